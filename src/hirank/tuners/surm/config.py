"""Configuration of SURM adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..._peft import HirankPeftType
from .._validate import FieldCheck
from ..base import HirankConfig

STRUCTURES = ("circulant", "toeplitz", "kronecker", "ldr")
PLACEMENTS = ("lora", "adapter")
#: Activations of the adapter placement; each has act(0) = 0, so the adapter starts as the identity.
ACTIVATIONS = ("gelu", "relu", "silu", "tanh", "identity")


@dataclass
class SurmConfig(HirankConfig):
    """SURM: structured unrestricted-rank matrices (Sehanobish et al., NeurIPS 2024; spec §3).

    A structured matrix S with O(d) parameters but (generically) full rank replaces LoRA's B·A or a
    Houlsby adapter's bottleneck. Parameters per adapted m × n weight (N = max(m, n)):
    circulant 2N (c = a ⊙ b), Toeplitz m+n−1, Kronecker m+n, LDR 2·r·N; the adapter placement uses a
    square S on the d = m outputs plus a bias of d.

    Saving and loading: ``model.save_pretrained(folder)`` writes every field; loading needs ``import hirank``
    before ``PeftModel.from_pretrained`` (it registers the method with peft; without it peft raises
    ``KeyError: 'HIRANK_SURM'``), which the saved adapter_config.json and README.md also say.

    Args:
        structure: ``"circulant"`` (Circ(a ⊙ b), spec §3.2a), ``"toeplitz"`` (one general Toeplitz matrix
            with m+n−1 diagonals, §3.3; the authors' code multiplies two symmetric ones), ``"kronecker"``
            (B ⊗ A, §3.2c) or ``"ldr"`` (W(G, H) = Σ_{i≤r} Circ(g_i)·SkewCirc(h_i), §3.2d).
            Rectangular circulant and LDR use the truncated N × N matrix S[:m, :n] (our choice, §3.3).
        placement: ``"lora"``: h = W₀x + α·S·dropout(x), mergeable (§3.2). ``"adapter"``: on the targeted
            module's output y, out = y + act(α·S·dropout(y)) + bias, not mergeable (§3.4); with
            ``target_modules=None`` it targets each block's attention-output and FFN-output projections.
        alpha: α, a fixed multiplier of S (the authors' ``circ_alpha``; no division by a rank).
        displacement_rank: r of W(G, H) (the authors' ``num_adapters``); plays LoRA's rank. ``ldr`` only.
        kronecker_factor: r of B ∈ R^{(m/r)×r}, A ∈ R^{r×(n/r)} (the authors' ``r``); must divide both
            dims. ``None``: per layer, the divisor of gcd(m, n) with the highest rank bound. ``kronecker`` only.
        adapter_activation: act of the adapter placement (the authors' example uses GELU).
        dropout: dropout on the input of S (the authors' adapter dropout; 0.15 in their GLUE script).
        init_weights: True (paper): one factor is zero (circulant b, Toeplitz t, Kronecker B, LDR G), so
            S = 0 at start with non-zero gradients. False: that factor is random too, so S ≠ 0 (tests, experiments).
    """

    structure: Literal["circulant", "toeplitz", "kronecker", "ldr"] = field(
        default="circulant", metadata={"help": f"Structure of S, one of {STRUCTURES}."}
    )
    placement: Literal["lora", "adapter"] = field(
        default="lora", metadata={"help": "'lora': W₀x + α·S·x (mergeable); 'adapter': y + act(α·S·y) + bias."}
    )
    alpha: float = field(default=1.0, metadata={"help": "Fixed multiplier α of S (authors' circ_alpha)."})
    displacement_rank: int = field(default=1, metadata={"help": "Displacement rank r of W(G, H) (ldr only)."})
    kronecker_factor: Optional[int] = field(
        default=None, metadata={"help": "r in B: (m/r, r), A: (r, n/r) (kronecker only); None chooses per layer."}
    )
    adapter_activation: Literal["gelu", "relu", "silu", "tanh", "identity"] = field(
        default="gelu", metadata={"help": f"Activation of the adapter placement, one of {ACTIVATIONS}."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of S."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = HirankPeftType.SURM
        check = FieldCheck(self)
        check.choice("structure", STRUCTURES)
        check.choice("placement", PLACEMENTS)
        # α = 0 would zero S's contribution and its gradients (nothing but the adapter bias would train)
        self.alpha = check.number("alpha", nonzero=True)
        self.displacement_rank = check.integer("displacement_rank")
        self.kronecker_factor = check.optional_integer("kronecker_factor")
        check.choice("adapter_activation", ACTIVATIONS,
                     " (each has act(0) = 0, which keeps the adapter the identity at init)")
        self.dropout = check.number("dropout", low=0.0, high=1.0, high_open=True)
