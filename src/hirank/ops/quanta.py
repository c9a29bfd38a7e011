"""QuanTA: quantum-informed tensor adaptation (Chen et al., NeurIPS 2024), pure torch.

A token's vector x ∈ ℝᴺ, N = n₁·…·n_D, is viewed row-major as a tensor X ∈ ℝ^{n₁×…×n_D}. One gate
G⁽ᵃᵇ⁾ of shape (out_a, out_b, in_a, in_b) acts on every pair of axes a < b, identity elsewhere, in the
authors' fixed order (fastest-varying pair first; spec §1.2): for D = 4 (3,4)→(2,4)→(1,4)→(2,3)→(1,3)→(1,2).
The circuit is the linear map M(θ) = G⁽¹²⁾·…·G⁽³⁴⁾. For a rectangular layer each axis a may also change
size n_a → m_a at the first gate that touches it (spec §1.5, our extension); afterwards it stays m_a.

Execution (ours, not the paper's): the state of T tokens is one contiguous tensor whose axes (tokens and
n₁…n_D) are kept in a *layout* chosen per gate, so that every gate is one GEMM (or a batched GEMM over a few
leading axes with the tokens inside the matrix columns) and no gate needs a permute of its own; a small
dynamic program (``_plan_layouts``) picks the layouts with the fewest copies. The authors contract with one
einsum per gate on the state in its natural order, which permutes twice per gate and runs small-batched
matmuls ([T·N/(n_a n_b·R), n_a n_b, R] with tiny R). Backward is a custom autograd Function that saves only the
input and recomputes the states chunk by chunk over tokens, so activation memory stays that of one input.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def gate_pairs(n_axes: int) -> tuple[tuple[int, int], ...]:
    """0-based axis pairs (a, b), a < b, in the official order: itertools.combinations of D-1, …, 0."""
    return tuple((b, a) for a, b in itertools.combinations(range(n_axes - 1, -1, -1), 2))


def factorizations(n: int, n_axes: int, largest: int | None = None) -> list[tuple[int, ...]]:
    """All non-increasing tuples of ``n_axes`` factors ≥ 2 (each ≤ ``largest``) whose product is n."""
    largest = n if largest is None else min(largest, n)
    if n_axes == 1:
        return [(n,)] if 2 <= n <= largest else []
    return [
        (first,) + rest
        for first in range(largest, 1, -1)
        if n % first == 0
        for rest in factorizations(n // first, n_axes - 1, first)
    ]


def balanced_factorization(n: int, n_axes: int) -> tuple[int, ...] | None:
    """The most balanced D-way factorization of n (smallest largest factor, then largest smallest), or None."""
    options = factorizations(n, n_axes)
    return min(options, key=lambda f: (f[0], -f[-1])) if options else None


def padded_factors(n: int, n_axes: int) -> tuple[int, ...]:
    """The authors' fallback (spec §1.5): D copies of ⌈n^(1/D)⌉, whose product is ≥ n."""
    size = math.ceil(round(n ** (1 / n_axes), 9))
    return (size,) * n_axes


#: The token axis in a layout (circuit axes are 0 … D−1).
TOKENS = -1
#: Cost of moving one element in a permute copy, in multiply-adds (measured: permuting 512·1024 floats
#: takes as long as a GEMM of 512·1024 × 16 × 16 on one CPU thread).
COPY_COST_MACS = 16
#: Layout search is exhaustive up to this many axes (7! layouts); beyond it every gate moves its pair last.
_MAX_SEARCHED_AXES = 6


@dataclass(frozen=True)
class GateStep:
    """How one gate runs: the layout its input is put in, and where its pair sits there."""

    pair: tuple[int, int]
    layout: tuple[int, ...]
    position: int  # index in ``layout`` of the first of the pair's two (adjacent) axes
    swapped: bool  # True when the layout holds the pair as (b, a)


def _fits(layout: tuple[int, ...], pair: tuple[int, int]) -> bool:
    """The pair is adjacent and its GEMM well shaped: at either end (one GEMM), or tokens after it (a batched
    GEMM over the few leading axes, tokens in the columns)."""
    i, j = layout.index(pair[0]), layout.index(pair[1])
    low = min(i, j)
    return abs(i - j) == 1 and (low == 0 or low + 2 == len(layout) or layout.index(TOKENS) > low)


def _plan_layouts(n_axes: int, pairs: tuple[tuple[int, int], ...]) -> tuple[tuple[int, ...], ...]:
    """The layout of each gate's input, with the fewest permute copies from (tokens, 1…D) back to it.

    Dynamic program over layouts with the tokens first or last: a gate either runs in the current layout
    (free, when ``_fits``) or after one copy into any fitting layout; ties prefer single GEMMs.
    """
    natural = (TOKENS, *range(n_axes))
    if n_axes > _MAX_SEARCHED_AXES:
        return tuple((TOKENS, *(a for a in range(n_axes) if a not in pair), *pair) for pair in pairs)
    layouts = [(TOKENS, *p) for p in itertools.permutations(range(n_axes))]
    layouts += [(*p, TOKENS) for p in itertools.permutations(range(n_axes))]
    cost = {layout: 0.0 if layout == natural else 1.0 for layout in layouts}
    choices = []
    for pair in pairs:
        best = min(cost, key=cost.get)
        new_cost, choice = {}, {}
        for layout in layouts:
            if not _fits(layout, pair):
                continue
            batched = 0.0 if min(layout.index(pair[0]), layout.index(pair[1])) in (0, n_axes - 1) else 0.01
            stay = cost.get(layout, math.inf)
            previous = layout if stay <= cost[best] + 1 else best
            new_cost[layout] = min(stay, cost[best] + 1) + batched
            choice[layout] = previous
        cost = new_cost
        choices.append(choice)
    layout = min(cost, key=lambda l: cost[l] + (l != natural))
    plan = [layout]
    for choice in reversed(choices[1:]):
        layout = choice[layout]
        plan.append(layout)
    return tuple(reversed(plan))


def _relayout(state: torch.Tensor, source: tuple[int, ...], target: tuple[int, ...]) -> torch.Tensor:
    """The state (axes in ``source`` order) copied into ``target`` order; no copy when they agree."""
    if source == target:
        return state
    return state.permute([source.index(axis) for axis in target]).contiguous()


def _gate_matrix(gate: torch.Tensor, swapped: bool) -> torch.Tensor:
    """(out_a, out_b, in_a, in_b) → the (out, in) matrix for the pair held as (a, b) or, swapped, (b, a).

    Always a fresh copy (the gates are tiny): a view into the flat vector would sit at an offset whose
    alignment depends on where the vector was allocated (a loaded checkpoint vs a new one), and BLAS kernels
    round differently for different alignments, so equal gates would not give bitwise equal outputs."""
    gate = gate.permute(1, 0, 3, 2) if swapped else gate
    return gate.reshape(gate.shape[0] * gate.shape[1], gate.shape[2] * gate.shape[3]).clone()


def _split_at(shape: torch.Size, position: int) -> tuple[int, int, int]:
    """(P, k, R): sizes before, of, and after the two axes at ``position``."""
    return math.prod(shape[:position]), shape[position] * shape[position + 1], math.prod(shape[position + 2:])


def _gate_forward(state: torch.Tensor, step: GateStep, matrix: torch.Tensor, out_pair: tuple[int, int]) -> torch.Tensor:
    """Apply the (k_out, k) gate matrix to the pair at ``step.position``: one GEMM, or a GEMM batched over P."""
    shape = list(state.shape)
    rows, k, cols = _split_at(state.shape, step.position)
    if cols == 1:
        out = state.reshape(rows, k) @ matrix.T
    elif rows == 1:
        out = matrix @ state.reshape(k, cols)
    else:
        out = torch.matmul(matrix, state.reshape(rows, k, cols))
    shape[step.position: step.position + 2] = out_pair
    return out.reshape(shape)


def _gate_backward(grad: torch.Tensor, step: GateStep, matrix: torch.Tensor, in_shape: torch.Size,
                   state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(∂L/∂input, ∂L/∂matrix or None without the input ``state``) from ∂L/∂output of one gate."""
    rows, k_out, cols = _split_at(grad.shape, step.position)
    k = matrix.shape[1]
    grad_matrix = None
    if cols == 1:
        grad_in = grad.reshape(rows, k_out) @ matrix
        if state is not None:
            grad_matrix = grad.reshape(rows, k_out).T @ state.reshape(rows, k)
    elif rows == 1:
        grad_in = matrix.T @ grad.reshape(k_out, cols)
        if state is not None:
            grad_matrix = grad.reshape(k_out, cols) @ state.reshape(k, cols).T
    else:
        grad_in = torch.matmul(matrix.T, grad.reshape(rows, k_out, cols))
        if state is not None:
            grad_matrix = torch.matmul(grad.reshape(rows, k_out, cols), state.reshape(rows, k, cols).transpose(1, 2)).sum(0)
    return grad_in.reshape(in_shape), grad_matrix


@dataclass(frozen=True)
class QuantaCircuit:
    """The gate layout for input factors n and output factors m (same number D of axes).

    ``in_features``/``out_features`` default to Πn / Πm; when Πn > in_features the input is zero-padded
    and when Πm ≠ out_features the output is cropped or zero-padded (the authors' fallback, spec §1.5).
    """

    in_factors: tuple[int, ...]
    out_factors: tuple[int, ...]
    in_features: int = 0
    out_features: int = 0

    def __post_init__(self) -> None:
        if len(self.in_factors) != len(self.out_factors) or len(self.in_factors) < 2:
            raise ValueError(
                f"QuanTA needs the same number (≥ 2) of input and output factors, got {self.in_factors} and "
                f"{self.out_factors}."
            )
        object.__setattr__(self, "in_features", self.in_features or self.in_size)
        object.__setattr__(self, "out_features", self.out_features or self.out_size)
        if self.in_size < self.in_features:
            raise ValueError(f"input factors {self.in_factors} cover {self.in_size} < {self.in_features} features.")
        # computed once here (not cached_property: its RLock breaks torch.compile graphs on Python 3.11)
        current, shapes = list(self.in_factors), []
        for a, b in gate_pairs(len(self.in_factors)):
            shapes.append((self.out_factors[a], self.out_factors[b], current[a], current[b]))
            current[a], current[b] = self.out_factors[a], self.out_factors[b]
        object.__setattr__(self, "gate_shapes", tuple(shapes))
        steps = []
        for pair, layout in zip(gate_pairs(len(self.in_factors)), _plan_layouts(len(self.in_factors), gate_pairs(len(self.in_factors)))):
            i, j = layout.index(pair[0]), layout.index(pair[1])
            steps.append(GateStep(pair, layout, min(i, j), i > j))
        object.__setattr__(self, "steps", tuple(steps))

    #: (out_a, out_b, in_a, in_b) per gate, tracking each axis's current size along the circuit.
    gate_shapes: tuple[tuple[int, int, int, int], ...] = field(init=False, repr=False, compare=False)
    #: how each gate runs (layout and position of its pair), planned once
    steps: tuple[GateStep, ...] = field(init=False, repr=False, compare=False)

    @property
    def in_size(self) -> int:
        return math.prod(self.in_factors)

    @property
    def out_size(self) -> int:
        return math.prod(self.out_factors)

    def num_parameters(self) -> int:
        """Σ over gates of (out_a·out_b)(in_a·in_b); for square factors Σ_{a<b} (n_a n_b)² (spec §1.6)."""
        return sum(math.prod(shape) for shape in self.gate_shapes)

    def macs_per_token(self) -> int:
        """Multiply-adds of one ``apply`` per token: each gate costs (its size) × (the other axes' sizes)."""
        current, total = list(self.in_factors), 0
        for (a, b), shape in zip(gate_pairs(len(current)), self.gate_shapes):
            total += math.prod(shape) * math.prod(current) // (current[a] * current[b])
            current[a], current[b] = shape[0], shape[1]
        return total

    def copies(self) -> int:
        """Permute copies of the state in one pass through the circuit (the planned layouts' changes)."""
        natural = (TOKENS, *range(len(self.in_factors)))
        layouts = [natural, *(step.layout for step in self.steps), natural]
        return sum(a != b for a, b in zip(layouts, layouts[1:]))

    # ---- cost model: structured circuit vs a dense ΔW built once per step ------------------------------
    def structured_cost(self, tokens: int) -> int:
        """Multiply-add equivalents of one training step of ``apply_difference`` on ``tokens`` rows.

        Six circuit passes: forward for θ and θ₀; in backward the recomputed states, the chain through θ
        (giving ∂x), the gate gradients and the chain through θ₀; each pass also pays its permute copies.
        """
        per_pass = self.macs_per_token() + COPY_COST_MACS * max(self.in_size, self.out_size) * self.copies()
        return 6 * tokens * per_pass

    def dense_cost(self, tokens: int) -> int:
        """The same for ``x @ delta_dense(θ, θ₀)ᵀ``: three (tokens × d_in × d_out) products (forward, ∂x,
        ∂ΔW) plus the six passes of the difference circuit over the d_in rows of the identity."""
        return 3 * tokens * self.in_features * self.out_features + 6 * self.in_features * self.macs_per_token()

    def prefer_dense(self, tokens: int) -> bool:
        """True where building ΔW densely once per step is cheaper than the structured path (tokens ≫ d, or
        few large axes)."""
        return self.dense_cost(tokens) < self.structured_cost(tokens)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of the gates inside one flat parameter vector of length ``num_parameters()``."""
        sizes = [math.prod(shape) for shape in self.gate_shapes]
        return [part.view(shape) for part, shape in zip(torch.split(flat, sizes), self.gate_shapes)]

    def init_gates(self, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Flat random gates, U(±1/√(in_a in_b)) each: nn.Linear's default init on the gate as a matrix (§1.3)."""
        parts = []
        for shape in self.gate_shapes:
            bound = 1.0 / math.sqrt(shape[2] * shape[3])
            parts.append((torch.rand(math.prod(shape), generator=generator, dtype=dtype) * 2 - 1) * bound)
        return torch.cat(parts)

    # ---- application -------------------------------------------------------------------------------
    def apply(self, x: torch.Tensor, flat_gates: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) → M(θ) x (..., out_features), gate by gate (the optimal contraction order for
        these sizes, spec §1.2, checked with opt_einsum for 16·8·8·4 at 100 and 4096 rows)."""
        return self._run(x, flat_gates, None)

    def apply_difference(self, x: torch.Tensor, flat_gates: torch.Tensor, frozen_gates: torch.Tensor) -> torch.Tensor:
        """x → M(θ)x − M(θ₀)x (spec §1.4), exactly 0 (bitwise) while θ = θ₀: the frozen branch then returns
        the trained branch's own values, so a fresh adapter leaves the model's outputs untouched."""
        return self._run(x, flat_gates, frozen_gates.detach())

    def dense(self, flat_gates: torch.Tensor) -> torch.Tensor:
        """M(θ) as an (out_features, in_features) matrix: the circuit applied to the identity."""
        identity = torch.eye(self.in_features, dtype=flat_gates.dtype, device=flat_gates.device)
        return self.apply(identity, flat_gates).T

    def delta_dense(self, flat_gates: torch.Tensor, frozen_gates: torch.Tensor) -> torch.Tensor:
        """ΔW = M(θ) − M(θ₀) as an (out_features, in_features) matrix, exactly 0 while θ = θ₀ (merge path)."""
        identity = torch.eye(self.in_features, dtype=flat_gates.dtype, device=flat_gates.device)
        return self.apply_difference(identity, flat_gates, frozen_gates).T

    def _run(self, x: torch.Tensor, flat_gates: torch.Tensor, frozen_gates: torch.Tensor | None) -> torch.Tensor:
        batch = x.shape[:-1]
        if self.in_size != self.in_features:
            x = torch.nn.functional.pad(x, (0, self.in_size - self.in_features))
        out = _CircuitFunction.apply(x.reshape(-1, self.in_size), flat_gates, frozen_gates, self)
        out = out.reshape(*batch, self.out_size)
        if self.out_size != self.out_features:
            out = torch.nn.functional.pad(out, (0, self.out_features - self.out_size))  # crops if negative
        return out

    def forward_states(self, x: torch.Tensor, gates: list[torch.Tensor], keep: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (T, in_size) → (M x as (T, out_size), each gate's input in its layout if ``keep``; the last gate is
        not run when keeping, as backward needs only the inputs)."""
        natural = (TOKENS, *range(len(self.in_factors)))
        state, layout, states = x.reshape(x.shape[0], *self.in_factors), natural, []
        for step, gate in zip(self.steps, gates):
            state, layout = _relayout(state, layout, step.layout), step.layout
            if keep:
                states.append(state)
                if len(states) == len(self.steps):
                    return state, states
            out_pair = (gate.shape[1], gate.shape[0]) if step.swapped else (gate.shape[0], gate.shape[1])
            state = _gate_forward(state, step, _gate_matrix(gate, step.swapped), out_pair)
        return _relayout(state, layout, natural).reshape(x.shape[0], self.out_size), states

    def backward_chain(self, grad: torch.Tensor, gates: list[torch.Tensor],
                       states: list[torch.Tensor] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """∂L/∂out (T, out_size) → (Mᵀ ∂L/∂out as (T, in_size), ∂L/∂gate per gate if the gate inputs are given)."""
        natural = (TOKENS, *range(len(self.in_factors)))
        grad, layout = grad.reshape(grad.shape[0], *self.out_factors), natural
        gate_grads: list[torch.Tensor] = []
        for index in range(len(self.steps) - 1, -1, -1):
            step, gate = self.steps[index], gates[index]
            grad, layout = _relayout(grad, layout, step.layout), step.layout
            in_shape = list(grad.shape)
            in_pair = (gate.shape[3], gate.shape[2]) if step.swapped else (gate.shape[2], gate.shape[3])
            in_shape[step.position: step.position + 2] = in_pair
            grad, grad_matrix = _gate_backward(grad, step, _gate_matrix(gate, step.swapped), torch.Size(in_shape),
                                               None if states is None else states[index])
            if grad_matrix is not None:
                o1, o2, i1, i2 = gate.shape
                grad_gate = (grad_matrix.reshape(o2, o1, i2, i1).permute(1, 0, 3, 2) if step.swapped
                             else grad_matrix.reshape(o1, o2, i1, i2))
                gate_grads.append(grad_gate.reshape(-1))
        gate_grads.reverse()
        return _relayout(grad, layout, natural).reshape(grad.shape[0], self.in_size), gate_grads


def _backward_chunk(tokens: int, n_gates: int) -> int:
    """Tokens per backward chunk: the recomputed gate inputs of one chunk then take about one state (T × N),
    whatever the number of gates."""
    return max(1, -(-tokens // max(1, n_gates - 1)))


class _CircuitFunction(torch.autograd.Function):
    """M(θ)x, or M(θ)x − M(θ₀)x, saving only x: backward recomputes each chunk's gate inputs (spec §1.4)."""

    @staticmethod
    def forward(x: torch.Tensor, flat_gates: torch.Tensor, frozen_gates: torch.Tensor | None,
                circuit: QuantaCircuit) -> torch.Tensor:
        # in x's dtype even under autocast (the layer casts x to the gates' float32): backward runs without it
        with torch.autocast(x.device.type, enabled=False):
            out, _ = circuit.forward_states(x, circuit.split(flat_gates), keep=False)
            if frozen_gates is None:
                return out
            frozen, _ = circuit.forward_states(x, circuit.split(frozen_gates), keep=False)
            # θ = θ₀ gives ΔW = 0 exactly: take the trained branch's own values there, so out − out = 0 bitwise
            return out - torch.where((flat_gates == frozen_gates).all(), out, frozen)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, flat_gates, frozen_gates, circuit = inputs
        ctx.circuit = circuit
        ctx.save_for_backward(x, flat_gates, frozen_gates)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, flat_gates, frozen_gates = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype)
        circuit: QuantaCircuit = ctx.circuit
        gates = circuit.split(flat_gates)
        frozen = None if frozen_gates is None else circuit.split(frozen_gates)
        need_x, need_gates = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x_parts, grad_gates = [], None
        chunk = _backward_chunk(x.shape[0], len(gates))
        for x_part, grad_part in zip(x.split(chunk), grad_out.split(chunk)):
            states = circuit.forward_states(x_part, gates, keep=True)[1] if need_gates else None
            grad_in, part_grads = circuit.backward_chain(grad_part, gates, states)
            if need_gates:
                flat = torch.cat(part_grads)
                grad_gates = flat if grad_gates is None else grad_gates + flat
            if need_x:
                if frozen is not None:
                    grad_in = grad_in - circuit.backward_chain(grad_part, frozen, None)[0]
                grad_x_parts.append(grad_in)
        grad_x = torch.cat(grad_x_parts) if need_x else None
        return grad_x, grad_gates, None, None


def plan_circuit(
    in_features: int,
    out_features: int,
    n_axes: int = 4,
    factors: tuple[int, ...] | None = None,
    out_factors: tuple[int, ...] | None = None,
    pad: bool = False,
) -> QuantaCircuit:
    """Choose the factorization of a layer; a clear ValueError with valid choices when there is none.

    Auto mode uses the most balanced factorization with ``n_axes`` axes, or fewer (down to 2) where the
    dimensions allow no more; rectangular layers get their own output factors. ``pad=True`` falls back to
    the authors' zero-pad/crop layout (D copies of ⌈max(d_in, d_out)^(1/D)⌉) when no exact one exists.
    """

    def suggestions(n: int) -> str:
        options = {d: balanced_factorization(n, d) for d in range(2, max(n_axes, 2) + 1)}
        valid = [list(f) for f in options.values() if f]
        return f"valid factorizations of {n}: {valid}" if valid else f"{n} is prime"

    def check(given: tuple[int, ...], n: int, which: str) -> tuple[int, ...]:
        given = tuple(int(f) for f in given)
        if math.prod(given) == n or (pad and math.prod(given) > n):
            return given
        raise ValueError(f"{which} {list(given)} multiply to {math.prod(given)}, not {n}; {suggestions(n)}.")

    if factors is not None:
        factors = check(factors, in_features, "factors")
        if out_factors is None:
            out_factors = factors if in_features == out_features else balanced_factorization(out_features, len(factors))
            if out_factors is None:
                raise ValueError(
                    f"out_features {out_features} has no {len(factors)}-way factorization; pass out_factors "
                    f"({suggestions(out_features)}) or pad=True."
                )
        out_factors = check(out_factors, out_features, "out_factors")
        return QuantaCircuit(factors, out_factors, in_features, out_features)
    for axes in range(n_axes, 1, -1):
        in_f = balanced_factorization(in_features, axes)
        out_f = in_f if in_features == out_features else balanced_factorization(out_features, axes)
        if in_f and out_f:
            return QuantaCircuit(in_f, out_f, in_features, out_features)
    if pad:
        padded = padded_factors(max(in_features, out_features), n_axes)
        return QuantaCircuit(padded, padded, in_features, out_features)
    raise ValueError(
        f"cannot factor a {in_features}→{out_features} layer into 2..{n_axes} axes ({suggestions(in_features)}; "
        f"{suggestions(out_features)}). Pass pad=True to zero-pad to {math.prod(padded_factors(max(in_features, out_features), n_axes))} "
        "(the authors' fallback, which wastes capacity), or explicit factors/out_factors."
    )
