"""Configuration of QuanTA adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..._peft import HirankPeftType
from .._validate import FieldCheck
from ..base import HirankConfig


@dataclass
class QuantaConfig(HirankConfig):
    """QuanTA: quantum-informed tensor adaptation (Chen et al., NeurIPS 2024; spec §1).

    Each adapted weight gets ΔW = M(θ) − M(θ₀): a circuit of small trainable gates, one per pair of axes
    of the reshaped hidden vector, minus a frozen copy of its random initial value. High (full) rank,
    Σ_{a<b}(n_a n_b)² parameters per layer, no scaling factor, mergeable.

    Saving and loading: ``model.save_pretrained(folder)`` writes every field; loading needs ``import hirank``
    before ``PeftModel.from_pretrained`` (it registers the method with peft; without it peft raises
    ``KeyError: 'HIRANK_QUANTA'``), which the saved adapter_config.json and README.md also say.

    Args:
        n_axes: D, the number of tensor axes (paper: the length of ``per_dim_features``). Used when
            ``factors`` is not given: each dimension gets its most balanced D-way factorization, or fewer
            axes (down to 2) where the dimension allows no more. D = 2 is a dense update; efficiency needs D ≥ 3.
        factors: explicit input factors n₁…n_D (paper: ``per_dim_features``, e.g. [16, 8, 8, 4] for 4096);
            applied to every targeted layer, so their product must equal each layer's input size.
        out_factors: explicit output factors m₁…m_D for rectangular layers (product = output size; our
            extension, spec §1.5). Default: the input factors for square layers, else the most balanced
            factorization of the output size with the same D.
        pad: the authors' fallback when a size cannot be factored: zero-pad the input to Πn and crop the
            output (wastes capacity; spec §1.5).
        dropout: dropout on the adapter input (paper: ``quanta_dropout``).
        init_weights: True (paper): random gates θ and a frozen copy θ₀ = θ, so ΔW = 0 at start with
            non-zero gradients. False: θ₀ drawn independently, so ΔW ≠ 0 (tests, experiments).
        fold_frozen_copy: False (default): every step subtracts M(θ₀)·x by running the frozen circuit too, exact
            (a fresh adapter leaves outputs bitwise unchanged) and without extra memory. True: the authors'
            execution (spec §1.3): each adapted layer keeps W₀ − M(θ₀) as a dense copy beside W₀ (W₀ itself is
            never edited; the copy is not saved and is rebuilt after loading, merging and unmerging) and runs only
            the θ circuit: 4 circuit passes per training step instead of 6, which shortened QuanTA's step by
            6–17% at d = 1024–4096 (``benchmarks/speed.py``, one CPU thread). Costs one weight-sized buffer per
            adapted layer and adapter, outputs at init equal to the base's only up to the rounding of W₀ − M(θ₀) in W₀'s
            dtype, and, with dropout, the θ₀ term reads x undropped (the authors' y = (W₀ − M(θ₀))x + M(θ)·drop(x)).
            Needs a float ``nn.Linear``/``Conv1D`` weight (not bitsandbytes-quantized); layers whose base runs
            through hooks, or whose weight is sharded or trainable, and several active adapters at once, fall back
            to the exact path.
    """

    n_axes: int = field(default=4, metadata={"help": "Number of tensor axes D (auto factorization)."})
    factors: Optional[list[int]] = field(default=None, metadata={"help": "Input factors n_1..n_D."})
    out_factors: Optional[list[int]] = field(default=None, metadata={"help": "Output factors m_1..m_D."})
    pad: bool = field(default=False, metadata={"help": "Zero-pad/crop when a size does not factor."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    fold_frozen_copy: bool = field(
        default=False,
        metadata={"help": "Keep W0 − M(θ0) as a dense copy per layer, run only the θ circuit (faster, more memory)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = HirankPeftType.QUANTA
        check = FieldCheck(self)
        self.n_axes = check.integer("n_axes", minimum=2, expected="an integer ≥ 2 (n_axes=2 is already a dense update)")
        for name in ("factors", "out_factors"):
            setattr(self, name, check.integers(name, min_length=2, minimum=1,
                                               expected="None or a list of at least 2 positive integers"))
        self.pad = check.flag("pad")
        self.dropout = check.number("dropout", low=0.0, high=1.0, high_open=True)
        self.fold_frozen_copy = check.flag("fold_frozen_copy")
        if self.out_factors is not None and self.factors is None:
            raise ValueError("QuantaConfig: out_factors needs factors too (both define the gate shapes).")
        if self.factors is not None and self.out_factors is not None and len(self.factors) != len(self.out_factors):
            raise ValueError(
                f"QuantaConfig: factors {self.factors} and out_factors {self.out_factors} need the same length."
            )
