"""QuanTA math (hirank.ops.quanta) and its layer, checked against an independent reference."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import hirank
from hirank.analysis import delta_weights, effective_rank, trainable_parameters
from hirank.ops import chunks
from hirank.ops.quanta import QuantaCircuit, _backward_chunk, balanced_factorization, gate_pairs, plan_circuit

torch.set_default_dtype(torch.float32)


def reference_apply(x: torch.Tensor, circuit: QuantaCircuit, flat: torch.Tensor) -> torch.Tensor:
    """Gate by gate with movedim + matmul (no einsum): move axes (a, b) last, multiply, move back."""
    batch = x.shape[0]
    state = x.reshape(batch, *circuit.in_factors)
    for (a, b), gate in zip(gate_pairs(len(circuit.in_factors)), circuit.split(flat)):
        out_a, out_b, in_a, in_b = gate.shape
        moved = state.movedim((a + 1, b + 1), (-2, -1))
        rest = moved.shape[:-2]
        product = moved.reshape(-1, in_a * in_b) @ gate.reshape(out_a * out_b, in_a * in_b).T
        state = product.reshape(*rest, out_a, out_b).movedim((-2, -1), (a + 1, b + 1))
    return state.reshape(batch, -1)


def random_gates(circuit: QuantaCircuit, seed: int = 0) -> torch.Tensor:
    return circuit.init_gates(torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_official_gate_order_for_four_axes():
    # (3,4)→(2,4)→(1,4)→(2,3)→(1,3)→(1,2) in the paper's 1-based axes (spec §1.2)
    assert gate_pairs(4) == ((2, 3), (1, 3), (0, 3), (1, 2), (0, 2), (0, 1))


@pytest.mark.parametrize("in_factors, out_factors", [
    ((4, 3, 3, 2), (4, 3, 3, 2)),
    ((4, 4, 2, 2), (4, 4, 4, 3)),  # rectangular 64 → 192
    ((6, 4, 4), (2, 4, 4)),  # rectangular 96 → 32
    ((3, 5), (3, 5)),
])
def test_sequential_forward_equals_x_times_dense_transpose(in_factors, out_factors):
    circuit = QuantaCircuit(in_factors, out_factors)
    gates = random_gates(circuit)
    x = torch.randn(7, circuit.in_size, dtype=torch.float64)
    reference = reference_apply(x, circuit, gates)
    torch.testing.assert_close(circuit.apply(x, gates), reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(x @ circuit.dense(gates).T, reference, rtol=0, atol=1e-12)


def test_padded_circuit_equals_its_dense_matrix():
    circuit = plan_circuit(61, 61, pad=True)  # 3·3·3·3 = 81 ≥ 61: pad the input, crop the output
    gates = random_gates(circuit)
    x = torch.randn(5, 61, dtype=torch.float64)
    torch.testing.assert_close(circuit.apply(x, gates), x @ circuit.dense(gates).T, rtol=0, atol=1e-12)
    assert circuit.dense(gates).shape == (61, 61)


@pytest.mark.parametrize("factors, expected", [((16, 8, 8, 4), 43_008), ((8, 8, 8, 8), 24_576), ((16, 16, 16), 196_608)])
def test_parameter_count_is_sum_of_squared_pair_products(factors, expected):
    circuit = QuantaCircuit(factors, factors)
    assert circuit.num_parameters() == expected  # spec §1.6 table
    assert circuit.init_gates().numel() == expected


def test_two_axes_is_a_dense_update():
    circuit = QuantaCircuit((4, 6), (4, 6))
    gates = random_gates(circuit)
    assert circuit.num_parameters() == 24 ** 2
    torch.testing.assert_close(circuit.dense(gates), gates.view(24, 24), rtol=0, atol=0)


def test_random_gates_give_full_rank():
    for factors in [(6, 4, 4, 4), (4, 4, 3, 2)]:
        circuit = QuantaCircuit(factors, factors)
        dense = circuit.dense(random_gates(circuit, seed=3))
        assert effective_rank(dense) == circuit.in_size


def test_balanced_factorizations():
    assert balanced_factorization(4096, 4) == (8, 8, 8, 8)
    assert balanced_factorization(384, 4) == (6, 4, 4, 4)
    assert balanced_factorization(61, 2) is None
    assert plan_circuit(8, 8).in_factors == (2, 2, 2)  # fewer axes where the size allows no more
    assert plan_circuit(64, 192).out_factors == (4, 4, 4, 3)


def test_unfactorable_sizes_raise_with_suggestions():
    with pytest.raises(ValueError, match="pad=True"):
        plan_circuit(61, 61)
    with pytest.raises(ValueError, match=r"valid factorizations of 96: \[\[12, 8\], \[6, 4, 4\], \[4, 4, 3, 2\]\]"):
        plan_circuit(96, 96, factors=(16, 8))


def _linear_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width))


def test_384_wide_layer_has_full_rank_delta_with_fewer_params_than_lora_r8():
    model = get_peft_model(_linear_model(384), hirank.QuantaConfig(target_modules=["0"], init_weights=False))
    (delta,) = delta_weights(model, dtype=torch.float64).values()
    assert effective_rank(delta) == 384  # σ_min/σ_max ≈ 4e-5: float32 rounding would blur the last one
    assert trainable_parameters(model) == 2496 < 8 * (384 + 384)


def test_delta_is_zero_at_init_and_every_gate_gets_gradient():
    model = get_peft_model(_linear_model(96), hirank.QuantaConfig(target_modules=["0"]))
    (delta,) = delta_weights(model).values()
    assert delta.abs().max() == 0
    layer = model.base_model.model[0]
    model(torch.randn(8, 96)).pow(2).sum().backward()
    circuit = layer.quanta_circuit["default"]
    for gate_grad in circuit.split(layer.quanta_gates["default"].grad):
        assert gate_grad.abs().max() > 0


def test_explicit_factors_for_the_wrong_size_name_the_module():
    config = hirank.QuantaConfig(target_modules=["0"], factors=[16, 8, 8, 4])
    with pytest.raises(ValueError, match=r"Cannot adapt module '0'.*multiply to 4096, not 96"):
        get_peft_model(_linear_model(96), config)


def test_theta0_is_saved_so_loading_is_exact(tmp_path):
    model = get_peft_model(_linear_model(96), hirank.QuantaConfig(target_modules=["0"]))
    with torch.no_grad():
        model.base_model.model[0].quanta_gates["default"].add_(0.01)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(saved) == ["base_model.model.0.quanta_gates", "base_model.model.0.quanta_theta0"]
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(_linear_model(96), tmp_path)
    x = torch.randn(3, 96)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_frozen_branch_follows_theta0_changed_in_place():
    model = get_peft_model(_linear_model(96), hirank.QuantaConfig(target_modules=["0"], init_weights=False))
    layer = model.base_model.model[0]
    x = torch.randn(4, 96)
    with torch.no_grad():
        for _ in range(2):  # the second pass sees θ₀ changed in place (as load_state_dict does)
            expected = layer.get_base_layer()(x) + x @ layer.get_delta_weight("default").T
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
            layer.quanta_theta0["default"].mul_(0.5)


@pytest.mark.parametrize("in_factors, out_factors", [
    ((4, 3, 3, 2), (4, 3, 3, 2)),
    ((4, 4, 2, 2), (4, 4, 4, 3)),
    ((3, 2, 2, 2, 2), (2, 2, 3, 2, 2)),
])
def test_circuit_and_difference_gradients_are_exact(in_factors, out_factors):
    """The custom backward (recomputed states, chunked over tokens) against finite differences."""
    circuit = QuantaCircuit(in_factors, out_factors)
    gates = random_gates(circuit).requires_grad_()
    frozen = random_gates(circuit, seed=1)
    x = torch.randn(7, circuit.in_size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(circuit.apply, (x, gates), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, g: circuit.apply_difference(x, g, frozen), (x, gates), fast_mode=True)


class _CountOps(TorchDispatchMode):
    """Counts GEMM calls and the elements written by copies (clone, copy_, cat) under it."""

    def __init__(self) -> None:
        super().__init__()
        self.gemms, self.copied = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.gemms += name in ("mm", "bmm", "addmm", "baddbmm")
        self.copied += out.numel() if name in ("clone", "copy_", "cat", "_to_copy") else 0
        return out


@pytest.mark.parametrize("factors", [(8, 8, 4, 4), (4, 4, 2, 2, 2)])
def test_each_gate_is_one_gemm_and_the_state_is_copied_only_at_the_ends(factors):
    """The bubble layout: every gate finds its pair adjacent, so a forward of M(θ)x − M(θ₀)x is one GEMM per
    gate and branch and copies the state twice (the output relayout), and a backward copies it three times;
    one einsum per gate (the authors') permutes the state twice per gate."""
    circuit = QuantaCircuit(factors, factors)
    gates, frozen = circuit.init_gates().requires_grad_(), circuit.init_gates()
    x = torch.randn(256, circuit.in_size, requires_grad=True)
    state, params = x.numel(), circuit.num_parameters()
    chunks = -(-256 // _backward_chunk(256, len(circuit.steps)))
    with _CountOps() as forward:
        out = circuit.apply_difference(x, gates, frozen)
    assert forward.gemms == 2 * len(circuit.steps)
    assert forward.copied == 2 * state + 2 * params  # + the gate matrices of θ and θ₀
    with _CountOps() as backward:
        out.backward(torch.randn_like(out))
    assert backward.copied == 3 * state + 2 * params + 2 * params * chunks  # + matrices, gradients per chunk


def test_passes_in_cache_sized_token_chunks_give_the_whole_pass_outputs_and_exact_gradients(monkeypatch):
    """On CPU a pass runs in chunks of tokens (``chunks.CPU_CHUNK_ELEMENTS`` of state each): the whole pass's
    outputs (to rounding: BLAS blocks a product by its width) and gradients that finite differences confirm."""
    circuit = QuantaCircuit((4, 4, 2, 2), (4, 4, 4, 3))
    gates = random_gates(circuit).requires_grad_()
    frozen = random_gates(circuit, seed=1)
    x = torch.randn(7, circuit.in_size, dtype=torch.float64, requires_grad=True)
    whole = circuit.apply_difference(x, gates, frozen)
    monkeypatch.setattr(chunks, "CPU_CHUNK_ELEMENTS", 2 * circuit.out_size)  # 4 chunks: 2+2+2+1 tokens
    with _CountOps() as forward:
        chunked = circuit.apply_difference(x, gates, frozen)
    assert forward.gemms == 2 * len(circuit.steps) * 4
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(lambda x, g: circuit.apply_difference(x, g, frozen), (x, gates), fast_mode=True)


def test_difference_is_bitwise_zero_while_theta_equals_theta0_yet_gates_get_gradient():
    circuit = QuantaCircuit((6, 4, 4), (6, 4, 4))
    gates = circuit.init_gates().requires_grad_()
    x = torch.randn(5, 96, requires_grad=True)
    out = circuit.apply_difference(x, gates, gates.detach().clone())
    assert (out == 0).all()
    (out * torch.randn_like(out)).sum().backward()
    assert gates.grad.abs().max() > 0
    assert (circuit.delta_dense(gates.detach(), gates.detach().clone()) == 0).all()


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_fresh_adapter_leaves_logits_bitwise_unchanged(name):
    from tests.tiny_models import TINY_MODELS

    tiny = TINY_MODELS[name]
    inputs = tiny.inputs()
    with torch.no_grad():
        before = tiny.output(tiny.build(), inputs)
        model = get_peft_model(tiny.build(), hirank.QuantaConfig(target_modules=list(tiny.target_modules)))
        assert (tiny.output(model, inputs) == before).all()
        model.merge_adapter()
        assert (tiny.output(model, inputs) == before).all()


def test_cost_model_picks_the_dense_delta_only_where_tokens_repay_its_build():
    """Module docstring: per token the dense ΔW costs 3·N² against 6 circuit passes; building it costs a step
    on N rows. At N = 1024 with 4 axes it wins from about 4k tokens; a 2-axis (single dense gate) layer soon."""
    four_axes, two_axes = QuantaCircuit((8, 8, 4, 4), (8, 8, 4, 4)), QuantaCircuit((32, 32), (32, 32))
    assert not four_axes.prefer_dense(512) and not four_axes.prefer_dense(1024) and four_axes.prefer_dense(8192)
    wide = QuantaCircuit((8, 8, 8, 4), (8, 8, 8, 4))
    assert not any(wide.prefer_dense(tokens) for tokens in (512, 2048, 1 << 16))
    assert two_axes.prefer_dense(8192) and not two_axes.prefer_dense(16)


@pytest.mark.parametrize("tokens", [4, 4096], ids=["structured", "dense"])
def test_both_layer_paths_give_the_dense_delta_forward_and_gradients(tokens):
    model = get_peft_model(_linear_model(24), hirank.QuantaConfig(target_modules=["0"], factors=[6, 4],
                                                                  init_weights=False))
    layer = model.base_model.model[0]
    assert layer.quanta_circuit["default"].prefer_dense(tokens) == (tokens == 4096)
    x = torch.randn(tokens, 24, requires_grad=True)
    gates = layer.quanta_gates["default"]
    layer(x).square().sum().backward()
    grads = (x.grad.clone(), gates.grad.clone())
    x.grad, gates.grad = None, None
    circuit, theta0 = layer.quanta_circuit["default"], layer.quanta_theta0["default"]
    reference = layer.get_base_layer()(x) + x @ (circuit.dense(gates) - circuit.dense(theta0)).T
    reference.square().sum().backward()
    torch.testing.assert_close(grads[0], x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], gates.grad, rtol=1e-4, atol=1e-4)


def test_backward_saves_only_the_input_of_the_circuit():
    """Activation memory: the adapter keeps x (as LoRA keeps x for its A) and nothing per gate."""
    model = get_peft_model(_linear_model(384), hirank.QuantaConfig(target_modules=["0"]))
    x = torch.randn(64, 384, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x)
    activation_bytes = sum(t.numel() * t.element_size() for t in saved if t.shape[0] == 64)
    assert activation_bytes == x.numel() * x.element_size()


# ---- one product with W₀ + ΔW (ops/merged.py) where the cost model prefers the dense ΔW -----------------------
def test_merged_linear_equals_base_plus_delta_product_with_all_gradients():
    from hirank.ops.merged import merged_linear

    torch.manual_seed(0)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)  # a base trained too: ∂W₀ = ∂ΔW
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 5, 7, dtype=torch.float64)
    inputs = (x, weight, bias, delta)
    fused = torch.autograd.grad(merged_linear(*inputs), inputs, grad)
    separate = torch.autograd.grad(nn.functional.linear(x, weight, bias) + x @ delta.T, inputs, grad)
    torch.testing.assert_close(merged_linear(*inputs), nn.functional.linear(x, weight, bias) + x @ delta.T)
    for got, expected in zip(fused, separate):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_merged_linear_saves_x_and_one_weight_sized_tensor():
    from hirank.ops.merged import merged_linear

    x = torch.randn(64, 32, requires_grad=True)
    weight, delta = torch.randn(48, 32), torch.randn(48, 32, requires_grad=True)
    saved: dict[int, int] = {}
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t,
            lambda t: t):
        merged_linear(x, weight, None, delta)
    assert sum(saved.values()) == (64 * 32 + 48 * 32) * 4  # x and W₀ + ΔW; not ΔW as well, nothing per token more


def _fused_layer(width: int, **config) -> tuple[nn.Module, nn.Module]:
    model = get_peft_model(_linear_model(width).double(),
                           hirank.QuantaConfig(target_modules=["0"], init_weights=False, **config))
    return model, model.base_model.model[0]


def _count_fused_calls(monkeypatch) -> list[int]:
    import hirank.tuners.base as tuner_base

    calls: list[int] = []
    original = tuner_base.merged_linear
    monkeypatch.setattr(tuner_base, "merged_linear", lambda *args: calls.append(1) or original(*args))
    return calls


def test_fused_path_gives_the_separate_branch_outputs_and_gradients(monkeypatch):
    """float64: one product with W₀ + ΔW == base(x) + x·ΔWᵀ, for the output and the gradients of x, gates, bias."""
    calls = _count_fused_calls(monkeypatch)
    model, layer = _fused_layer(24, factors=[6, 4])
    layer.get_base_layer().bias.requires_grad_(True)
    x = torch.randn(2, 2048, 24, dtype=torch.float64, requires_grad=True)
    tensors = (x, layer.quanta_gates["default"], layer.get_base_layer().bias)
    grad = torch.randn(2, 2048, 24, dtype=torch.float64)
    fused_out = model(x)
    fused = torch.autograd.grad(fused_out, tensors, grad)
    assert calls == [1]
    monkeypatch.setattr(type(layer), "fuses_delta", False)
    separate_out = model(x)
    separate = torch.autograd.grad(separate_out, tensors, grad)
    assert calls == [1]
    torch.testing.assert_close(fused_out, separate_out, rtol=1e-12, atol=1e-12)
    for got, expected in zip(fused, separate):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_fresh_adapter_on_the_fused_path_is_bitwise_the_base_layer(monkeypatch):
    """At init ΔW == 0 exactly (the θ == θ₀ guard), W₀ + 0 == W₀: output and ∂x are the frozen layer's, bit for bit."""
    calls = _count_fused_calls(monkeypatch)
    model = get_peft_model(_linear_model(64), hirank.QuantaConfig(target_modules=["0"]))
    base = model.base_model.model[0].get_base_layer()
    x = torch.randn(4096, 64, requires_grad=True)
    grad = torch.randn(4096, 64)
    out = model(x)
    assert calls == [1]
    (grad_x,) = torch.autograd.grad(out, x, grad)
    expected = base(x)
    (expected_grad_x,) = torch.autograd.grad(expected, x, grad)
    assert torch.equal(out, expected) and torch.equal(grad_x, expected_grad_x)


def test_cost_model_fuses_the_dense_delta_from_fewer_tokens_than_a_separate_branch():
    """Fused, the dense ΔW adds one GEMM per token (∂ΔW) instead of three: it repays its build (a structured step on
    N rows) from ≈ 1.3k tokens at N = 1024 and ≈ 3.7k at N = 2048 (measured ≈ 1.3k and ≈ 3k), where the separate
    dense branch needs ≈ 4k and never; for memory (it saves W₀ + ΔW) only from 2·N tokens on."""
    four_axes, wide = QuantaCircuit((8, 8, 4, 4), (8, 8, 4, 4)), QuantaCircuit((8, 8, 8, 4), (8, 8, 8, 4))
    assert not four_axes.prefer_dense(1024, fused=True) and four_axes.prefer_dense(2048, fused=True)
    assert not four_axes.prefer_dense(2048)
    assert not wide.prefer_dense(2048, fused=True) and wide.prefer_dense(4096, fused=True)
    assert four_axes.dense_cost(4096) - four_axes.dense_cost(4096, fused=True) == 2 * 4096 * 1024 * 1024
    two_axes = QuantaCircuit((32, 32), (32, 32))  # one dense gate: time alone would fuse it at 1.5·N
    assert two_axes.dense_cost(1536, fused=True) < two_axes.structured_cost(1536)
    assert not two_axes.prefer_dense(1024 * 2 - 1, fused=True) and two_axes.prefer_dense(2048, fused=True)


@pytest.mark.parametrize("blocker", ["few tokens", "dropout", "half base", "hook", "two adapters", "merged",
                                     "autocast", "extra argument"])
def test_fused_path_only_on_a_plain_float_linear_with_one_active_adapter(blocker, monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    dropout = 0.1 if blocker == "dropout" else 0.0
    model = get_peft_model(_linear_model(24), hirank.QuantaConfig(target_modules=["0"], factors=[6, 4],
                                                                  dropout=dropout, init_weights=False))
    layer = model.base_model.model[0]
    x = torch.randn(4 if blocker == "few tokens" else 4096, 24)
    if blocker == "half base":
        layer.get_base_layer().to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    elif blocker == "hook":
        layer.get_base_layer().register_forward_hook(lambda *args: None)
    elif blocker == "two adapters":
        model.add_adapter("other", hirank.QuantaConfig(target_modules=["0"], factors=[6, 4]))
        layer.set_adapter(["default", "other"])
    elif blocker == "merged":
        model.merge_adapter()
    model.train()
    expected = layer.get_base_layer()(x)
    if blocker == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
    elif blocker == "extra argument":
        with pytest.raises(TypeError):  # nn.Linear takes no extra argument: the base layer gets it, as before
            layer(x, None)
    else:
        assert layer(x).shape == expected.shape
    assert calls == []


def test_fused_path_compiles_as_one_graph(monkeypatch):
    """torch.compile(backend="eager") traces the fused path's checks (hooks, dtypes, autocast) and Function whole."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    calls = _count_fused_calls(monkeypatch)
    model, _ = _fused_layer(24, factors=[6, 4])
    x = torch.randn(4096, 24, dtype=torch.float64, requires_grad=True)
    expected = model(x)
    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(model, backend="eager")(x)
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    assert calls == [1, 1]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_fused_path_saves_x_and_the_merged_weight_only(monkeypatch):
    """Activation memory of the fused path: x and W₀ + ΔW; the identity the build of ΔW runs on is rebuilt in
    backward, not kept (it was one more d_in² per layer: 1.5× LoRA's activation memory at d = 2048, 4096 tokens)."""
    calls = _count_fused_calls(monkeypatch)
    model = get_peft_model(_linear_model(64), hirank.QuantaConfig(target_modules=["0"], init_weights=False))
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    x = torch.randn(4096, 64, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in weights:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)
    assert calls == [1]
    assert sum(saved.values()) == (4096 * 64 + 64 * 64) * 4
    out.sum().backward()  # the rebuilt identity gives the gates their gradient
    assert model.base_model.model[0].quanta_gates["default"].grad.abs().max() > 0


# ---- fold_frozen_copy: W₀ − M(θ₀) kept densely, only the θ circuit per step -----------------------------------
def _plain_and_folded(width: int = 96, **config) -> tuple[nn.Module, nn.Module]:
    """The same W₀, θ and θ₀ (float64) without and with ``fold_frozen_copy``."""
    models = [get_peft_model(_linear_model(width).double(), hirank.QuantaConfig(
        target_modules=["0"], init_weights=False, fold_frozen_copy=fold, **config)) for fold in (False, True)]
    models[1].load_state_dict(models[0].state_dict())
    return models[0], models[1]


@pytest.mark.parametrize("tokens, path", [(64, ["structured"]), (128, ["dense"]), (4096, ["dense", "fused"])])
def test_folded_copy_runs_only_the_theta_circuit_with_the_exact_outputs_and_gradients(tokens, path, monkeypatch):
    """Each path of the cost model (the θ circuit; M(θ) built densely, as a separate product or fused into the
    folded weight's) gives the unfolded layer's output and gradients, and none runs the θ₀ circuit."""
    import hirank.tuners.quanta.layer as quanta_layer

    plain, folded = _plain_and_folded(24, factors=[6, 4]) if "fused" in path else _plain_and_folded()
    width = plain.base_model.model[0].in_features
    x = torch.randn(tokens // 64, 64, width, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(tokens // 64, 64, width, dtype=torch.float64)

    def run(model: nn.Module) -> tuple[torch.Tensor, ...]:
        out = model(x)
        return (out, *torch.autograd.grad(out, (x, model.base_model.model[0].quanta_gates["default"]), grad))

    expected = run(plain)
    calls: list[str] = []
    monkeypatch.setattr(QuantaCircuit, "apply_difference", lambda *args: pytest.fail("the θ₀ circuit ran"))
    monkeypatch.setattr(QuantaCircuit, "delta_dense", lambda *args: pytest.fail("the θ₀ circuit ran"))
    apply, dense, merged = QuantaCircuit.apply, QuantaCircuit.dense, quanta_layer.merged_linear
    monkeypatch.setattr(QuantaCircuit, "apply", lambda *args: calls.append("structured") or apply(*args))
    monkeypatch.setattr(QuantaCircuit, "dense", lambda *args: calls.append("dense") or dense(*args))
    monkeypatch.setattr(quanta_layer, "merged_linear", lambda *args: calls.append("fused") or merged(*args))
    for got, want in zip(run(folded), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert calls == path


def test_folded_copy_is_rebuilt_after_load_theta0_edits_unmerge_and_casts(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    plain, folded = _plain_and_folded()
    layer = folded.base_model.model[0]
    x = torch.randn(5, 96, dtype=torch.float64)

    def check(what: str, tolerance: float = 1e-10) -> None:
        torch.testing.assert_close(folded(x), plain(x), rtol=tolerance, atol=tolerance, msg=what)

    with torch.no_grad():
        assert layer.quanta_folded_from["default"] == layer._fold_source("default"), "not refolded on load"
        check("after load_state_dict")
        for model in (plain, folded):
            model.base_model.model[0].quanta_theta0["default"].mul_(0.5)
        check("θ₀ edited in place")
        for model in (plain, folded):
            model.merge_adapter()
        check("merged")
        for model in (plain, folded):
            model.unmerge_adapter()
        check("after unmerge")
        plain.float(), folded.float()
        x = x.float()
        check("after a cast to float32", 1e-5)
        assert layer.quanta_folded["default"].dtype == torch.float32

    assert not any("folded" in key for key in folded.state_dict())
    folded.save_pretrained(tmp_path)
    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == [
        "base_model.model.0.quanta_gates", "base_model.model.0.quanta_theta0"]
    loaded = PeftModel.from_pretrained(_linear_model(96), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), folded(x), rtol=0, atol=0)

    folded.add_adapter("other", hirank.QuantaConfig(target_modules=["0"], fold_frozen_copy=True))
    assert "other" in layer.quanta_folded
    folded.delete_adapter("other")
    assert "other" not in layer.quanta_folded and "other" not in layer.quanta_folded_from


@pytest.mark.parametrize("blocker", ["hook", "trainable weight"])
def test_folded_copy_falls_back_to_the_exact_path_where_the_base_cannot_run_on_it(blocker):
    """A hook would be skipped, and a trainable W₀ would get no gradient through the copy: the exact path runs."""
    plain, folded = _plain_and_folded()
    base = folded.base_model.model[0].get_base_layer()
    if blocker == "hook":
        base.register_forward_hook(lambda *args: None)
    else:
        for model in (plain, folded):
            model.base_model.model[0].get_base_layer().weight.requires_grad_(True)
    x = torch.randn(5, 96, dtype=torch.float64)
    with pytest.warns(UserWarning, match="fold_frozen_copy.*exact θ₀ circuit"):
        out = folded(x)
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
    if blocker == "trainable weight":
        out.sum().backward()
        assert base.weight.grad is not None and base.weight.grad.abs().max() > 0


def test_folded_cost_model_counts_four_passes_instead_of_six():
    circuit = QuantaCircuit((8, 8, 4, 4), (8, 8, 4, 4))
    assert 3 * circuit.structured_cost(512, folded=True) == 2 * circuit.structured_cost(512)
    assert circuit.dense_cost(512, folded=True) < circuit.dense_cost(512)
