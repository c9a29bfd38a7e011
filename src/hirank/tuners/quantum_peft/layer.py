"""Quantum-PEFT layer: y = W₀x + b + s·U(Λ ⊙ (Vᵀx)), with U, V generated from a few circuit angles."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...ops import pauli
from ..base import HirankLayer
from ..sharding import is_gathered
from .config import QuantumPeftConfig


@dataclass(frozen=True)
class CircuitKey:
    """Circuits with equal keys are simulated as one batch."""

    dim: int
    rank: int
    n_layers: int
    dtype: torch.dtype
    device: torch.device


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
    per-token cost is that of LoRA with rank K. Under the tuner's forward, the circuits of every layer are
    simulated together beforehand (:func:`shared_circuits`) and the layer only reads its factors. Under no-grad
    (evaluation, generation) U and V are kept until the angles change, so inference runs no circuits.
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
            self._inference_factors: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        smallest = min(self.in_features, self.out_features)
        if config.rank > smallest:
            raise ValueError(
                f"rank K={config.rank} exceeds min(in_features, out_features) = {smallest}, so U and V cannot have K "
                f"orthonormal columns; use rank ≤ {smallest} or leave this module out of target_modules."
            )
        self._inference_factors.pop(adapter_name, None)
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

    def circuit_requests(self) -> list[tuple[CircuitKey, tuple[str, str], nn.Parameter]]:
        """(circuit shape, (adapter, "out" | "in"), angles) of every factor this layer's next forward needs and
        that can be simulated ahead of it: none while a sharding wrapper holds the angles (the layer then
        simulates its own circuits inside its forward, where the wrapper has gathered them)."""
        if self.disable_adapters or self.merged:
            return []
        requests = []
        for name in self.active_adapters:
            if name not in self._adapter_names() or self._cached_factors(name) is not None:
                continue
            settings = self.qpeft_settings[name]
            factors = (("out", self.qpeft_angles_out[name], self.out_features),
                       ("in", self.qpeft_angles_in[name], self.in_features))
            if not all(is_gathered(angles, pauli.stiefel_angle_count(dim, settings.rank, settings.n_layers))
                       for _, angles, dim in factors):
                return []
            for role, angles, dim in factors:
                key = CircuitKey(dim, settings.rank, settings.n_layers, angles.dtype, angles.device)
                requests.append((key, (name, role), angles))
        return requests

    def _angles_key(self, adapter_name: str) -> tuple:
        """Changes whenever either angle tensor is replaced or edited in place (optimizer step, load, .to())."""
        angles = (self.qpeft_angles_out[adapter_name], self.qpeft_angles_in[adapter_name])
        return tuple((tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device) for tensor in angles)

    def _cached_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(U, V) kept from an earlier no-grad forward with the same angles; None with grad on or when stale."""
        cached = self._inference_factors.get(adapter_name)
        if torch.is_grad_enabled() or cached is None or cached[0] != self._angles_key(adapter_name):
            return None
        return cached[1], cached[2]

    def _keep_for_inference(self, adapter_name: str, u: torch.Tensor, v: torch.Tensor) -> None:
        """Under no-grad, keep (U, V) for the next forwards until the angles change (eval needs no new circuits)."""
        if not torch.is_grad_enabled():
            self._inference_factors[adapter_name] = (self._angles_key(adapter_name), u, v)

    def stiefel_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V): (d_out × K) and (d_in × K) with orthonormal columns."""
        shared = getattr(self, "_shared_factors", {})
        if (adapter_name, "out") in shared:
            u, v = shared[adapter_name, "out"], shared[adapter_name, "in"]
        else:
            cached = self._cached_factors(adapter_name)
            if cached is not None:
                return cached
            u, v = self._simulate(adapter_name)
        self._keep_for_inference(adapter_name, u, v)
        return u, v

    def _simulate(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) from this layer's circuits alone."""
        settings = self.qpeft_settings[adapter_name]
        angles_out, angles_in = self.qpeft_angles_out[adapter_name], self.qpeft_angles_in[adapter_name]
        if self.in_features == self.out_features:  # one batched circuit simulation for both factors
            u, v = pauli.stiefel_columns(torch.stack((angles_out, angles_in)), self.out_features, settings.rank,
                                         settings.n_layers).unbind(0)
            return u, v
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


@contextlib.contextmanager
def shared_circuits(model: nn.Module) -> Iterator[None]:
    """Simulate the circuits of every Quantum-PEFT layer of ``model`` in one batch per circuit shape, for the
    forward passes inside the block (each gate is then one tensor operation for all layers instead of one per
    layer: fewer, larger kernels). Same values and gradients as per-layer generation (tested)."""
    layers = [module for module in model.modules() if isinstance(module, QuantumPeftLayer)]
    batches: dict[CircuitKey, list[tuple[QuantumPeftLayer, tuple[str, str], nn.Parameter]]] = {}
    for layer in layers:
        for key, slot, angles in layer.circuit_requests():
            batches.setdefault(key, []).append((layer, slot, angles))
    try:
        for key, batch in batches.items():
            columns = pauli.stiefel_columns(torch.stack([angles for *_, angles in batch]), key.dim, key.rank,
                                            key.n_layers)
            for (layer, slot, _), factor in zip(batch, columns.unbind(0)):
                layer.__dict__.setdefault("_shared_factors", {})[slot] = factor
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("_shared_factors", None)
