"""hirank.analysis.to_lora: every mergeable method becomes a peft LoRA folder that plain peft loads; at full rank
it reproduces the merged model; the kept fraction of ‖ΔW‖² is reported; non-weight adapters refuse."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from hirank import analysis
from tests.cases import CASES, MethodCase
from tests.tiny_models import TINY_MODELS

ONE_PER_METHOD = [case for i, case in enumerate(CASES)
                  if case.id != "lora" and case.id.split("-")[0] not in {c.id.split("-")[0] for c in CASES[:i]}]
MERGEABLE = [case for case in ONE_PER_METHOD if case.mergeable]


def _adapted(case: MethodCase, tiny_name: str, **overrides):
    tiny = TINY_MODELS[tiny_name]
    torch.manual_seed(0)
    return tiny, get_peft_model(tiny.build(), case.config(tiny.target_modules, init_weights=False, **overrides))


@pytest.mark.parametrize("tiny_name", ["llama", "gpt2"])  # gpt2: Conv1D, ΔW stored transposed
@pytest.mark.parametrize("case", MERGEABLE, ids=lambda c: c.id)
def test_full_rank_lora_reproduces_merged_model(case: MethodCase, tiny_name: str, tmp_path) -> None:
    overrides = {"filter_modules": "nothing"} if case.id.startswith("loratrf") else {}  # a regex: no task filter
    tiny, model = _adapted(case, tiny_name, **overrides)
    inputs = tiny.inputs()
    conversion = analysis.to_lora(model, rank=1.0, out_dir=tmp_path / "lora")
    assert conversion.total_kept_energy == pytest.approx(1.0, abs=1e-6)
    assert set(conversion.ranks) == {name.removeprefix("base_model.model.") for name in analysis.delta_weights(model)}
    with torch.no_grad():
        merged = tiny.output(model.merge_and_unload(), inputs)

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    with safe_open(str(tmp_path / "lora" / "adapter_model.safetensors"), "pt") as file:
        assert all(".lora_A." in key or ".lora_B." in key for key in file.keys())
    lora = PeftModel.from_pretrained(tiny.build(), tmp_path / "lora")
    layers = [m for m in lora.modules() if hasattr(m, "base_layer")]
    assert layers and all(isinstance(m, LoraLayer) for m in layers), "the folder must load as plain peft LoRA"
    with torch.no_grad():
        converted = tiny.output(lora, inputs)
    scale = merged.abs().max()
    assert (converted - merged).abs().max() <= 1e-4 * scale, f"{(converted - merged).abs().max():.3g}"


def test_truncated_rank_reports_kept_energy(tmp_path) -> None:
    """A rank-2 LoRA of QuanTA's (full-rank) ΔW keeps Σ_{i<2} σ_i² / Σ σ_i² of each layer, as the spectrum says."""
    case = next(case for case in CASES if case.id == "quanta")
    tiny, model = _adapted(case, "llama")
    curve = analysis.lora_energy_by_rank(model, [1, 2, 32, 64])
    assert 0 < curve[1] < curve[2] < curve[32] <= curve[64] == pytest.approx(1.0)
    conversion = analysis.to_lora(model, rank=2, out_dir=tmp_path / "lora")
    assert set(conversion.ranks.values()) == {2}
    assert conversion.total_kept_energy == pytest.approx(curve[2], rel=1e-5)
    for name, delta in analysis.delta_weights(model).items():
        energy = analysis.spectrum(delta).pow(2)
        assert conversion.kept_energy[name.removeprefix("base_model.model.")] == pytest.approx(
            float(energy[:2].sum() / energy.sum()), rel=1e-5)


@pytest.mark.parametrize("case_id, message", [("surm-circulant-adapter", "non-linear"),
                                              ("loratrf", "task filter")])
def test_adapters_that_are_no_weight_update_refuse(case_id: str, message: str, tmp_path) -> None:
    case = next(case for case in CASES if case.id == case_id)
    _, model = _adapted(case, "llama")
    with pytest.raises(ValueError, match=rf"module '.*q_proj'.*cannot be converted to LoRA.*{message}"):
        analysis.to_lora(model, rank=8, out_dir=tmp_path / "lora")
    assert not (tmp_path / "lora").exists(), "a refused conversion must not leave a folder behind"
