"""The methods ``hirank compare`` knows: how to build each one's peft config, which knob settings
budget matching may try, and its learning rates: the short-schedule default (tuned on a validation split) and
the rate of its paper's recipe.

Adding or adjusting a method is one :class:`MethodSpec` entry in ``METHODS`` below. A method whose
config class is not in this build of hirank is listed but *unavailable*: asking for it raises
:class:`MethodUnavailableError` naming the methods that are available (never a silent skip).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import peft
from peft import PeftConfig

import hirank

from .options import LEARNING_RATE_PRESETS

Knobs = dict[str, Any]
Shape = tuple[int, int]  # (in_features, out_features) of a targeted layer


class MethodUnavailableError(ValueError):
    """The method is unknown, or its config class is missing from this build."""


class UnknownPresetError(ValueError):
    """A learning-rate preset that is not one of :data:`LEARNING_RATE_PRESETS`."""


@dataclass(frozen=True)
class MethodSpec:
    """One comparable method.

    ``config_class`` names a class on ``hirank`` (or ``peft`` for LoRA). ``knob_grid(shapes)`` yields the
    knob settings budget matching may try, given the (in_features, out_features) of every targeted layer
    (for methods whose valid settings depend on them); a setting may also override ``target_modules``.
    ``fixed_knobs`` are passed with every setting. ``learning_rate`` is the default of ``hirank compare``;
    ``paper_learning_rate`` (``--lr-preset paper``) the rate of the method's published recipe.
    """

    name: str
    config_class: str
    knob_grid: Callable[[Sequence[Shape]], Iterable[Knobs]]
    learning_rate: float
    paper_learning_rate: float
    paper_learning_rate_source: str
    fixed_knobs: Mapping[str, Any] = field(default_factory=dict)

    def config_cls(self) -> type[PeftConfig] | None:
        """The config class, or None when this build of hirank does not have it."""
        home = peft if self.name == "lora" else hirank
        return getattr(home, self.config_class, None)

    def preset_learning_rate(self, preset: str) -> tuple[float, str]:
        """The learning rate of ``preset`` (see :data:`LEARNING_RATE_PRESETS`) and where it comes from."""
        if preset == "tuned":
            return self.learning_rate, TUNED_SOURCE
        if preset == "paper":
            return self.paper_learning_rate, self.paper_learning_rate_source
        raise UnknownPresetError(
            f"unknown learning-rate preset {preset!r}; use one of {', '.join(LEARNING_RATE_PRESETS)}."
        )

    @property
    def available(self) -> bool:
        return self.config_cls() is not None

    def make_config(
        self, target_modules: Sequence[str], knobs: Mapping[str, Any], modules_to_save: Sequence[str] | None = None
    ) -> PeftConfig:
        """The peft config for these knobs (``knobs['target_modules']``, if given, overrides the default targets)."""
        config_cls = self.config_cls()
        if config_cls is None:
            raise MethodUnavailableError(unavailable_message(self.name))
        kwargs = {"target_modules": list(target_modules), **dict(self.fixed_knobs), **dict(knobs)}
        if modules_to_save:
            kwargs["modules_to_save"] = list(modules_to_save)
        return config_cls(**kwargs)


# ---- knob grids ---------------------------------------------------------------------------------
_RANKS = tuple(range(1, 17)) + (20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256)


def _ranks(shapes: Sequence[Shape]) -> list[int]:
    """Ranks up to the smallest dimension of any targeted layer."""
    limit = min(min(shape) for shape in shapes)
    return [r for r in _RANKS if r <= limit]


def format_knobs(knobs: Mapping[str, Any]) -> str:
    """``r=4, lora_alpha=8``: knobs as the tables and messages show them."""
    return ", ".join(f"{key}={value}" for key, value in knobs.items())


def lora_knobs(rank: int) -> Knobs:
    """LoRA knobs for ``rank``; lora_alpha = 2r keeps the scaling alpha/r at 2 across ranks."""
    return {"r": rank, "lora_alpha": 2 * rank}


def _lora_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    return (lora_knobs(r) for r in _ranks(shapes))


def factorizations(n: int, n_factors: int, largest: int | None = None) -> list[tuple[int, ...]]:
    """All non-increasing tuples of ``n_factors`` factors ≥ 2 whose product is ``n``."""
    largest = n if largest is None else min(largest, n)
    if n_factors == 1:
        return [(n,)] if 2 <= n <= largest else []
    return [
        (first, *rest)
        for first in range(largest, 1, -1)
        if n % first == 0
        for rest in factorizations(n // first, n_factors - 1, first)
    ]


def _quanta_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    yield from ({"n_axes": n_axes} for n_axes in (3, 4, 5))
    widths = {in_features for in_features, _ in shapes}
    if len(widths) == 1:  # explicit factors apply to every targeted layer, so they need one input width
        (width,) = widths
        for n_axes in (3, 4, 5):
            yield from ({"factors": list(factors)} for factors in factorizations(width, n_axes))


_CIRCUIT_LAYERS = tuple(range(1, 9)) + (10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128)


def _quantum_peft_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    # K adds K parameters per layer, each circuit layer L about 2·log2(d) per circuit: L is the budget knob.
    ranks = [r for r in _ranks(shapes) if r in (1, 2, 4, 8, 16, 32, 64)]
    return ({"rank": rank, "n_layers": n_layers} for n_layers in _CIRCUIT_LAYERS for rank in ranks)


def _mtlora_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    return (lora_knobs(r) for r in _ranks(shapes))


def _loratrf_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    # The filter adds d + 2dk (low-rank T) or 2d (diagonal T) per layer to LoRA's r(d_in + d_out).
    for k in (1, 2, 4, 8):
        yield from ({**lora_knobs(r), "filter_rank": k} for r in _ranks(shapes))
    yield from ({**lora_knobs(r), "filter_transform": "diagonal"} for r in _ranks(shapes))


def _surm_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    for structure in ("circulant", "toeplitz", "kronecker"):
        yield {"structure": structure}
    for displacement_rank in _ranks(shapes):
        yield {"structure": "ldr", "displacement_rank": displacement_rank}


_NO_RECIPE = "no published recipe could be read; LoRA's"
#: ``tuned``: each method's ``learning_rate`` below is the best of the grid 5e-4 … 1e-1 on SST-2's *validation*
#: split (MiniLM, LoRA r=4's budget, 3 epochs of 500 sentences, seed 0; ``benchmarks/lr_sweep.py``, table in
#: the README). ``paper``: the published recipes, set for schedules 20–100× longer; most underfit in 96 steps.
TUNED_SOURCE = "best on SST-2 validation in a short MiniLM run (benchmarks/lr_sweep.py)"

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("lora", "LoraConfig", _lora_grid, 5e-3, 5e-4, "LoRA paper (Hu et al. 2021), RoBERTa-base on SST-2"),
        MethodSpec("quanta", "QuantaConfig", _quanta_grid, 1e-2, 1e-4, "QuanTA official run.sh, LLaMA-2-7B on DROP"),
        MethodSpec("quantum_peft", "QuantumPeftConfig", _quantum_peft_grid, 5e-2, 5e-4, _NO_RECIPE),
        MethodSpec(
            "mtlora",
            "MTLoraConfig",
            _mtlora_grid,
            5e-3,
            5e-4,
            "MTLoRA official scripts, RoBERTa-base on SST-2",
            fixed_knobs={"variant": "shim"},
        ),
        MethodSpec("loratrf", "LoraTRFConfig", _loratrf_grid, 5e-3, 5e-4, _NO_RECIPE),
        MethodSpec(
            "surm",
            "SurmConfig",
            _surm_grid,
            2e-3,
            2e-3,
            "SURM official run_bert_glue.py, BERT-base on GLUE",
            fixed_knobs={"placement": "lora"},
        ),
    )
}


def available_methods() -> list[str]:
    """Names of the methods whose config class exists in this build."""
    return [name for name, spec in METHODS.items() if spec.available]


def unavailable_message(name: str) -> str:
    if name in METHODS:
        reason = f"method {name!r} is not available in this build of hirank (no hirank.{METHODS[name].config_class})"
    else:
        reason = f"unknown method {name!r}"
    return f"{reason}; available methods: {', '.join(available_methods())}."


def get_method(name: str) -> MethodSpec:
    """The spec of an available method; :class:`MethodUnavailableError` otherwise."""
    spec = METHODS.get(name)
    if spec is None or not spec.available:
        raise MethodUnavailableError(unavailable_message(name))
    return spec
