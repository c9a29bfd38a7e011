"""Budget matching: choose a method's knobs so that its adapter trains (as close as possible to) a target
number of parameters, for hirank's methods and peft's own (LoRA, DoRA, C3A, FourierFT, LoKr, OFT, BOFT, HiRA,
VeRA, RandLoRA).

Counts are exact whatever the method: every candidate setting is applied with ``get_peft_model`` to a copy of the
model whose tensors live on the ``meta`` device (no memory, no compute), and its trainable parameters are counted.
Only adapter parameters count toward the budget; modules in ``modules_to_save`` (a new classifier head) do not.

Each method sizes itself by its *natural* knobs within caps (:class:`KnobSpace`): budget matching never drives a
method into a degenerate regime (a 128-layer Quantum-PEFT circuit, QuanTA factors that are mostly 2s, a VeRA rank
of thousands). When only such settings would reach the budget, the match keeps the nearest natural setting and
says so in :attr:`BudgetMatch.note`; so it does when the method's settings step over the budget (DoRA's ranks fall
±1/(2r) either side of LoRA rank r's count, its magnitude vector adding one parameter per output feature). Only a
budget beyond every setting raises :class:`BudgetError`.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import peft
import torch
from peft import PeftConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .ops.quanta import balanced_factorization, factorizations, plan_circuit
from .tuners.base import module_name_matches

Knobs = dict[str, Any]
Shape = tuple[int, int]  # (in_features, out_features) of a targeted layer
Grid = Callable[[Sequence[Shape]], Iterable[Knobs]]

#: How far (relative) a method's closest adapter parameter count may miss a budget before matching fails.
DEFAULT_BUDGET_TOLERANCE = 0.10

_SAVED_MODULE_MARK = ".modules_to_save."


class BudgetError(ValueError):
    """A budget that no knob setting of a method reaches within the tolerance, or one that cannot be parsed."""


class MethodUnavailableError(ValueError):
    """The method is unknown, or its config class is missing from this build."""


def format_knobs(knobs: Mapping[str, Any]) -> str:
    """``r=4, lora_alpha=8``: knobs as the tables and messages show them."""
    return ", ".join(f"{key}={value}" for key, value in knobs.items())


@dataclass(frozen=True)
class KnobSpace:
    """How budget matching may size one method.

    ``config_class`` names a class on ``hirank`` (or on ``peft`` when ``from_peft``). ``grid(shapes)`` yields the
    natural knob settings, given the (in_features, out_features) of every targeted layer; ``beyond_caps(shapes)``
    the degenerate ones the caps (``caps``, in words) exclude: they are only counted, to tell a user that the
    budget would need them. ``fixed_knobs`` are passed with every setting. ``step_cost(shapes, knobs)``, where
    given, is a setting's relative training-step cost: among settings as close to the budget as the closest
    (within :data:`NEAR_TIE`), the cheapest is chosen.
    """

    config_class: str
    grid: Grid
    fixed_knobs: Mapping[str, Any] = field(default_factory=dict)
    from_peft: bool = False
    caps: str = ""
    beyond_caps: Grid | None = None
    step_cost: Callable[[Sequence[Shape], Knobs], float] | None = None

    def config_cls(self) -> type[PeftConfig] | None:
        """The config class, or None when this build of hirank (or of peft) does not have it."""
        import hirank  # hirank imports this module's users: look the classes up only when asked

        return getattr(peft if self.from_peft else hirank, self.config_class, None)

    @property
    def available(self) -> bool:
        return self.config_cls() is not None

    def make_config(
        self, target_modules: Sequence[str], knobs: Mapping[str, Any], modules_to_save: Sequence[str] | None = None
    ) -> PeftConfig:
        """The peft config for these knobs (``knobs['target_modules']``, if given, overrides the default targets)."""
        config_cls = self.config_cls()
        if config_cls is None:
            raise MethodUnavailableError(f"{self.config_class} is not in this build")
        kwargs = {"target_modules": list(target_modules), **dict(self.fixed_knobs), **dict(knobs)}
        if modules_to_save:
            kwargs["modules_to_save"] = list(modules_to_save)
        return config_cls(**kwargs)


@dataclass(frozen=True)
class BudgetMatch:
    """The knob setting chosen for ``method``, its exact adapter parameter count, and a ``note`` (empty when
    the method reached the budget within the tolerance by its natural knobs)."""

    method: str
    knobs: Knobs
    params: int
    target: int
    note: str = ""
    candidates: list[tuple[Knobs, int]] = field(default_factory=list, compare=False, repr=False)

    @property
    def relative_error(self) -> float:
        return (self.params - self.target) / self.target


# ---- counting ------------------------------------------------------------------------------------
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


# ---- knob grids ----------------------------------------------------------------------------------
_RANKS = tuple(range(1, 17)) + (20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256)


def _ranks(shapes: Sequence[Shape]) -> list[int]:
    """Ranks up to the smallest dimension of any targeted layer."""
    limit = min(min(shape) for shape in shapes)
    return [r for r in _RANKS if r <= limit]


def lora_knobs(rank: int) -> Knobs:
    """LoRA knobs for ``rank``; lora_alpha = 2r keeps the scaling alpha/r at 2 across ranks."""
    return {"r": rank, "lora_alpha": 2 * rank}


def _lora_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    return (lora_knobs(r) for r in _ranks(shapes))


def _divisors(shapes: Sequence[Shape], smallest: int = 1) -> list[int]:
    """Common divisors ≥ ``smallest`` of every targeted in and out width."""
    width = math.gcd(*(size for shape in shapes for size in shape))
    return [b for b in range(smallest, width + 1) if width % b == 0]


_QUANTA_AXES = (3, 4, 5)


def _degenerate_factors(factors: Sequence[int]) -> bool:
    """Several axes of size 2: a QuanTA circuit of tiny gates (many gates, each nearly nothing)."""
    return sum(f == 2 for f in factors) > 1


def _quanta_settings(shapes: Sequence[Shape]) -> Iterable[tuple[Knobs, bool]]:
    """(knobs, natural?) of every QuanTA setting: the auto factorization at 3–5 axes and explicit factors."""
    widths = {size for shape in shapes for size in shape}
    for n_axes in _QUANTA_AXES:
        balanced = [balanced_factorization(width, n_axes) for width in widths]
        yield {"n_axes": n_axes}, all(f is not None and not _degenerate_factors(f) for f in balanced)
    in_widths = {in_features for in_features, _ in shapes}
    if len(in_widths) == 1:  # explicit factors apply to every targeted layer, so they need one input width
        (width,) = in_widths
        for n_axes in _QUANTA_AXES:
            for factors in factorizations(width, n_axes):
                yield {"factors": list(factors)}, not _degenerate_factors(factors)


def _quanta_step_cost(shapes: Sequence[Shape], knobs: Knobs) -> float:
    """Σ over the targeted layers of one circuit pass per token (``QuantaCircuit.pass_cost_per_token``): at 2048
    wide, [16, 8, 4, 4] (−18% of LoRA r=8's count) costs 6% less than [16, 8, 8, 2] (+17%), measured 9% faster."""
    factors = tuple(knobs["factors"]) if "factors" in knobs else None
    return sum(plan_circuit(i, o, n_axes=knobs.get("n_axes", 4), factors=factors).pass_cost_per_token()
               for i, o in shapes)


def _quanta_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    return (knobs for knobs, natural in _quanta_settings(shapes) if natural)


def _quanta_beyond_caps(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    return (knobs for knobs, natural in _quanta_settings(shapes) if not natural)


# Quantum-PEFT: K adds K parameters per layer, each circuit layer L about 2·log2(d) per circuit. K is the natural
# knob; L is capped: a deep circuit costs a sequential gate walk per layer per step (L=128 spent 56% of a step in
# torch.cat) for parameters the method exists to avoid (spec: 5–25× fewer than LoRA).
_QUANTUM_PEFT_MAX_LAYERS = 4
_QUANTUM_PEFT_RANKS = (1, 2, 4, 8, 16, 32, 64)
_DEEP_CIRCUIT_LAYERS = (5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128)


def _quantum_peft_settings(shapes: Sequence[Shape], depths: Iterable[int]) -> Iterable[Knobs]:
    ranks = [r for r in _ranks(shapes) if r in _QUANTUM_PEFT_RANKS]
    return ({"rank": rank, "n_layers": n_layers} for n_layers in depths for rank in ranks)


def _quantum_peft_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    return _quantum_peft_settings(shapes, range(1, _QUANTUM_PEFT_MAX_LAYERS + 1))


def _quantum_peft_beyond_caps(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    return _quantum_peft_settings(shapes, _DEEP_CIRCUIT_LAYERS)


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


def _c3a_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    # ΔW of (in·out)/b² circulant blocks of size b: in·out/b parameters; blocks below 8 are barely structured
    return ({"block_size": b} for b in reversed(_divisors(shapes, smallest=8)))


def _fourierft_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    # n spectral coefficients per layer, up to the smallest layer's in·out entries
    limit = min(i * o for i, o in shapes)
    counts = sorted({round(b * 2**e) for e in range(3, 24) for b in (1.0, 1.25, 1.5, 1.75)})
    return ({"n_frequency": n} for n in counts if n <= limit)


def _lokr_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    # ΔW = w1 ⊗ w2 with w1 f×f (f = decompose_factor; -1: near √d) and w2 (d/f)² at rank r (full once 2r ≥ d/f)
    for factor in (-1, 16, 8, 4, 2):
        yield from ({"r": r, "alpha": r, "decompose_factor": factor} for r in _ranks(shapes))


def _oft_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    # d/b skew-symmetric blocks of b(b-1)/2 angles: about d(b-1)/2 per layer
    return ({"r": 0, "oft_block_size": b} for b in _divisors(shapes, smallest=2))


def _boft_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    # m butterfly factors of d/b blocks of b(b-1)/2 angles: about m·d(b-1)/2 per layer
    for factor in (1, 2, 3, 4):
        for b in _divisors(shapes, smallest=2):
            yield {"boft_block_size": b, "boft_block_num": 0, "boft_n_butterfly_factor": factor}


def _hira_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    return ({"r": r} for r in _ranks(shapes))  # ΔW = W₀ ⊙ (B A): r(in + out) like LoRA


# VeRA trains r + out per layer (the r×in and out×r projections are frozen and shared); the paper goes to r=1024.
_VERA_MAX_RANK = 1024


def _vera_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    return ({"r": r} for r in _RANKS + (384, 512, 768, 1024) if r <= _VERA_MAX_RANK)


def _vera_beyond_caps(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    return ({"r": r} for r in (1280, 1536, 2048, 2560, 3072, 4096, 6144, 8192, 12288, 16384))


def _randlora_grid(shapes: Sequence[Shape]) -> Iterable[Knobs]:
    return ({"r": r, "randlora_alpha": 2 * r} for r in _ranks(shapes))


KNOB_SPACES: dict[str, KnobSpace] = {
    "lora": KnobSpace("LoraConfig", _lora_grid, from_peft=True),
    "quanta": KnobSpace(
        "QuantaConfig", _quanta_grid, caps="3–5 tensor axes, at most one axis of size 2",
        beyond_caps=_quanta_beyond_caps, step_cost=_quanta_step_cost,
    ),
    "quantum_peft": KnobSpace(
        "QuantumPeftConfig", _quantum_peft_grid,
        caps=f"rank K ≤ {max(_QUANTUM_PEFT_RANKS)}, circuit depth n_layers ≤ {_QUANTUM_PEFT_MAX_LAYERS}",
        beyond_caps=_quantum_peft_beyond_caps,
    ),
    "mtlora": KnobSpace("MTLoraConfig", _lora_grid, fixed_knobs={"variant": "shim"}),
    "loratrf": KnobSpace("LoraTRFConfig", _loratrf_grid),
    "surm": KnobSpace("SurmConfig", _surm_grid, fixed_knobs={"placement": "lora"}),
    "dora": KnobSpace("LoraConfig", _lora_grid, fixed_knobs={"use_dora": True}, from_peft=True),
    "c3a": KnobSpace("C3AConfig", _c3a_grid, from_peft=True, caps="block_size ≥ 8"),
    "fourierft": KnobSpace("FourierFTConfig", _fourierft_grid, from_peft=True),
    "lokr": KnobSpace("LoKrConfig", _lokr_grid, from_peft=True),
    "oft": KnobSpace("OFTConfig", _oft_grid, from_peft=True),
    "boft": KnobSpace("BOFTConfig", _boft_grid, from_peft=True),
    "hira": KnobSpace("HiraConfig", _hira_grid, from_peft=True),
    "vera": KnobSpace(
        "VeraConfig", _vera_grid, from_peft=True, caps=f"r ≤ {_VERA_MAX_RANK}", beyond_caps=_vera_beyond_caps
    ),
    "randlora": KnobSpace("RandLoraConfig", _randlora_grid, from_peft=True),
}


def available_knob_spaces() -> list[str]:
    """Names of the methods budget matching can size in this build."""
    return [name for name, space in KNOB_SPACES.items() if space.available]


def knob_space(method: str) -> KnobSpace:
    """The knob space of ``method``; :class:`MethodUnavailableError` when it is unknown or not in this build."""
    space = KNOB_SPACES.get(method)
    if space is None or not space.available:
        reason = "unknown method" if space is None else f"no {space.config_class} in this build for method"
        raise MethodUnavailableError(
            f"{reason} {method!r}; available methods: {', '.join(available_knob_spaces())}."
        )
    return space


# ---- matching ------------------------------------------------------------------------------------
def _count_settings(
    space: KnobSpace, grid: Grid, model: nn.Module, shapes: Sequence[Shape], target_modules: Sequence[str]
) -> tuple[list[tuple[Knobs, int]], list[str]]:
    candidates: list[tuple[Knobs, int]] = []
    rejected: list[str] = []
    for knobs in grid(shapes):
        try:
            candidates.append((knobs, count_adapter_parameters(model, space.make_config(target_modules, knobs))))
        except (TypeError, ValueError) as error:  # a setting the method rejects for this model's shapes
            rejected.append(f"{format_knobs(knobs)}: {error}")
    return candidates, rejected


def _first_beyond_caps(
    space: KnobSpace, model: nn.Module, shapes: Sequence[Shape], target_modules: Sequence[str], target: int,
    allowed: float,
) -> Knobs | None:
    """The first setting beyond the caps within ``allowed`` of ``target`` (None if none): only to name it."""
    for knobs in space.beyond_caps(shapes) if space.beyond_caps is not None else ():
        try:
            params = count_adapter_parameters(model, space.make_config(target_modules, knobs))
        except (TypeError, ValueError):
            continue
        if abs(params - target) <= allowed * target:
            return knobs
    return None


#: Settings whose counts miss the budget by at most this much (relative) more than the closest one's are as close.
NEAR_TIE = 0.02


def _closest(candidates: list[tuple[Knobs, int]], target: int,
             cost: Callable[[Knobs], float] | None = None) -> tuple[Knobs, int]:
    """The candidate closest to ``target``; with ``cost``, the cheapest of those within :data:`NEAR_TIE` of the
    closest one's miss. Ties: the earlier setting."""
    best = min(abs(params - target) for _, params in candidates)
    near = [c for c in candidates if abs(c[1] - target) <= best + (NEAR_TIE * target if cost is not None else 0)]
    return min(near, key=lambda candidate: cost(candidate[0])) if cost is not None else near[0]


def match_budget(
    method: str,
    model: nn.Module,
    target_params: int,
    target_modules: Sequence[str],
    tolerance: float | None = DEFAULT_BUDGET_TOLERANCE,
    space: KnobSpace | None = None,
) -> BudgetMatch:
    """The natural knob setting of ``method`` (``"lora"``, ``"quanta"``, ``"c3a"``, ... as in
    :data:`KNOB_SPACES`) whose exact adapter parameter count on ``model``'s ``target_modules`` is closest to
    ``target_params``; ties go to the earlier setting in the method's grid.

    When the closest misses by more than ``tolerance`` (relative) but a setting beyond the method's caps would
    not, or the budget lies between two of its settings (it steps over it), the nearest natural setting is kept
    and :attr:`BudgetMatch.note` says so; when the budget lies beyond every setting, :class:`BudgetError` says
    what is reachable. ``tolerance=None`` never raises: a miss beyond
    :data:`DEFAULT_BUDGET_TOLERANCE` is then only noted. ``space`` replaces the method's knob space (e.g. one
    restricted to some settings).
    """
    space = space or knob_space(method)
    shapes = target_shapes(model, target_modules)
    candidates, rejected = _count_settings(space, space.grid, model, shapes, target_modules)
    if not candidates:
        raise BudgetError(f"no knob setting of {method} is valid for this model: " + "; ".join(rejected[:5]))
    cost = None if space.step_cost is None else lambda knobs: space.step_cost(shapes, knobs)
    knobs, params = _closest(candidates, target_params, cost)
    match = BudgetMatch(method, dict(knobs), params, target_params, candidates=candidates)
    allowed = DEFAULT_BUDGET_TOLERANCE if tolerance is None else tolerance
    if abs(match.relative_error) <= allowed:
        return match
    far_knobs = _first_beyond_caps(space, model, shapes, target_modules, target_params, allowed)
    counts = [params for _, params in candidates]
    # inside the range the settings span, the method's own steps (DoRA's magnitude vector, OFT's and BOFT's block
    # sizes) decide how near it can come: run the nearest; only a budget beyond every setting is out of reach
    steps_over = min(counts) <= target_params <= max(counts)
    if far_knobs is None and tolerance is not None and not steps_over:
        raise BudgetError(_out_of_reach_message(match, tolerance))
    if far_knobs is not None:
        reach = (
            f"cannot reach {target_params:,} parameters with its natural knobs ({space.caps}): it would take "
            f"{format_knobs(far_knobs)}"
        )
    elif steps_over:
        reach = f"steps over {target_params:,} parameters (its nearest settings give {_nearest_settings(match)})"
    else:
        reach = f"misses {target_params:,} parameters"
    note = (
        f"{method} {reach}; kept the nearest natural setting {format_knobs(knobs)} "
        f"({params:,} parameters, {match.relative_error:+.0%})"
    )
    return BudgetMatch(method, dict(knobs), params, target_params, note, candidates)


def _nearest_settings(match: BudgetMatch) -> str:
    """``"32,256 (r=3, lora_alpha=6, -12%) and 41,472 (r=4, lora_alpha=8, +12%)"``: the settings either side."""
    below = max((c for c in match.candidates if c[1] <= match.target), key=lambda c: c[1], default=None)
    above = min((c for c in match.candidates if c[1] > match.target), key=lambda c: c[1], default=None)
    return " and ".join(
        f"{params:,} ({format_knobs(knobs)}, {(params - match.target) / match.target:+.0%})"
        for knobs, params in (c for c in (below, above) if c is not None)
    )


def _out_of_reach_message(match: BudgetMatch, tolerance: float) -> str:
    counts = [c[1] for c in match.candidates]
    return (
        f"a budget of {match.target:,} adapter parameters is out of reach for {match.method}: the nearest knob "
        f"settings give {_nearest_settings(match)} (allowed: ±{tolerance:.0%}; reachable range "
        f"{min(counts):,}–{max(counts):,}). "
        "Pick a budget in reach, other target modules, or a wider --budget-tolerance."
    )
