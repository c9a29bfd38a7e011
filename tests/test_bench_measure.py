"""Measurements of a trained comparison run."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from hirank.analysis import delta_weights, effective_rank
from hirank.bench.measure import effective_rank_of_updates


def test_effective_rank_counts_directions_below_float32_rounding() -> None:
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(64, 64)), LoraConfig(target_modules=["0"], r=2, lora_alpha=2))
    layer = model.base_model.model[0]
    with torch.no_grad():  # ΔW = B·A with singular values 1 and 1e-6: rank 2, but float32 ΔW reads as rank 1
        basis_out, _ = torch.linalg.qr(torch.randn(64, 2))
        basis_in, _ = torch.linalg.qr(torch.randn(64, 2))
        layer.lora_B["default"].weight.copy_(basis_out * torch.tensor([1.0, 1e-6]))
        layer.lora_A["default"].weight.copy_(basis_in.T)
    assert [effective_rank(delta) for delta in delta_weights(model).values()] == [1]
    assert effective_rank_of_updates(model) == {
        "effective_rank_mean": 2.0, "effective_rank_min": 2, "effective_rank_max": 2
    }
