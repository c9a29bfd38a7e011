"""LoRATRF, LoRA with a task-aware filter (Li, Ding, Luan, Di, arXiv 2412.09827), RECONSTRUCTED.

No code was published and the paper's method section could not be read: this follows the
reconstruction of spec §2.3 (from a third-party summary, §2.2). On the output h (..., d) of an adapted
layer, with a learnable task vector t (d,) and a transformation T (d, d):

    g_i = clamp(sim(h_i, t), 0, 1)          per-token scalar gate; sim = cosine or dot product (§2.6 Q2)
    h_i ← h_i + g_i · h_i · T              the filtered feature, enhanced, added back (row-vector convention)

    T = C D   (low_rank; C (d, k), D (k, d), D = 0 at start: spec §2.3)
    T = D     (dense; D (d, d))      T = diag(D)  (diagonal; D (d,))      (§2.6 Q4)

The LoRA part on the weight itself (ΔW = (α/r)·B·A) is plain LoRA and lives in the tuner layer.
"""

from __future__ import annotations

from typing import Optional

import torch

SIMILARITIES = ("cosine", "dot")
TRANSFORMS = ("low_rank", "diagonal", "dense")


def task_gate(h: torch.Tensor, task_vector: torch.Tensor, similarity: str, eps: float = 1e-8) -> torch.Tensor:
    """g = clamp(sim(h, t), 0, 1) per token: h (..., d), t (d,) → (..., 1)."""
    score = h @ task_vector  # (...)
    if similarity == "cosine":
        score = score / (h.norm(dim=-1).clamp_min(eps) * task_vector.norm().clamp_min(eps))
    elif similarity != "dot":
        raise ValueError(f"unknown similarity {similarity!r}; choose one of {SIMILARITIES}.")
    return score.clamp(0.0, 1.0).unsqueeze(-1)


def position_mask(seq_len: int, first: int, last: int, device: torch.device) -> torch.Tensor:
    """(seq_len, 1) mask selecting the first ``first`` and the last ``last`` positions (LoReFT's f<p>+l<s>)."""
    index = torch.arange(seq_len, device=device)
    return ((index < first) | (index >= seq_len - last)).unsqueeze(-1)


def enhance(h: torch.Tensor, gate: torch.Tensor, D: torch.Tensor, C: Optional[torch.Tensor] = None) -> torch.Tensor:
    """g · h · T for h (..., d), gate (..., 1) → (..., d), without forming a d×d matrix for low_rank."""
    if C is not None:  # low_rank: (g·h C) D, the gate applied on the k-wide side (cheaper forward and backward)
        return (gate * (h @ C)) @ D  # (..., d) → (..., k) → (..., d)
    if D.ndim == 1:  # diagonal
        return gate * h * D
    return gate * (h @ D)  # dense


def transformation(D: torch.Tensor, C: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense T (d, d) (for tests and analysis; the forward never builds it)."""
    if C is not None:
        return C @ D
    return torch.diag(D) if D.ndim == 1 else D


def filter_delta(
    h: torch.Tensor,
    task_vector: torch.Tensor,
    D: torch.Tensor,
    C: Optional[torch.Tensor] = None,
    similarity: str = "cosine",
    first: int = 0,
    last: int = 0,
) -> torch.Tensor:
    """What the filter adds to h: g·h·T (..., d). With ``first``/``last`` > 0 only those positions of the
    sequence axis (dim -2 of h, which must then be (..., seq, d)) are edited (§2.6 Q5)."""
    gate = task_gate(h, task_vector, similarity)
    if first or last:
        gate = gate * position_mask(h.shape[-2], first, last, h.device)
    return enhance(h, gate, D, C)
