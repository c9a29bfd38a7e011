"""LoRATRF layer (reconstructed, spec §2.3): LoRA on the weight, then a task-aware filter on the output."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ...ops import loratrf
from ..base import HirankLayer
from .config import LoraTRFConfig


class TaskFilter(nn.Module):
    """The task-aware filter of one adapter on one layer: h ↦ g·h·T with g = clamp(sim(h, t), 0, 1).

    ``forward`` returns what the filter adds to h; both run in h's dtype. Parameters: ``task_vector`` t (d,),
    ``C`` (d, k) for low_rank only, and ``D``, the zero-initialised last factor of T: D (k, d) for low_rank
    (T = C·D), T itself (d, d) for dense, diag(T) (d,) for diagonal.
    """

    def __init__(self, width: int, config: LoraTRFConfig, module_name: str = "") -> None:
        super().__init__()
        self.similarity = config.similarity
        self.first, self.last = config.positions()
        self.module_name = module_name
        # t: Gaussian (third-party code), scaled to norm ≈ 1 so that the dot-product gate starts unsaturated
        self.task_vector = nn.Parameter(torch.randn(width) / math.sqrt(width))
        k = config.filter_rank
        if config.filter_transform == "low_rank":
            bound = width**-0.5  # C like nn.Linear(d, k).weight (third-party code)
            self.C: Optional[nn.Parameter] = nn.Parameter(torch.empty(width, k).uniform_(-bound, bound))
            D, fan_in = torch.empty(k, width), k
        elif config.filter_transform == "dense":
            self.C = None
            D, fan_in = torch.empty(width, width), width
        else:  # diagonal
            self.C = None
            D, fan_in = torch.empty(width), 1
        if config.init_weights:
            nn.init.zeros_(D)  # T = 0: the output starts unchanged, D gets gradient at step 1, t and C from step 2
        else:
            nn.init.uniform_(D, -(fan_in**-0.5), fan_in**-0.5)
        self.D = nn.Parameter(D)

    def _check_shape(self, h: torch.Tensor) -> None:
        if (self.first or self.last) and h.ndim < 3:
            raise ValueError(
                f"module {self.module_name!r}: filter_positions='f{self.first}+l{self.last}' needs outputs shaped "
                f"(batch, seq, features), got shape {tuple(h.shape)}; use filter_positions='all' for this model."
            )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self._check_shape(h)
        C = None if self.C is None else self.C.to(h.dtype)
        return loratrf.filter_delta(h, self.task_vector.to(h.dtype), self.D.to(h.dtype), C, self.similarity,
                                    self.first, self.last)

    def filtered(self, h: torch.Tensor) -> torch.Tensor:
        """h + forward(h); memory-lean (autograd keeps y, not h: ``loratrf.filtered_output``)."""
        self._check_shape(h)
        return loratrf.filtered_output(h, self.task_vector, self.D, self.C, self.similarity, self.first, self.last)

    def transformation(self) -> torch.Tensor:
        """Dense T (d, d)."""
        return loratrf.transformation(self.D, self.C)

    def extra_repr(self) -> str:
        positions = f"f{self.first}+l{self.last}" if self.first or self.last else "all"
        return f"similarity={self.similarity!r}, positions={positions!r}"


def apply_filters(h: torch.Tensor, filters: Iterable[TaskFilter]) -> torch.Tensor:
    """h + Σ filter(h): several active adapters' filters all read the same h and add their edits."""
    filters = list(filters)
    if len(filters) == 1:  # the usual case: one filter, memory-lean
        return filters[0].filtered(h)
    edits = [task_filter(h) for task_filter in filters]
    for edit in edits:
        h = h + edit
    return h


class TaskFilteredLayer(nn.Module):
    """What ``merge_and_unload`` leaves of a LoRATRF layer: the merged Linear/Conv1D plus its live filters.

    It is no peft layer: a later ``merge_and_unload()`` or ``unload()`` (of this or another peft model around it)
    leaves it as it is, since its LoRA part is already in the weight and the filter cannot be merged.
    """

    def __init__(self, base_layer: nn.Module, task_filters: Iterable[TaskFilter]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.task_filters = nn.ModuleList(task_filters)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return apply_filters(self.base_layer(x, *args, **kwargs), self.task_filters)

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        """peft's teardown calls this on every module with a ``base_layer``: already torn down, stay as is."""
        return self


class LoraTRFLayer(HirankLayer):
    """h = W₀x + b + (α/r)·B·A·drop(x), then h + g·h·T for each active adapter's filter (spec §2.3).

    The LoRA part is ``delta_weight``/``adapter_output`` and merges; the filter reads the layer's full output
    (LoRA included), so merged and unmerged outputs agree and ``merge`` keeps the filter live.
    """

    adapter_layer_names = ("loratrf_A", "loratrf_B", "loratrf_filter")
    other_param_names = ("loratrf_scaling", "loratrf_dropout")

    def update_layer(self, adapter_name: str, config: LoraTRFConfig, **kwargs: Any) -> None:
        r = config.r
        if not hasattr(self, "loratrf_A"):
            self.loratrf_A = nn.ParameterDict()  # (r, in)
            self.loratrf_B = nn.ParameterDict()  # (out, r)
            self.loratrf_filter = nn.ModuleDict()  # TaskFilter, on the layers config.filter_modules selects
            self.loratrf_scaling: dict[str, float] = {}
            self.loratrf_dropout = nn.ModuleDict()
        A = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # LoRA's init
        B = torch.zeros(self.out_features, r)
        if not config.init_weights:
            nn.init.uniform_(B, -(r**-0.5), r**-0.5)
        self.loratrf_A[adapter_name] = nn.Parameter(A)
        self.loratrf_B[adapter_name] = nn.Parameter(B)
        module_name = kwargs.get("module_name", "")
        if config.filters_module(module_name):
            self.loratrf_filter[adapter_name] = TaskFilter(self.out_features, config, module_name)
        self.loratrf_scaling[adapter_name] = config.lora_alpha / r
        dropout = config.lora_dropout
        self.loratrf_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._finish_update_layer(adapter_name, config)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW of the LoRA part only (the filter is input-dependent and has no ΔW)."""
        return self.loratrf_scaling[adapter_name] * (self.loratrf_B[adapter_name] @ self.loratrf_A[adapter_name])

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        A = self.loratrf_A[adapter_name]
        x = self.loratrf_dropout[adapter_name](x.to(A.dtype))
        return ((x @ A.T) * self.loratrf_scaling[adapter_name]) @ self.loratrf_B[adapter_name].T  # scale r-wide

    def _filters(self, adapter_names: Iterable[str]) -> list[TaskFilter]:
        return [self.loratrf_filter[name] for name in adapter_names if name in self.loratrf_filter]

    def _adapted_output(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # the merged adapters' LoRA parts are in the weight; their filters stay live
            return apply_filters(h, self._filters(self.merged_adapters))
        active = [name for name in self.active_adapters if name in self._adapter_names()]
        for name in active:
            h = h + self.adapter_output(x, name).to(h.dtype)
        return apply_filters(h, self._filters(active))

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        """The layer without peft: for ``merge_and_unload``, the merged base layer wrapped with the merged adapters'
        live filters. For ``unload``: the untouched base layer, or, after ``merge_adapter`` (whose ΔW is in the
        weight), the merged layer with its filters, as peft's LoRA keeps merged weights on ``unload``."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        filters = self._filters(self.merged_adapters)
        return TaskFilteredLayer(self.get_base_layer(), filters) if filters else self.get_base_layer()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return adapter_name not in self.loratrf_filter
