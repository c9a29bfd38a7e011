"""Convert a hirank adapter to a plain peft LoRA adapter folder, for servers that batch LoRA only (vLLM, TGI).

Each adapted layer's dense ΔW is factored by truncated SVD, ΔW ≈ B·A with B = U_k·Σ_k, A = V_kᵀ (peft's own
``peft.convert_to_lora`` does the factoring; hirank adds clear refusals, the kept energy and an atomic folder).
The Eckart–Young theorem makes this the best rank-k LoRA in Frobenius norm; the fraction of ‖ΔW‖² it keeps is
Σ_{i<k} σ_i² / Σ_i σ_i², reported per layer. A rank of at least min(out, in) per layer (or ``rank=1.0``) is exact.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch
from peft import convert_to_lora
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn

from .tuners.base import HirankLayer


@dataclass(frozen=True)
class LoraConversion:
    """What :func:`to_lora` wrote: the folder, and per adapted module its LoRA rank and the fraction of ‖ΔW‖² kept."""

    directory: Path
    ranks: dict[str, int]
    kept_energy: dict[str, float]
    #: Σ over layers of the kept ‖ΔW‖², over Σ ‖ΔW‖² (1.0 = exact)
    total_kept_energy: float


def _refusal(name: str, layer: BaseTunerLayer, adapter_name: str) -> str | None:
    """Why ``layer`` cannot become a LoRA layer (None when it can)."""
    if layer.supports_lora_conversion(adapter_name):
        return None
    reason = getattr(layer, "not_mergeable_reason", "") if not getattr(layer, "mergeable", True) else ""
    if not reason and isinstance(layer, HirankLayer):  # LoRATRF: the LoRA part merges, the filter cannot
        reason = ("its output passes through an input-dependent task filter (h + g·h·T) that no weight update ΔW "
                  "reproduces. Serve it with hirank, or train LoRATRF with filter_modules that leave out the "
                  "layers to convert.")
    return f"module {name!r} ({type(layer).__name__}) cannot be converted to LoRA: {reason or 'it has no ΔW.'}"


def to_lora(
    model: nn.Module, rank: Union[int, float], out_dir: Union[str, os.PathLike], adapter_name: str = "default"
) -> LoraConversion:
    """Write ``adapter_name`` of a peft model with hirank adapters to ``out_dir`` as a peft LoRA adapter.

    ``rank``: an int is the LoRA rank of every layer (at most min(out, in) of the smallest adapted layer); a float
    in (0, 1] keeps, per layer, the fewest singular values whose σ² reach that fraction of ‖ΔW‖² (peft's rule).
    The folder loads with plain peft, no hirank: ``PeftModel.from_pretrained(base, out_dir)``. Raises ValueError
    naming the first module whose adapter is no weight update (SURM's adapter placement, LoRATRF's task filter).
    """
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, BaseTunerLayer) and adapter_name in m._all_available_adapter_names()]
    if not layers:
        raise ValueError(f"the model has no adapter named {adapter_name!r} to convert to LoRA.")
    for name, layer in layers:
        refusal = _refusal(name, layer, adapter_name)
        if refusal:
            raise ValueError(refusal)
    config, state_dict = convert_to_lora(model, rank=rank, adapter_name=adapter_name)

    ranks: dict[str, int] = {}
    kept: dict[str, float] = {}
    kept_total = delta_total = 0.0
    with torch.no_grad():
        for name, layer in layers:
            A = state_dict[f"{name}.lora_A.weight"].double()  # (k, in)
            B = state_dict[f"{name}.lora_B.weight"].double()  # (out, k)
            delta_energy = float(layer.get_delta_weight(adapter_name).double().pow(2).sum())
            lora_energy = float(((B.T @ B) * (A @ A.T)).sum())  # ‖B·A‖²_F = tr(BᵀB·AAᵀ), both k × k
            module = name.removeprefix("base_model.model.")
            ranks[module] = A.shape[0]
            kept[module] = lora_energy / delta_energy if delta_energy > 0 else 1.0
            kept_total += lora_energy
            delta_total += delta_energy

    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".to_lora-") as staging:
        save_file({key: value.contiguous() for key, value in state_dict.items()},
                  os.path.join(staging, SAFETENSORS_WEIGHTS_NAME))
        config.save_pretrained(staging)
        for file_name in (SAFETENSORS_WEIGHTS_NAME, "adapter_config.json"):  # each file appears whole or not at all
            os.replace(os.path.join(staging, file_name), directory / file_name)
    total = kept_total / delta_total if delta_total > 0 else 1.0
    return LoraConversion(directory, ranks, kept, total)


def lora_energy_by_rank(model: nn.Module, ranks: Sequence[int], adapter_name: str = "default") -> dict[int, float]:
    """For each LoRA rank k, the fraction of the model's total ‖ΔW‖² that :func:`to_lora` at rank k keeps:
    Σ_layers Σ_{i<k} σ_i² / Σ_layers ‖ΔW‖²_F (σ: singular values of each layer's ΔW, in float64)."""
    from .analysis import delta_weights, spectrum  # analysis re-exports this module

    energies = [spectrum(delta).pow(2) for delta in delta_weights(model, adapter_name).values()]
    total = float(sum(energy.sum() for energy in energies))
    if total == 0:
        return {k: 1.0 for k in ranks}
    return {k: float(sum(energy[:k].sum() for energy in energies)) / total for k in ranks}
