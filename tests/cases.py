"""The methods the invariant battery runs on. Adding a method (or a variant) is one line in CASES."""

from __future__ import annotations

import itertools

from dataclasses import dataclass
from typing import Any, Callable, Optional

import peft
from peft import PeftConfig
from torch import nn

import hirank
from hirank.ops.quanta import plan_circuit
from hirank.tuners.loratrf import TaskFilter


@dataclass(frozen=True)
class MethodCase:
    """How to configure one method, and what the battery should expect of it.

    ``formula(in_features, out_features)`` is the paper's trainable-parameter count for one adapted
    layer with the case's knobs (invariant 8).
    """

    id: str
    config_cls: type[PeftConfig]
    kwargs: dict[str, Any]
    formula: Callable[[int, int], int]
    #: False when the adapter is not a ΔW added to the base weight (e.g. SURM's adapter placement,
    #: out = y + act(S·y) + bias): invariants 3 and 4 and the ΔW-sum part of 7 do not apply, and the
    #: method's own tests show that merging raises a clear error.
    mergeable: bool = True
    #: peft's LoRA silently skips a listed target that matches nothing (a known complaint); hirank raises.
    strict_targets: bool = True
    #: name of the config field that selects the identity init (peft's LoRA calls it init_lora_weights).
    init_arg: str = "init_weights"
    #: For a layer that edits its own output after adding ΔW (LoRATRF's task-aware filter: input-dependent,
    #: kept live by merging): a function that makes that edit an identity, in place, on the whole peft model.
    #: Invariants 3 (forward == x·ΔWᵀ) and 7 (two active adapters sum their ΔW) then check the ΔW part alone;
    #: invariant 4 (merged == unmerged == merge_and_unload) still runs on the full method. None: ΔW is all.
    neutralize_output_edit: Optional[Callable[[nn.Module], None]] = None

    def config(self, target_modules: list[str] | tuple[str, ...], init_weights: bool = True, **overrides: Any) -> PeftConfig:
        kwargs = {**self.kwargs, self.init_arg: init_weights, **overrides}
        return self.config_cls(target_modules=list(target_modules), **kwargs)


def _lora_formula(r: int) -> Callable[[int, int], int]:
    return lambda d_in, d_out: r * (d_in + d_out)


def _quanta_formula(**knobs: Any) -> Callable[[int, int], int]:
    """Square: Σ_{a<b}(n_a n_b)² (spec §1.6). Rectangular: Σ over gates (m_a m_b)(in_a in_b), where an
    axis has its input size n until the first gate touching it and its output size m after (spec §1.5)."""

    def count(d_in: int, d_out: int) -> int:
        circuit = plan_circuit(d_in, d_out, **knobs)
        n, m = circuit.in_factors, circuit.out_factors
        if n == m:
            return sum((n[a] * n[b]) ** 2 for a, b in itertools.combinations(range(len(n)), 2))
        touched: set[int] = set()
        total = 0
        for b, a in itertools.combinations(range(len(n) - 1, -1, -1), 2):  # fastest-varying pair first
            total += m[a] * m[b] * (m[a] if a in touched else n[a]) * (m[b] if b in touched else n[b])
            touched |= {a, b}
        return total

    return count


def _surm_formula(structure: str, placement: str, displacement_rank: int = 1) -> Callable[[int, int], int]:
    """Spec §3.5 for an m × n weight, N = max(m, n): circulant 2N (a ⊙ b), Toeplitz m+n−1, Kronecker m+n,
    LDR 2rN. The adapter placement's S is square on the d = m outputs, plus a bias of d (spec §3.4)."""

    def count(d_in: int, d_out: int) -> int:
        rows, cols = d_out, d_out if placement == "adapter" else d_in
        size = max(rows, cols)
        per_structure = {"circulant": 2 * size, "toeplitz": rows + cols - 1, "kronecker": rows + cols,
                         "ldr": 2 * displacement_rank * size}
        return per_structure[structure] + (rows if placement == "adapter" else 0)

    return count


def _surm_case(structure: str, placement: str, **knobs: Any) -> MethodCase:
    """SURM with one structure and placement; the adapter placement is not a ΔW, so it is not mergeable."""
    return MethodCase(
        f"surm-{structure}-{placement}", hirank.SurmConfig, {"structure": structure, "placement": placement, **knobs},
        _surm_formula(structure, placement, **knobs), mergeable=placement == "lora",
    )


def _quantum_peft_formula(rank: int, n_layers: int) -> Callable[[int, int], int]:
    """Λ (K) plus the angles of U and V. A circuit on n qubits has (2L+1)n − 2L angles (spec §2.3, 0 for n = 0);
    N = 2^{b₀} + 2^{b₁} + … (b₀ > b₁ > …) is split block by block, each split after the first adding min(K, Rᵢ)
    coupling angles, Rᵢ = 2^{bᵢ} + 2^{bᵢ₊₁} + … (cosine–sine split, hirank.ops.pauli)."""

    def circuit(n_qubits: int) -> int:
        return (2 * n_layers + 1) * n_qubits - 2 * n_layers if n_qubits else 0

    def unitary(dim: int) -> int:
        powers = [b for b in range(dim.bit_length() - 1, -1, -1) if dim >> b & 1]
        remainders = [sum(1 << b for b in powers[i:]) for i in range(1, len(powers))]
        return sum(circuit(b) for b in powers) + sum(min(rank, r) for r in remainders)

    return lambda d_in, d_out: rank + unitary(d_in) + unitary(d_out)


def _mtlora_formula(r: int, variant: str) -> Callable[[int, int], int]:
    """LoRA's r(d_in + d_out) plus T's factors: r² (SHIM, ICFM) or 2r² (CTCM, DTSM) (spec §1.2, §1.7)."""
    return lambda d_in, d_out: r * (d_in + d_out) + (2 if variant in ("ctcm", "dtsm") else 1) * r * r


def _loratrf_formula(r: int, filter_rank: int, transform: str = "low_rank") -> Callable[[int, int], int]:
    """LoRA's r(d_in + d_out), plus the filter on the d = d_out outputs: task vector d and T: 2dk (low_rank),
    d (diagonal) or d² (dense) (spec §2.3)."""
    transform_size = {"low_rank": lambda d: 2 * d * filter_rank, "diagonal": lambda d: d, "dense": lambda d: d * d}
    return lambda d_in, d_out: r * (d_in + d_out) + d_out + transform_size[transform](d_out)


def _silence_task_filters(model: nn.Module) -> None:
    """D = 0 makes T = 0, so each LoRATRF task filter passes h through unchanged."""
    for module in model.modules():
        if isinstance(module, TaskFilter):
            nn.init.zeros_(module.D)


def _loratrf_case(case_id: str, r: int = 4, filter_rank: int = 3, **knobs: Any) -> MethodCase:
    """LoRATRF (reconstructed); its task filter is checked apart from the ΔW invariants 3 and 7."""
    return MethodCase(
        case_id, hirank.LoraTRFConfig, {"r": r, "lora_alpha": 2 * r, "filter_rank": filter_rank, **knobs},
        _loratrf_formula(r, filter_rank, knobs.get("filter_transform", "low_rank")),
        neutralize_output_edit=_silence_task_filters,
    )


def _mtlora_case(variant: str, r: int = 4) -> MethodCase:
    """MTLoRA (matrix-transformation LoRA) with one structure of T, at rank r with α = 2r."""
    return MethodCase(f"mtlora-{variant}", hirank.MTLoraConfig, {"r": r, "lora_alpha": 2 * r, "variant": variant},
                      _mtlora_formula(r, variant))


CASES: list[MethodCase] = [
    MethodCase(
        "lora", peft.LoraConfig, {"r": 4, "lora_alpha": 8}, _lora_formula(4), strict_targets=False,
        init_arg="init_lora_weights",
    ),
    MethodCase("quanta", hirank.QuantaConfig, {}, _quanta_formula()),
    MethodCase("quanta-3axes", hirank.QuantaConfig, {"n_axes": 3}, _quanta_formula(n_axes=3)),
    MethodCase("quanta-folded", hirank.QuantaConfig, {"fold_frozen_copy": True}, _quanta_formula()),
    _surm_case("circulant", "lora"),
    _surm_case("circulant", "adapter"),
    _surm_case("toeplitz", "lora"),
    _surm_case("toeplitz", "adapter"),
    _surm_case("kronecker", "lora"),
    _surm_case("kronecker", "adapter"),
    _surm_case("ldr", "lora", displacement_rank=2),
    _surm_case("ldr", "adapter", displacement_rank=2),
    MethodCase("quantum_peft", hirank.QuantumPeftConfig, {"rank": 4}, _quantum_peft_formula(4, 1)),
    MethodCase("quantum_peft-L2-masked", hirank.QuantumPeftConfig,
               {"rank": 8, "n_layers": 2, "scale": 0.5, "rank_mask": [1, 1, 0, 1, 1, 1, 0, 1]},
               _quantum_peft_formula(8, 2)),
    _mtlora_case("shim"),
    _mtlora_case("icfm"),
    _mtlora_case("ctcm"),
    _mtlora_case("dtsm"),
    _loratrf_case("loratrf"),
    _loratrf_case("loratrf-dot-diagonal", similarity="dot", filter_transform="diagonal"),
]
