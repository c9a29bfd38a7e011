"""Inspect adapted models: trainable parameters, dense ΔW per layer, effective rank, spectrum; match a
method's knobs to a parameter budget."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .convert import LoraConversion, lora_energy_by_rank, to_lora  # noqa: F401  (serving: LoRA by SVD of ΔW)

if TYPE_CHECKING:
    from .bench.budget import BudgetMatch


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
    """Module name → dense ΔW (out_features × in_features) of every adapted layer.

    Works for hirank layers and for peft layers that expose ``get_delta_weight`` (LoRA, ...).
    ``adapter_name`` defaults to each layer's first active adapter. ``dtype=torch.float64`` recomputes
    ΔW from the adapter's parameters in float64 (on a copy of the layer): use it for rank analysis,
    where float32 rounding blurs singular values below σ_max·1e-5. Default: the adapter's own precision
    (at least float32).
    """
    deltas: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "get_delta_weight"):
            continue
        adapter = adapter_name or module.active_adapters[0]
        if adapter not in module._all_available_adapter_names():
            continue
        layer = copy.deepcopy(module).to(dtype) if dtype is not None else module
        with torch.no_grad():
            delta = layer.get_delta_weight(adapter)
        delta = delta.T if getattr(module, "fan_in_fan_out", False) else delta
        deltas[name] = delta.detach().to(dtype or torch.promote_types(delta.dtype, torch.float32))
    return deltas


def spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of ``matrix`` in descending order (computed in float64)."""
    return torch.linalg.svdvals(matrix.detach().to(torch.float64))


def effective_rank(matrix: torch.Tensor, tol: Optional[float] = None) -> int:
    """Numerical rank: the number of singular values above ``tol``.

    The default tolerance is NumPy's ``matrix_rank`` rule, σ_max · max(m, n) · eps, with eps of the
    matrix's own dtype (float32 ΔW → float32 eps), so rounding noise does not count as rank.
    """
    values = spectrum(matrix)
    if values.numel() == 0:
        return 0
    if tol is None:
        eps = torch.finfo(matrix.dtype if matrix.dtype.is_floating_point else torch.float32).eps
        tol = float(values[0]) * max(matrix.shape[-2:]) * eps
    return int((values > tol).sum())


#: How far (relative) a method's closest adapter parameter count may miss a budget before matching fails.
DEFAULT_BUDGET_TOLERANCE = 0.10


def match_budget(
    method: str,
    model: nn.Module,
    target_params: int,
    target_modules: Sequence[str],
    tolerance: Optional[float] = DEFAULT_BUDGET_TOLERANCE,
) -> "BudgetMatch":
    """The knobs of ``method`` (``"lora"``, ``"quanta"``, ... as in ``hirank list``) whose exact adapter parameter
    count on ``model``'s ``target_modules`` is closest to ``target_params``; raises ``BudgetError`` when the
    closest misses by more than ``tolerance`` (relative). See :func:`hirank.bench.budget.match_budget`.
    """
    from .bench.budget import match_budget as match  # bench imports hirank: import it only when used

    return match(method, model, target_params, target_modules, tolerance)
