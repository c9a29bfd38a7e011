"""QuanTA layer: the gate circuit on activations, minus its frozen initial copy."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...ops.quanta import QuantaCircuit, plan_circuit
from ..base import HirankLayer, drops_inputs
from .config import QuantaConfig


class QuantaLayer(HirankLayer):
    """y = W₀x + b + M(θ)·drop(x) − M(θ₀)·drop(x), with M the QuanTA circuit (spec §1.4).

    The base weight is never edited in place (the official code folds −M(θ₀) into W₀). θ₀ is a
    persistent buffer saved with the adapter, so save/load is exact. Per forward the layer picks, by the
    circuit's written cost model (``QuantaCircuit.prefer_dense``: GEMM-equivalent multiply-adds for this many
    tokens), either the structured difference circuit on the activations or a dense ΔW = M(θ) − M(θ₀) built
    for the step: on a plain float ``nn.Linear`` with one active adapter and no dropout, one product with
    W₀ + ΔW (``fused_output``, ``ops.merged``), else one more matmul. All are exactly W₀x + b while θ = θ₀.
    """

    adapter_layer_names = ("quanta_gates",)
    other_param_names = ("quanta_theta0", "quanta_circuit", "quanta_dropout")
    fuses_delta = True

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
        gates = circuit.init_gates()
        self.quanta_gates[adapter_name] = nn.Parameter(gates)
        self.quanta_theta0[adapter_name] = gates.clone() if config.init_weights else circuit.init_gates()
        self.quanta_circuit[adapter_name] = circuit
        self.quanta_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._finish_update_layer(adapter_name, config)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        gates = self.quanta_gates[adapter_name]
        return self.quanta_circuit[adapter_name].delta_dense(gates, self.quanta_theta0[adapter_name].to(gates.dtype))

    def fused_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        """x·(W₀ + ΔW)ᵀ + b as one product, where the cost model prefers it (``prefer_dense(fused=True)``) and no
        dropout makes the branch read another input than the base layer."""
        dropout = self.quanta_dropout[adapter_name]
        if drops_inputs(dropout):
            return None
        if not self.quanta_circuit[adapter_name].prefer_dense(x.numel() // x.shape[-1], fused=True):
            return None
        return self.merged_product(x, self.delta_weight(adapter_name))

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        circuit = self.quanta_circuit[adapter_name]
        gates = self.quanta_gates[adapter_name]
        theta0 = self.quanta_theta0[adapter_name].to(gates.dtype)
        x = self.quanta_dropout[adapter_name](x.to(gates.dtype))
        if circuit.prefer_dense(x.numel() // x.shape[-1]):
            return x @ circuit.delta_dense(gates, theta0).T
        return circuit.apply_difference(x, gates, theta0)
