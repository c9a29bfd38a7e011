"""QuanTA layer: the gate circuit on activations, minus its frozen initial copy."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ...ops.merged import merged_linear
from ...ops.quanta import QuantaCircuit, plan_circuit
from ..base import SUPPORTED_LAYER_TYPES, HirankLayer, drops_inputs, quantized_weight_kind
from ..sharding import is_gathered
from .config import QuantaConfig

#: What a folded copy W₀ − M(θ₀) was built from: the base weight's and θ₀'s version, storage, dtype and device.
FoldSource = tuple[int, int, torch.dtype, torch.device, int, int]


class QuantaLayer(HirankLayer):
    """y = W₀x + b + M(θ)·drop(x) − M(θ₀)·drop(x), with M the QuanTA circuit (spec §1.4).

    The base weight is never edited in place (the official code folds −M(θ₀) into W₀). θ₀ is a
    persistent buffer saved with the adapter, so save/load is exact. Per forward the layer picks, by the
    circuit's written cost model (``QuantaCircuit.prefer_dense``: GEMM-equivalent multiply-adds for this many
    tokens), either the structured difference circuit on the activations or a dense ΔW = M(θ) − M(θ₀) built
    for the step: on a plain float ``nn.Linear`` with one active adapter and no dropout, one product with
    W₀ + ΔW (``fused_output``, ``ops.merged``), else one more matmul. All are exactly W₀x + b while θ = θ₀.

    With ``fold_frozen_copy`` the layer keeps W₀ − M(θ₀) as a separate dense copy (``quanta_folded``, not saved)
    and computes the authors' y = (W₀ − M(θ₀))x + b + M(θ)·drop(x) (spec §1.3): no θ₀ circuit per step.
    """

    adapter_layer_names = ("quanta_gates",)
    other_param_names = ("quanta_theta0", "quanta_circuit", "quanta_dropout", "quanta_folded", "quanta_folded_from")
    fuses_delta = True

    def update_layer(self, adapter_name: str, config: QuantaConfig, **kwargs: Any) -> None:
        circuit = plan_circuit(
            self.in_features, self.out_features, n_axes=config.n_axes,
            factors=tuple(config.factors) if config.factors else None,
            out_factors=tuple(config.out_factors) if config.out_factors else None,
            pad=config.pad,
        )
        if config.fold_frozen_copy and quantized_weight_kind(self.get_base_layer()) is not None:
            raise ValueError(
                f"fold_frozen_copy=True needs a float base weight to fold −M(θ₀) into, but this layer's is "
                f"bitsandbytes {quantized_weight_kind(self.get_base_layer())}; use fold_frozen_copy=False."
            )
        if not hasattr(self, "quanta_gates"):
            self.quanta_gates = nn.ParameterDict()
            self.quanta_theta0 = BufferDict(persistent=True)
            self.quanta_circuit: dict[str, QuantaCircuit] = {}
            self.quanta_dropout = nn.ModuleDict()
            self.quanta_folded = BufferDict(persistent=False)  # W₀ − M(θ₀) per folding adapter, base layout/dtype
            self.quanta_folded_from: dict[str, Optional[FoldSource]] = {}  # None: not built yet
            self.register_load_state_dict_post_hook(_refold_after_load)
        gates = circuit.init_gates()
        self.quanta_gates[adapter_name] = nn.Parameter(gates)
        self.quanta_theta0[adapter_name] = gates.clone() if config.init_weights else circuit.init_gates()
        self.quanta_circuit[adapter_name] = circuit
        self.quanta_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._finish_update_layer(adapter_name, config)
        if config.fold_frozen_copy:
            self._fold(adapter_name)

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

    # ---- fold_frozen_copy: W₀ − M(θ₀) kept as a dense copy, only the θ circuit per step ---------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = None if args or kwargs else self._folded_adapter()
        if name is None:
            return super().forward(x, *args, **kwargs)
        return self._folded_output(x, name)

    def unmerge(self) -> None:
        """Subtract the merged ΔW again, then rebuild the folded copies from the restored W₀."""
        super().unmerge()
        self._fold_all()

    def _fold_all(self) -> None:
        for name in self.quanta_folded_from:
            self._fold(name)

    def _fold_source(self, adapter_name: str) -> FoldSource:
        weight, theta0 = self.get_base_layer().weight, self.quanta_theta0[adapter_name]
        return (weight._version, weight.data_ptr(), weight.dtype, weight.device, theta0._version, theta0.data_ptr())

    def _fold(self, adapter_name: str) -> None:
        """Build W₀ − M(θ₀) in the base weight's layout and dtype (summed in float32, one cast); skipped while
        W₀ or θ₀ is not materialized (meta device, sharded), to be built at the next eager forward."""
        weight, theta0 = self.get_base_layer().weight, self.quanta_theta0[adapter_name]
        if weight.is_meta or theta0.is_meta or not is_gathered(weight, self.in_features * self.out_features):
            self.quanta_folded_from[adapter_name] = None
            return
        with torch.no_grad():
            frozen = self.quanta_circuit[adapter_name].dense(theta0)  # M(θ₀): (out_features, in_features)
            frozen = frozen.T if self.fan_in_fan_out else frozen
            accumulate = torch.promote_types(weight.dtype, frozen.dtype)
            folded = (weight.to(accumulate) - frozen.to(weight.device, accumulate)).to(weight.dtype)
        self.quanta_folded[adapter_name] = folded
        self.quanta_folded_from[adapter_name] = self._fold_source(adapter_name)

    def _folded_adapter(self) -> Optional[str]:
        """The one active unmerged adapter when it folds its frozen copy and the base can run on the folded weight
        (``base_runs_as_product`` for nn.Linear / Conv1D, its weight frozen); else None (the exact θ₀-circuit path)."""
        names = [name for name in self.active_adapters if name in self._adapter_names()]
        if self.disable_adapters or self.merged or len(names) != 1 or names[0] not in self.quanta_folded_from:
            return None
        if not self.base_runs_as_product(SUPPORTED_LAYER_TYPES) or self.base_layer.weight.requires_grad:
            warnings.warn(
                f"QuanTA fold_frozen_copy: this layer's base ({type(self.base_layer).__name__}) runs through hooks, a "
                "patched forward, a sharded or a trainable weight, so it cannot run on the folded copy; it runs the "
                "exact θ₀ circuit instead (same outputs, slower).", stacklevel=2,
            )
            return None
        return names[0]

    def _folded_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """(W₀ − M(θ₀))x + b + M(θ)·drop(x): the θ circuit, or M(θ) built densely where the cost model says so."""
        # eager: rebuild after an edit of W₀ or θ₀, or a move; and where the copy alone changed dtype (peft's
        # cast_adapter_dtype casts every half-precision adapter buffer, this one too, to float32)
        if not torch.compiler.is_compiling() and (
                self.quanta_folded_from[adapter_name] != self._fold_source(adapter_name)
                or self.quanta_folded[adapter_name].dtype != self.get_base_layer().weight.dtype):
            self._fold(adapter_name)
        folded = self.quanta_folded[adapter_name]
        weight, bias = (folded.T if self.fan_in_fan_out else folded), self.base_layer.bias
        circuit, gates = self.quanta_circuit[adapter_name], self.quanta_gates[adapter_name]
        dropout, tokens = self.quanta_dropout[adapter_name], x.numel() // x.shape[-1]
        if not drops_inputs(dropout) and circuit.prefer_dense(tokens, fused=True, folded=True) \
                and self._fusable_adapter(x) == adapter_name:
            return merged_linear(x, weight, bias, circuit.dense(gates))  # one product with W₀ − M(θ₀) + M(θ)
        result = nn.functional.linear(x, weight, bias)
        branch_input = dropout(x.to(gates.dtype))
        if circuit.prefer_dense(tokens, folded=True):
            return result + (branch_input @ circuit.dense(gates).T).to(result.dtype)
        return result + circuit.apply(branch_input, gates).to(result.dtype)


def _refold_after_load(layer: QuantaLayer, incompatible_keys: Any) -> None:
    """``load_state_dict`` (as ``PeftModel.from_pretrained`` calls it) may bring another θ₀ or W₀: fold again."""
    layer._fold_all()
