"""Linear algebra on a LoRA update ΔW = s·B·A through its factors, never forming the out × in matrix.

For r ≪ min(out, in) everything here costs O((out + in)·r²), so it runs in milliseconds even on the
adapters of a 7B model, where ΔW itself would be 4096 × 11008. Two rewritings of B·A order its
components for truncation: `singular_factors` by weight (the best rank-k approximation of ΔW) and
`output_factors` by output on calibration inputs (the best rank-k approximation of ΔW·X).
"""

from __future__ import annotations

import math

import torch

from .errors import InputError
from .options import SVD_SPLITS


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
        raise InputError(f"unknown svd split {split!r}; choose one of {', '.join(SVD_SPLITS)}")
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


def singular_values(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """σ of B·A, descending, without the factors (`singular_factors` without its rotation): float32 from float64."""
    A, B = lora_A.detach().double(), lora_B.detach().double()
    r_b = torch.linalg.qr(B, mode="r").R
    r_a = torch.linalg.qr(A.t(), mode="r").R
    return torch.linalg.svdvals(r_b @ r_a.t()).float()


def output_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, gram: torch.Tensor):
    """Re-express B·A in the basis that orders its output on the calibration inputs: (A', B', λ, w) with
    B'·A' = B·A and λ descending, where G = (A·X)(A·X)ᵀ for inputs X (`lorpa.calibrate`).

    With B = Q_B·R_B (thin QR) and R_B·G·R_Bᵀ = V·Λ·Vᵀ, B·A·X = (Q_B·V)·(Vᵀ·R_B·A·X) and the rows of the
    second factor are orthogonal with squared norms λ: Q_B·V are the left singular vectors of B·A·X.
    Keeping the first k components, B'_k·A'_k = P_k·B·A with P_k the projector on the top k of them, is
    the rank-k M that minimises ‖(B·A − M)·X‖_F (the argument of activation-aware SVD for base weights),
    and Σ_{j>k} λ_j / Σ λ_j is its squared relative output error. A diagonal then gives each component
    equal factor norms (‖B'[:,j]‖ = ‖A'[j,:]‖), which leaves B'·A' unchanged. w_j = ‖B'[:,j]‖²·‖A'[j,:]‖²
    are the components' weight energies: the columns of Q_B·V are orthonormal, so dropping a set D of
    them changes ‖ΔW‖_F² by exactly Σ_D w_j. Computed in float64, returned in the input dtype.
    """
    A, B, G = lora_A.detach().double(), lora_B.detach().double(), gram.to(device=lora_A.device, dtype=torch.float64)
    q_b, r_b = torch.linalg.qr(B)
    energy, vectors = torch.linalg.eigh(r_b @ G @ r_b.t())
    energy, vectors = energy.flip(0).clamp_min(0), vectors.flip(1)
    new_B, new_A = q_b @ vectors, vectors.t() @ r_b @ A
    weight = new_A.square().sum(dim=1)  # ‖A'[j,:]‖² with ‖B'[:,j]‖ = 1
    balance = weight.sqrt().sqrt()
    balance[balance == 0] = 1
    new_B, new_A = new_B * balance[None, :], new_A / balance[:, None]
    return new_A.to(lora_A.dtype), new_B.to(lora_B.dtype), energy.float(), weight.float()


def weight_gram(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """H = (BᵀB) ∘ (AAᵀ), so that ‖Σ_i c_i·B[:,i]·A[i,:]‖_F² = cᵀ·H·c for any weights c.

    The Gram products run in float32 (they dominate the cost); H is returned in float64 for the sums.
    """
    A, B = lora_A.detach().float(), lora_B.detach().float()
    return (B.t() @ B).double() * (A @ A.t()).double()


def kept_error(gram: torch.Tensor, kept: torch.Tensor, scale: float, new_scale: float) -> float:
    """‖ΔW − ΔW'‖_F / ‖ΔW‖_F when ΔW = s·Σ_i B[:,i]A[i,:] and ΔW' = s'·Σ_{i ∈ kept} B[:,i]A[i,:].

    `gram` is H of `weight_gram`, or its diagonal when the components are orthogonal (the singular or
    output basis). The difference has weights c_i = s (dropped) and s − s' (kept); with H positive
    semi-definite cᵀ·H·c is a sum that cannot cancel below zero, so float32 Gram products suffice.
    An update that was zero (untrained B) has error 0 if it stays zero, else infinity.
    """
    weights = torch.full((gram.shape[0],), float(scale), dtype=torch.float64, device=gram.device)
    weights[kept.to(gram.device)] = scale - new_scale
    if gram.dim() == 1:
        difference, norm = (weights.square() * gram).sum(), scale * scale * gram.sum()
    else:
        difference, norm = weights @ gram @ weights, scale * scale * gram.sum()
    difference, norm = float(difference.clamp_min(0).sqrt()), float(norm.clamp_min(0).sqrt())
    if norm == 0:
        return 0.0 if difference == 0 else math.inf
    return difference / norm


def output_error(before: tuple, after: tuple, gram: torch.Tensor) -> float | None:
    """‖(ΔW − ΔW')·X‖_F / ‖ΔW·X‖_F on the calibration inputs, for (A, B, scale) triples, from G = (A·X)(A·X)ᵀ.

    ΔW'·X is known from G when A' = W·A (kept, rotated or rescaled components): then
    (ΔW − ΔW')·X = (s·B − s'·B'·W)·Z and its squared norm is ⟨CᵀC, G⟩ with C = s·B − s'·B'·W.
    None when A' leaves the row space of A (rewound initial values), where G says nothing.
    """
    (a0, b0, s0), (a1, b1, s1) = before, after
    A0, B0 = a0.detach().double(), b0.detach().double()
    A1, B1 = a1.detach().to(A0), b1.detach().to(B0)
    G = gram.to(A0)
    transform = A1 @ torch.linalg.pinv(A0)
    if torch.linalg.norm(A1 - transform @ A0) > 1e-4 * max(float(torch.linalg.norm(A1)), 1e-30):
        return None
    difference = s0 * B0 - s1 * B1 @ transform
    error = float(torch.sum((difference.t() @ difference) * G).clamp_min(0).sqrt())
    norm = float((s0 * s0 * torch.sum((B0.t() @ B0) * G)).clamp_min(0).sqrt())
    if norm == 0:
        return 0.0 if error == 0 else math.inf
    return error / norm


def relative_error(before: tuple, after: tuple) -> float:
    """‖ΔW_before − ΔW_after‖_F / ‖ΔW_before‖_F for any (A, B, scale) triples, scaling included (used where the
    kept factors are no subset of the old ones: rewound initial values; `kept_error` covers the rest).

    ‖s₀B₀A₀ − s₁B₁A₁‖² = s₀²⟨B₀ᵀB₀, A₀A₀ᵀ⟩ − 2s₀s₁⟨B₀ᵀB₁, A₀A₁ᵀ⟩ + s₁²⟨B₁ᵀB₁, A₁A₁ᵀ⟩: the r₀ × r₀ Gram
    matrices of the update before, which its norm needs anyway, are the only costly part.
    An update that was zero before (untrained B) has error 0 if it stays zero, else infinity.
    """
    (a0, b0, s0), (a1, b1, s1) = before, after
    A0, B0 = a0.detach().double(), b0.detach().double()
    A1 = a1.detach().to(device=a0.device, dtype=torch.float64)
    B1 = b1.detach().to(device=b0.device, dtype=torch.float64)
    squared_norm = s0 * s0 * torch.sum((B0.t() @ B0) * (A0 @ A0.t()))
    cross = s0 * s1 * torch.sum((B0.t() @ B1) * (A0 @ A1.t()))
    kept = s1 * s1 * torch.sum((B1.t() @ B1) * (A1 @ A1.t()))
    norm = float(squared_norm.clamp_min(0).sqrt())
    difference = float((squared_norm - 2 * cross + kept).clamp_min(0).sqrt())
    if norm == 0:
        return 0.0 if difference == 0 else math.inf
    return difference / norm
