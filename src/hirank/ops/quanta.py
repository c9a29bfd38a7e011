"""QuanTA: quantum-informed tensor adaptation (Chen et al., NeurIPS 2024), pure torch.

A token's vector x ∈ ℝᴺ, N = n₁·…·n_D, is viewed row-major as a tensor X ∈ ℝ^{n₁×…×n_D}. One gate
G⁽ᵃᵇ⁾ of shape (out_a, out_b, in_a, in_b) acts on every pair of axes a < b, identity elsewhere, in the
authors' fixed order (fastest-varying pair first; spec §1.2): for D = 4 (3,4)→(2,4)→(1,4)→(2,3)→(1,3)→(1,2).
The circuit is the linear map M(θ) = G⁽¹²⁾·…·G⁽³⁴⁾. For a rectangular layer each axis a may also change
size n_a → m_a at the first gate that touches it (spec §1.5, our extension); afterwards it stays m_a.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

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

    @property
    def in_size(self) -> int:
        return math.prod(self.in_factors)

    @property
    def out_size(self) -> int:
        return math.prod(self.out_factors)

    @cached_property
    def gate_shapes(self) -> tuple[tuple[int, int, int, int], ...]:
        """(out_a, out_b, in_a, in_b) per gate, tracking each axis's current size along the circuit."""
        current = list(self.in_factors)
        shapes = []
        for a, b in gate_pairs(len(self.in_factors)):
            shapes.append((self.out_factors[a], self.out_factors[b], current[a], current[b]))
            current[a], current[b] = self.out_factors[a], self.out_factors[b]
        return tuple(shapes)

    @cached_property
    def _equations(self) -> tuple[str, ...]:
        """One two-operand einsum per gate: '...abcd,CDcd->...abCD' for the pair (c, d)."""
        state = _LETTERS[: len(self.in_factors)]
        equations = []
        for a, b in gate_pairs(len(self.in_factors)):
            out_a, out_b = state[a].upper(), state[b].upper()
            result = "".join(out_a if i == a else out_b if i == b else s for i, s in enumerate(state))
            equations.append(f"...{state},{out_a}{out_b}{state[a]}{state[b]}->...{result}")
        return tuple(equations)

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

    def apply(self, x: torch.Tensor, flat_gates: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) → M(θ) x (..., out_features), gate by gate.

        Applying the gates one at a time is the optimal contraction order for these sizes (spec §1.2, checked
        with opt_einsum for 16·8·8·4 at 100 and 4096 rows); each step is one batched matmul.
        """
        batch = x.shape[:-1]
        if self.in_size != self.in_features:
            x = torch.nn.functional.pad(x, (0, self.in_size - self.in_features))
        state = x.reshape(*batch, *self.in_factors)
        for equation, gate in zip(self._equations, self.split(flat_gates)):
            state = torch.einsum(equation, state, gate)
        out = state.reshape(*batch, self.out_size)
        if self.out_size != self.out_features:
            out = torch.nn.functional.pad(out, (0, self.out_features - self.out_size))  # crops if negative
        return out

    def dense(self, flat_gates: torch.Tensor) -> torch.Tensor:
        """M(θ) as an (out_features, in_features) matrix: the circuit applied to the identity (merge path)."""
        identity = torch.eye(self.in_features, dtype=flat_gates.dtype, device=flat_gates.device)
        return self.apply(identity, flat_gates).T


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
