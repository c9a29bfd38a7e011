"""Measurements of a trained comparison run."""

from __future__ import annotations

import pytest
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


def test_save_adapter_replaces_a_folder_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    from safetensors.torch import load_file

    from hirank.bench.measure import save_adapter

    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(target_modules=["0"], r=2))
    folder = tmp_path / "adapters" / "lora-seed0"
    first = save_adapter(model, folder)
    assert first == (folder / "adapter_model.safetensors").stat().st_size
    saved = load_file(folder / "adapter_model.safetensors")

    def crash(path, **kwargs):  # killed half-way through writing
        (path / "adapter_model.safetensors").parent.mkdir(parents=True)
        (path / "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, folder)
    assert load_file(folder / "adapter_model.safetensors").keys() == saved.keys()  # the old adapter, intact
    monkeypatch.undo()
    assert save_adapter(model, folder) == first  # the re-run replaces it and clears the partial folder
    assert sorted(p.name for p in folder.parent.iterdir()) == ["lora-seed0"]
