"""MTLoRA layer: LoRA's two factors with an r×r transformation T between them."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...ops import mtlora
from ..base import HirankLayer
from .config import MTLoraConfig


class MTLoraLayer(HirankLayer):
    """y = W₀x + b + (α/r)·B·T(C, D)·A·drop(x) (spec §1.2), computed as x → Ax → TAx → BTAx."""

    adapter_layer_names = ("mtlora_A", "mtlora_B", "mtlora_C", "mtlora_D")
    other_param_names = ("mtlora_variant", "mtlora_scaling", "mtlora_dropout")

    def update_layer(self, adapter_name: str, config: MTLoraConfig, **kwargs: Any) -> None:
        r = config.r
        if not hasattr(self, "mtlora_A"):
            self.mtlora_A = nn.ParameterDict()  # (r, in)
            self.mtlora_B = nn.ParameterDict()  # (out, r)
            self.mtlora_C = nn.ParameterDict()  # (r, r)
            self.mtlora_D = nn.ParameterDict()  # (r, r), CTCM and DTSM only
            self.mtlora_variant: dict[str, str] = {}
            self.mtlora_scaling: dict[str, float] = {}
            self.mtlora_dropout = nn.ModuleDict()
        A = torch.empty(r, self.in_features)
        B = torch.empty(self.out_features, r)
        if not config.init_weights:  # everything random: ΔW ≠ 0 with a generic T
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.uniform_(B, -(r**-0.5), r**-0.5)
            C = mtlora.random_square(r)
            D = mtlora.random_square(r) if config.variant in mtlora.TWO_FACTOR_VARIANTS else None
        else:
            C, D = mtlora.initial_factors(config.variant, config.init_T, r)
            if config.init_T == "zeros":  # the LLaVA recipe: ΔW = 0 through T = 0, B random
                nn.init.normal_(A, std=0.02)
                nn.init.normal_(B, std=0.02)
            else:  # ΔW = 0 through B = 0; B gets gradient at step 1, A and T from step 2
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                nn.init.zeros_(B)
        self.mtlora_A[adapter_name] = nn.Parameter(A)
        self.mtlora_B[adapter_name] = nn.Parameter(B)
        self.mtlora_C[adapter_name] = nn.Parameter(C)
        if D is not None:
            self.mtlora_D[adapter_name] = nn.Parameter(D)
        self.mtlora_variant[adapter_name] = config.variant
        self.mtlora_scaling[adapter_name] = config.lora_alpha / r
        dropout = config.lora_dropout
        self.mtlora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._finish_update_layer(adapter_name, config)

    def transformation(self, adapter_name: str) -> torch.Tensor:
        """T (r, r) of the adapter."""
        D = self.mtlora_D[adapter_name] if adapter_name in self.mtlora_D else None
        return mtlora.transformation(self.mtlora_variant[adapter_name], self.mtlora_C[adapter_name], D)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return mtlora.delta_weight(
            self.mtlora_A[adapter_name], self.mtlora_B[adapter_name], self.transformation(adapter_name),
            self.mtlora_scaling[adapter_name],
        )

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        A = self.mtlora_A[adapter_name]
        x = self.mtlora_dropout[adapter_name](x.to(A.dtype))
        return mtlora.forward(
            x, A, self.mtlora_B[adapter_name], self.transformation(adapter_name), self.mtlora_scaling[adapter_name]
        )
