"""Budget specs of ``hirank compare`` (``lora-r4``, ``37k``, ``0.2%``); the matching itself is the library's
:mod:`hirank.budget`, re-exported here for the harness."""

from __future__ import annotations

import re
from dataclasses import dataclass
from collections.abc import Sequence

from torch import nn

from ..budget import (  # noqa: F401  (re-exported for the harness)
    BudgetError,
    BudgetMatch,
    adapter_parameters,
    count_adapter_parameters,
    knob_space,
    lora_knobs,
    match_budget,
    saved_module_parameters,
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
        lora_config = knob_space("lora").make_config(target_modules, lora_knobs(int(spec.value)))
        return count_adapter_parameters(model, lora_config)
    if spec.kind == "share":
        return max(1, round(spec.value * sum(p.numel() for p in model.parameters())))
    return int(spec.value)
