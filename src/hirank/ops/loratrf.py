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

from .chunks import gather_rows, sum_over_chunks, token_chunks

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


class _FilteredOutput(torch.autograd.Function):
    """y = h + g·h·T (low_rank T = C·D, or diagonal T = diag(D)) saving only y and per-token scalars (k + 2 values)
    for backward: h is recovered from y (low_rank: h = y − (g·hC)·D; diagonal: h = y / (1 + g·D)) and y is what
    the next op saves anyway (GELU, attention), so the filter adds ≈ nothing to activation memory where autograd's
    own path keeps h, h·t, |h|, hC, ... Gradients follow :func:`filter_delta` (clamp and clamp_min pass the bounds).

    Everything runs in h's dtype (the caller casts t, C, D to it), so that y is the very tensor the next op saves.
    Diagonal: y / s with the same s recomputed is h to two roundings for any s ≠ 0; s = 1 + g·D_j lies between 1
    and 1 + D_j (g ∈ [0, 1]), so it is never 0 while every D_j > −1. Where it is exactly 0 (a feature with
    D_j ≤ −1 that the filter erases), y holds nothing of h and backward counts h as 0 there: no host sync decides
    (on CPU in eager mode, where reading a bool costs none, the test of each entry is skipped while every D_j > −1).
    """

    @staticmethod
    def forward(ctx, h, task_vector, D, C, cosine: bool, mask, eps: float):  # type: ignore[override]
        # in h's dtype even under autocast: backward (which runs without autocast) reuses y and u
        with torch.autocast(h.device.type, enabled=False):
            return _FilteredOutput._forward(ctx, h, task_vector, D, C, cosine, mask, eps)

    @staticmethod
    def _forward(ctx, h, task_vector, D, C, cosine: bool, mask, eps: float) -> torch.Tensor:
        shape = h.shape
        h = h.reshape(-1, shape[-1])  # (n, d)
        rows = h.shape[0]
        probe = task_vector.unsqueeze(-1) if C is None else torch.cat([C, task_vector.unsqueeze(-1)], dim=1)
        t_norm = torch.linalg.vector_norm(task_vector) if cosine else None
        y = u = cosine_score = h_norm = None
        for part in token_chunks(rows, shape[-1], h.device, few_steps=True):
            h_part = h[part]
            projected = h_part @ probe  # (t, k+1) low_rank: [hC, h·t]; diagonal: (t, 1) [h·t]
            score = projected[:, -1]
            if cosine:
                part_norm = torch.linalg.vector_norm(h_part, dim=-1)
                h_norm = gather_rows(h_norm, part, part_norm, rows)
                score = score / (part_norm.clamp_min(eps) * t_norm.clamp_min(eps))
            cosine_score = gather_rows(cosine_score, part, score, rows)
            gate = score.clamp(0.0, 1.0)
            if mask is not None:
                gate = gate * mask[part]
            if C is not None:  # y = h + (g·hC)·D
                y_part = torch.addmm(h_part, gate.unsqueeze(-1) * projected[:, :-1], D)
                u = gather_rows(u, part, projected[:, :-1], rows)
            else:  # y = h ⊙ (1 + g·D)
                y_part = h_part * torch.addcmul(torch.ones_like(D), gate.unsqueeze(-1), D)  # the scale is transient
            y = gather_rows(y, part, y_part, rows)
        y = y.reshape(shape)
        ctx.cosine, ctx.eps = cosine, eps
        ctx.save_for_backward(y, u, cosine_score, h_norm, t_norm, task_vector, D, C, mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        y, u, cosine_score, h_norm, t_norm, task_vector, D, C, mask = ctx.saved_tensors
        shape = grad_y.shape
        dy = grad_y.reshape(-1, shape[-1])
        y = y.reshape(-1, shape[-1])
        rows = dy.shape[0]
        probe = task_vector.unsqueeze(-1) if C is None else torch.cat([C, task_vector.unsqueeze(-1)], dim=1)
        scale_never_zero = C is None and _scale_never_zero(D)
        grad_h = grad_D = grad_probe = t_sum = None
        for part in token_chunks(rows, shape[-1], dy.device, few_steps=True):
            part_grad_h, part_grads = _FilteredOutput._backward_rows(
                ctx, dy[part], y[part], None if u is None else u[part], cosine_score[part],
                None if h_norm is None else h_norm[part], t_norm, probe, D, C, None if mask is None else mask[part],
                scale_never_zero)
            grad_h = gather_rows(grad_h, part, part_grad_h, rows)
            grad_D, grad_probe, t_sum = (sum_over_chunks(total, value) if value is not None else None
                                         for total, value in zip((grad_D, grad_probe, t_sum), part_grads))
        grad_t = grad_probe[:, -1]
        if ctx.cosine:  # no host sync: |t| < eps (clamped) passes no gradient through |t|
            t_term = torch.where(t_norm >= ctx.eps, t_sum / t_norm.square(), 0.0)
            grad_t = grad_t - t_term * task_vector
        grad_C = grad_probe[:, :-1].to(C.dtype) if C is not None else None
        return (grad_h.reshape(shape), grad_t.to(task_vector.dtype), grad_D.to(D.dtype), grad_C, None, None, None)

    @staticmethod
    def _backward_rows(ctx, dy, y, u, cosine_score, h_norm, t_norm, probe, D, C, mask, scale_never_zero: bool):
        """One chunk of rows: (∂L/∂h, (its terms of ∂L/∂D, ∂L/∂probe, Σ ∂L/∂score·score or None))."""
        gate = cosine_score.clamp(0.0, 1.0)
        passes = (cosine_score >= 0) & (cosine_score <= 1)  # clamp's gradient mask
        if mask is not None:
            gate = gate * mask
            passes = passes & mask.bool()
        g = gate.unsqueeze(-1)
        if C is not None:
            v = g * u  # (t, k)
            h = torch.addmm(y, v, D, alpha=-1.0)  # h = y − v·D
            dv = dy @ D.T  # (t, k)
            grad_D = v.T @ dy  # (k, d)
            grad_gate = (dv * u).sum(-1)
            grad_u = g * dv
        else:
            scale = torch.addcmul(torch.ones_like(D), g, D)
            h = y / scale if scale_never_zero else torch.where(scale == 0, 0.0, y / scale)  # class docstring
            hdy = h * dy
            grad_D = hdy.T @ gate  # (d,)
            grad_gate = hdy @ D
            grad_u = None
        grad_score = torch.where(passes, grad_gate, torch.zeros_like(grad_gate))
        t_sum = None
        if ctx.cosine:  # c = s / (|h|·|t|)
            h_scale = h_norm.clamp_min(ctx.eps)
            t_scale = t_norm.clamp_min(ctx.eps)
            a = grad_score / (h_scale * t_scale)  # ∂L/∂s
            h_term = torch.where(h_norm >= ctx.eps, grad_score * cosine_score / h_norm.square(), 0.0)
            t_sum = (grad_score * cosine_score).sum()
        else:
            a, h_term = grad_score, None
        w = a.unsqueeze(-1) if grad_u is None else torch.cat([grad_u, a.unsqueeze(-1)], dim=1)  # (t, k+1)
        base = dy if C is not None else dy * scale
        grad_h = torch.addmm(base, w, probe.T)
        if h_term is not None:
            grad_h = grad_h.addcmul_(h_term.unsqueeze(-1), h, value=-1.0)
        return grad_h, (grad_D, h.T @ w, t_sum)


def _scale_never_zero(D: torch.Tensor) -> bool:
    """Whether every D_j > −1, read where a bool costs no device sync (CPU, eager): then 1 + g·D_j > 0 for every
    gate g ∈ [0, 1], also in floating point, and backward recovers h = y / (1 + g·D) without testing each entry
    for 0 (two passes fewer over the layer output)."""
    return D.device.type == "cpu" and not torch.compiler.is_compiling() and bool((D > -1).all())


def filtered_output(
    h: torch.Tensor,
    task_vector: torch.Tensor,
    D: torch.Tensor,
    C: Optional[torch.Tensor] = None,
    similarity: str = "cosine",
    first: int = 0,
    last: int = 0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """The filtered h: h + :func:`filter_delta`, in h's dtype (t, C, D are cast to it: under bf16 the filter
    runs in bf16, like the layer around it), memory-lean (:class:`_FilteredOutput`) for low_rank and diagonal T;
    the dense T goes through autograd."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; choose one of {SIMILARITIES}.")
    task_vector, D = task_vector.to(h.dtype), D.to(h.dtype)
    C = None if C is None else C.to(h.dtype)
    if C is None and D.ndim == 2:
        return h + filter_delta(h, task_vector, D, C, similarity, first, last)
    mask = None
    if first or last:  # (seq,) broadcast over the leading axes of the flattened (batch·seq) tokens
        mask = position_mask(h.shape[-2], first, last, h.device).squeeze(-1).to(h.dtype)
        mask = mask.expand(h.shape[:-1]).reshape(-1)
    return _FilteredOutput.apply(h, task_vector, D, C, similarity == "cosine", mask, eps)
