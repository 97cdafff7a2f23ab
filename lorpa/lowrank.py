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


def frobenius_norm(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float = 1.0) -> float:
    """‖s·B·A‖_F from trace((BᵀB)(AAᵀ)), two r × r Gram matrices."""
    A, B = lora_A.detach().double(), lora_B.detach().double()
    squared = torch.sum((B.t() @ B) * (A @ A.t())).clamp_min(0)
    return abs(scale) * float(squared.sqrt())


def relative_error(before: tuple, after: tuple) -> float:
    """‖ΔW_before − ΔW_after‖_F / ‖ΔW_before‖_F for (A, B, scale) triples, scaling included.

    The difference is itself a factored product: [B_before, B_after]·[s_b·A_before; −s_a·A_after].
    An update that was zero before (untrained B) has error 0 if it stays zero, else infinity.
    """
    (a0, b0, s0), (a1, b1, s1) = before, after
    a1 = a1.to(device=a0.device)
    b1 = b1.to(device=b0.device)
    norm = frobenius_norm(a0, b0, s0)
    difference = frobenius_norm(torch.cat([s0 * a0.double(), -s1 * a1.double()]), torch.cat([b0.double(), b1.double()], dim=1))
    if norm == 0:
        return 0.0 if difference == 0 else math.inf
    return difference / norm
