"""The methods the invariant battery runs on. Adding a method (or a variant) is one line in CASES."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import peft
from peft import PeftConfig


@dataclass(frozen=True)
class MethodCase:
    """How to configure one method, and what the battery should expect of it.

    ``formula(in_features, out_features)`` is the paper's trainable-parameter count for one adapted
    layer with the case's knobs (invariant 8).
    """

    id: str
    config_cls: type[PeftConfig]
    kwargs: dict[str, Any]
    formula: Callable[[int, int], int]
    mergeable: bool = True
    #: peft's LoRA silently skips a listed target that matches nothing (a known complaint); hirank raises.
    strict_targets: bool = True
    #: ids of tiny models whose shapes the method cannot serve (each must then raise a clear error).
    rejects: tuple[str, ...] = ()
    #: name of the config field that selects the identity init (peft's LoRA calls it init_lora_weights).
    init_arg: str = "init_weights"

    def config(self, target_modules: list[str] | tuple[str, ...], init_weights: bool = True, **overrides: Any) -> PeftConfig:
        kwargs = {**self.kwargs, self.init_arg: init_weights, **overrides}
        return self.config_cls(target_modules=list(target_modules), **kwargs)


def _lora_formula(r: int) -> Callable[[int, int], int]:
    return lambda d_in, d_out: r * (d_in + d_out)


CASES: list[MethodCase] = [
    MethodCase(
        "lora", peft.LoraConfig, {"r": 4, "lora_alpha": 8}, _lora_formula(4), strict_targets=False,
        init_arg="init_lora_weights",
    ),
]
