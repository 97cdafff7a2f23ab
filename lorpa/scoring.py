"""Importance scores for the rank components of LoRA adapters.

Component i of an adapter is the rank-1 matrix B[:, i] ⊗ A[i, :]. A score is one number per
component; pruning keeps the highest-scoring ones. The rotated scores change the components first:
`svd` scores the singular directions of ΔW = s·B·A (`lowrank.singular_factors`), `activation` the
directions of ΔW·X on calibration inputs X (`lowrank.output_factors`, after `lorpa.calibrate`); `prune`
rewrites the adapter in that basis before it keeps the leading directions. Everything here works on tensors:
`lorpa.plan` calls it for live layers and saved files alike.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from .errors import InputError
from .lowrank import output_factors, singular_factors


def magnitude_scores(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """Σ|B[:,i] ⊗ A[i,:]| = ‖B[:,i]‖₁·‖A[i,:]‖₁ (the paper's score), without the out × in matrix."""
    return lora_B.detach().abs().sum(dim=0) * lora_A.detach().abs().sum(dim=1)


def elementwise_scores(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """Σ_j |B[j,i]·A[i,j]|: the authors' released code, kept for faithful reproduction.

    It pairs output j with input j, so it is only defined for square layers.
    """
    if lora_B.shape[0] != lora_A.shape[1]:
        raise InputError(f"elementwise score needs in_features == out_features, got in={lora_A.shape[1]}, "
                         f"out={lora_B.shape[0]}")
    return (lora_B.detach().t() * lora_A.detach()).abs().sum(dim=1)


def random_scores(rank: int, seed: int, module_name: str) -> torch.Tensor:
    """A seeded random ranking (the lottery-ticket baseline), the same on every process and device."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module_name.encode()))
    return torch.rand(rank, generator=generator)


@dataclass
class Rotation:
    """One module's update rewritten for a rotated score: factors whose components are kept instead of the
    stored ones, each component's `amplitude` (its size: |s|·σ, or |s|·√(λ / tokens), the root mean square
    it adds to the layer's output per calibration token), descending, and its weight energy (squared
    Frobenius norm of B'[:,j]·A'[j,:]; the components are orthogonal, so these add up)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    amplitude: torch.Tensor
    weight_energy: torch.Tensor

    def ranking(self, norm: str) -> torch.Tensor:
        """The scores a budget ranks: amplitudes as they are (comparable across modules), or each one's share of
        its module's (√ of its energy over the module's total energy)."""
        if norm == "absolute":
            return self.amplitude.float().cpu()
        total = float(self.amplitude.double().square().sum())
        return (self.amplitude / math.sqrt(total) if total > 0 else torch.zeros_like(self.amplitude)).float().cpu()


def rotate(score: str, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, calibration,
           split: str = "balanced"):
    """The module's `Rotation` for `svd` or `activation` (which needs the layer's calibration)."""
    if score == "svd":
        new_A, new_B, sigma = singular_factors(lora_A, lora_B, split)
        return Rotation(new_A, new_B, abs(scaling) * sigma, sigma.double().square())
    new_A, new_B, energy, weight = output_factors(lora_A, lora_B, calibration.gram)
    per_token = energy.double() / max(calibration.tokens, 1)
    return Rotation(new_A, new_B, (abs(scaling) * per_token.sqrt()).float(), weight.double())
