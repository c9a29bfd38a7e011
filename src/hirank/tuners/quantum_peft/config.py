"""Configuration of Quantum-PEFT adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..._peft import HirankPeftType
from .._validate import FieldCheck
from ..base import HirankConfig


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

    Saving and loading: ``model.save_pretrained(folder)`` writes every field; loading needs ``import hirank``
    before ``PeftModel.from_pretrained`` (it registers the method with peft; without it peft raises
    ``KeyError: 'HIRANK_QUANTUM_PEFT'``), which the saved adapter_config.json and README.md also say.

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
        check = FieldCheck(self)
        self.rank = check.integer("rank", expected="a positive integer (K)")
        self.n_layers = check.integer("n_layers", minimum=0, expected="a non-negative integer (L)")
        # s = 0 would make ΔW and every gradient zero (nothing trains); a sign is absorbed by Λ
        self.scale = check.number("scale", nonzero=True)
        mask = f"rank={self.rank} entries, each 0 or 1, at least one 1 (or be None)"
        self.rank_mask = check.integers("rank_mask", min_length=0, minimum=0, expected=mask, verb="hold")
        if self.rank_mask is not None and (len(self.rank_mask) != self.rank or set(self.rank_mask) - {0, 1}
                                           or not any(self.rank_mask)):
            check.fail("rank_mask", mask, verb="hold")
