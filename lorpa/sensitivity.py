"""First-order sensitivity of rank components, tracked while training (`score="sensitivity"`).

|θ·∂L/∂θ| is the first-order change of the loss if θ were zeroed; component i's sensitivity is its sum
over row i of A and column i of B, i.e. what dropping the component would cost. One batch's gradient
is noisy, so the value is an exponential moving average over optimizer steps, as AdaLoRA smooths its
importance (Ī ← β·Ī + (1−β)·I from Ī = 0, β = 0.85): the last steps before the prune dominate.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .errors import InputError
from .layers import factors, layer_state, lora_layers, resolve_adapter, set_layer_state, unwrap

SENSITIVITY_ATTR = "_lorpa_sensitivity"
DEFAULT_BETA = 0.85


def component_sensitivity(lora_A: nn.Parameter, lora_B: nn.Parameter) -> torch.Tensor:
    """Σ_j |A[i,j]·∂L/∂A[i,j]| + Σ_j |B[j,i]·∂L/∂B[j,i]| for each component i, from the current gradients."""
    total = torch.zeros(lora_A.shape[0], dtype=torch.float32, device=lora_A.device)
    if lora_A.grad is not None:
        total += (lora_A.detach() * lora_A.grad).abs().float().sum(dim=1)
    if lora_B.grad is not None:
        total += (lora_B.detach() * lora_B.grad).abs().float().sum(dim=0)
    return total


def tracked_sensitivity(layer: nn.Module, adapter_name: str) -> torch.Tensor | None:
    return layer_state(layer, SENSITIVITY_ATTR, adapter_name)


def update_sensitivity(model: nn.Module, beta: float = DEFAULT_BETA, adapter_name: str | None = None) -> None:
    """Fold the current gradients into every LoRA layer's moving average (call before the optimizer step)."""
    model = unwrap(model)
    adapter_name = resolve_adapter(model, adapter_name)
    for layer in lora_layers(model, adapter_name).values():
        current = component_sensitivity(*factors(layer, adapter_name))
        previous = tracked_sensitivity(layer, adapter_name)
        previous = torch.zeros_like(current) if previous is None else previous.to(current.device)
        set_layer_state(layer, SENSITIVITY_ATTR, adapter_name, beta * previous + (1 - beta) * current)


def sensitivity_state(model: nn.Module, adapter_name: str | None = None) -> dict[str, list[float]]:
    """The moving averages as plain lists (float32 values survive JSON exactly)."""
    model = unwrap(model)
    adapter_name = resolve_adapter(model, adapter_name)
    state = {}
    for name, layer in lora_layers(model, adapter_name).items():
        values = tracked_sensitivity(layer, adapter_name)
        if values is not None:
            state[name] = values.cpu().tolist()
    return state


def load_sensitivity_state(model: nn.Module, state: dict[str, list[float]], adapter_name: str | None = None) -> None:
    model = unwrap(model)
    adapter_name = resolve_adapter(model, adapter_name)
    for name, layer in lora_layers(model, adapter_name).items():
        if name in state:
            values = torch.tensor(state[name], dtype=torch.float32)
            set_layer_state(layer, SENSITIVITY_ATTR, adapter_name, values)


class SensitivityCallback(TrainerCallback, ExportableState):
    """Tracks sensitivity during `Trainer.train`; `lorpa.prune(model, score="sensitivity")` then uses it.

    Its state goes into every checkpoint's trainer_state.json, so a resumed run prunes exactly as an
    uninterrupted one (see `restore_sensitivity`).
    """

    def __init__(self, beta: float = DEFAULT_BETA):
        if not 0 <= beta < 1:
            raise InputError(f"sensitivity beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        update_sensitivity(model, self.beta)

    def state(self) -> dict:
        scores = {} if self.model is None else sensitivity_state(self.model)
        return {"args": {"beta": self.beta}, "attributes": {"scores": scores}}


def restore_sensitivity(model: nn.Module, trainer_state: dict) -> bool:
    """Load the averages a checkpoint's trainer_state.json holds; False if it holds none."""
    stored = (trainer_state.get("stateful_callbacks") or {}).get(SensitivityCallback.__name__)
    if isinstance(stored, list):
        stored = stored[0] if stored else None
    if not stored:
        return False
    load_sensitivity_state(model, stored["attributes"]["scores"])
    return True
