"""Budget specs of ``hirank compare`` (``lora-r4``, ``37k``, ``0.2%``); the matching itself is the library's
:mod:`hirank.budget`, re-exported here for the harness."""

from __future__ import annotations

import re
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
_COUNT_BUDGET = re.compile(r"(\d+(?:\.\d+)?)([km]?)")


def parse_budget(budget: str, model: nn.Module, target_modules: Sequence[str]) -> int:
    """Target adapter parameter count from a budget spec.

    ``lora-r4``: what LoRA with r=4 trains on ``target_modules``; ``36864``, ``37k``, ``1.2m``: an absolute
    count; ``0.2%``: that share of the base model's parameters.
    """
    text = budget.strip().lower()
    if match := _LORA_BUDGET.fullmatch(text):
        rank = int(match.group(1))
        return count_adapter_parameters(model, knob_space("lora").make_config(target_modules, lora_knobs(rank)))
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            share = -1.0
        if 0 < share <= 1:
            return max(1, round(share * sum(p.numel() for p in model.parameters())))
    elif match := _COUNT_BUDGET.fullmatch(text):
        scale = {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2)]
        count = round(float(match.group(1)) * scale)
        if count > 0:
            return count
    raise BudgetError(
        f"cannot read budget {budget!r}: use lora-r<N> (LoRA rank N on the target modules), a parameter count "
        "(36864, 37k, 1.2m) or a share of the base model's parameters (0.2%)."
    )
