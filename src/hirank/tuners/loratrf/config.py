"""Configuration of LoRATRF adapters (reconstructed method)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ..._peft import HirankPeftType
from ...ops.loratrf import SIMILARITIES, TRANSFORMS
from .._validate import FieldCheck
from ..base import HirankConfig, module_name_matches

_POSITIONS = re.compile(r"(?:f(?P<first>\d+))?\+?(?:l(?P<last>\d+))?")


@dataclass
class LoraTRFConfig(HirankConfig):
    """LoRATRF, LoRA with task-relevant feature enhancement (Li et al., arXiv 2412.09827; spec §2).

    RECONSTRUCTED from the abstract and a third-party summary (spec §2.3): no official code exists and the
    method section could not be read, so this is "LoRATRF (reconstructed from the abstract)", not a verified
    port. Each adapted layer computes h = (W₀ + (α/r)·B·A)·x + b (LoRA) and then edits its own output with a
    task-aware filter: per token g = clamp(sim(h, t), 0, 1) with a learnable task vector t, and
    h ← h + g·h·T with T = C·D low-rank (D = 0 at start, so the model starts unchanged).

    Merging folds the LoRA part into the weight; the filter depends on the input and stays a small live
    module, also after ``merge_and_unload`` (which then returns the model with each filtered Linear/Conv1D
    wrapped in a ``TaskFilteredLayer``). Its inference cost per token and filtered layer is a d-wide dot
    product and norm, a clamp and two thin matmuls (≈ 4dk FLOPs for low_rank): see benchmarks/loratrf.py.

    Parameters per adapted layer (d = out_features): r(d_in + d_out) + d + 2dk (low_rank), + d + d
    (diagonal) or + d + d² (dense); a layer outside ``filter_modules`` has only the LoRA part.

    Each open question of spec §2.6 is a knob; the defaults follow spec §2.3 and the issue.

    Saving and loading: ``model.save_pretrained(folder)`` writes every field; loading needs ``import hirank``
    before ``PeftModel.from_pretrained`` (it registers the method with peft; without it peft raises
    ``KeyError: 'HIRANK_LORATRF'``), which the saved adapter_config.json and README.md also say.

    Args:
        r: rank of the LoRA part (paper: r).
        lora_alpha: the LoRA part is scaled by lora_alpha / r (paper: α).
        lora_dropout: dropout on the LoRA part's input.
        filter_rank: k, the rank of T = C·D for ``filter_transform="low_rank"`` (third-party code: 8; spec §2.5
            suggests 8-16).
        similarity: sim(h, t) in the gate (Q2): "cosine" (default; the clamp saturates less) or "dot"
            (the summary's product ⟨h, t⟩).
        filter_transform: structure of T (Q4): "low_rank" (default, C·D), "diagonal" (d numbers) or "dense" (d²).
        filter_modules: where the filter sits (Q1). None (default): on the output of every adapted layer.
            Otherwise names (exact or dotted suffixes) or a regex of the adapted modules that get a filter;
            the others get the LoRA part only. To approximate the block-output reading, name the projections
            that write into the residual stream (e.g. ["o_proj", "down_proj"]); filtering the residual stream
            itself is not offered (it is not the output of a Linear).
        share_task_vector: one task vector per filtered layer (Q3; default False, spec §2.3's t_l) or one
            shared by all filtered layers of an adapter (True; they must then all have the same output width).
            A shared vector is counted once as a parameter but stored once per layer in the adapter file.
        filter_positions: which tokens are edited (Q5): "all" (default), or LoReFT's notation "f<p>", "l<s>",
            "f<p>+l<s>" for the first p and/or last s positions of the sequence axis (dim -2 of the layer
            output, which must be (batch, seq, d)). Positions are raw indices: padding is not accounted for,
            and in cached generation each new token is its own length-1 sequence.
        init_weights: True: B = 0 and D = 0 (output unchanged at start). False: B and D random (tests).
    """

    r: int = field(default=8, metadata={"help": "Rank r of the LoRA part."})
    lora_alpha: float = field(default=8, metadata={"help": "LoRA scaling α; the update is scaled by α / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA part's input."})
    filter_rank: int = field(default=8, metadata={"help": "k, rank of T = C·D (low_rank filter)."})
    similarity: Literal["cosine", "dot"] = field(
        default="cosine", metadata={"help": "Gate similarity sim(h, t): cosine or dot."}
    )
    filter_transform: Literal["low_rank", "diagonal", "dense"] = field(
        default="low_rank", metadata={"help": "Structure of T: low_rank (C·D), diagonal or dense."}
    )
    filter_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Adapted modules whose output is filtered (None: all of them)."}
    )
    share_task_vector: bool = field(
        default=False, metadata={"help": "One task vector shared by all filtered layers (else one per layer)."}
    )
    filter_positions: str = field(
        default="all", metadata={"help": "Edited positions: 'all' or 'f<p>', 'l<s>', 'f<p>+l<s>'."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = HirankPeftType.LORATRF
        check = FieldCheck(self)
        self.r = check.integer("r")
        self.lora_alpha = check.number("lora_alpha", low=0.0, nonzero=True, expected="a finite number > 0")
        self.lora_dropout = check.number("lora_dropout", low=0.0, high=1.0, high_open=True)
        self.filter_rank = check.integer("filter_rank", expected="a positive integer (the filter rank k)")
        check.choice("similarity", SIMILARITIES)
        check.choice("filter_transform", TRANSFORMS)
        check.module_names("filter_modules")
        if isinstance(self.filter_modules, (set, tuple)):
            self.filter_modules = sorted(self.filter_modules)
        if isinstance(self.filter_modules, list) and not self.filter_modules:
            raise ValueError("LoraTRFConfig: filter_modules=[] filters nothing, which is plain LoRA: use "
                             "peft.LoraConfig instead.")
        check.flag("share_task_vector")
        if not isinstance(self.filter_positions, str):
            check.fail("filter_positions", "'all' or 'f<p>', 'l<s>', 'f<p>+l<s>' (e.g. 'f7+l7')")
        self.positions()  # validates filter_positions

    def positions(self) -> tuple[int, int]:
        """(first p, last s) positions to edit; (0, 0) means every position."""
        if self.filter_positions == "all":
            return 0, 0
        match = _POSITIONS.fullmatch(self.filter_positions or "")
        first, last = (int(match[g] or 0) for g in ("first", "last")) if match else (0, 0)
        if not match or first + last == 0 or ("+" in self.filter_positions) != bool(match["first"] and match["last"]):
            raise ValueError(
                "LoraTRFConfig: filter_positions must be 'all' or 'f<p>', 'l<s>', 'f<p>+l<s>' with p + s > 0 "
                f"(e.g. 'f7+l7'), got {self.filter_positions!r}."
            )
        return first, last

    def filters_module(self, module_name: str) -> bool:
        """Whether the adapted module ``module_name`` gets a task filter."""
        if self.filter_modules is None:
            return True
        if isinstance(self.filter_modules, str):
            return re.fullmatch(self.filter_modules, module_name) is not None
        return any(module_name_matches(module_name, name) for name in self.filter_modules)
