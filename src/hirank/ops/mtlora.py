"""MTLoRA, the matrix-transformation LoRA of Liang, Wang, Li, Zeng (arXiv 2403.07440; spec §1).

Not the multi-task MTLoRA of Agiza et al. (CVPR 2024). An r×r transformation T sits between LoRA's
factors (spec §1.2):

    y = W0 x + b + s · B · T · A · dropout(x),    s = α / r
    A: (r, d_in)   B: (d_out, r)   T: (r, r) built from C (and D), each (r, r)

    SHIM  T = C        ICFM  T = C Cᵀ        CTCM  T = C D        DTSM  T = C + D

rank(ΔW) ≤ r as for LoRA: T changes the optimisation geometry, not the hypothesis class (spec §1.2).
"""

from __future__ import annotations

from typing import Optional

import torch

VARIANTS = ("shim", "icfm", "ctcm", "dtsm")
#: variants whose T is built from two factors C and D (2r² parameters instead of r²)
TWO_FACTOR_VARIANTS = ("ctcm", "dtsm")
INIT_T = ("identity", "random", "zeros")


def transformation(variant: str, C: torch.Tensor, D: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T (r, r) of a variant from its factors C (r, r) and, for CTCM/DTSM, D (r, r) (spec §1.2 table)."""
    if variant == "shim":
        return C
    if variant == "icfm":
        return C @ C.T  # C Cᵀ everywhere (the authors' embedding forward used CᵀC, a bug: spec §1.5)
    if D is None:
        raise ValueError(f"variant {variant!r} needs the second factor D.")
    if variant == "ctcm":
        return C @ D
    if variant == "dtsm":
        return C + D
    raise ValueError(f"unknown MTLoRA variant {variant!r}; choose one of {VARIANTS}.")


def delta_weight(A: torch.Tensor, B: torch.Tensor, T: torch.Tensor, scaling: float) -> torch.Tensor:
    """Dense ΔW = s · B T A, shape (d_out, d_in); the cheaper association for the given shapes."""
    return scaling * (B @ (T @ A))  # (d_out, r) @ ((r, r) @ (r, d_in))


def forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, T: torch.Tensor, scaling: float) -> torch.Tensor:
    """Adapter branch s · B T A x for x (..., d_in) → (..., d_out): LoRA's cost plus one r×r matmul per token.

    s is folded into the r×r matrix, so no elementwise pass over the d_out-wide output is needed."""
    return ((x @ A.T) @ (scaling * T).T) @ B.T  # (..., r) → (..., r) → (..., d_out)


def initial_factors(
    variant: str, init_T: str, r: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Initial (C, D) for ``init_T`` (spec §1.3); D is None for SHIM and ICFM.

    identity: T = I (the authors' README tip). SHIM/ICFM C = I; CTCM C = D = I; DTSM C = I, D = 0 (our
    choice of the two readings of "C + D = I": under SGD/Adam both give the same updates to T).
    random: C, D kaiming-uniform like an nn.Linear(r, r) (the authors' NLU/NLG code).
    zeros: C = D = 0 (the authors' LLaVA code); T = 0 is a saddle with zero gradients for ICFM and CTCM.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown MTLoRA variant {variant!r}; choose one of {VARIANTS}.")
    two = variant in TWO_FACTOR_VARIANTS
    if init_T == "identity":
        C = torch.eye(r, dtype=dtype)
        D = (torch.eye(r, dtype=dtype) if variant == "ctcm" else torch.zeros(r, r, dtype=dtype)) if two else None
    elif init_T == "random":
        C = random_square(r, dtype)
        D = random_square(r, dtype) if two else None
    elif init_T == "zeros":
        C = torch.zeros(r, r, dtype=dtype)
        D = torch.zeros(r, r, dtype=dtype) if two else None
    else:
        raise ValueError(f"unknown init_T {init_T!r}; choose one of {INIT_T}.")
    return C, D


def random_square(r: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An (r, r) matrix drawn like nn.Linear(r, r).weight: uniform in ±1/√r (kaiming-uniform, a = √5)."""
    bound = r**-0.5
    return torch.empty(r, r, dtype=dtype).uniform_(-bound, bound)
