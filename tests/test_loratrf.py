"""LoRATRF (reconstructed, spec §2.3) through peft: the filter on the layer output, merging with a live
filter, several adapters, and the §2.6 knobs (filter_modules, share_task_vector, filter_positions)."""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from torch.nn import functional as F

import hirank
from hirank.analysis import trainable_parameters
from hirank.tuners.loratrf import LoraTRFLayer, TaskFilteredLayer
from tests import invariants
from tests.cases import CASES
from tests.tiny_models import TINY_MODELS

MLP, LLAMA = TINY_MODELS["mlp"], TINY_MODELS["llama"]


def _model(tiny, seed: int = 0, **knobs) -> PeftModel:
    torch.manual_seed(seed)
    config = hirank.LoraTRFConfig(target_modules=list(tiny.target_modules), r=4, lora_alpha=8, filter_rank=3, **knobs)
    return get_peft_model(tiny.build(), config)


def _layers(model: nn.Module) -> dict[str, LoraTRFLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraTRFLayer)}


def _spec_filter(h: torch.Tensor, task_filter) -> torch.Tensor:
    """Spec §2.3 written out densely: g = clamp(cos(h, t), 0, 1), g·h·T."""
    t = task_filter.task_vector
    gate = F.cosine_similarity(h, t.expand_as(h), dim=-1).clamp(0, 1).unsqueeze(-1)
    return (gate * h) @ task_filter.transformation()


def test_layer_output_is_lora_then_the_task_filter():
    model = _model(MLP, init_weights=False).double()
    layer = model.base_model.model.lin0
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    with torch.no_grad():
        h = layer.get_base_layer()(x) + 2.0 * x @ (layer.loratrf_B["default"] @ layer.loratrf_A["default"]).T
        expected = h + _spec_filter(h, layer.loratrf_filter["default"])
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
        assert _spec_filter(h, layer.loratrf_filter["default"]).abs().max() > 1e-3  # the filter is not idle


def test_merge_folds_lora_and_keeps_the_filter_live():
    model = _model(LLAMA, init_weights=False)
    inputs = LLAMA.inputs()
    with torch.no_grad():
        unmerged = LLAMA.output(model, inputs)
        model.merge_adapter()
        torch.testing.assert_close(LLAMA.output(model, inputs), unmerged, rtol=0, atol=1e-5)
        model.unmerge_adapter()
        merged = model.merge_and_unload()
        wrapped = {name: m for name, m in merged.named_modules() if isinstance(m, TaskFilteredLayer)}
        assert len(wrapped) == 6 and all(len(m.task_filters) == 1 for m in wrapped.values())  # 2 blocks × 3 targets
        torch.testing.assert_close(LLAMA.output(merged, inputs), unmerged, rtol=0, atol=1e-5)
        for name, module in wrapped.items():  # dropping the filters (folding LoRA only) is a different model
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent), child, module.base_layer)
        assert (LLAMA.output(merged, inputs) - unmerged).abs().max() > 1e-3


def test_unload_drops_lora_and_filter():
    plain = _model(MLP, init_weights=False).unload()
    assert isinstance(plain.lin0, nn.Linear) and not any(isinstance(m, TaskFilteredLayer) for m in plain.modules())


def test_two_active_adapters_add_their_lora_parts_and_filter_the_same_output():
    model = _model(MLP, init_weights=False).double()
    model.add_adapter("other", hirank.LoraTRFConfig(target_modules=["lin0", "lin1"], r=2, init_weights=False,
                                                    similarity="dot", filter_transform="dense"))
    model.base_model.set_adapter(["default", "other"])
    layer = model.base_model.model.lin1
    x = torch.randn(2, 5, 96, dtype=torch.float64)
    with torch.no_grad():
        h = layer.get_base_layer()(x) + x @ (layer.delta_weight("default") + layer.delta_weight("other")).T
        expected = h + layer.loratrf_filter["default"](h) + layer.loratrf_filter["other"](h)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
        model.merge_adapter()
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)


def test_filter_modules_puts_filters_on_the_named_modules_only():
    model = _model(LLAMA, filter_modules=["down_proj"])
    filtered = {name.rsplit(".", 1)[-1] for name, layer in _layers(model).items() if "default" in layer.loratrf_filter}
    assert filtered == {"down_proj"}
    lora_part = sum(4 * (layer.in_features + layer.out_features) for layer in _layers(model).values())
    assert trainable_parameters(model) == lora_part + 2 * (64 + 2 * 64 * 3)  # two down_proj filters, d = 64, k = 3
    regex = _model(LLAMA, filter_modules=r".*\.(q|v)_proj")
    assert {n.rsplit(".", 1)[-1] for n, la in _layers(regex).items() if la.loratrf_filter} == {"q_proj", "v_proj"}


def test_filter_module_that_is_not_adapted_raises():
    with pytest.raises(ValueError, match=r"filter_modules \['o_proj'\] match no adapted module.*down_proj"):
        _model(LLAMA, filter_modules=["down_proj", "o_proj"])


def test_shared_task_vector_is_one_parameter_and_survives_save_load(tmp_path):
    model = _model(LLAMA, init_weights=False, filter_modules=["q_proj", "down_proj"], share_task_vector=True)
    filters = [layer.loratrf_filter["default"] for layer in _layers(model).values() if layer.loratrf_filter]
    assert len(filters) == 4 and all(f.task_vector is filters[0].task_vector for f in filters)
    lora_part = sum(4 * (layer.in_features + layer.out_features) for layer in _layers(model).values())
    assert trainable_parameters(model) == lora_part + 64 + 4 * (2 * 64 * 3)  # one t, four C·D
    model.save_pretrained(tmp_path)
    inputs = LLAMA.inputs()
    loaded = PeftModel.from_pretrained(LLAMA.build(), tmp_path)
    loaded_filters = [layer.loratrf_filter["default"] for layer in _layers(loaded).values() if layer.loratrf_filter]
    assert all(f.task_vector is loaded_filters[0].task_vector for f in loaded_filters)
    torch.testing.assert_close(loaded_filters[0].task_vector, filters[0].task_vector, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(LLAMA.output(loaded, inputs), LLAMA.output(model, inputs), rtol=0, atol=1e-6)


def test_shared_task_vector_needs_one_width():
    with pytest.raises(ValueError, match=r"share_task_vector=True needs one output width.*v_proj.*has 32"):
        _model(LLAMA, share_task_vector=True)  # q_proj and down_proj give 64, v_proj 32


def test_filter_positions_edit_only_the_chosen_tokens():
    model = _model(MLP, init_weights=False, filter_positions="f1+l2")
    layer = model.base_model.model.lin0
    x = MLP.inputs()["x"]  # (3, 5, 64): positions 0, 3, 4 are edited
    with torch.no_grad():
        lora_only = layer.get_base_layer()(x) + layer.adapter_output(x, "default")
        edit = layer(x) - lora_only
    assert not edit[:, 1:3].any() and (edit[:, [0, 3, 4]].abs().amax(dim=(0, 2)) > 1e-4).all()
    with pytest.raises(ValueError, match=r"module 'lin0'.*needs outputs shaped \(batch, seq, features\)"):
        layer(x[0])


@pytest.mark.parametrize("knobs", [
    {}, {"similarity": "dot", "filter_transform": "diagonal"}, {"filter_transform": "dense", "filter_positions": "l3"},
], ids=["cosine-low_rank", "dot-diagonal", "dense-last3"])
def test_every_parameter_group_gets_gradient_by_step_2_and_the_loss_falls(knobs):
    inputs = LLAMA.inputs()
    model = _model(LLAMA, **knobs)
    with torch.no_grad():
        torch.testing.assert_close(LLAMA.output(model, inputs), LLAMA.output(LLAMA.build(), inputs), rtol=0, atol=0)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    groups = {re.sub(r".*\.(loratrf_\w+)\.default", r"\1", name) for name in trainable}  # e.g. loratrf_filter.D
    expected_groups = {"loratrf_A", "loratrf_B", "loratrf_filter.task_vector", "loratrf_filter.D"}
    assert groups == expected_groups | ({"loratrf_filter.C"} if "filter_transform" not in knobs else set())
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    moved, losses = set(), []
    for step in range(5):
        optimizer.zero_grad()
        loss = LLAMA.loss(model, inputs)
        loss.backward()
        if step < 2:
            moved |= {name for name, p in trainable.items() if p.grad.abs().sum() > 0}
        losses.append(loss.item())
        optimizer.step()
    assert moved == set(trainable), f"no gradient by step 2: {sorted(set(trainable) - moved)}"
    assert losses[-1] < losses[0] - 1e-3, f"loss did not go down: {losses}"


@pytest.mark.parametrize("knobs, message", [
    ({"similarity": "l2"}, "similarity must be one of"),
    ({"filter_transform": "circulant"}, "filter_transform must be one of"),
    ({"filter_rank": 0}, r"filter_rank must be a positive integer"),
    ({"filter_modules": []}, "plain LoRA"),
    ({"filter_positions": "first3"}, "filter_positions must be 'all' or"),
    ({"filter_positions": "f0"}, "p \\+ s > 0"),
    ({"r": -1}, "r must be a positive integer"),
])
def test_bad_knobs_raise_clear_errors(knobs, message):
    with pytest.raises(ValueError, match=message):
        hirank.LoraTRFConfig(target_modules=["lin0"], **knobs)


def test_battery_still_catches_a_wrong_lora_delta_under_the_neutralize_flag(monkeypatch):
    """Silencing the filter for invariants 3 and 7 keeps them strict on the LoRA part."""
    case = next(c for c in CASES if c.id == "loratrf")
    original = LoraTRFLayer.delta_weight
    monkeypatch.setattr(LoraTRFLayer, "delta_weight", lambda self, name: 2 * original(self, name))
    with pytest.raises(AssertionError, match="structured forward"):
        invariants.check_forward_matches_dense_delta(case, MLP)


def test_battery_catches_merge_and_unload_dropping_the_filter(monkeypatch):
    case = next(c for c in CASES if c.id == "loratrf")

    def merge_lora_only(self, merge, safe_merge, adapter_names):
        self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.get_base_layer()

    monkeypatch.setattr(LoraTRFLayer, "unload_and_optionally_merge_module", merge_lora_only)
    with pytest.raises(AssertionError, match=r"merge_and_unload\(\) vs unmerged"):
        invariants.check_merge_unmerge(case, MLP)


def _trained(tiny) -> PeftModel:
    torch.manual_seed(0)
    config = hirank.LoraTRFConfig(target_modules=list(tiny.target_modules), r=4, lora_alpha=8, filter_rank=3,
                                  init_weights=False)
    return get_peft_model(tiny.build(), config)


def test_teardown_after_a_merge_keeps_the_adapted_model_and_its_live_filters():
    """A second merge_and_unload, and unload after merge_adapter, give the adapted model (LoRA part in the weight,
    filter live), as peft's LoRA keeps merged weights; unload alone gives the base (DESIGN invariant 12)."""
    inputs = MLP.inputs()
    with torch.no_grad():
        base = MLP.output(MLP.build(), inputs)
        model = _trained(MLP)
        adapted = MLP.output(model, inputs)
        first = model.merge_and_unload()
        second = model.merge_and_unload()  # was: AttributeError: 'TaskFilteredLayer' object has no attribute 'merge'
        assert second is first and isinstance(second.lin0, TaskFilteredLayer)
        torch.testing.assert_close(MLP.output(second, inputs), adapted, rtol=0, atol=1e-5)

        model = _trained(MLP)
        model.merge_adapter()
        unloaded = model.unload()  # was: the LoRA part merged, the filter dropped
        assert isinstance(unloaded.lin0, TaskFilteredLayer)
        torch.testing.assert_close(MLP.output(unloaded, inputs), adapted, rtol=0, atol=1e-5)

        torch.testing.assert_close(MLP.output(_trained(MLP).unload(), inputs), base, rtol=0, atol=0)
