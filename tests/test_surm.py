"""SURM through peft: the issue's acceptance, both placements, rectangular layers, clear errors.

The invariant battery (test_battery.py) covers the shared contract; these tests cover what is SURM's own:
the adapter placement's forward and its refusal to merge, default targets, and the structure choices.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import hirank
from hirank.analysis import delta_weights, effective_rank, trainable_parameters
from hirank.ops import structured
from tests.tiny_models import TINY_MODELS

STRUCTURES = ("circulant", "toeplitz", "kronecker", "ldr")


class Single(nn.Module):
    """One Linear layer named ``proj``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _single(d_in: int, d_out: int, **config) -> nn.Module:
    torch.manual_seed(0)
    return get_peft_model(Single(d_in, d_out), hirank.SurmConfig(target_modules=["proj"], **config))


def _dense_s(layer, adapter: str = "default") -> torch.Tensor:
    """S of one adapter, rebuilt here from its factors with the ops' dense definitions."""
    settings = layer.surm_settings[adapter]
    b, a = layer.surm_B[adapter], layer.surm_A[adapter] if adapter in layer.surm_A else None
    rows, cols = settings.rows, settings.cols
    return {
        "circulant": lambda: structured.circulant_dense(a * b, rows, cols),
        "toeplitz": lambda: structured.toeplitz_dense(b, rows, cols),
        "kronecker": lambda: torch.kron(b, a),
        "ldr": lambda: structured.ldr_dense(b, a, rows, cols),
    }[settings.structure]()


# ---- acceptance ---------------------------------------------------------------------------------
def test_circulant_on_a_384_wide_layer_has_at_most_2x384_params_and_full_rank_delta():
    model = _single(384, 384, structure="circulant")
    assert trainable_parameters(model) == 2 * 384
    assert not delta_weights(model)["base_model.model.proj"].any()  # ΔW = 0 at the start
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(16, 384, generator=torch.Generator().manual_seed(0))
    (model(x) - 1).pow(2).mean().backward()
    optimizer.step()
    assert effective_rank(delta_weights(model)["base_model.model.proj"]) == 384  # one step: full rank


# ---- LoRA placement ---------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_starts_at_zero_with_a_gradient_on_the_zero_factor(structure):
    model = _single(64, 96, structure=structure, displacement_rank=2)
    layer = model.base_model.model.proj
    assert not layer.get_delta_weight("default").any()
    model(torch.randn(8, 64)).pow(2).sum().backward()
    assert layer.surm_B["default"].grad.abs().sum() > 0


@pytest.mark.parametrize("structure", STRUCTURES)
def test_rectangular_384_to_1536(structure):
    """Forward == x·(α·S)ᵀ in float64, parameter count as documented, ΔW of full rank 384."""
    model = _single(384, 1536, structure=structure, alpha=0.5, init_weights=False).to(torch.float64)
    layer = model.base_model.model.proj
    x = torch.randn(2, 3, 384, dtype=torch.float64)
    expected = layer.get_base_layer()(x) + 0.5 * x @ _dense_s(layer).T
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-10)
    counts = {"circulant": 2 * 1536, "toeplitz": 384 + 1536 - 1, "kronecker": 384 + 1536, "ldr": 2 * 1536}
    assert trainable_parameters(model) == counts[structure]
    assert effective_rank(layer.get_delta_weight("default")) == 384  # Kronecker: r = 24, rank ≤ min(64, 24)·16


def test_alpha_scales_the_delta_linearly():
    one = _single(32, 32, structure="toeplitz", init_weights=False)
    three = _single(32, 32, structure="toeplitz", init_weights=False, alpha=3.0)
    torch.testing.assert_close(three.base_model.model.proj.get_delta_weight("default"),
                               3 * one.base_model.model.proj.get_delta_weight("default"))


def test_kronecker_factor_is_chosen_per_layer_or_rejected_with_valid_choices():
    layer = _single(64, 192, structure="kronecker").base_model.model.proj
    assert tuple(layer.surm_A["default"].shape) == (8, 8) and tuple(layer.surm_B["default"].shape) == (24, 8)
    layer = _single(64, 192, structure="kronecker", kronecker_factor=4).base_model.model.proj
    assert tuple(layer.surm_A["default"].shape) == (4, 16) and tuple(layer.surm_B["default"].shape) == (48, 4)
    with pytest.raises(ValueError, match=r"'proj'.*kronecker_factor=3.*valid choices: \[1, 2, 4, 8, 16, 32, 64\]"):
        _single(64, 192, structure="kronecker", kronecker_factor=3)


def test_kronecker_on_coprime_dims_warns_that_s_has_rank_one():
    with pytest.warns(UserWarning, match="'proj'.*rank-1"):
        model = _single(61, 64, structure="kronecker", init_weights=False)
    assert effective_rank(model.base_model.model.proj.get_delta_weight("default")) == 1


def test_displacement_rank_larger_than_the_matrix_is_rejected():
    with pytest.raises(ValueError, match=r"'proj'.*displacement_rank 9 exceeds the size 8"):
        _single(8, 8, structure="ldr", displacement_rank=9)


@pytest.mark.parametrize("bad, message", [
    ({"structure": "lowrank"}, "structure must be one of"),
    ({"placement": "prefix"}, "placement must be one of"),
    ({"adapter_activation": "sigmoid"}, "act\\(0\\) = 0"),
    ({"displacement_rank": 0}, "displacement_rank must be a positive integer"),
    ({"kronecker_factor": 0}, "kronecker_factor must be None or a positive integer"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"init_weights": "gaussian"}, "init_weights must be True"),
])
def test_config_rejects_bad_knobs(bad, message):
    with pytest.raises(ValueError, match=message):
        hirank.SurmConfig(target_modules=["proj"], **bad)


# ---- adapter placement -----------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_adapter_placement_is_y_plus_act_of_s_y_plus_bias(structure):
    model = _single(48, 64, structure=structure, placement="adapter", alpha=0.7, init_weights=False)
    model = model.to(torch.float64)
    layer = model.base_model.model.proj
    nn.init.normal_(layer.surm_bias["default"])
    assert _dense_s(layer).shape == (64, 64)  # square on the outputs
    x = torch.randn(5, 48, dtype=torch.float64)
    y = layer.get_base_layer()(x)
    expected = y + nn.functional.gelu(0.7 * y @ _dense_s(layer).T) + layer.surm_bias["default"]
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-10)


def test_adapter_placement_refuses_to_merge_and_leaves_the_weight_alone():
    model = _single(32, 32, placement="adapter", init_weights=False)
    weight = model.base_model.model.proj.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match="cannot be merged: placement='adapter'.*non-linear"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="has no ΔW"):
        model.base_model.model.proj.get_delta_weight("default")
    assert torch.equal(model.base_model.model.proj.get_base_layer().weight, weight)
    assert not model.base_model.model.proj.supports_lora_conversion()


def test_two_active_adapters_act_in_parallel_on_the_same_output():
    """Adapter-placed: each sees the layer output y. LoRA-placed ones first change y (they are part of the layer)."""
    model = _single(16, 16, placement="adapter", adapter_activation="tanh", init_weights=False).to(torch.float64)
    model.add_adapter("second", hirank.SurmConfig(target_modules=["proj"], placement="adapter", structure="toeplitz",
                                                  adapter_activation="tanh", init_weights=False))
    model.add_adapter("lora", hirank.SurmConfig(target_modules=["proj"], structure="ldr", init_weights=False))
    layer = model.base_model.model.proj
    x = torch.randn(4, 16, dtype=torch.float64)
    y = layer.get_base_layer()(x) + x @ _dense_s(layer, "lora").T
    model.base_model.set_adapter(["default", "second", "lora"])
    expected = y + sum(torch.tanh(y @ _dense_s(layer, name).T) + layer.surm_bias[name]
                       for name in ("default", "second"))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("tiny, block, targets", [
    ("bert", "bert.encoder.layer.{}", ("attention.output.dense", "output.dense")),
    ("gpt2", "transformer.h.{}", ("attn.c_proj", "mlp.c_proj")),
    ("llama", "model.layers.{}", ("self_attn.o_proj", "mlp.down_proj")),
])
def test_adapter_placement_defaults_to_two_adapters_per_block(tiny, block, targets):
    model = get_peft_model(TINY_MODELS[tiny].build(), hirank.SurmConfig(placement="adapter"))
    adapted = {name for name, module in model.named_modules() if hasattr(module, "surm_settings")}
    expected = {f"base_model.model.{block.format(i)}.{target}" for i in range(2) for target in targets}
    assert adapted == expected


def test_lora_placement_keeps_the_lora_default_targets():
    model = get_peft_model(TINY_MODELS["bert"].build(), hirank.SurmConfig())
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "surm_settings")}
    assert adapted == {"query", "value"}


def test_adapter_placement_without_default_targets_asks_for_target_modules():
    with pytest.raises(ValueError, match="no default target_modules.*Pass target_modules"):
        get_peft_model(TINY_MODELS["mlp"].build(), hirank.SurmConfig(placement="adapter"))


# ---- fast product or dense S per layer (issue 12) ---------------------------------------------------
def test_cost_model_prefers_the_dense_s_only_when_tokens_pay_for_it():
    assert structured.fast_product_is_cheaper("ldr", 512, 4096, 4096, displacement_rank=1)
    assert not structured.fast_product_is_cheaper("ldr", 8192, 64, 64, displacement_rank=8)  # tokens ≫ d
    assert structured.fast_product_is_cheaper("ldr", 1, 64, 64, displacement_rank=8)  # the build is not paid back
    assert structured.fast_product_is_cheaper("circulant", 1024, 1024, 1024)
    assert structured.fast_product_is_cheaper("kronecker", 10 ** 6, 64, 64)  # never materialized


def test_cost_model_keeps_a_saved_dense_s_out_of_training_where_it_outweighs_half_of_x():
    """Circulant's and Toeplitz's dense path saves S (m × n) for backward: in training only where T ≥ 2m.
    LDR's rebuilds W in backward instead, so its choice is by time alone."""
    assert structured.fast_product_is_cheaper("toeplitz", 100, 64, 64)  # S would outweigh x
    assert not structured.fast_product_is_cheaper("toeplitz", 100, 64, 64, training=False)
    assert not structured.fast_product_is_cheaper("toeplitz", 128, 64, 64)
    assert not structured.fast_product_is_cheaper("ldr", 100, 64, 64, displacement_rank=8)


def _saved_bytes(run) -> int:
    """Bytes autograd saves for backward while ``run()`` builds its graph (unique storages)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def test_ldr_dense_path_saves_no_more_than_the_fast_path(monkeypatch):
    """W (64 × 64, as big as the 64 tokens' x) is rebuilt in backward, not saved."""
    model = _single(64, 64, structure="ldr", displacement_rank=2, init_weights=False)
    x = torch.randn(64, 64, requires_grad=True)
    saved = {}
    for fast in (True, False):
        monkeypatch.setattr(structured, "fast_product_is_cheaper", lambda *args, fast=fast, **kwargs: fast)
        saved[fast] = _saved_bytes(lambda: model(x))
    assert saved[False] <= saved[True], saved


@pytest.mark.parametrize("structure", ["circulant", "toeplitz", "ldr"])
def test_dense_path_compiles_as_one_graph(structure, monkeypatch):
    """torch.compile(backend="eager") traces the dense build of S (strided views, cumulative sums) without a
    graph break; a custom Function that rebuilt S with torch.autograd.grad in backward broke it once per layer."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(structured, "fast_product_is_cheaper", lambda *args, **kwargs: False)
    model = _single(24, 40, structure=structure, displacement_rank=2, init_weights=False)
    x = torch.randn(2, 7, 24)
    torch._dynamo.reset()
    counters.clear()
    torch.compile(model, backend="eager")(x).square().sum().backward()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("structure", ["circulant", "toeplitz", "ldr"])
@pytest.mark.parametrize("placement", ["lora", "adapter"])
def test_dense_path_and_fast_path_give_the_same_outputs_and_gradients(structure, placement, monkeypatch):
    model = _single(24, 40, structure=structure, placement=placement, displacement_rank=3, init_weights=False)
    model = model.to(torch.float64)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    results = {}
    for fast in (True, False):
        monkeypatch.setattr(structured, "fast_product_is_cheaper", lambda *args, fast=fast, **kwargs: fast)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results[fast] = (out, [p.grad.clone() for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(results[False][0], results[True][0], rtol=0, atol=1e-10)
    for dense_grad, fast_grad in zip(results[False][1], results[True][1]):
        torch.testing.assert_close(dense_grad, fast_grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_one_sample_poisoned_leaves_the_others_alone(structure):
    """Issue 11.3 through the layer: NaN in one sample of the batch, the other samples' outputs unchanged."""
    model = _single(32, 32, structure=structure, displacement_rank=2, init_weights=False)
    x = torch.randn(4, 3, 32)
    clean = model(x)
    x[1, 2] = float("nan")
    out = model(x)
    torch.testing.assert_close(out[[0, 2, 3]], clean[[0, 2, 3]], rtol=0, atol=1e-6)


# ---- the dense S inside the base layer's product with W₀ + α·S (ops/merged.py) ---------------------------------
def test_cost_model_fuses_the_dense_s_from_fewer_tokens_than_a_separate_branch():
    """Fused, a dense S adds one GEMM per row in training (∂S) instead of three: LDR r=8 takes it from 512 tokens at
    N = 2048 and 1024 at N = 4096, where the separate dense branch keeps the fast product (measured at N = 2048,
    512 tokens: separate dense 1.03× the fast step); at N = 1024 both take the dense S from 512 tokens (separate
    measured 0.65×); LDR r=1 keeps its fast product."""
    assert not structured.fast_product_is_cheaper("ldr", 512, 1024, 1024, displacement_rank=8)
    assert not structured.fast_product_is_cheaper("ldr", 512, 1024, 1024, displacement_rank=8, fused=True)
    assert structured.fast_product_is_cheaper("ldr", 512, 2048, 2048, displacement_rank=8)
    assert not structured.fast_product_is_cheaper("ldr", 512, 2048, 2048, displacement_rank=8, fused=True)
    assert structured.fast_product_is_cheaper("ldr", 1024, 4096, 4096, displacement_rank=8)
    assert not structured.fast_product_is_cheaper("ldr", 1024, 4096, 4096, displacement_rank=8, fused=True)
    assert structured.fast_product_is_cheaper("ldr", 256, 4096, 4096, displacement_rank=8, fused=True)
    assert structured.fast_product_is_cheaper("ldr", 512, 1024, 1024, displacement_rank=1, fused=True)
    assert structured.fast_product_is_cheaper("circulant", 1024, 1024, 1024, fused=True)  # S outweighs x: memory
    assert structured.fast_product_is_cheaper("kronecker", 10 ** 6, 64, 64, fused=True)


def _count_fused(monkeypatch) -> list[str]:
    calls: list[str] = []
    for module, name in ((structured, "ldr_merged_linear"), (__import__("hirank.tuners.base").tuners.base,
                                                             "merged_linear")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, original=original, name=name: calls.append(name)
                            or original(*args))
    return calls


@pytest.mark.parametrize("structure", ["circulant", "toeplitz", "ldr"])
def test_fused_path_gives_the_separate_branch_outputs_and_gradients(structure, monkeypatch):
    """float64, lora placement, forced dense S: one product with W₀ + α·S == W₀x + b + α·S·x (x, factors, bias)."""
    calls = _count_fused(monkeypatch)
    monkeypatch.setattr(structured, "fast_product_is_cheaper", lambda *args, **kwargs: False)
    model = _single(24, 40, structure=structure, displacement_rank=3, init_weights=False, alpha=0.7).double()
    layer = model.base_model.model.proj
    layer.get_base_layer().bias.requires_grad_(True)
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    tensors = [x, layer.get_base_layer().bias, *(p for p in layer.parameters() if p.requires_grad)]
    grad = torch.randn(2, 7, 40, dtype=torch.float64)
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(type(layer), "fuses_delta", fused)
        out = model(x)
        results[fused] = (out, torch.autograd.grad(out, tensors, grad))
    assert calls == ["ldr_merged_linear" if structure == "ldr" else "merged_linear"]
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=1e-10)
    for fused_grad, separate_grad in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(fused_grad, separate_grad, rtol=0, atol=1e-10)


def test_fresh_ldr_adapter_on_the_fused_path_is_bitwise_the_base_layer(monkeypatch):
    """G = 0 at init, so W(0, H) == 0 exactly and W₀ + 0 == W₀: the frozen layer's output and ∂x, bit for bit."""
    calls = _count_fused(monkeypatch)
    model = _single(64, 64, structure="ldr", displacement_rank=8)
    base = model.base_model.model.proj.get_base_layer()
    x = torch.randn(512, 64, requires_grad=True)
    grad = torch.randn(512, 64)
    out = model(x)
    assert calls == ["ldr_merged_linear"]
    expected = base(x)
    assert torch.equal(out, expected)
    assert torch.equal(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])
