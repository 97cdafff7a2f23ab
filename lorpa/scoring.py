"""Importance scores for the rank components of LoRA adapters.

Component i of an adapter is the rank-1 matrix B[:, i] ⊗ A[i, :]. A score is one number per
component; pruning keeps the highest-scoring ones. The `svd` score is the exception that changes the
components: it scores the singular directions of ΔW = s·B·A, which `prune` first rotates the adapter
into (see `lowrank.singular_factors`).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from .layers import factors, lora_layers, resolve_adapter, unwrap
from .lowrank import singular_factors
from .sensitivity import tracked_sensitivity

SCORES = ("magnitude", "elementwise", "random", "svd", "sensitivity")


def magnitude_scores(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """Σ|B[:,i] ⊗ A[i,:]| = ‖B[:,i]‖₁·‖A[i,:]‖₁ (the paper's score), without the out × in matrix."""
    return lora_B.detach().abs().sum(dim=0) * lora_A.detach().abs().sum(dim=1)


def elementwise_scores(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """Σ_j |B[j,i]·A[i,j]|: the authors' released code, kept for faithful reproduction.

    It pairs output j with input j, so it is only defined for square layers.
    """
    if lora_B.shape[0] != lora_A.shape[1]:
        raise ValueError(
            f"elementwise score needs in_features == out_features, got in={lora_A.shape[1]}, out={lora_B.shape[0]}"
        )
    return (lora_B.detach().t() * lora_A.detach()).abs().sum(dim=1)


def random_scores(rank: int, seed: int, module_name: str) -> torch.Tensor:
    """A seeded random ranking (the lottery-ticket baseline), the same on every process and device."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module_name.encode()))
    return torch.rand(rank, generator=generator)


def svd_scores(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """|s|·σ_i: the singular values of ΔW, comparable across modules with different scalings."""
    return abs(scaling) * singular_factors(lora_A, lora_B)[2]


def rank_scores(
    model: nn.Module, score: str = "magnitude", *, seed: int | None = None, adapter_name: str | None = None
) -> dict[str, torch.Tensor]:
    """Score every rank component of every LoRA module: {full module name: float tensor of length r}.

    Scores are returned in float32 on the CPU so that ties and thresholds do not depend on the
    training dtype or device. `svd` scores describe the singular basis, not the stored components;
    `sensitivity` needs a `SensitivityCallback` (or `update_sensitivity`) during training.
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    model = unwrap(model)
    adapter_name = resolve_adapter(model, adapter_name)
    scores = {}
    for name, layer in lora_layers(model, adapter_name).items():
        lora_A, lora_B = factors(layer, adapter_name)
        if score == "random":
            values = random_scores(lora_A.shape[0], 0 if seed is None else seed, name)
        elif score == "svd":
            values = svd_scores(lora_A, lora_B, layer.scaling[adapter_name])
        elif score == "sensitivity":
            values = tracked_sensitivity(layer, adapter_name)
            if values is None:
                raise ValueError(
                    f"{name}: no sensitivity was tracked; train with lorpa.SensitivityCallback "
                    "(or call lorpa.update_sensitivity before each optimizer step) before pruning"
                )
        elif score == "elementwise":
            values = elementwise_scores(lora_A.float(), lora_B.float())
        else:
            values = magnitude_scores(lora_A.float(), lora_B.float())
        scores[name] = values.float().cpu()
    return scores
