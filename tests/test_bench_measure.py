"""Measurements of a trained comparison run."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from hirank.analysis import delta_weights, effective_rank
from hirank.bench.measure import effective_rank_of_updates
from hirank.bench.methods import METHODS, PEERS
from tests.tiny_models import TINY_MODELS


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


@pytest.mark.parametrize("name", ["lora", *PEERS])
def test_each_peers_update_is_what_merging_adds_to_the_weights(name: str) -> None:
    """peft's get_delta_weight is not the update for every method (DoRA, OFT, HiRA; BOFT returns a tuple, which
    crashed effective_rank_of_updates after training BOFT): ΔW must be W_merged − W for each of them."""
    tiny = TINY_MODELS["llama"]
    spec = METHODS[name]
    knobs = next(iter(spec.knob_grid([(64, 64), (64, 32)])))
    model = get_peft_model(tiny.build(), spec.make_config(["q_proj", "v_proj"], knobs))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained adapter: every trainable tensor away from its (often ΔW = 0) init
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    base = {name: module.get_base_layer().weight.detach().clone()
            for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    merged = dict(copy.deepcopy(model).merge_and_unload().named_modules())

    deltas = delta_weights(model, dtype=torch.float64)
    assert deltas.keys() == base.keys()
    for layer, delta in deltas.items():
        expected = merged[layer.removeprefix("base_model.model.")].weight - base[layer]
        assert expected.abs().max() > 1e-4, "the update is zero: the check below would prove nothing"
        torch.testing.assert_close(delta.float(), expected, rtol=0, atol=1e-6 * base[layer].abs().max().item())
    ranks = effective_rank_of_updates(model)
    assert 1 <= ranks["effective_rank_min"] <= ranks["effective_rank_max"] <= 64
    model.merge_adapter()  # a merged layer's ΔW is the same update, not one taken from the merged weight again
    for layer, delta in delta_weights(model, dtype=torch.float64).items():
        torch.testing.assert_close(delta, deltas[layer], rtol=0, atol=1e-5 * base[layer].abs().max().item())


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
