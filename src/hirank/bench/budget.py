"""Budget matching: choose each method's knobs so that its adapter trains (as close as possible to) a
target number of parameters.

Counts are exact whatever the method: every candidate setting is applied with ``get_peft_model`` to a
copy of the model whose tensors live on the ``meta`` device (no memory, no compute), and its trainable
parameters are counted. Only adapter parameters count toward the budget; modules in
``modules_to_save`` (a new classifier head) are reported separately.
"""

from __future__ import annotations

import copy
import itertools
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..analysis import DEFAULT_BUDGET_TOLERANCE
from ..tuners.base import module_name_matches
from .methods import Knobs, Shape, format_knobs, get_method, lora_knobs

_SAVED_MODULE_MARK = ".modules_to_save."


class BudgetError(ValueError):
    """A budget that no knob setting of a method reaches within the tolerance, or one that cannot be parsed."""


@dataclass(frozen=True)
class BudgetMatch:
    """The knob setting chosen for ``method`` and its exact adapter parameter count."""

    method: str
    knobs: Knobs
    params: int
    target: int
    candidates: list[tuple[Knobs, int]] = field(default_factory=list, compare=False, repr=False)

    @property
    def relative_error(self) -> float:
        return (self.params - self.target) / self.target


def adapter_parameters(model: nn.Module) -> int:
    """Trainable parameters of the adapters only (each shared tensor once; ``modules_to_save`` copies excluded)."""
    return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and _SAVED_MODULE_MARK not in name)


def saved_module_parameters(model: nn.Module) -> int:
    """Trainable parameters of the ``modules_to_save`` copies (e.g. a new classifier head)."""
    return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and _SAVED_MODULE_MARK in name)


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are shape-only ``meta`` tensors."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def count_adapter_parameters(model: nn.Module, config: PeftConfig) -> int:
    """Exact adapter parameter count of ``config`` applied to ``model`` (which is left untouched).

    Built on a meta copy; a method whose initialisation cannot run on ``meta`` is built on a real copy.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return adapter_parameters(get_peft_model(meta_copy(model), copy.deepcopy(config)))
        except (NotImplementedError, RuntimeError):
            return adapter_parameters(get_peft_model(copy.deepcopy(model), copy.deepcopy(config)))


def target_shapes(model: nn.Module, target_modules: Sequence[str]) -> list[Shape]:
    """(in_features, out_features) of every module whose name is, or ends with, one of ``target_modules``."""
    shapes = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) or not any(module_name_matches(name, t) for t in target_modules):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            out_features, in_features = weight.shape
            if getattr(module, "nf", None) == in_features:  # transformers Conv1D stores (in, out)
                in_features, out_features = out_features, in_features
            shapes.append((in_features, out_features))
    if not shapes:
        raise BudgetError(f"target_modules {list(target_modules)} match no weight matrix of {type(model).__name__}.")
    return shapes


def match_budget(
    method: str,
    model: nn.Module,
    target_params: int,
    target_modules: Sequence[str],
    tolerance: float | None = DEFAULT_BUDGET_TOLERANCE,
) -> BudgetMatch:
    """The knob setting of ``method`` whose adapter parameter count is closest to ``target_params``.

    Ties go to the earlier setting in the method's grid. Raises :class:`BudgetError` when the closest
    count is off by more than ``tolerance`` (relative; ``None`` accepts any) or no setting is valid.
    """
    spec = get_method(method)
    candidates: list[tuple[Knobs, int]] = []
    rejected: list[str] = []
    for knobs in spec.knob_grid(target_shapes(model, target_modules)):
        try:
            candidates.append((knobs, count_adapter_parameters(model, spec.make_config(target_modules, knobs))))
        except (TypeError, ValueError) as error:  # a setting the method rejects for this model's shapes
            rejected.append(f"{format_knobs(knobs)}: {error}")
    if not candidates:
        raise BudgetError(f"no knob setting of {method} is valid for this model: " + "; ".join(rejected[:5]))
    knobs, params = min(candidates, key=lambda candidate: abs(candidate[1] - target_params))
    match = BudgetMatch(method, dict(knobs), params, target_params, candidates)
    if tolerance is not None and abs(match.relative_error) > tolerance:
        raise BudgetError(_out_of_reach_message(match, tolerance))
    return match


def _out_of_reach_message(match: BudgetMatch, tolerance: float) -> str:
    below = max((c for c in match.candidates if c[1] <= match.target), key=lambda c: c[1], default=None)
    above = min((c for c in match.candidates if c[1] > match.target), key=lambda c: c[1], default=None)
    nearest = " and ".join(
        f"{params:,} ({format_knobs(knobs)}, {(params - match.target) / match.target:+.0%})"
        for knobs, params in (c for c in (below, above) if c is not None)
    )
    counts = [c[1] for c in match.candidates]
    return (
        f"a budget of {match.target:,} adapter parameters is out of reach for {match.method}: the nearest knob "
        f"settings give {nearest} (allowed: ±{tolerance:.0%}; reachable range {min(counts):,}–{max(counts):,}). "
        "Pick a budget in reach, other target modules, or a wider --budget-tolerance."
    )


_LORA_BUDGET = re.compile(r"lora-r(\d+)")
_COUNT_BUDGET = re.compile(r"([+-]?\d+(?:\.\d+)?)([km]?)")
_SHARE_BUDGET = re.compile(r"([+-]?\d+(?:\.\d+)?)%")
BUDGET_FORMS = (
    "use lora-r<N> (LoRA rank N on the target modules), a parameter count (36864, 37k, 1.2m) "
    "or a share of the base model's parameters (0.2%)"
)


@dataclass(frozen=True)
class BudgetSpec:
    """A budget as written, before a model turns it into a count: ``lora`` rank, parameter ``count`` or ``share``."""

    kind: str
    value: float


def read_budget(budget: str) -> BudgetSpec:
    """Read a budget spec without a model; :class:`BudgetError` names the form and the allowed range."""
    text = budget.strip().lower()
    if match := _LORA_BUDGET.fullmatch(text):
        if int(match.group(1)) < 1:
            raise BudgetError(f"budget {budget!r} is out of range: the LoRA rank N of lora-r<N> must be ≥ 1.")
        return BudgetSpec("lora", int(match.group(1)))
    if match := _SHARE_BUDGET.fullmatch(text):
        share = float(match.group(1)) / 100
        if not 0 < share <= 1:
            raise BudgetError(f"budget {budget!r} is out of range: a share must be > 0% and ≤ 100%.")
        return BudgetSpec("share", share)
    if match := _COUNT_BUDGET.fullmatch(text):
        count = round(float(match.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2)])
        if count < 1:
            raise BudgetError(f"budget {budget!r} is out of range: a parameter count must be ≥ 1.")
        return BudgetSpec("count", count)
    raise BudgetError(f"cannot read budget {budget!r}: {BUDGET_FORMS}.")


def parse_budget(budget: str, model: nn.Module, target_modules: Sequence[str]) -> int:
    """Target adapter parameter count from a budget spec.

    ``lora-r4``: what LoRA with r=4 trains on ``target_modules``; ``36864``, ``37k``, ``1.2m``: an absolute
    count; ``0.2%``: that share of the base model's parameters.
    """
    spec = read_budget(budget)
    if spec.kind == "lora":
        lora_config = get_method("lora").make_config(target_modules, lora_knobs(int(spec.value)))
        return count_adapter_parameters(model, lora_config)
    if spec.kind == "share":
        return max(1, round(spec.value * sum(p.numel() for p in model.parameters())))
    return int(spec.value)
