"""Linear algebra on a LoRA update ΔW = s·B·A through its factors, never forming the out × in matrix.

For r ≪ min(out, in) everything here costs O((out + in)·r²), so it runs in milliseconds even on the
adapters of a 7B model, where ΔW itself would be 4096 × 11008.
"""

from __future__ import annotations

import math

import torch

SVD_SPLITS = ("balanced", "orthonormal_a")


def singular_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, split: str = "balanced"):
    """Re-express B·A in its singular basis: (A', B', σ) with B'·A' = B·A and σ descending.

    With B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR), B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ, so the SVD of the r × r
    core, U·S·Vᵀ, gives B·A = (Q_B·U)·S·(Q_A·V)ᵀ. Keeping the first k components of (A', B') is then
    the best rank-k approximation of B·A (Eckart–Young).

    split: "balanced" gives each factor √S (A' = √S·Vᵀ, B' = U·√S: equal norms, as PiSSA
        initialises); "orthonormal_a" gives A' orthonormal rows and B' = U·S.
    Computed in float64 and returned in the input dtype.
    """
    if split not in SVD_SPLITS:
        raise ValueError(f"unknown svd split {split!r}; choose one of {', '.join(SVD_SPLITS)}")
    A, B = lora_A.detach().double(), lora_B.detach().double()
    q_b, r_b = torch.linalg.qr(B)
    q_a, r_a = torch.linalg.qr(A.t())
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.t())
    left, right = q_b @ u, vh @ q_a.t()  # out × r, r × in
    if split == "balanced":
        root = sigma.sqrt()
        new_A, new_B = root[:, None] * right, left * root[None, :]
    else:
        new_A, new_B = right, left * sigma[None, :]
    return new_A.to(lora_A.dtype), new_B.to(lora_B.dtype), sigma.float()


def relative_error(before: tuple, after: tuple) -> float:
    """‖ΔW_before − ΔW_after‖_F / ‖ΔW_before‖_F for (A, B, scale) triples, scaling included.

    ‖s₀B₀A₀ − s₁B₁A₁‖² = s₀²⟨B₀ᵀB₀, A₀A₀ᵀ⟩ − 2s₀s₁⟨B₀ᵀB₁, A₀A₁ᵀ⟩ + s₁²⟨B₁ᵀB₁, A₁A₁ᵀ⟩: the r₀ × r₀ Gram
    matrices of the update before, which its norm needs anyway, are the only costly part.
    An update that was zero before (untrained B) has error 0 if it stays zero, else infinity.
    """
    (a0, b0, s0), (a1, b1, s1) = before, after
    A0, B0 = a0.detach().double(), b0.detach().double()
    A1, B1 = a1.detach().to(device=a0.device, dtype=torch.float64), b1.detach().to(device=b0.device, dtype=torch.float64)
    squared_norm = s0 * s0 * torch.sum((B0.t() @ B0) * (A0 @ A0.t()))
    cross = s0 * s1 * torch.sum((B0.t() @ B1) * (A0 @ A1.t()))
    kept = s1 * s1 * torch.sum((B1.t() @ B1) * (A1 @ A1.t()))
    norm, difference = float(squared_norm.clamp_min(0).sqrt()), float((squared_norm - 2 * cross + kept).clamp_min(0).sqrt())
    if norm == 0:
        return 0.0 if difference == 0 else math.inf
    return difference / norm
