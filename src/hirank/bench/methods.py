"""The methods ``hirank compare`` knows and their learning rates: the short-schedule default (tuned on a validation
split) and the rate of its paper's recipe. How each one's peft config is built and which knob settings budget
matching may try is the library's (:data:`hirank.budget.KNOB_SPACES`).

Adding a method is one :class:`KnobSpace` there and one :class:`MethodSpec` entry in ``METHODS`` below. A method whose
config class is not in this build of hirank is listed but *unavailable*: asking for it raises
:class:`MethodUnavailableError` naming the methods that are available (never a silent skip).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from peft import PeftConfig

from ..budget import (  # noqa: F401  (format_knobs: re-exported for the report)
    KNOB_SPACES,
    KnobSpace,
    Knobs,
    MethodUnavailableError,
    Shape,
    format_knobs,
)

from .options import LEARNING_RATE_PRESETS


class UnknownPresetError(ValueError):
    """A learning-rate preset that is not one of :data:`LEARNING_RATE_PRESETS`."""


@dataclass(frozen=True)
class MethodSpec:
    """One comparable method: its name (a key of :data:`hirank.budget.KNOB_SPACES`, which says how to build its
    peft config and which knob settings budget matching may try) and its learning rates. ``learning_rate`` is the
    default of ``hirank compare``; ``paper_learning_rate`` (``--lr-preset paper``) the rate of the method's
    published recipe.
    """

    name: str
    learning_rate: float
    paper_learning_rate: float
    paper_learning_rate_source: str
    tuned_source: str = ""  # where ``learning_rate`` comes from, if not the shared sweep (TUNED_SOURCE)

    @property
    def knob_space(self) -> KnobSpace:
        return KNOB_SPACES[self.name]

    @property
    def config_class(self) -> str:
        return self.knob_space.config_class

    @property
    def fixed_knobs(self) -> Mapping[str, Any]:
        return self.knob_space.fixed_knobs

    def knob_grid(self, shapes: Sequence[Shape]) -> Iterable[Knobs]:
        return self.knob_space.grid(shapes)

    def config_cls(self) -> type[PeftConfig] | None:
        """The config class, or None when this build of hirank does not have it."""
        return self.knob_space.config_cls()

    def preset_learning_rate(self, preset: str) -> tuple[float, str]:
        """The learning rate of ``preset`` (see :data:`LEARNING_RATE_PRESETS`) and where it comes from."""
        if preset == "tuned":
            return self.learning_rate, self.tuned_source or TUNED_SOURCE
        if preset == "paper":
            return self.paper_learning_rate, self.paper_learning_rate_source
        raise UnknownPresetError(
            f"unknown learning-rate preset {preset!r}; use one of {', '.join(LEARNING_RATE_PRESETS)}."
        )

    @property
    def available(self) -> bool:
        return self.knob_space.available

    def make_config(
        self, target_modules: Sequence[str], knobs: Mapping[str, Any], modules_to_save: Sequence[str] | None = None
    ) -> PeftConfig:
        """The peft config for these knobs (``knobs['target_modules']``, if given, overrides the default targets)."""
        if not self.available:
            raise MethodUnavailableError(unavailable_message(self.name))
        return self.knob_space.make_config(target_modules, knobs, modules_to_save)


_NO_RECIPE = "no published recipe could be read; LoRA's"
#: ``tuned``: each method's ``learning_rate`` below is the best of the grid 5e-4 … 1e-1 on SST-2's *validation*
#: split (MiniLM, LoRA r=4's budget, 3 epochs of 500 sentences, seed 0; ``benchmarks/lr_sweep.py``, table in
#: the README). ``paper``: the published recipes, set for schedules 20–100× longer; most underfit in 96 steps.
TUNED_SOURCE = "best on SST-2 validation in a short MiniLM run (benchmarks/lr_sweep.py)"

#: peft's own methods that aim at more rank or fewer parameters than LoRA, compared as rows (``--methods peers``).
_SWEEP = "best of {grid} on SST-2 validation in a short MiniLM run, seed 0 (benchmarks/lr_sweep.py): {accuracies}"
_GRID = "2e-3, 5e-3, 2e-2, 5e-2"
#: ``tuned`` rates of the peers, with the best-epoch validation accuracy at each rate of the grid (3 epochs of 500
#: sentences, LoRA r=4's budget; LoRA: 87% at 5e-3); ties go to the smaller rate.
_PEER_TUNED_RATES = {
    "dora": (5e-3, _SWEEP.format(grid=_GRID, accuracies="81%, 83%, 62%, 62%")),
    "vera": (1e-1, _SWEEP.format(grid="5e-3, 5e-2, 1e-1, 2e-1", accuracies="56%, 78%, 83%, 62%")),
    "c3a": (5e-1, _SWEEP.format(grid="5e-3, 5e-2, 1e-1, 2e-1, 3e-1, 5e-1, 1, 2",
                                accuracies="54%, 68%, 74%, 79%, 80%, 83%, 82%, 74%")),
    "fourierft": (5e-2, _SWEEP.format(grid="5e-3, 5e-2, 1e-1, 2e-1", accuracies="65%, 80%, 74%, 62%")),
    "lokr": (5e-3, _SWEEP.format(grid=_GRID, accuracies="52%, 80%, 80%, 62%")),
    "oft": (5e-3, _SWEEP.format(grid=_GRID, accuracies="81%, 82%, 78%, 40%")),
    "boft": (2e-2, _SWEEP.format(grid=_GRID, accuracies="66%, 81%, 83%, 80%")),
    "hira": (5e-2, _SWEEP.format(grid=_GRID + ", 1e-1, 2e-1", accuracies="48%, 58%, 81%, 82%, 82%, 62%")),
    "randlora": (2e-3, _SWEEP.format(grid="5e-4, 1e-3, " + _GRID, accuracies="66%, 78%, 81%, 80%, 46%, 53%")),
}
PEERS = ("dora", "vera", "c3a", "fourierft", "lokr", "oft", "boft", "hira", "randlora")
_PEFT_COMPARISON = "peft's method comparison (MetaMathQA, Llama-3.2-3B, 5000 steps), experiments/"
#: ``paper`` rates of the peers whose recipe in peft's own method comparison sets one (the others use its default,
#: the rate it gives LoRA too).
_PEER_DEFAULT_PAPER_RATE = "no recipe of its own in peft's method comparison: LoRA's paper rate"
_PEER_PAPER_RATES = {
    "c3a": (3e-1, _PEFT_COMPARISON + "c3a/llama-3.2-3B-default"),
    "hira": (4.5e-3, _PEFT_COMPARISON + "hira/llama-3.2-3B-rank32-lr4.5e-3"),
    "lokr": (3e-3, _PEFT_COMPARISON + "lokr/llama-3.2-3B-rank32-factor4-lr0.003"),
}


def _peer(name: str) -> MethodSpec:
    """A peer's spec: its swept rate and its recipe's rate (else LoRA's paper rate)."""
    tuned, tuned_source = _PEER_TUNED_RATES[name]
    paper, paper_source = _PEER_PAPER_RATES.get(name, (5e-4, _PEER_DEFAULT_PAPER_RATE))
    return MethodSpec(name, tuned, paper, paper_source, tuned_source=tuned_source)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("lora", 5e-3, 5e-4, "LoRA paper (Hu et al. 2021), RoBERTa-base on SST-2"),
        MethodSpec("quanta", 1e-2, 1e-4, "QuanTA official run.sh, LLaMA-2-7B on DROP"),
        MethodSpec("quantum_peft", 5e-2, 5e-4, _NO_RECIPE),
        MethodSpec("mtlora", 5e-3, 5e-4, "MTLoRA official scripts, RoBERTa-base on SST-2"),
        MethodSpec("loratrf", 5e-3, 5e-4, _NO_RECIPE),
        MethodSpec("surm", 2e-3, 2e-3, "SURM official run_bert_glue.py, BERT-base on GLUE"),
        *(_peer(name) for name in PEERS),
    )
}
#: Names ``--methods`` accepts for sets: the default (LoRA and hirank's methods), ``peers`` (LoRA and peft's
#: high-rank methods) and ``all``.
METHOD_SETS = {
    "default": tuple(name for name in METHODS if name not in PEERS),
    "peers": ("lora", *PEERS),
    "all": tuple(METHODS),
}


def available_methods(group: str = "default") -> list[str]:
    """Names of the methods of ``group`` (see :data:`METHOD_SETS`) whose config class exists in this build."""
    return [name for name in METHOD_SETS[group] if METHODS[name].available]


def expand_method_names(names: Sequence[str]) -> list[str]:
    """``--methods`` entries with the set names ``all``, ``peers`` and ``default`` expanded (order kept, no repeats)."""
    expanded: list[str] = []
    for name in names:
        for member in available_methods(name) if name in METHOD_SETS else [name]:
            if member not in expanded:
                expanded.append(member)
    return expanded


def unavailable_message(name: str) -> str:
    if name in METHODS:
        reason = f"method {name!r} is not available in this build of hirank (no hirank.{METHODS[name].config_class})"
    else:
        reason = f"unknown method {name!r}"
    return f"{reason}; available methods: {', '.join(available_methods('all'))} (sets: {', '.join(METHOD_SETS)})."


def get_method(name: str) -> MethodSpec:
    """The spec of an available method; :class:`MethodUnavailableError` otherwise."""
    spec = METHODS.get(name)
    if spec is None or not spec.available:
        raise MethodUnavailableError(unavailable_message(name))
    return spec
