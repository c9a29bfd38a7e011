"""The battery itself is tested: each invariant check fails on a deliberately broken method.

The broken methods are peft's LoRA with one piece sabotaged; the same checks pass on the intact
LoRA in ``test_battery.py``, so each failure here is caused by the sabotage alone.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft.tuners import lora, tuners_utils
from torch.nn.modules.module import _IncompatibleKeys

from tests import invariants
from tests.cases import CASES
from tests.tiny_models import RESIZED_MLP, TINY_MODELS

LORA = next(case for case in CASES if case.id == "lora")
MLP = TINY_MODELS["mlp"]
GPT2 = TINY_MODELS["gpt2"]


def test_1_fails_when_default_init_is_not_identity(monkeypatch):
    original = lora.layer.LoraLayer.reset_lora_parameters

    def randomize_b(self, adapter_name, init):
        original(self, adapter_name, init)
        torch.nn.init.normal_(self.lora_B[adapter_name].weight)

    monkeypatch.setattr(lora.layer.LoraLayer, "reset_lora_parameters", randomize_b)
    with pytest.raises(AssertionError, match="unchanged"):
        invariants.check_identity_at_init(LORA, MLP)


def test_2_fails_when_random_init_is_a_no_op(monkeypatch):
    original = lora.layer.LoraLayer.update_layer

    def zero_b_after_update(self, adapter_name, *args, **kwargs):
        original(self, adapter_name, *args, **kwargs)
        self.reset_lora_parameters(adapter_name, True)

    monkeypatch.setattr(lora.layer.LoraLayer, "update_layer", zero_b_after_update)
    with pytest.raises(AssertionError, match="changed the output by only"):
        invariants.check_non_identity_init_changes_output(LORA, MLP)


@pytest.mark.parametrize("tiny", [MLP, GPT2], ids=["linear", "conv1d"])
def test_3_fails_on_a_wrong_get_delta_weight(monkeypatch, tiny):
    original = lora.layer.Linear.get_delta_weight
    monkeypatch.setattr(lora.layer.Linear, "get_delta_weight", lambda self, name: 2 * original(self, name))
    with pytest.raises(AssertionError, match="structured forward"):
        invariants.check_forward_matches_dense_delta(LORA, tiny)


def test_3_fails_on_a_transposed_delta_for_conv1d(monkeypatch):
    original = lora.layer.Linear.get_delta_weight
    monkeypatch.setattr(lora.layer.Linear, "get_delta_weight",
                        lambda self, name: original(self, name).T.contiguous().reshape(original(self, name).shape))
    with pytest.raises(AssertionError, match="structured forward"):
        invariants.check_forward_matches_dense_delta(LORA, GPT2)


def test_4_fails_when_unmerge_does_not_restore_the_weight(monkeypatch):
    monkeypatch.setattr(lora.layer.Linear, "unmerge", lambda self: self.merged_adapters.clear())
    with pytest.raises(AssertionError, match="unmerge restores W0"):
        invariants.check_merge_unmerge(LORA, MLP)


def test_4_fails_when_merge_adds_the_wrong_delta(monkeypatch):
    original = lora.layer.Linear.get_delta_weight
    monkeypatch.setattr(lora.layer.Linear, "get_delta_weight", lambda self, name: 2 * original(self, name))
    with pytest.raises(AssertionError, match="merged vs unmerged"):
        invariants.check_merge_unmerge(LORA, MLP)


def test_5_fails_when_a_factor_is_not_saved(monkeypatch, tmp_path):
    original = lora.model.LoraModel._get_adapter_state_dict.__func__

    def drop_lora_b(cls, *args, **kwargs):
        return {k: v for k, v in original(cls, *args, **kwargs).items() if "lora_B" not in k}

    monkeypatch.setattr(lora.model.LoraModel, "_get_adapter_state_dict", classmethod(drop_lora_b))
    with pytest.raises(AssertionError, match="file holds"):
        invariants.check_save_load_round_trip(LORA, MLP, tmp_path)


def test_6_fails_when_base_weights_stay_trainable(monkeypatch):
    monkeypatch.setattr(lora.model.LoraModel, "_mark_only_adapters_as_trainable", lambda self, model: None)
    with pytest.raises(AssertionError, match="requires_grad"):
        invariants.check_only_adapters_train(LORA, MLP)


def test_6_fails_when_training_cannot_lower_the_loss(monkeypatch):
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, closure=None: None)
    with pytest.raises(AssertionError, match="did not lower the loss"):
        invariants.check_only_adapters_train(LORA, MLP)


def test_7_fails_when_switching_adapters_does_nothing(monkeypatch):
    monkeypatch.setattr(lora.layer.LoraLayer, "set_adapter", lambda self, names, inference_mode=False: None)
    with pytest.raises(AssertionError, match="switching adapters"):
        invariants.check_several_adapters(LORA, MLP)


def test_8_fails_on_a_wrong_formula():
    wrong = dataclasses.replace(LORA, formula=lambda d_in, d_out: 5 * (d_in + d_out))
    with pytest.raises(AssertionError, match="the formula gives"):
        invariants.check_parameter_count(wrong, MLP)


def test_9_fails_when_adapters_follow_the_half_base_dtype(monkeypatch):
    monkeypatch.setattr(tuners_utils, "cast_adapter_dtype", lambda *args, **kwargs: None)
    with pytest.raises(AssertionError, match="must stay float32"):
        invariants.check_half_precision_base(LORA, MLP, torch.bfloat16)


def test_10_fails_when_an_unsupported_layer_is_silently_skipped(monkeypatch):
    original = lora.model.LoraModel._create_and_replace

    def skip_norms(self, config, adapter_name, target, *args, **kwargs):
        if isinstance(target, torch.nn.LayerNorm):
            return None
        return original(self, config, adapter_name, target, *args, **kwargs)

    monkeypatch.setattr(lora.model.LoraModel, "_create_and_replace", skip_norms)
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        invariants.check_unsupported_layer_raises(LORA, MLP)


def test_10_fails_when_unknown_targets_are_silently_skipped():
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        invariants.check_unknown_target_raises(LORA, MLP)  # peft's LoRA ignores the unknown name


def test_10_fails_when_a_mismatched_adapter_loads(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda self, *args, **kwargs: _IncompatibleKeys([], []))
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        invariants.check_mismatched_adapter_load_raises(LORA, MLP, RESIZED_MLP, tmp_path)


def test_11_fails_when_samples_mix(monkeypatch):
    original = lora.layer.Linear.forward

    def mix_the_batch(self, x, *args, **kwargs):
        result = original(self, x, *args, **kwargs)
        return result + 1e-3 * result.roll(1, dims=0)  # each sample also sees its neighbour's output

    monkeypatch.setattr(lora.layer.Linear, "forward", mix_the_batch)
    with pytest.raises(AssertionError, match="changed the other samples"):
        invariants.check_batch_independence(LORA, MLP)


def test_12_fails_when_a_teardown_gives_another_model(monkeypatch):
    original = lora.layer.Linear.merge

    def merge_twice(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.merged_adapters.clear()
        original(self, *args, **kwargs)

    monkeypatch.setattr(lora.layer.Linear, "merge", merge_twice)
    with pytest.raises(AssertionError, match="neither the base nor the adapted"):
        invariants.check_teardown(LORA, MLP)


def test_12_fails_when_a_teardown_crashes(monkeypatch):
    def crash(self, *args, **kwargs):
        raise AttributeError("'TaskFilteredLayer' object has no attribute 'merge'")

    monkeypatch.setattr(lora.layer.Linear, "merge", crash)
    with pytest.raises(AttributeError):
        invariants.check_teardown(LORA, MLP)
