"""Finding the LoRA layers of a peft model, whatever wraps it.

Every other module works on the mapping returned by `lora_layers`: full module names relative to
the base model (the names peft matches `rank_pattern` keys against) to peft `LoraLayer`s.
"""

from __future__ import annotations

from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from .errors import InputError


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / accelerate wrappers, which all keep the real model in `.module`."""
    while not isinstance(model, PeftModel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def resolve_adapter(model: nn.Module, adapter_name: str | None) -> str:
    """The adapter to work on: the given one, else the model's single active adapter."""
    if adapter_name is not None:
        return adapter_name
    active = getattr(model, "active_adapter", "default")
    if isinstance(active, (list, tuple)):
        if len(active) != 1:
            raise InputError(f"model has several active adapters {list(active)}: pass adapter_name")
        active = active[0]
    return active


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under the peft wrappers; its module names are peft's pattern keys."""
    model = unwrap(model)
    return model.get_base_model() if isinstance(model, PeftModel) else model


def lora_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, LoraLayer]:
    """Every LoRA layer holding `adapter_name`, keyed by full module name, in model order.

    Only layers whose factors are `nn.Linear` (peft's Linear and Conv1D targets) are supported:
    the rank-1 decomposition the pruning relies on is exact there. DoRA, embedding and
    convolution adapters raise, since dropping rank components means something else for them.
    """
    model = unwrap(model)
    adapter_name = resolve_adapter(model, adapter_name)
    layers = {}
    for name, module in base_model(model).named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        if module.use_dora.get(adapter_name, False):
            raise InputError(f"{name}: DoRA adapters cannot be rank-pruned (the magnitude vector depends on all "
                             "ranks)")
        factors = (module.lora_A[adapter_name], module.lora_B[adapter_name])
        if not all(type(f) is nn.Linear for f in factors):
            raise InputError(f"{name}: only LoRA on linear layers can be rank-pruned, found {type(module).__name__}")
        layers[name] = module
    if not layers:
        raise InputError(f"model has no LoRA layers for adapter {adapter_name!r}")
    return layers


def factors(layer: LoraLayer, adapter_name: str):
    """(A, B) weights: A is r × in, B is out × r."""
    return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight


def layer_state(layer: LoraLayer, key: str, adapter_name: str):
    """What LoRPA recorded on a layer for an adapter (calibration, sensitivity, injection-time values), or None.

    Kept as a plain attribute, not a buffer, so it never enters peft's saved adapter."""
    return layer.__dict__.get(key, {}).get(adapter_name)


def set_layer_state(layer: LoraLayer, key: str, adapter_name: str, value) -> None:
    """Record `value` on the layer for the adapter; None removes the record."""
    states = layer.__dict__.setdefault(key, {})
    if value is None:
        states.pop(adapter_name, None)
    else:
        states[adapter_name] = value
