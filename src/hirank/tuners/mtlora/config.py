"""Configuration of MTLoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..._peft import HirankPeftType
from ...ops.mtlora import INIT_T, VARIANTS
from .._validate import FieldCheck
from ..base import HirankConfig


@dataclass
class MTLoraConfig(HirankConfig):
    """MTLoRA, matrix-transformation LoRA (Liang et al., arXiv 2403.07440; spec §1).

    Not the multi-task MTLoRA of Agiza et al. Each adapted weight gets ΔW = (α/r)·B·T·A with an r×r
    transformation T between LoRA's factors; T = I is exactly LoRA. Mergeable, r(d_in + d_out) + r²
    parameters per layer (SHIM, ICFM) or r(d_in + d_out) + 2r² (CTCM, DTSM).

    Saving and loading: ``model.save_pretrained(folder)`` writes every field; loading needs ``import hirank``
    before ``PeftModel.from_pretrained`` (it registers the method with peft; without it peft raises
    ``KeyError: 'HIRANK_MTLORA'``), which the saved adapter_config.json and README.md also say.

    Args:
        r: rank of the update (paper: r).
        lora_alpha: scaling numerator; the update is scaled by lora_alpha / r (paper: α).
        lora_dropout: dropout on the adapter input (paper: lora_dropout).
        variant: structure of T (paper's names): "shim" T = C, "icfm" T = C Cᵀ (symmetric PSD),
            "ctcm" T = C D, "dtsm" T = C + D. Default "icfm", the file the authors ship as their NLU/NLG
            default (spec §1.2).
        init_T: the three published recipes (spec §1.3). "identity" (default, the authors' README tip):
            T = I, A kaiming-uniform, B = 0. "random" (NLU/NLG code): C, D kaiming-uniform, A kaiming-uniform,
            B = 0. "zeros" (LLaVA code): C = D = 0, A, B ~ N(0, 0.02); refused for ICFM and CTCM, whose
            gradients are all exactly zero at T = 0. Every recipe starts at ΔW = 0.
        init_weights: True: the ``init_T`` recipe (ΔW = 0). False: A, B, C, D all random, so ΔW ≠ 0 and T is
            a generic matrix (tests, experiments).
    """

    r: int = field(default=8, metadata={"help": "Rank r of the update."})
    lora_alpha: float = field(default=8, metadata={"help": "Scaling α; the update is scaled by α / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    variant: Literal["shim", "icfm", "ctcm", "dtsm"] = field(
        default="icfm", metadata={"help": "T = C (shim), C Cᵀ (icfm), C D (ctcm) or C + D (dtsm)."}
    )
    init_T: Literal["identity", "random", "zeros"] = field(
        default="identity", metadata={"help": "Initial T: identity (README tip), random (NLU/NLG), zeros (LLaVA)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = HirankPeftType.MTLORA
        check = FieldCheck(self)
        self.r = check.integer("r")
        # α = 0 makes ΔW and every gradient zero: nothing would ever train
        self.lora_alpha = check.number("lora_alpha", low=0.0, nonzero=True, expected="a finite number > 0")
        self.lora_dropout = check.number("lora_dropout", low=0.0, high=1.0, high_open=True)
        check.choice("variant", VARIANTS)
        check.choice("init_T", INIT_T)
        if self.init_T == "zeros" and self.variant in ("icfm", "ctcm"):
            raise ValueError(
                f"MTLoraConfig: init_T='zeros' with variant={self.variant!r} never trains: at T = 0 the gradients of "
                "A, B, C and D are all exactly zero (spec §1.3). Use init_T='identity' (default) or 'random'."
            )
