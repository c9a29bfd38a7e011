"""QuanTA: quantum-informed tensor adaptation (Chen et al., NeurIPS 2024), pure torch.

A token's vector x ∈ ℝᴺ, N = n₁·…·n_D, is viewed row-major as a tensor X ∈ ℝ^{n₁×…×n_D}. One gate
G⁽ᵃᵇ⁾ of shape (out_a, out_b, in_a, in_b) acts on every pair of axes a < b, identity elsewhere, in the
authors' fixed order (fastest-varying pair first; spec §1.2): for D = 4 (3,4)→(2,4)→(1,4)→(2,3)→(1,3)→(1,2).
The circuit is the linear map M(θ) = G⁽¹²⁾·…·G⁽³⁴⁾. For a rectangular layer each axis a may also change
size n_a → m_a at the first gate that touches it (spec §1.5, our extension); afterwards it stays m_a.

Execution (ours, not the paper's). The state of T tokens is one contiguous tensor with the tokens last and
the circuit axes in a *layout*: it starts as x's own axis order (x is read transposed by the first GEMM, no
copy) and every gate writes its pair back swapped. The official gate order is then a bubble sort of the axes,
so every gate finds its two axes adjacent and runs as one GEMM (batched over the axes in front, tokens inside
the matrix columns) on the state as laid out: no permute between gates. The layout ends reversed; one
relayout (two copies near memory speed) brings the output back. The authors contract with one einsum per gate
on the state in its natural order, which permutes twice per gate. Backward is a custom autograd Function that
saves only x and recomputes the gate inputs chunk by chunk over tokens, so activation memory stays that of x.
M(θ)x and M(θ₀)x share the layouts, so the relayouts of a step (output; incoming gradient; ∂x) are done once
for both branches.

Cost model (``QuantaCircuit.structured_cost`` / ``dense_cost``, in multiply-adds of a large dense GEMM):
a step of the structured path is 6 passes through the circuit (forward θ and θ₀; in backward the recomputed
inputs, the θ chain, the gate gradients, the θ₀ chain), and one gate of contraction size k over a state of S
elements costs S·(k + κ): its k multiply-adds per element, plus κ ≈ 80 for small GEMMs' packing and memory
traffic (fitted on one CPU thread: a D = 4 step at N = 1024 costs ≈ 20·N·Σk, not 6·N·Σk). The dense path
builds ΔW = M(θ) − M(θ₀) once per step (the structured step on the N_in rows of the identity) and then costs,
beyond the frozen base layer's own two T × N_in × N_out GEMMs: three more as a separate branch x·ΔWᵀ
(forward, ∂x, ∂ΔW), or one where the layer runs base and adapter as one product with W₀ + ΔW
(``ops.merged``, ``fused=True``: its forward and ∂x GEMMs are the base's, only ∂ΔW is added). Per token the
structured path is cheaper where 6·Σ(k + κ) < 3·N (separate) or < N (fused). Separate: every 4-axis layer
from N = 2048 on; at N = 1024 with 4 axes (Σk ≈ 208–240 plus 6κ) the dense ΔW repays its build beyond ≈ 4
thousand tokens per step. Fused (a plain float nn.Linear base, the usual case): from ≈ 1.3 thousand tokens at
N = 1024 and ≈ 3.7 thousand at N = 2048 (measured on one CPU thread, 4 axes: ≈ 1.3k and ≈ 3k), i.e. in the
LLM training regime T ≳ 2N; a 2-axis layer (one dense gate) from a few hundred tokens. Memory: the fused path
saves x and W₀ + ΔW (the identity the build runs on is rebuilt in backward), so it is taken only from T ≥ 2·N_out
on (W₀ + ΔW at most half of x: activation memory within 1.3× LoRA's). ``prefer_dense`` picks per layer and step.
Where the layer keeps W₀ − M(θ₀) as a dense copy (``fold_frozen_copy``, the authors' execution, spec §1.3) the θ₀
passes drop out of both paths (``folded=True``): four passes per step, and the dense path builds M(θ) alone.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from .chunks import token_chunks

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


@dataclass(frozen=True)
class GateStep:
    """How one gate runs on the state of T tokens held as one contiguous (before, k_in, after·T) tensor.

    The circuit axes are kept in a *layout* (an order of the D axes, tokens last) that starts as x's own axes
    (x read transposed, no copy) and in which every gate writes its pair back in swapped order: the official
    gate order is then a bubble sort that always finds its pair adjacent, so no gate needs a permute.
    """

    pair: tuple[int, int]
    before: int  # product of the sizes of the axes in front of the pair
    after: int  # product of the sizes of the axes behind it (the tokens follow them)
    flipped: bool  # the layout holds the pair as (b, a)

    def matrix(self, gate: torch.Tensor) -> torch.Tensor:
        """(out_a, out_b, in_a, in_b) → (k_out, k_in) with inputs in layout order and outputs swapped.

        Always a fresh copy (the gates are tiny): a view into the flat vector would sit at an offset whose
        alignment depends on where the vector was allocated (a loaded checkpoint vs a new one), and BLAS
        kernels round differently for different alignments, so equal gates would not give bitwise equal
        outputs."""
        out_a, out_b, in_a, in_b = gate.shape
        permuted = gate.permute(0, 1, 3, 2) if self.flipped else gate.permute(1, 0, 2, 3)
        return permuted.clone(memory_format=torch.contiguous_format).view(out_a * out_b, in_a * in_b)

    def gate_gradient(self, grad_matrix: torch.Tensor, gate_shape: torch.Size) -> torch.Tensor:
        """∂L/∂matrix (k_out, k_in) → ∂L/∂gate, flat (the inverse of ``matrix``'s permutation)."""
        out_a, out_b, in_a, in_b = gate_shape
        if self.flipped:
            return grad_matrix.view(out_a, out_b, in_b, in_a).permute(0, 1, 3, 2).reshape(-1)
        return grad_matrix.view(out_b, out_a, in_a, in_b).permute(1, 0, 2, 3).reshape(-1)


#: Cost of one gate per element of its state beyond its multiply-adds, in multiply-adds of a large GEMM:
#: small-k GEMMs pack and stream the whole state (fitted on one CPU thread at N = 1024–2048, D = 2–4: steps
#: measured 17–22·N·Σk for D = 4, 11·N·Σk for D = 3, 6·N·Σk for D = 2, against 6·N·Σk of pure multiply-adds).
SMALL_GEMM_OVERHEAD = 80


def _bubble_steps(in_factors: tuple[int, ...], gate_shapes: tuple[tuple[int, int, int, int], ...]) -> tuple[GateStep, ...]:
    """The layout of every gate: start in x's axis order, swap each gate's pair (spec §1.2 order)."""
    layout, sizes, steps = list(range(len(in_factors))), list(in_factors), []
    for (a, b), shape in zip(gate_pairs(len(in_factors)), gate_shapes):
        i, j = layout.index(a), layout.index(b)
        if abs(i - j) != 1:
            raise AssertionError(f"gate {(a, b)} not adjacent in layout {layout}")  # cannot happen: bubble sort
        low = min(i, j)
        steps.append(GateStep((a, b), math.prod(sizes[axis] for axis in layout[:low]),
                              math.prod(sizes[axis] for axis in layout[low + 2:]), i > j))
        sizes[a], sizes[b] = shape[0], shape[1]
        layout[low], layout[low + 1] = layout[low + 1], layout[low]
    return tuple(steps)


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
        object.__setattr__(self, "steps", _bubble_steps(self.in_factors, self.gate_shapes))

    #: (out_a, out_b, in_a, in_b) per gate, tracking each axis's current size along the circuit.
    gate_shapes: tuple[tuple[int, int, int, int], ...] = field(init=False, repr=False, compare=False)
    #: how each gate runs (where its pair sits in the bubble layout), planned once
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

    # ---- cost model: structured circuit vs a dense ΔW built once per step (module docstring) ------------
    def pass_cost_per_token(self) -> int:
        """Dense-GEMM multiply-add equivalents of one pass through the circuit, per token: each gate costs its
        multiply-adds plus ``SMALL_GEMM_OVERHEAD`` per element of its (larger) state."""
        current, total = list(self.in_factors), 0
        for (a, b), shape in zip(gate_pairs(len(current)), self.gate_shapes):
            state_in = math.prod(current)
            state_out = state_in // (current[a] * current[b]) * shape[0] * shape[1]
            total += state_out * shape[2] * shape[3] + SMALL_GEMM_OVERHEAD * max(state_in, state_out)
            current[a], current[b] = shape[0], shape[1]
        return total

    def structured_cost(self, tokens: int, folded: bool = False) -> int:
        """Cost of one training step of ``apply_difference`` on ``tokens`` rows: six circuit passes (forward θ
        and θ₀; backward: recomputed inputs, θ chain, gate gradients, θ₀ chain); four for ``apply`` alone, where
        −M(θ₀) is ``folded`` into a copy of the base weight (its GEMMs are the base layer's own)."""
        return (4 if folded else 6) * tokens * self.pass_cost_per_token()

    def dense_cost(self, tokens: int, fused: bool = False, folded: bool = False) -> int:
        """The same for a dense ΔW built for the step, a structured step on the d_in rows of the identity, plus
        its (tokens × d_in × d_out) GEMMs beyond the base layer's own: three for a separate branch
        ``x @ delta_dense(θ, θ₀)ᵀ`` (forward, ∂x, ∂ΔW); one when ``fused`` into the base layer's product with
        W₀ + ΔW (``ops.merged``: its forward and ∂x GEMMs replace the base's, only ∂ΔW is added). ``folded``:
        the built matrix is M(θ) alone, added to the folded weight W₀ − M(θ₀)."""
        gemms = 1 if fused else 3
        return gemms * tokens * self.in_features * self.out_features + self.structured_cost(self.in_features, folded)

    def prefer_dense(self, tokens: int, fused: bool = False, folded: bool = False) -> bool:
        """True where building ΔW densely once per step is cheaper than the structured path (tokens ≫ d, or
        few large axes); ``fused``: as one product with W₀ + ΔW (see ``dense_cost``), and only where that weight,
        saved for backward, is at most half of x (tokens ≥ 2·d_out): activation memory within 1.3× LoRA's;
        ``folded``: both paths without the θ₀ branch (see ``structured_cost``)."""
        if fused and tokens < 2 * self.out_features:
            return False
        return self.dense_cost(tokens, fused, folded) < self.structured_cost(tokens, folded)

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
        return self._run(identity, flat_gates, None, identity=True).T

    def delta_dense(self, flat_gates: torch.Tensor, frozen_gates: torch.Tensor) -> torch.Tensor:
        """ΔW = M(θ) − M(θ₀) as an (out_features, in_features) matrix, exactly 0 while θ = θ₀ (merge path)."""
        identity = torch.eye(self.in_features, dtype=flat_gates.dtype, device=flat_gates.device)
        return self._run(identity, flat_gates, frozen_gates.detach(), identity=True).T

    def _run(self, x: torch.Tensor, flat_gates: torch.Tensor, frozen_gates: torch.Tensor | None,
             identity: bool = False) -> torch.Tensor:
        """``identity``: x is the (padded) identity, which backward rebuilds instead of keeping (one d_in² less)."""
        batch = x.shape[:-1]
        if self.in_size != self.in_features:
            x = torch.nn.functional.pad(x, (0, self.in_size - self.in_features))
        out = _CircuitFunction.apply(x.reshape(-1, self.in_size), flat_gates, frozen_gates, self, identity)
        out = out.reshape(*batch, self.out_size)
        if self.out_size != self.out_features:
            out = torch.nn.functional.pad(out, (0, self.out_features - self.out_size))  # crops if negative
        return out

    def matrices(self, flat_gates: torch.Tensor) -> list[torch.Tensor]:
        """Each gate as the (k_out, k_in) matrix its step multiplies by (fresh copies, see ``GateStep.matrix``)."""
        return [step.matrix(gate) for step, gate in zip(self.steps, self.split(flat_gates))]

    def chain(self, x: torch.Tensor, matrices: list[torch.Tensor], keep: bool = False
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (T, in_size), any strides → (M x in the end layout (m_D, …, m_1, T), contiguous; each gate's input
        as (before, k_in, after·T) if ``keep``, the last gate then not run: backward needs only the inputs).

        The first gate reads x transposed (BLAS takes the strided operand, no copy); each gate is one
        (batched) GEMM with the tokens inside the matrix columns."""
        state, inputs = x.T, []
        outputs = self.steps[:-1] if keep else self.steps
        workspace = _Workspace(x, [x.shape[0] * step.before * k_out * step.after
                                   for step, (k_out, _) in zip(outputs, (m.shape for m in matrices))], keep)
        for step, matrix in zip(self.steps, matrices):
            state = state.reshape(step.before, matrix.shape[1], -1)
            if keep:
                inputs.append(state)
                if len(inputs) == len(self.steps):
                    return state, inputs
            state = torch.matmul(matrix, state, out=workspace.next((step.before, matrix.shape[0], state.shape[2])))
        return state, inputs

    def chain_backward(self, grad: torch.Tensor, matrices: list[torch.Tensor], inputs: list[torch.Tensor] | None
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """∂L/∂(M x) in the end layout → (Mᵀ ∂L/∂(M x) as (in_size, T), ∂L/∂gate (flat) per gate if the gate
        inputs of ``chain(keep=True)`` are given)."""
        tokens = grad.numel() // self.out_size
        workspace = _Workspace(grad, [tokens * step.before * k_in * step.after
                                      for step, (_, k_in) in zip(self.steps, (m.shape for m in matrices))], False)
        gate_grads: list[torch.Tensor] = []
        for index in range(len(self.steps) - 1, -1, -1):
            step, matrix = self.steps[index], matrices[index]
            grad = grad.reshape(step.before, matrix.shape[0], -1)
            if inputs is not None:
                grad_matrix = torch.matmul(grad, inputs[index].transpose(1, 2))
                gate_grads.append(step.gate_gradient(grad_matrix.sum(0), self.gate_shapes[index]))
            grad = torch.matmul(matrix.T, grad, out=workspace.next((step.before, matrix.shape[1], grad.shape[2])))
        gate_grads.reverse()
        return grad.reshape(self.in_size, -1), gate_grads

    def to_end_layout(self, y: torch.Tensor) -> torch.Tensor:
        """(T, out_size) natural → the end layout (m_D, …, m_1, T), contiguous. Two copies that run near memory
        speed (a blocked 2-D transpose, then a reversal of the axes in runs of T) instead of one permute whose
        innermost axis jumps by T·out_size/m_D: half the time, measured."""
        axes = len(self.out_factors)
        transposed = y.T.contiguous().view(*self.out_factors, y.shape[0])
        return transposed.permute([*range(axes - 1, -1, -1), axes]).contiguous()

    def from_end_layout(self, state: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The end layout (m_D, …, m_1, T) → ``out`` (T, out_size) natural, by the same two copies in reverse."""
        axes, tokens = len(self.out_factors), out.shape[0]
        ordered = state.reshape(*reversed(self.out_factors), tokens).permute([*range(axes - 1, -1, -1), axes])
        return out.copy_(ordered.reshape(self.out_size, tokens).T)


class _Workspace:
    """Memory for a chain's successive states, allocated once: alternating between two slots, or (``keep``)
    one slot per state. Many fresh multi-MiB tensors per pass cost page faults that took as long as the GEMMs
    themselves (one CPU thread, 512 × 1024 states)."""

    def __init__(self, like: torch.Tensor, sizes: list[int], keep: bool) -> None:
        largest = max(sizes, default=0)
        self.offsets = list(itertools.accumulate([0, *sizes[:-1]])) if keep else [largest * (i % 2) for i in range(len(sizes))]
        self.memory = torch.empty(sum(sizes) if keep else largest * min(2, len(sizes)), dtype=like.dtype, device=like.device)
        self.index = 0

    def next(self, shape: tuple[int, ...]) -> torch.Tensor:
        start = self.offsets[self.index]
        self.index += 1
        return self.memory[start: start + math.prod(shape)].view(shape)


def _backward_chunk(tokens: int, n_gates: int) -> int:
    """Tokens per backward chunk: the recomputed gate inputs of one chunk then take about one state (T × N),
    whatever the number of gates."""
    return max(1, -(-tokens // max(1, n_gates - 1)))


def _token_chunks(circuit: QuantaCircuit, tokens: int, device: torch.device, at_most: int | None = None
                  ) -> list[slice]:
    """The token chunks of a pass: :func:`chunks.token_chunks` of the circuit's widest state (measurements there)."""
    return token_chunks(tokens, max(circuit.in_size, circuit.out_size), device, at_most)


def _unless_equal(trained: torch.Tensor, frozen: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """trained − frozen, exactly 0 (bitwise) where θ = θ₀ (``same``): the frozen branch then takes the trained
    branch's own values, so a fresh adapter leaves outputs and upstream gradients untouched. On CPU (eager) the
    flag is read as a bool, which costs no device sync there, and the subtraction runs in place in the trained
    chain's workspace: one pass over the state instead of a ``where`` and a subtraction (2–3% of a step)."""
    if trained.device.type == "cpu" and not torch.compiler.is_compiling():
        return trained.sub_(trained if same else frozen)
    return trained - torch.where(same, trained, frozen)


class _CircuitFunction(torch.autograd.Function):
    """M(θ)x, or M(θ)x − M(θ₀)x, saving only x: backward recomputes each chunk's gate inputs (spec §1.4).

    One step costs six passes through the circuit (forward θ and θ₀; backward: recomputed θ inputs, the θ
    chain, the gate gradients, the θ₀ chain) and five copies of the state: one relayout (two copies) of the
    forward's output and one of the backward's incoming gradient, each shared by both branches, and one
    transpose of ∂x (``QuantaCircuit.structured_cost``)."""

    @staticmethod
    def forward(x: torch.Tensor, flat_gates: torch.Tensor, frozen_gates: torch.Tensor | None,
                circuit: QuantaCircuit, identity: bool = False) -> torch.Tensor:
        # in x's dtype even under autocast (the layer casts x to the gates' float32): backward runs without it
        with torch.autocast(x.device.type, enabled=False):
            matrices = circuit.matrices(flat_gates)
            frozen = None if frozen_gates is None else circuit.matrices(frozen_gates)
            same = None if frozen_gates is None else (flat_gates == frozen_gates).all()
            result = x.new_empty(x.shape[0], circuit.out_size)
            for rows in _token_chunks(circuit, x.shape[0], x.device):
                state, _ = circuit.chain(x[rows], matrices)
                if frozen is not None:
                    state = _unless_equal(state, circuit.chain(x[rows], frozen)[0], same)
                circuit.from_end_layout(state, result[rows])
            return result

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, flat_gates, frozen_gates, circuit, identity = inputs
        ctx.circuit = circuit
        ctx.identity = (x.shape, x.dtype, x.device) if identity else None  # eye(rows, in_size), rebuilt in backward
        ctx.save_for_backward(None if identity else x, flat_gates, frozen_gates)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, flat_gates, frozen_gates = ctx.saved_tensors
        if ctx.identity is not None:
            shape, dtype, device = ctx.identity
            x = torch.eye(*shape, dtype=dtype, device=device)
        circuit: QuantaCircuit = ctx.circuit
        grad_out = grad_out.to(x.dtype)
        matrices = circuit.matrices(flat_gates)
        frozen = None if frozen_gates is None else circuit.matrices(frozen_gates)
        same = None if frozen_gates is None else (flat_gates == frozen_gates).all()
        need_x, need_gates = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_gates = None
        grad_x = x.new_empty(x.shape) if need_x else None
        at_most = _backward_chunk(x.shape[0], len(matrices)) if need_gates else None
        for rows in _token_chunks(circuit, x.shape[0], x.device, at_most):
            x_part, grad_part = x[rows], circuit.to_end_layout(grad_out[rows])
            inputs = circuit.chain(x_part, matrices, keep=True)[1] if need_gates else None
            grad_in, part_grads = circuit.chain_backward(grad_part, matrices, inputs)
            if need_gates:
                flat = torch.cat(part_grads)
                grad_gates = flat if grad_gates is None else grad_gates + flat
            if need_x:
                if frozen is not None:
                    grad_in = _unless_equal(grad_in, circuit.chain_backward(grad_part, frozen, None)[0], same)
                # (in_size, t) → rows of (T, in_size) by a blocked 2-D transpose copy: autograd adds ∂x to the
                # base layer's input gradient, and an add reading a transposed view is ~10× slower (measured)
                grad_x[rows].copy_(grad_in.T)
        return grad_x, grad_gates, None, None, None


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
