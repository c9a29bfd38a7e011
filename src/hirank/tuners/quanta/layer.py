"""QuanTA layer: the gate circuit on activations, minus its frozen initial copy."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...ops.quanta import QuantaCircuit, plan_circuit
from ..base import HirankLayer
from .config import QuantaConfig


# Below this ratio of dense to circuit multiply-adds, a cached dense M(θ₀) matmul beats running the frozen
# circuit: measured on 2 CPU threads, 512 tokens: d=384 (ratio 3.2) dense 0.9 ms vs circuit 1.9 ms; d=768
# (4.4) 3.7 vs 3.7; d=1536 (6.2) 14.4 vs 7.0 (benchmarks/quanta.py prints the end-to-end effect).
DENSE_THETA0_MAX_RATIO = 4.0


class QuantaLayer(HirankLayer):
    """y = W₀x + b + M(θ)·drop(x) − M(θ₀)·drop(x), with M the QuanTA circuit (spec §1.4).

    The base weight is never edited in place (the official code folds −M(θ₀) into W₀). θ₀ is a
    persistent buffer saved with the adapter, so save/load is exact. The frozen branch M(θ₀)·x runs
    without autograd, either as the circuit or, where that is faster (small layers, see
    ``DENSE_THETA0_MAX_RATIO``), as one matmul with a cached dense M(θ₀) (not saved; rebuilt whenever
    θ₀ changes).
    """

    adapter_layer_names = ("quanta_gates",)
    other_param_names = ("quanta_theta0", "quanta_circuit", "quanta_dropout")

    def update_layer(self, adapter_name: str, config: QuantaConfig, **kwargs: Any) -> None:
        circuit = plan_circuit(
            self.in_features, self.out_features, n_axes=config.n_axes,
            factors=tuple(config.factors) if config.factors else None,
            out_factors=tuple(config.out_factors) if config.out_factors else None,
            pad=config.pad,
        )
        if not hasattr(self, "quanta_gates"):
            self.quanta_gates = nn.ParameterDict()
            self.quanta_theta0 = BufferDict(persistent=True)
            self.quanta_circuit: dict[str, QuantaCircuit] = {}
            self.quanta_dropout = nn.ModuleDict()
            self._theta0_dense_cache: dict[str, tuple[tuple, torch.Tensor]] = {}
        gates = circuit.init_gates()
        self.quanta_gates[adapter_name] = nn.Parameter(gates)
        self.quanta_theta0[adapter_name] = gates.clone() if config.init_weights else circuit.init_gates()
        self.quanta_circuit[adapter_name] = circuit
        self._theta0_dense_cache.pop(adapter_name, None)
        self.quanta_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._finish_update_layer(adapter_name, config)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        circuit = self.quanta_circuit[adapter_name]
        gates = self.quanta_gates[adapter_name]
        return circuit.dense(gates) - circuit.dense(self.quanta_theta0[adapter_name].to(gates.dtype))

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        circuit = self.quanta_circuit[adapter_name]
        gates = self.quanta_gates[adapter_name]
        x = self.quanta_dropout[adapter_name](x.to(gates.dtype))
        return circuit.apply(x, gates) - self._frozen_output(x, adapter_name)

    @torch.no_grad()
    def _frozen_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """M(θ₀)·x, by the cheaper of the circuit and a cached dense matrix."""
        circuit, theta0 = self.quanta_circuit[adapter_name], self.quanta_theta0[adapter_name]
        if self.in_features * self.out_features > DENSE_THETA0_MAX_RATIO * circuit.macs_per_token():
            return circuit.apply(x, theta0.to(x.dtype))
        key = (theta0.data_ptr(), theta0._version, x.dtype, x.device)
        cached = self._theta0_dense_cache.get(adapter_name)
        if cached is None or cached[0] != key:
            with torch.autocast(x.device.type, enabled=False):  # in x.dtype, even if first built under autocast
                cached = (key, circuit.dense(theta0.to(x.dtype)))
            self._theta0_dense_cache[adapter_name] = cached
        return x @ cached[1].T

    def delete_adapter(self, adapter_name: str) -> None:
        self._theta0_dense_cache.pop(adapter_name, None)
        super().delete_adapter(adapter_name)
