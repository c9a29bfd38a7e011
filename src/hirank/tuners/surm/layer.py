"""SURM layer: a structured matrix S applied by FFT / reshape, as a LoRA branch or as an adapter."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from ...ops import structured
from ..base import HirankLayer, drops_inputs
from .config import SurmConfig

#: generators ↦ dense S, per structure (keyword arguments out_features, in_features)
DENSE_BUILDS: dict[str, Callable[..., torch.Tensor]] = {
    "circulant": structured.circulant_dense,
    "toeplitz": structured.toeplitz_dense,
    "kronecker": lambda b, a, out_features, in_features: structured.kronecker_dense(b, a),
    "ldr": structured.ldr_dense,
}
ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": nn.functional.gelu,
    "relu": nn.functional.relu,
    "silu": nn.functional.silu,
    "tanh": torch.tanh,
    "identity": lambda v: v,
}
#: std of the LDR skew-circulant generators H at init (the authors' 0.02, spec §3.2d).
SKEW_GENERATOR_STD = 0.02


@dataclass(frozen=True)
class SurmSettings:
    """Per-adapter settings of one layer: S is ``rows × cols`` (cols = rows for the adapter placement)."""

    structure: str
    placement: str
    alpha: float
    activation: str
    rows: int
    cols: int


class SurmLayer(HirankLayer):
    """SURM on a Linear / Conv1D layer (spec §3.2, §3.4).

    ``placement="lora"``: y = W₀x + b + α·S·drop(x), mergeable. ``placement="adapter"``: with
    y = W₀x + b the base output, out = y + act(α·S·drop(y)) + bias (S square on the outputs), not mergeable.
    Several active adapters act in parallel: the LoRA-placed ones add to y, then each adapter-placed one
    adds act(α·S·y) + bias computed from that same y.

    Factors per structure: ``surm_B`` is the factor that starts at zero (circulant b, Toeplitz t,
    Kronecker B, LDR G), ``surm_A`` the other one (circulant a, Kronecker A, LDR H; none for Toeplitz),
    ``surm_bias`` the adapter placement's bias.
    """

    adapter_layer_names = ("surm_B", "surm_A", "surm_bias")
    other_param_names = ("surm_settings", "surm_dropout")
    not_mergeable_reason = (
        "placement='adapter' computes out = y + act(α·S·y) + bias, which is non-linear in the layer output y, so no "
        "weight update ΔW can reproduce it. Keep the model unmerged, or use placement='lora' (W₀x + α·S·x) for a "
        "mergeable SURM."
    )

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        """True unless an adapter of this layer uses ``placement="adapter"``."""
        return all(settings.placement == "lora" for settings in self.surm_settings.values())

    def update_layer(self, adapter_name: str, config: SurmConfig, **kwargs: Any) -> None:
        if not hasattr(self, "surm_B"):
            self.surm_B = nn.ParameterDict()
            self.surm_A = nn.ParameterDict()
            self.surm_bias = nn.ParameterDict()
            self.surm_settings: dict[str, SurmSettings] = {}
            self.surm_dropout = nn.ModuleDict()
        rows = self.out_features
        cols = self.out_features if config.placement == "adapter" else self.in_features
        settings = SurmSettings(config.structure, config.placement, float(config.alpha), config.adapter_activation,
                                rows, cols)
        zero_factor, other_factor = self._init_factors(settings, config, kwargs.get("module_name", "this module"))
        self.surm_B[adapter_name] = nn.Parameter(zero_factor)
        if other_factor is not None:
            self.surm_A[adapter_name] = nn.Parameter(other_factor)
        if config.placement == "adapter":
            self.surm_bias[adapter_name] = nn.Parameter(torch.zeros(rows))
        self.surm_settings[adapter_name] = settings
        self.surm_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._finish_update_layer(adapter_name, config)

    @staticmethod
    def _init_factors(settings: SurmSettings, config: SurmConfig,
                      module_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the factor that starts at zero, the other factor) at the paper init (spec §3.2).

        With ``init_weights=False`` the zero factor is drawn instead, scaled so that the entries of S have
        variance of order 1/n (n = columns of S), like a freshly initialised linear layer.
        """
        rows, cols = settings.rows, settings.cols
        size = max(rows, cols)

        def zero_factor(*shape: int, random_std: float) -> torch.Tensor:
            return torch.zeros(shape) if config.init_weights else torch.randn(shape) * random_std

        if settings.structure == "circulant":  # c = a ⊙ b; a ~ N(0, 1) as the authors' code runs, b = 0
            return zero_factor(size, random_std=size ** -0.5), torch.randn(size)
        if settings.structure == "toeplitz":  # one generator t = 0; its gradient is linear in x, not zero
            return zero_factor(rows + cols - 1, random_std=cols ** -0.5), None
        if settings.structure == "kronecker":  # A kaiming-uniform (nn.Linear default, variance r/3n), B = 0
            factor = SurmLayer._kronecker_factor(config.kronecker_factor, rows, cols, module_name)
            other = torch.empty(factor, cols // factor)
            nn.init.kaiming_uniform_(other, a=math.sqrt(5))
            return zero_factor(rows // factor, factor, random_std=(3 / factor) ** 0.5), other
        rank = config.displacement_rank  # ldr: G = 0, H ~ N(0, 0.02²)
        if rank > size:
            raise ValueError(f"displacement_rank {rank} exceeds the size {size} of the structured matrix; "
                             f"use displacement_rank ≤ {size}.")
        random_std = 1 / (size * rank ** 0.5 * SKEW_GENERATOR_STD)
        return zero_factor(rank, size, random_std=random_std), torch.randn(rank, size) * SKEW_GENERATOR_STD

    @staticmethod
    def _kronecker_factor(requested: int | None, rows: int, cols: int, module_name: str) -> int:
        choices = structured.kronecker_factor_choices(cols, rows)
        if requested is None:
            factor = structured.choose_kronecker_factor(cols, rows)
            if structured.kronecker_rank_bound(cols, rows, factor) == 1 < min(rows, cols):
                warnings.warn(
                    f"SURM kronecker on {module_name!r} ({rows}×{cols}): gcd {math.gcd(rows, cols)} admits no factor "
                    "with rank above 1, so S = B ⊗ A is a rank-1 update. Use structure='circulant' or 'toeplitz' "
                    "for a full-rank S on this module."
                )
            return factor
        if requested not in choices:
            raise ValueError(
                f"kronecker_factor={requested} must divide both sides of the {rows}×{cols} structured matrix; "
                f"valid choices: {choices} (or kronecker_factor=None to choose per layer)."
            )
        return requested

    # ---- the structure ------------------------------------------------------------------------
    def _generators(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The generators of α·S, with α folded into the zero factor (O(N) work instead of a pass over the
        activations): circulant (c,), Toeplitz (t,), Kronecker (B, A), LDR (G, H)."""
        settings = self.surm_settings[adapter_name]
        scaled = settings.alpha * self.surm_B[adapter_name]
        if settings.structure == "circulant":
            return (self.surm_A[adapter_name] * scaled,)
        if settings.structure == "toeplitz":
            return (scaled,)
        return scaled, self.surm_A[adapter_name]

    def _dense_builder(self, adapter_name: str) -> Callable[..., torch.Tensor]:
        """generators ↦ the dense (rows, cols) matrix they define."""
        settings = self.surm_settings[adapter_name]
        return partial(DENSE_BUILDS[settings.structure], out_features=settings.rows, in_features=settings.cols)

    def _fast_product_is_cheaper(self, adapter_name: str, generators: tuple[torch.Tensor, ...], v: torch.Tensor,
                                 fused: bool) -> bool:
        """The cost model's pick for this step's input v (..., cols): the fast product, or a dense S (added to W₀
        where ``fused``); in training when v or a generator needs a gradient."""
        settings = self.surm_settings[adapter_name]
        training = torch.is_grad_enabled() and (v.requires_grad or any(g.requires_grad for g in generators))
        rank = generators[0].shape[0] if settings.structure == "ldr" else 1
        tokens = v.numel() // max(v.shape[-1], 1)
        return structured.fast_product_is_cheaper(settings.structure, tokens, settings.rows, settings.cols, rank,
                                                  training, fused=fused)

    def _scaled_product(self, v: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """α·S · v on the last axis, (..., cols) → (..., rows): the structure's fast product, or S built once for
        this step and one matmul where the cost model says that is cheaper (``structured.fast_product_is_cheaper``)."""
        settings = self.surm_settings[adapter_name]
        generators = self._generators(adapter_name)
        if settings.structure == "kronecker":  # never materialized: B·X·Aᵀ is always the cheaper product
            return structured.kronecker_matvec(*generators, v)
        if not self._fast_product_is_cheaper(adapter_name, generators, v, fused=False):
            if settings.structure == "ldr":  # rebuilds W in backward: the fast product's memory
                return structured.ldr_dense_product(*generators, v, settings.rows)
            dtype = torch.promote_types(generators[0].dtype, torch.float32)  # as the FFTs: float32 at least
            dense = self._dense_builder(adapter_name)(*generators).to(dtype)
            return (v.to(dtype) @ dense.T).to(v.dtype)
        if settings.structure == "circulant":
            return structured.circulant_matvec(*generators, v, settings.rows)
        if settings.structure == "toeplitz":
            return structured.toeplitz_matvec(*generators, v, settings.rows)
        return structured.ldr_matvec(*generators, v, settings.rows)

    # ---- HirankLayer API ----------------------------------------------------------------------
    fuses_delta = True

    def fused_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        """W₀x + b + α·S·x as one product with W₀ + α·S (the LoRA placement), where the cost model prefers it
        (``structured.fast_product_is_cheaper(fused=True)``) and no dropout makes the branch read another input."""
        settings = self.surm_settings[adapter_name]
        dropout = self.surm_dropout[adapter_name]
        if settings.placement != "lora" or settings.structure == "kronecker" or drops_inputs(dropout):
            return None
        generators = self._generators(adapter_name)
        if self._fast_product_is_cheaper(adapter_name, generators, x, fused=True):
            return None
        if settings.structure == "ldr":  # W rebuilt in backward: the fast product's memory
            return structured.ldr_merged_linear(x, self.base_layer.weight, self.base_layer.bias, *generators)
        return self.merged_product(x, self._dense_builder(adapter_name)(*generators))

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """α·S for the LoRA placement; the adapter placement has no ΔW (ValueError)."""
        if self.surm_settings[adapter_name].placement != "lora":
            raise ValueError(f"SURM adapter {adapter_name!r} has no ΔW: {self.not_mergeable_reason}")
        return self._dense_builder(adapter_name)(*self._generators(adapter_name))

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """α·S·drop(x), the LoRA placement's branch."""
        v = self.surm_dropout[adapter_name](x.to(self.surm_B[adapter_name].dtype))
        return self._scaled_product(v, adapter_name)

    def adapter_block_output(self, y: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """act(α·S·drop(y)) + bias, what the adapter placement adds to the layer output y."""
        settings = self.surm_settings[adapter_name]
        v = self.surm_dropout[adapter_name](y.to(self.surm_B[adapter_name].dtype))
        activation = ACTIVATION_FUNCTIONS[settings.activation]
        return activation(self._scaled_product(v, adapter_name)) + self.surm_bias[adapter_name]

    def _adapted_output(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Unmerged LoRA-placed branches read x; adapter-placed ones then read the resulting layer output."""
        active = [name for name in self.active_adapters
                  if name in self.surm_settings and name not in self.merged_adapters]
        for name in active:
            if self.surm_settings[name].placement == "lora":
                result = result + self.adapter_output(x, name).to(result.dtype)
        layer_output = result
        for name in active:
            if self.surm_settings[name].placement == "adapter":
                result = result + self.adapter_block_output(layer_output, name).to(result.dtype)
        return result
