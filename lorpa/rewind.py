"""Lottery-ticket rewinding: remember each adapter's values at injection time.

Classic lottery-ticket pruning resets the surviving weights to their initial values. peft does not
keep those, so they are recorded here when the adapters are created and pruned along with them.
The snapshot is kept on each layer (`lorpa.layers.layer_state`), so it never enters peft's saved adapter.
"""

from __future__ import annotations

import peft
import torch
from torch import nn

from .layers import factors, layer_state, lora_layers, resolve_adapter, set_layer_state, unwrap

SNAPSHOT_ATTR = "_lorpa_init"


def record_init(model: nn.Module, adapter_name: str | None = None) -> None:
    """Snapshot the current LoRA factors (call right after the adapters are injected)."""
    model = unwrap(model)
    adapter_name = resolve_adapter(model, adapter_name)
    for layer in lora_layers(model, adapter_name).values():
        lora_A, lora_B = factors(layer, adapter_name)
        snapshot = (lora_A.detach().cpu().clone(), lora_B.detach().cpu().clone())
        set_layer_state(layer, SNAPSHOT_ATTR, adapter_name, snapshot)


def get_peft_model(model: nn.Module, config: peft.LoraConfig, **kwargs) -> peft.PeftModel:
    """`peft.get_peft_model` that also records the injection-time values needed by `rewind="init"`."""
    peft_model = peft.get_peft_model(model, config, **kwargs)
    record_init(peft_model)
    return peft_model


def init_snapshot(layer: nn.Module, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    return layer_state(layer, SNAPSHOT_ATTR, adapter_name)


def init_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The snapshots as a flat state dict, so a resumed run can still rewind."""
    model = unwrap(model)
    adapter_name = resolve_adapter(model, adapter_name)
    state = {}
    for name, layer in lora_layers(model, adapter_name).items():
        snapshot = init_snapshot(layer, adapter_name)
        if snapshot is not None:
            state[f"{name}.lora_A"], state[f"{name}.lora_B"] = snapshot
    return state


def load_init_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
    model = unwrap(model)
    adapter_name = resolve_adapter(model, adapter_name)
    for name, layer in lora_layers(model, adapter_name).items():
        snapshot = (state[f"{name}.lora_A"], state[f"{name}.lora_B"])
        set_layer_state(layer, SNAPSHOT_ATTR, adapter_name, snapshot)
