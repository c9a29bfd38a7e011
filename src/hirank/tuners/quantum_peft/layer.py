"""Quantum-PEFT layer: y = W₀x + b + s·U(Λ ⊙ (Vᵀx)), with U, V generated from a few circuit angles."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...ops import pauli
from ..base import HirankLayer
from .config import QuantumPeftConfig


@dataclass(frozen=True)
class QuantumPeftSettings:
    """Per-adapter settings of one layer."""

    rank: int
    n_layers: int
    scale: float


class QuantumPeftLayer(HirankLayer):
    """Quantum-PEFT on a Linear / Conv1D layer (spec §2.6): ΔW = s·U Λ Vᵀ, merged densely like LoRA.

    ``qpeft_angles_out`` generates U (d_out × K), ``qpeft_angles_in`` generates V (d_in × K), ``qpeft_lambda``
    is Λ. U and V are regenerated once per forward call (a token-independent circuit simulation); the
    per-token cost is that of LoRA with rank K.
    """

    adapter_layer_names = ("qpeft_angles_out", "qpeft_angles_in", "qpeft_lambda")
    other_param_names = ("qpeft_settings", "qpeft_rank_mask")

    def update_layer(self, adapter_name: str, config: QuantumPeftConfig, **kwargs: Any) -> None:
        if not hasattr(self, "qpeft_lambda"):
            self.qpeft_angles_out = nn.ParameterDict()
            self.qpeft_angles_in = nn.ParameterDict()
            self.qpeft_lambda = nn.ParameterDict()
            self.qpeft_settings: dict[str, QuantumPeftSettings] = {}
            self.qpeft_rank_mask = BufferDict(persistent=False)  # rebuilt from the config on load
        smallest = min(self.in_features, self.out_features)
        if config.rank > smallest:
            raise ValueError(
                f"rank K={config.rank} exceeds min(in_features, out_features) = {smallest}, so U and V cannot have K "
                f"orthonormal columns; use rank ≤ {smallest} or leave this module out of target_modules."
            )
        rank, n_layers = config.rank, config.n_layers
        self.qpeft_settings[adapter_name] = QuantumPeftSettings(rank, n_layers, float(config.scale))
        # Our init choice (spec §2.6 leaves it open): angles uniform in [−π, π) so U, V are spread-out subspaces
        # (θ = 0 would give coordinate axes) and Λ = 0 so ΔW = 0; the angles get gradient once Λ ≠ 0 (step 1).
        for angles, dim in ((self.qpeft_angles_out, self.out_features), (self.qpeft_angles_in, self.in_features)):
            count = pauli.stiefel_angle_count(dim, rank, n_layers)
            angles[adapter_name] = nn.Parameter(torch.empty(count).uniform_(-math.pi, math.pi))
        diagonal = torch.zeros(rank) if config.init_weights else torch.randn(rank)
        self.qpeft_lambda[adapter_name] = nn.Parameter(diagonal)
        if config.rank_mask is not None:
            self.qpeft_rank_mask[adapter_name] = torch.tensor(config.rank_mask, dtype=torch.float32)
        elif adapter_name in self.qpeft_rank_mask:
            del self.qpeft_rank_mask[adapter_name]
        self._finish_update_layer(adapter_name, config)

    def stiefel_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V): (d_out × K) and (d_in × K) with orthonormal columns."""
        settings = self.qpeft_settings[adapter_name]
        angles_out, angles_in = self.qpeft_angles_out[adapter_name], self.qpeft_angles_in[adapter_name]
        if self.in_features == self.out_features:  # one batched circuit simulation for both factors
            both = pauli.stiefel_columns(torch.stack((angles_out, angles_in)), self.out_features, settings.rank,
                                         settings.n_layers)
            return both[0], both[1]
        u = pauli.stiefel_columns(angles_out, self.out_features, settings.rank, settings.n_layers)
        v = pauli.stiefel_columns(angles_in, self.in_features, settings.rank, settings.n_layers)
        return u, v

    def _scaled_diagonal(self, adapter_name: str) -> torch.Tensor:
        """s·Λ, with masked ranks zeroed (intrinsic-rank masking)."""
        diagonal = self.qpeft_lambda[adapter_name] * self.qpeft_settings[adapter_name].scale
        if adapter_name in self.qpeft_rank_mask:
            diagonal = diagonal * self.qpeft_rank_mask[adapter_name]
        return diagonal

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        u, v = self.stiefel_factors(adapter_name)
        return pauli.delta_weight(u, v, self._scaled_diagonal(adapter_name))

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        u, v = self.stiefel_factors(adapter_name)
        diagonal = self._scaled_diagonal(adapter_name)
        return pauli.adapter_output(x.to(diagonal.dtype), u, v, diagonal)
