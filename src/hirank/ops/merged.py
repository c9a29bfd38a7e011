"""A frozen linear layer and an additive dense update as one product: y = x·(W₀ + ΔW)ᵀ + b, pure torch.

Where an adapter builds its ΔW densely once per step (the dense paths of QuanTA's and SURM's cost models), adding
its own product to the base layer's costs 5 large GEMMs of T × N_in × N_out per training step: forward W₀x and
ΔWx, backward ∂x through W₀ and through ΔW, and ∂ΔW = gᵀx. One product with the merged weight costs 3: forward,
∂x against W₀ + ΔW, and ∂ΔW (the frozen base alone costs 2). So the adapter adds one GEMM (∂ΔW) to the base's
step, plus building ΔW and two N_out × N_in additions.

Memory: backward needs x (for ∂ΔW) and W₀ + ΔW (for ∂x). :class:`_MergedLinear` saves the merged weight, not ΔW:
the same bytes (one weight-sized tensor beside x), without redoing the addition in backward; ΔW itself is then
freed after forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable


class _MergedLinear(torch.autograd.Function):
    """F.linear(x, W₀ + ΔW, b) with ∂W₀ = ∂ΔW = gᵀx (one GEMM for both); saves x and W₀ + ΔW."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                delta: torch.Tensor) -> torch.Tensor:
        merged = weight + delta  # (N_out, N_in); W₀ + 0 == W₀ bitwise, so ΔW = 0 gives the base's output
        ctx.save_for_backward(x if ctx.needs_input_grad[1] or ctx.needs_input_grad[3] else None,
                              merged if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, merged, bias)  # x (..., N_in) → (..., N_out)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, merged = ctx.saved_tensors
        need_x, need_weight, need_bias, need_delta = ctx.needs_input_grad
        rows = grad.reshape(-1, grad.shape[-1])  # (T, N_out)
        grad_x = (rows @ merged).view(*grad.shape[:-1], merged.shape[1]) if need_x else None  # the base's ∂x GEMM
        grad_weight = rows.T @ x.reshape(-1, x.shape[-1]) if need_weight or need_delta else None  # (N_out, N_in)
        grad_bias = rows.sum(0) if ctx.has_bias and need_bias else None
        return grad_x, grad_weight if need_weight else None, grad_bias, grad_weight if need_delta else None


def merged_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  delta: torch.Tensor) -> torch.Tensor:
    """x·(W₀ + ΔW)ᵀ + b.  x: (..., N_in), weight and delta: (N_out, N_in), bias: (N_out,) or None → (..., N_out).

    All in one dtype (the caller checks: adding a small ΔW to a half-precision W₀ would round it away)."""
    return _MergedLinear.apply(x, weight, bias, delta)
