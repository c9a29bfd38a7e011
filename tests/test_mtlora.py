"""MTLoRA through peft: T = I is LoRA, every init starts at ΔW = 0 and trains every factor (spec §1.3, §1.10)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import hirank
from hirank.tuners.mtlora import MTLoraLayer
from tests.tiny_models import TINY_MODELS

VARIANT_INITS = [(v, i) for v in ("shim", "icfm", "ctcm", "dtsm") for i in ("identity", "random", "zeros")
                 if not (i == "zeros" and v in ("icfm", "ctcm"))]


@pytest.mark.parametrize("model_id", ["mlp", "gpt2"], ids=["linear", "conv1d"])
def test_identity_T_equals_peft_lora_on_the_same_factors(model_id):
    tiny = TINY_MODELS[model_id]
    inputs = tiny.inputs(dtype=torch.float64)
    torch.manual_seed(0)
    lora = get_peft_model(tiny.build(), LoraConfig(target_modules=list(tiny.target_modules), r=4, lora_alpha=8,
                                                   init_lora_weights=False)).double()
    mtlora = get_peft_model(tiny.build(), hirank.MTLoraConfig(target_modules=list(tiny.target_modules), r=4,
                                                              lora_alpha=8)).double()
    lora_layers = dict(lora.named_modules())
    with torch.no_grad():
        for name, layer in mtlora.named_modules():
            if isinstance(layer, MTLoraLayer):
                torch.testing.assert_close(layer.transformation("default"), torch.eye(4, dtype=torch.float64))
                layer.mtlora_A["default"].copy_(lora_layers[name].lora_A["default"].weight)
                layer.mtlora_B["default"].copy_(lora_layers[name].lora_B["default"].weight)
        expected = tiny.output(lora, inputs)
        assert (expected - tiny.output(tiny.build().double(), inputs)).abs().max() > 1e-3  # LoRA is not a no-op
        torch.testing.assert_close(tiny.output(mtlora, inputs), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant, init_T", VARIANT_INITS)
def test_every_init_starts_unchanged_and_trains_every_factor_by_step_2(variant, init_T):
    tiny = TINY_MODELS["llama"]
    inputs = tiny.inputs()
    torch.manual_seed(0)
    model = get_peft_model(tiny.build(), hirank.MTLoraConfig(target_modules=list(tiny.target_modules), r=4,
                                                             lora_alpha=8, variant=variant, init_T=init_T))
    with torch.no_grad():
        torch.testing.assert_close(tiny.output(model, inputs), tiny.output(tiny.build(), inputs), rtol=0, atol=1e-6)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert {name.split(".")[-2] for name in trainable} == (
        {"mtlora_A", "mtlora_B", "mtlora_C"} | ({"mtlora_D"} if variant in ("ctcm", "dtsm") else set()))
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    moved: dict[int, set[str]] = {}
    losses = []
    for step in (1, 2, 3, 4, 5):
        optimizer.zero_grad()
        loss = tiny.loss(model, inputs)
        loss.backward()
        moved[step] = {name for name, p in trainable.items() if p.grad.abs().sum() > 0}
        losses.append(loss.item())
        optimizer.step()
    assert moved[1] | moved[2] == set(trainable), f"no gradient by step 2: {set(trainable) - moved[1] - moved[2]}"
    if init_T != "zeros":  # ΔW = 0 through B = 0: at step 1 only B moves (this is why "within two steps")
        assert {name.split(".")[-2] for name in moved[1]} == {"mtlora_B"}
    assert losses[-1] < losses[0] - 1e-3, f"loss did not go down: {losses}"


@pytest.mark.parametrize("variant", ["icfm", "ctcm"])
def test_zero_T_recipe_is_refused_where_it_cannot_train(variant):
    with pytest.raises(ValueError, match="never trains.*init_T='identity'"):
        hirank.MTLoraConfig(target_modules=["lin0"], variant=variant, init_T="zeros")


@pytest.mark.parametrize("knobs, message", [
    ({"variant": "multitask"}, "variant must be one of"),
    ({"init_T": "eye"}, "init_T must be one of"),
    ({"r": 0}, "r must be a positive integer"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
])
def test_bad_knobs_raise_clear_errors(knobs, message):
    with pytest.raises(ValueError, match=message):
        hirank.MTLoraConfig(target_modules=["lin0"], **knobs)


def test_dropout_applies_to_the_adapter_input_only_in_training():
    tiny = TINY_MODELS["mlp"]
    torch.manual_seed(0)
    model = get_peft_model(tiny.build(), hirank.MTLoraConfig(target_modules=["lin0"], lora_dropout=0.5,
                                                             init_weights=False))
    x = tiny.inputs()["x"]
    layer = model.base_model.model.lin0
    with torch.no_grad():
        model.eval()
        expected = layer.get_base_layer()(x) + x @ layer.get_delta_weight("default").T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        model.train()
        assert (layer(x) - expected).abs().max() > 1e-3
