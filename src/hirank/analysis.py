"""Inspect adapted models: trainable parameters, dense ΔW per layer, effective rank, spectrum; match a
method's knobs to a parameter budget; convert an adapter to LoRA for serving."""

from __future__ import annotations

import copy
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .budget import DEFAULT_BUDGET_TOLERANCE, BudgetMatch, match_budget
from .convert import LoraConversion, lora_energy_by_rank, to_lora  # serving: LoRA by SVD of ΔW
from .tuners.base import HirankLayer, quantized_weight_kind

__all__ = [
    "DEFAULT_BUDGET_TOLERANCE",
    "BudgetMatch",
    "LoraConversion",
    "delta_weights",
    "effective_rank",
    "lora_energy_by_rank",
    "match_budget",
    "spectrum",
    "to_lora",
    "trainable_parameters",
]


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (each shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if parameter.requires_grad and id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


def delta_weights(
    model: nn.Module, adapter_name: Optional[str] = None, dtype: Optional[torch.dtype] = None
) -> dict[str, torch.Tensor]:
    """Module name → dense ΔW (out_features × in_features) of every adapted layer: the update merging applies.

    Works for hirank layers and for every mergeable peft layer: for peft's own methods ΔW is the merged weight
    minus the base weight, taken on a copy of the layer, since their ``get_delta_weight`` is not that update for
    all of them (DoRA: B·A without its magnitude rescaling; OFT and BOFT: the rotation; HiRA: before its Hadamard
    product with W). ``adapter_name`` defaults to each layer's first active adapter. ``dtype=torch.float64``
    recomputes ΔW in float64 (on a copy of the layer): use it for rank analysis, where float32 rounding blurs
    singular values below σ_max·1e-5. Default: the adapter's own precision (at least float32).
    """
    deltas: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "get_delta_weight"):
            continue
        adapter = adapter_name or module.active_adapters[0]
        if adapter not in module._all_available_adapter_names():
            continue
        with torch.no_grad():
            delta = _update(module, adapter, dtype)
        delta = delta.T if getattr(module, "fan_in_fan_out", False) else delta
        deltas[name] = delta.detach().to(dtype or torch.promote_types(delta.dtype, torch.float32))
    return deltas


def _update(module: BaseTunerLayer, adapter: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """ΔW of one layer in its weight's stored layout (see :func:`delta_weights`)."""
    if isinstance(module, HirankLayer):  # additive by construction: its ΔW directly
        layer = copy.deepcopy(module).to(dtype) if dtype is not None else module
        return layer.get_delta_weight(adapter)
    if quantized_weight_kind(module.get_base_layer()) is not None:
        raise NotImplementedError(
            f"ΔW of peft's {type(module).__name__} on a quantized base: the merged weight would carry the "
            "requantization error."
        )
    layer = copy.deepcopy(module)
    layer = layer.to(dtype) if dtype is not None else layer
    if layer.merged:
        layer.unmerge()
    before = layer.get_base_layer().weight.detach().clone()
    layer.merge(adapter_names=[adapter])
    return layer.get_base_layer().weight.detach() - before


class NonFiniteError(ValueError):
    """A ΔW (or other matrix) with NaN or infinite entries: its spectrum and rank are undefined."""


def _require_finite(matrix: torch.Tensor) -> None:
    bad = int((~torch.isfinite(matrix)).sum()) if matrix.is_floating_point() or matrix.is_complex() else 0
    if bad:
        raise NonFiniteError(
            f"matrix of shape {tuple(matrix.shape)} has {bad} non-finite entries (NaN or ±Inf), e.g. the ΔW of an "
            "adapter whose training diverged; its spectrum and rank are undefined."
        )


def spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of ``matrix`` in descending order (computed in float64); raises
    :class:`NonFiniteError` (a ``ValueError``) if ``matrix`` has NaN or infinite entries."""
    _require_finite(matrix)
    return torch.linalg.svdvals(matrix.detach().to(torch.float64))


def effective_rank(matrix: torch.Tensor, tol: Optional[float] = None) -> int:
    """Numerical rank: the number of singular values above ``tol``.

    The default tolerance is NumPy's ``matrix_rank`` rule, σ_max · max(m, n) · eps, with eps of the
    matrix's own dtype (float32 ΔW → float32 eps), so rounding noise does not count as rank. Raises
    :class:`NonFiniteError` (a ``ValueError``) if ``matrix`` has NaN or infinite entries.
    """
    values = spectrum(matrix)
    if values.numel() == 0:
        return 0
    if tol is None:
        eps = torch.finfo(matrix.dtype if matrix.dtype.is_floating_point else torch.float32).eps
        tol = float(values[0]) * max(matrix.shape[-2:]) * eps
    return int((values > tol).sum())
