"""The invariant battery of DESIGN.md (items 1-12), as checks that raise AssertionError.

Each ``check_*`` takes a method case and a tiny model; ``test_battery.py`` runs every check on
every case × model, and ``test_battery_catches_bugs.py`` shows each check fails on a broken method.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

from hirank.analysis import trainable_parameters
from tests.cases import MethodCase
from tests.tiny_models import DEVICE, VOCAB, TinyModel


def make_peft(case: MethodCase, tiny: TinyModel, init_weights: bool = True, dtype: torch.dtype | None = None,
              **overrides) -> PeftModel:
    base = tiny.build()
    if dtype is not None:
        base = base.to(dtype)
    return get_peft_model(base, case.config(tiny.target_modules, init_weights, **overrides))


def tuner_layers(model: nn.Module) -> list[tuple[str, BaseTunerLayer]]:
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    assert layers, "no module was adapted"
    return layers


def adapter_tensors(layer: BaseTunerLayer, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of one adapter on one layer (everything but the base layer)."""
    return {key: value for key, value in layer.state_dict().items()
            if not key.startswith("base_layer.") and adapter in key.split(".")}


def dense_delta(layer: BaseTunerLayer, adapter: str = "default") -> torch.Tensor:
    """ΔW of the layer as (out_features, in_features)."""
    delta = layer.get_delta_weight(adapter)
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    error = (actual - expected).abs().max().item()
    assert error <= atol, f"{what}: max abs error {error:.3g} > {atol:g}"


# 1 ---------------------------------------------------------------------------------------------
def check_identity_at_init(case: MethodCase, tiny: TinyModel) -> None:
    inputs = tiny.inputs()
    with torch.no_grad():
        expected = tiny.output(tiny.build(), inputs)
        model = make_peft(case, tiny)
        tuner_layers(model)
        _assert_close(tiny.output(model, inputs), expected, 1e-5, "default init must leave the output unchanged")


# 2 ---------------------------------------------------------------------------------------------
def check_non_identity_init_changes_output(case: MethodCase, tiny: TinyModel) -> None:
    inputs = tiny.inputs()
    with torch.no_grad():
        expected = tiny.output(tiny.build(), inputs)
        actual = tiny.output(make_peft(case, tiny, init_weights=False), inputs)
    change = (actual - expected).abs().max().item()
    assert change > 1e-4, f"init_weights=False changed the output by only {change:.3g}"


# 3 ---------------------------------------------------------------------------------------------
def check_forward_matches_dense_delta(case: MethodCase, tiny: TinyModel) -> None:
    model = make_peft(case, tiny, init_weights=False).to(torch.float64)
    if case.neutralize_output_edit is not None:
        case.neutralize_output_edit(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in tuner_layers(model):
            x = torch.randn(2, 3, layer.in_features, generator=generator, dtype=torch.float64).to(DEVICE)
            expected = layer.get_base_layer()(x) + x @ dense_delta(layer).T
            _assert_close(layer(x), expected, 1e-10, f"{name}: structured forward vs x @ ΔWᵀ")


# 4 ---------------------------------------------------------------------------------------------
def check_merge_unmerge(case: MethodCase, tiny: TinyModel) -> None:
    inputs = tiny.inputs()
    model = make_peft(case, tiny, init_weights=False)
    layers = tuner_layers(model)
    original = {name: layer.get_base_layer().weight.detach().clone() for name, layer in layers}
    with torch.no_grad():
        unmerged = tiny.output(model, inputs)
        model.merge_adapter()
        _assert_close(tiny.output(model, inputs), unmerged, 1e-5, "merged vs unmerged output")
        merged_weights = {name: layer.get_base_layer().weight.detach().clone() for name, layer in layers}
        with pytest.warns(UserWarning):
            model.merge_adapter()  # already merged: warns and changes nothing
        for name, layer in layers:
            _assert_close(layer.get_base_layer().weight, merged_weights[name], 0.0, f"{name}: merging twice")
        model.unmerge_adapter()
        for name, layer in layers:
            _assert_close(layer.get_base_layer().weight, original[name], 1e-5, f"{name}: unmerge restores W0")
        _assert_close(tiny.output(model, inputs), unmerged, 1e-5, "output after unmerge")
        plain = model.merge_and_unload()
        assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules()), "merge_and_unload left adapters"
        _assert_close(tiny.output(plain, inputs), unmerged, 1e-5, "merge_and_unload() vs unmerged output")


# 5 ---------------------------------------------------------------------------------------------
def check_save_load_round_trip(case: MethodCase, tiny: TinyModel, directory: Path) -> None:
    inputs = tiny.inputs()
    model = make_peft(case, tiny, init_weights=False)
    model.save_pretrained(directory)
    path = directory / "adapter_model.safetensors"
    assert path.exists() and not (directory / "adapter_model.bin").exists(), "adapter must be saved as safetensors"
    saved = load_file(path)
    assert not any("base_layer" in key for key in saved), "the base weights leaked into the adapter file"
    expected_numel = sum(t.numel() for _, layer in tuner_layers(model) for t in adapter_tensors(layer).values())
    saved_numel = sum(t.numel() for t in saved.values())
    assert saved_numel == expected_numel, f"file holds {saved_numel} numbers, the adapter has {expected_numel}"
    payload = sum(t.numel() * t.element_size() for t in saved.values())
    assert payload <= os.path.getsize(path) <= payload + 256 * len(saved) + 1024, "file size ≠ factor size"
    with torch.no_grad():
        expected = tiny.output(model, inputs)
        loaded = PeftModel.from_pretrained(tiny.build(), directory)
        _assert_close(tiny.output(loaded, inputs), expected, 1e-6, "output after save/load")


# 6 ---------------------------------------------------------------------------------------------
def check_only_adapters_train(case: MethodCase, tiny: TinyModel, steps: int = 5) -> None:
    torch.manual_seed(0)
    model = make_peft(case, tiny)
    adapter_names = {
        f"{name}.{key}" for name, layer in tuner_layers(model) for key, p in layer.named_parameters()
        if not key.startswith("base_layer.")
    }
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (name in adapter_names), f"{name}: requires_grad={parameter.requires_grad}"
    inputs = tiny.inputs()
    loss = tiny.loss(model, inputs)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (name in adapter_names), f"{name}: unexpected gradient state"
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in adapter_names), "all grads zero"
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = loss.item()
    for _ in range(steps):
        optimizer.step()
        optimizer.zero_grad()
        loss = tiny.loss(model, inputs)
        loss.backward()
    assert loss.item() < first, f"{steps} optimizer steps did not lower the loss ({first:.4f} → {loss.item():.4f})"


# 7 ---------------------------------------------------------------------------------------------
def check_several_adapters(case: MethodCase, tiny: TinyModel) -> None:
    inputs = tiny.inputs()
    with torch.no_grad():
        base_out = tiny.output(tiny.build(), inputs)
        model = make_peft(case, tiny, init_weights=False)
        first = tiny.output(model, inputs)
        model.add_adapter("other", case.config(tiny.target_modules, init_weights=False))
        _assert_close(tiny.output(model, inputs), first, 1e-6, "adding an adapter must not change the active one")
        model.set_adapter("other")
        second = tiny.output(model, inputs)
        assert (second - first).abs().max() > 1e-4, "switching adapters did not change the output"
        with model.disable_adapter():
            _assert_close(tiny.output(model, inputs), base_out, 1e-5, "disabled adapters vs base model")
        if case.mergeable:  # additive methods: two active adapters add their ΔW
            summed = model
            if case.neutralize_output_edit is not None:  # on a copy: the rest of this check uses the full method
                summed = copy.deepcopy(model)
                case.neutralize_output_edit(summed)
            summed.base_model.set_adapter(["default", "other"])
            generator = torch.Generator().manual_seed(2)
            for name, layer in tuner_layers(summed):
                x = torch.randn(4, layer.in_features, generator=generator).to(DEVICE)
                delta = dense_delta(layer, "default") + dense_delta(layer, "other")
                expected = layer.get_base_layer()(x) + x @ delta.T
                _assert_close(layer(x), expected, 1e-4, f"{name}: two active adapters vs the sum of their ΔW")
        model.base_model.set_adapter("default")
        model.delete_adapter("other")
        assert "other" not in model.peft_config
        for name, layer in tuner_layers(model):
            assert "other" not in layer._all_available_adapter_names(), f"{name} still holds the deleted adapter"
        _assert_close(tiny.output(model, inputs), first, 1e-6, "output after deleting the other adapter")


# 8 ---------------------------------------------------------------------------------------------
def check_parameter_count(case: MethodCase, tiny: TinyModel) -> None:
    model = make_peft(case, tiny)
    expected = sum(case.formula(layer.in_features, layer.out_features) for _, layer in tuner_layers(model))
    actual = trainable_parameters(model)
    assert actual == expected, f"{actual} trainable parameters, the formula gives {expected}"


# 9 ---------------------------------------------------------------------------------------------
def check_half_precision_base(case: MethodCase, tiny: TinyModel, dtype: torch.dtype) -> None:
    model = make_peft(case, tiny, init_weights=False, dtype=dtype)
    for name, layer in tuner_layers(model):
        for key, tensor in adapter_tensors(layer).items():
            if tensor.is_floating_point():
                assert tensor.dtype == torch.float32, f"{name}.{key} is {tensor.dtype}, adapters must stay float32"
        assert layer.get_base_layer().weight.dtype == dtype, "the base weight's dtype must not change"
    with torch.no_grad():
        output = tiny.output(model, tiny.inputs(dtype=dtype))
    assert torch.isfinite(output).all(), "non-finite output with a half-precision base"


# 10 --------------------------------------------------------------------------------------------
def check_unknown_target_raises(case: MethodCase, tiny: TinyModel) -> None:
    config = case.config([*tiny.target_modules, "no_such_module"])
    with pytest.raises(ValueError, match="no_such_module"):
        get_peft_model(tiny.build(), config)


def check_unsupported_layer_raises(case: MethodCase, tiny: TinyModel) -> None:
    base = tiny.build()
    kind = type(dict(base.named_modules())[next(
        n for n, _ in base.named_modules() if n.split(".")[-1] == tiny.unsupported_module)]).__name__
    with pytest.raises((TypeError, ValueError), match=kind):
        get_peft_model(base, case.config([tiny.unsupported_module]))


def check_mismatched_adapter_load_raises(case: MethodCase, tiny: TinyModel, other: TinyModel,
                                         directory: Path) -> None:
    """An adapter saved for ``tiny`` must not load silently into ``other`` (same names, other shapes)."""
    make_peft(case, tiny, init_weights=False).save_pretrained(directory)
    with pytest.raises((RuntimeError, ValueError), match="size|shape"):
        PeftModel.from_pretrained(other.build(), directory)


# 11 --------------------------------------------------------------------------------------------
def _float_inputs(model: nn.Module, tiny: TinyModel) -> dict[str, torch.Tensor]:
    """Three samples as a float tensor (token models get their embeddings), so one can be set to NaN."""
    if "x" in tiny.inputs():
        return tiny.inputs()
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (3, 7), generator=generator).to(DEVICE)
    return {"inputs_embeds": model.get_base_model().get_input_embeddings()(input_ids)}


def check_batch_independence(case: MethodCase, tiny: TinyModel) -> None:
    """One sample set to NaN, or scaled by 1e6, leaves every other sample's output as it was (to 1e-6)."""
    model = make_peft(case, tiny, init_weights=False)
    with torch.no_grad():
        inputs = _float_inputs(model, tiny)
        (key, clean), = inputs.items()
        expected = tiny.output(model, inputs)
        assert torch.isfinite(expected).all(), "non-finite output on clean inputs"
        for what, poison in (("NaN", lambda t: torch.full_like(t, float("nan"))), ("×1e6", lambda t: t * 1e6)):
            poisoned = clean.clone()
            poisoned[0] = poison(clean[0])
            actual = tiny.output(model, {key: poisoned})
            _assert_close(actual[1:], expected[1:], 1e-6, f"sample 0 set to {what} changed the other samples")


# 12 --------------------------------------------------------------------------------------------
def _assert_torn_down(model: nn.Module, tiny: TinyModel, inputs: dict, base_out: torch.Tensor,
                      adapted_out: torch.Tensor, what: str) -> None:
    """A torn-down model holds no peft layer and computes either the base or the adapted model."""
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules()), f"{what} left peft layers"
    output = tiny.output(model, inputs)
    errors = {"base": (output - base_out).abs().max().item(), "adapted": (output - adapted_out).abs().max().item()}
    assert min(errors.values()) <= 1e-5, f"{what} gives neither the base nor the adapted model (max abs error {errors})"


def _call_or_refusal(call: Callable[[], Any]) -> tuple[Any, Optional[Exception]]:
    """(result, None), or (None, error) for a clear refusal: a ValueError/RuntimeError that says what cannot be
    merged. Any other exception (AttributeError, KeyError, ...) is a crash and propagates."""
    try:
        return call(), None
    except (ValueError, RuntimeError) as error:
        assert "merge" in str(error), f"refusal does not say what cannot be done: {error}"
        return None, error


def check_teardown(case: MethodCase, tiny: TinyModel) -> None:
    """merge_and_unload twice, merge_adapter then unload, unload alone: each gives the base or the adapted
    model, or refuses clearly (and leaves the model adapted); never another error. unload alone gives the base."""
    inputs = tiny.inputs()
    with torch.no_grad():
        base_out = tiny.output(tiny.build(), inputs)
        adapted_out = tiny.output(make_peft(case, tiny, init_weights=False), inputs)

        model = make_peft(case, tiny, init_weights=False)
        for attempt in ("first", "second"):
            unloaded, refusal = _call_or_refusal(model.merge_and_unload)
            if refusal is None:
                _assert_torn_down(unloaded, tiny, inputs, base_out, adapted_out, f"the {attempt} merge_and_unload()")
            else:
                _assert_close(tiny.output(model, inputs), adapted_out, 1e-5, "output after a refused merge_and_unload")

        model = make_peft(case, tiny, init_weights=False)
        if _call_or_refusal(model.merge_adapter)[1] is not None:
            _assert_close(tiny.output(model, inputs), adapted_out, 1e-5, "output after a refused merge_adapter")
        _assert_torn_down(model.unload(), tiny, inputs, base_out, adapted_out, "merge_adapter() then unload()")

        unloaded = make_peft(case, tiny, init_weights=False).unload()
        _assert_torn_down(unloaded, tiny, inputs, base_out, adapted_out, "unload()")
        _assert_close(tiny.output(unloaded, inputs), base_out, 1e-6, "unload() alone must give the base model")
