"""Configuration of Quantum-PEFT adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..._peft import HirankPeftType
from ..base import HirankConfig


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class QuantumPeftConfig(HirankConfig):
    """Quantum-PEFT: ΔW = s·U Λ Vᵀ with Pauli-circuit Stiefel factors (Koike-Akino et al., ICLR 2025; spec §2).

    U (d_out × K) and V (d_in × K) are the first K columns of real orthogonal RY/CZ circuits (see
    ``hirank.ops.pauli``), so each costs (2L+1)·log₂N − 2L angles when N is a power of two; Λ is a
    trainable diagonal of K entries. Per adapted layer: angles(d_out) + angles(d_in) + K parameters,
    e.g. 2·34 + 8 = 76 for a 4096 × 4096 weight with L = 1, K = 8. Non-power-of-two sizes use a
    cosine–sine split N = N₁ + N₂ (reconstruction, module docstring of ``hirank.ops.pauli``). Only the
    Pauli parameterization is implemented: the paper's truncated-Taylor variant (spec §2.4) is not
    exactly orthogonal, and its exact form could not be confirmed from the paper.

    Args:
        rank: K, the intrinsic rank (columns of U and V, entries of Λ); ≤ min(d_in, d_out) of every layer.
        n_layers: L, the number of alternating RY/CZ entangling layers of each circuit.
        scale: s, a fixed multiplier of ΔW (not divided by K; the paper's value is unknown).
        rank_mask: "intrinsic-rank masking" (reconstruction, spec §2.4): K entries of 0/1; Λ is multiplied
            by it, so masked directions never contribute and their Λ entries get no gradient.
        init_weights: True: Λ = 0 (ΔW = 0 at start) with uniformly random angles, so Λ gets gradient at
            step 0 and the angles from the first step on. False: Λ random too, so ΔW ≠ 0.
    """

    rank: int = field(default=8, metadata={"help": "K: intrinsic rank of ΔW = s·U Λ Vᵀ."})
    n_layers: int = field(default=1, metadata={"help": "L: alternating RY/CZ entangling layers per circuit."})
    scale: float = field(default=1.0, metadata={"help": "s: fixed multiplier of ΔW."})
    rank_mask: Optional[list[int]] = field(
        default=None, metadata={"help": "Intrinsic-rank masking: K entries of 0/1 multiplying Λ (None: all 1)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = HirankPeftType.QUANTUM_PEFT
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"rank (K) must be a positive integer, got {self.rank!r}.")
        if not _is_int(self.n_layers) or self.n_layers < 0:
            raise ValueError(f"n_layers (L) must be a non-negative integer, got {self.n_layers!r}.")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"scale must be a number, got {self.scale!r}.")
        if self.rank_mask is not None:
            self.rank_mask = list(self.rank_mask)
            if len(self.rank_mask) != self.rank or any(not _is_int(m) or m not in (0, 1) for m in self.rank_mask):
                raise ValueError(
                    f"rank_mask must hold rank={self.rank} entries, each 0 or 1, got {self.rank_mask!r}."
                )
        if not isinstance(self.init_weights, bool):
            raise ValueError(
                f"init_weights must be True (Λ = 0, ΔW = 0 at start) or False (random Λ), got {self.init_weights!r}."
            )
