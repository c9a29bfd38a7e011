"""Quantum-PEFT math (hirank.ops.pauli) and the behaviour of its peft layer beyond the shared battery."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from torch import nn

import hirank
from hirank.analysis import effective_rank, spectrum, trainable_parameters
from hirank.ops import pauli


def _angles(count: int, *batch: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(*batch, count, generator=generator, dtype=dtype) * 2 - 1) * math.pi


# ---- the circuit against a dense reference written from the spec (§2.3) -----------------------------------
def _dense_reference(angles: torch.Tensor, n_qubits: int, n_layers: int) -> torch.Tensor:
    """C(θ) as a dense 2ⁿ×2ⁿ product of Kronecker-expanded gates; qubit 0 is the most significant bit."""
    size = 1 << n_qubits
    eye2 = torch.eye(2, dtype=angles.dtype)

    def ry(qubit: int, theta: torch.Tensor) -> torch.Tensor:
        c, s = torch.cos(theta / 2), torch.sin(theta / 2)
        factors = [eye2] * n_qubits
        factors[qubit] = torch.stack((torch.stack((c, -s)), torch.stack((s, c))))
        matrix = torch.ones(1, 1, dtype=angles.dtype)
        for factor in factors:
            matrix = torch.kron(matrix, factor)
        return matrix

    def cz_layer(first: int) -> torch.Tensor:
        signs = torch.ones(size, dtype=angles.dtype)
        for row in range(size):
            bits = [(row >> (n_qubits - 1 - q)) & 1 for q in range(n_qubits)]
            for q in range(first, n_qubits - 1, 2):
                if bits[q] and bits[q + 1]:
                    signs[row] = -signs[row]
        return torch.diag(signs)

    sequence: list[torch.Tensor | tuple[int, str]] = [(q, "ry") for q in range(n_qubits)]
    for _ in range(n_layers):
        sequence += [(q, "ry") for q in range(n_qubits - 1)] + [cz_layer(0)]
        sequence += [(q, "ry") for q in range(1, n_qubits)] + [cz_layer(1)]
    circuit, used = torch.eye(size, dtype=angles.dtype), 0
    for gate in sequence:
        if isinstance(gate, tuple):
            gate, used = ry(gate[0], angles[used]), used + 1
        circuit = gate @ circuit
    assert used == angles.numel()
    return circuit


@pytest.mark.parametrize("n_qubits, n_layers", [(1, 0), (1, 2), (2, 1), (2, 3), (3, 1), (4, 2), (5, 1), (6, 4), (7, 3)])
def test_circuit_columns_match_the_dense_circuit(n_qubits: int, n_layers: int) -> None:
    angles = _angles(pauli.pauli_angle_count(n_qubits, n_layers), dtype=torch.float64)
    rank = max(1, (1 << n_qubits) // 2)
    columns = pauli.pauli_circuit_columns(angles, n_qubits, n_layers, rank)
    expected = _dense_reference(angles, n_qubits, n_layers)[:, :rank]
    torch.testing.assert_close(columns, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_qubits", [1, 4, 10, 12])
@pytest.mark.parametrize("n_layers", [0, 1, 3])
def test_angle_count_is_the_papers_formula(n_qubits: int, n_layers: int) -> None:
    expected = (2 * n_layers + 1) * n_qubits - 2 * n_layers
    assert pauli.pauli_angle_count(n_qubits, n_layers) == expected
    assert sum(kind == "ry" for kind, _ in pauli.circuit_gates(n_qubits, n_layers)) == expected
    assert pauli.stiefel_angle_count(1 << n_qubits, 1, n_layers) == expected


# ---- orthonormality -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [64, 96, 384, 768, 1000])
@pytest.mark.parametrize("rank", [1, 8, 32])
@pytest.mark.parametrize("n_layers", [1, 2])
def test_columns_are_orthonormal_in_float32(dim: int, rank: int, n_layers: int) -> None:
    u = pauli.stiefel_columns(_angles(pauli.stiefel_angle_count(dim, rank, n_layers)), dim, rank, n_layers)
    assert u.shape == (dim, rank) and u.dtype == torch.float32
    gram_error = u.double().T @ u.double() - torch.eye(rank, dtype=torch.float64)
    assert torch.linalg.matrix_norm(gram_error, ord=2) < 1e-6


@pytest.mark.parametrize("dim", [3, 5, 61, 96, 100])
def test_all_columns_of_a_non_power_of_two_size_form_an_orthogonal_matrix(dim: int) -> None:
    """K = N gives a square Q with QᵀQ = QQᵀ = I: a true orthogonal construction, no pad-then-crop."""
    q = pauli.stiefel_columns(_angles(pauli.stiefel_angle_count(dim, dim, 1), dtype=torch.float64), dim, dim, 1)
    eye = torch.eye(dim, dtype=torch.float64)
    torch.testing.assert_close(q.T @ q, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(q @ q.T, eye, rtol=0, atol=1e-12)


def test_the_coupling_spreads_columns_over_both_blocks() -> None:
    """For N = 96 = 64 + 32 every column has weight on both blocks (cos², sin² of its coupling angle)."""
    angles = _angles(pauli.stiefel_angle_count(96, 8, 1), dtype=torch.float64)
    u = pauli.stiefel_columns(angles, 96, 8, 1)
    coupling = angles[pauli.pauli_angle_count(6, 1):][:8]
    torch.testing.assert_close(u[64:].pow(2).sum(0), torch.sin(coupling / 2).pow(2), rtol=0, atol=1e-12)


def test_batched_angles_give_the_same_columns_as_one_by_one() -> None:
    angles = _angles(pauli.stiefel_angle_count(96, 8, 1), 3, dtype=torch.float64)
    batched = pauli.stiefel_columns(angles, 96, 8, 1)
    for i in range(3):
        torch.testing.assert_close(batched[i], pauli.stiefel_columns(angles[i], 96, 8, 1), rtol=0, atol=1e-14)


def test_bad_sizes_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="rank ≤ dim"):
        pauli.stiefel_angle_count(4, 5, 1)
    with pytest.raises(ValueError, match="need 16 angles, got 15"):
        pauli.stiefel_columns(torch.zeros(15), 64, 4, 1)


# ---- the memory-lean backward ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dim, rank, batch", [(32, 4, ()), (96, 8, (2,)), (61, 40, ())])
def test_memory_lean_gradient_equals_autograd(dim: int, rank: int, batch: tuple[int, ...]) -> None:
    angles = _angles(pauli.stiefel_angle_count(dim, rank, 2), *batch, dtype=torch.float64)
    upstream = torch.randn(*batch, dim, rank, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = []
    for memory_lean in (True, False):
        leaf = angles.clone().requires_grad_()
        (pauli.stiefel_columns(leaf, dim, rank, 2, memory_lean=memory_lean) * upstream).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)
    assert grads[0].abs().min() > 0, "every angle should get gradient from a generic upstream gradient"


def test_memory_lean_gradcheck() -> None:
    angles = _angles(pauli.pauli_angle_count(4, 1), 2, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: pauli.pauli_circuit_columns(a, 4, 1, 3), (angles,))


# the layered simulation (rotation layers as two GEMMs, the default) against the gate-by-gate one
def _gate_by_gate(angles: torch.Tensor, n_qubits: int, n_layers: int, rank: int) -> torch.Tensor:
    """The circuit one gate at a time under plain autograd: the construction before the layered path."""
    return pauli.pauli_circuit_columns(angles, n_qubits, n_layers, rank, memory_lean=False)


@pytest.mark.parametrize("n_qubits, n_layers, rank, batch", [
    (1, 3, 2, ()), (2, 2, 3, (2,)), (3, 1, 8, ()), (5, 4, 7, (3,)), (7, 2, 64, ()), (10, 4, 64, (2,)),
])
def test_layered_circuit_equals_the_gate_by_gate_circuit_in_float64(n_qubits, n_layers, rank, batch) -> None:
    """Values and angle gradients of the default (layered, memory-lean) path equal the per-gate construction;
    n odd and even (both qubit splits), K not a power of two, L = 4 as budget matching picks, batched angles."""
    angles = _angles(pauli.pauli_angle_count(n_qubits, n_layers), *batch, dtype=torch.float64, seed=5)
    upstream = torch.randn(*batch, 1 << n_qubits, rank, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    results = []
    for construct in (pauli.pauli_circuit_columns, _gate_by_gate):
        leaf = angles.clone().requires_grad_()
        columns = construct(leaf, n_qubits, n_layers, rank)
        (columns * upstream).sum().backward()
        results.append((columns.detach(), leaf.grad))
    (layered, layered_grad), (reference, reference_grad) = results
    torch.testing.assert_close(layered, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(layered_grad, reference_grad, rtol=0, atol=1e-11)
    with torch.no_grad():  # the no-grad forward (inference) runs the same layers
        torch.testing.assert_close(pauli.pauli_circuit_columns(angles, n_qubits, n_layers, rank), reference,
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_qubits, n_layers, rank, batch", [(3, 2, 5, (2,)), (4, 3, 3, ())])
def test_layered_gradcheck_with_merged_angles(n_qubits: int, n_layers: int, rank: int, batch: tuple[int, ...]) -> None:
    """L ≥ 2: the first RY layer and the first entangling layer's RY's compose into one rotation per qubit."""
    angles = _angles(pauli.pauli_angle_count(n_qubits, n_layers), *batch, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: pauli.pauli_circuit_columns(a, n_qubits, n_layers, rank), (angles,))


def test_layered_circuit_stays_orthonormal_at_the_budget_size_in_float32() -> None:
    angles = _angles(pauli.pauli_angle_count(11, 4), 2)
    u = pauli.pauli_circuit_columns(angles.requires_grad_(), 11, 4, 64).detach().double()
    gram_error = u.mT @ u - torch.eye(64, dtype=torch.float64)
    assert torch.linalg.matrix_norm(gram_error, ord=2).max() < 1e-5


def _saved_bytes(memory_lean: bool, dim: int = 1024, rank: int = 8, n_layers: int = 1) -> int:
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    angles = _angles(pauli.stiefel_angle_count(dim, rank, n_layers)).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        pauli.stiefel_columns(angles, dim, rank, n_layers, memory_lean=memory_lean)
    return saved


@pytest.mark.parametrize("rank, n_layers", [(8, 1), (64, 4)])
def test_memory_lean_backward_saves_one_state_instead_of_one_per_gate(rank: int, n_layers: int) -> None:
    state_bytes = 1024 * rank * 4
    gates = len(pauli.circuit_gates(10, n_layers))
    assert _saved_bytes(memory_lean=True, rank=rank, n_layers=n_layers) <= state_bytes + 1024  # final state, angles
    assert _saved_bytes(memory_lean=False, rank=rank, n_layers=n_layers) >= gates * state_bytes


# ---- the peft layer --------------------------------------------------------------------------------------------
class _Pair(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _adapted(d_in: int = 96, d_out: int = 64, dtype: torch.dtype = torch.float32, **knobs) -> nn.Module:
    torch.manual_seed(0)
    base = _Pair(d_in, d_out).to(dtype)
    return get_peft_model(base, hirank.QuantumPeftConfig(target_modules=["proj"], **knobs))


def _layer(model: nn.Module) -> nn.Module:
    return model.base_model.model.proj


def test_trainable_count_for_4096_with_one_layer_and_rank_8() -> None:
    with torch.device("meta"):
        model = _adapted(4096, 4096, rank=8, n_layers=1)
    count = trainable_parameters(model)
    assert count == 2 * (3 * 12 - 2) + 8 == 76
    assert count < 100


@pytest.mark.parametrize("n_layers", [1, 2])
def test_trainable_parameters_grow_logarithmically(n_layers: int) -> None:
    """Doubling d adds the same 2·(2L+1) angles (one qubit more in each of U's and V's circuits)."""
    counts = []
    for dim in (128, 256, 512, 1024, 2048, 4096):
        with torch.device("meta"):
            counts.append(trainable_parameters(_adapted(dim, dim, rank=8, n_layers=n_layers)))
    steps = {later - earlier for earlier, later in zip(counts, counts[1:])}
    assert steps == {2 * (2 * n_layers + 1)}


def test_init_keeps_delta_zero_and_every_parameter_learns_after_one_step() -> None:
    model = _adapted(96, 64, rank=8)
    layer = _layer(model)
    assert torch.count_nonzero(layer.get_delta_weight("default")) == 0
    x, target = torch.randn(16, 96), torch.randn(16, 64)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

    def grads() -> dict[str, torch.Tensor]:
        optimizer.zero_grad()
        (model(x) - target).pow(2).mean().backward()
        return {key: p.grad.clone() for key, p in layer.named_parameters() if p.requires_grad}

    first = grads()
    assert first["qpeft_lambda.default"].abs().min() > 0, "Λ must get gradient at step 0"
    assert all(g.abs().max() == 0 for k, g in first.items() if "angles" in k), "angles: zero gradient while Λ = 0"
    optimizer.step()
    second = grads()
    for key, grad in second.items():
        assert grad.abs().min() > 0, f"{key} has entries without gradient after one step"


def test_delta_is_rank_k_with_singular_values_s_times_lambda() -> None:
    model = _adapted(96, 64, torch.float64, rank=8, scale=0.5, init_weights=False)
    layer = _layer(model)
    delta = layer.get_delta_weight("default")
    expected = (0.5 * layer.qpeft_lambda["default"]).abs().sort(descending=True).values
    torch.testing.assert_close(spectrum(delta)[:8], expected, rtol=0, atol=1e-12)
    assert effective_rank(delta) == 8


def test_rank_mask_removes_directions_and_their_gradient() -> None:
    mask = [1, 0, 1, 1, 0, 1, 1, 1]
    model = _adapted(96, 64, rank=8, rank_mask=mask, init_weights=False)
    layer = _layer(model)
    assert effective_rank(layer.get_delta_weight("default")) == sum(mask)
    (model(torch.randn(4, 96)) ** 2).sum().backward()
    masked = torch.tensor(mask) == 0
    lam_grad = layer.qpeft_lambda["default"].grad
    assert torch.all(lam_grad[masked] == 0) and torch.all(lam_grad[~masked] != 0)
    assert not any("rank_mask" in key for key in model.state_dict()), "the mask comes from the config, not the file"


def test_structured_forward_equals_dense_delta_on_a_half_precision_base() -> None:
    model = _adapted(96, 64, torch.bfloat16, rank=8, init_weights=False)
    layer = _layer(model)
    assert layer.qpeft_lambda["default"].dtype == torch.float32
    x = torch.randn(5, 96).to(torch.bfloat16)
    expected = x.float() @ layer.delta_weight("default").T
    torch.testing.assert_close(layer.adapter_output(x, "default"), expected, rtol=1e-5, atol=1e-6)


def test_rank_larger_than_a_layer_raises_naming_the_module() -> None:
    with pytest.raises(ValueError, match=r"'proj'.*rank K=40 exceeds min\(in_features, out_features\) = 32"):
        _adapted(96, 32, rank=40)


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"rank": 0}, "rank"),
        ({"n_layers": -1}, "n_layers"),
        ({"rank": 2, "rank_mask": [1, 0, 1]}, "rank_mask must hold rank=2 entries"),
        ({"rank": 2, "rank_mask": [1, 0.5]}, "each 0 or 1"),
        ({"init_weights": "gaussian"}, "init_weights"),
    ],
)
def test_bad_config_raises_clear_errors(knobs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hirank.QuantumPeftConfig(target_modules=["proj"], **knobs)


# ---- one batched circuit simulation per shape under peft's forward --------------------------------------
def test_peft_forward_simulates_every_layers_circuits_in_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from hirank.bench.models import load_model

    model = load_model("tiny-bert", "classification").model  # hidden 64, FFN 128: two circuit shapes
    config = hirank.QuantumPeftConfig(
        target_modules=["query", "value", "dense"], rank=4, n_layers=2, task_type="SEQ_CLS", init_weights=False
    )
    peft_model = get_peft_model(model, config)
    inputs = torch.randint(0, 50, (3, 10))
    calls = []
    simulate = pauli.stiefel_columns
    monkeypatch.setattr(pauli, "stiefel_columns", lambda angles, *a, **k: calls.append(angles.shape) or simulate(
        angles, *a, **k))

    def logits_and_grads(forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        peft_model.zero_grad()
        calls.clear()
        logits = forward(input_ids=inputs).logits
        logits.square().sum().backward()
        return logits, {name: p.grad.clone() for name, p in peft_model.named_parameters() if p.grad is not None}

    batched, batched_grads = logits_and_grads(peft_model)  # PeftModel.forward: peft's forward hooks
    assert sorted(shape[0] for shape in calls) == [4, 18]  # every 128-wide factor in one batch, every 64-wide in one
    per_layer, per_layer_grads = logits_and_grads(peft_model.get_base_model())  # no hooks: each layer alone
    assert len(calls) > 2
    assert torch.equal(batched, per_layer)
    assert batched_grads.keys() == per_layer_grads.keys() and len(batched_grads) > 0
    assert all(torch.allclose(batched_grads[n], per_layer_grads[n], atol=1e-6) for n in batched_grads)
    layers = [m for m in peft_model.modules() if isinstance(m, hirank.tuners.quantum_peft.layer.QuantumPeftLayer)]
    assert not any("_shared_factors" in layer.__dict__ for layer in layers)  # nothing kept between forwards
    with peft_model.disable_adapter():
        calls.clear()
        peft_model(input_ids=inputs)
        assert calls == []  # no circuit work for the base model


def test_shared_factors_are_dropped_when_the_forward_fails() -> None:
    from hirank.tuners.quantum_peft.layer import QuantumPeftLayer, shared_circuits

    model = get_peft_model(nn.Sequential(nn.Linear(16, 16)), hirank.QuantumPeftConfig(target_modules=["0"], rank=2))
    with pytest.raises(RuntimeError, match="boom"), shared_circuits(model):
        (layer,) = [m for m in model.modules() if isinstance(m, QuantumPeftLayer)]
        assert set(layer.__dict__["_shared_factors"]) == {("default", "out"), ("default", "in")}
        raise RuntimeError("boom")
    assert "_shared_factors" not in layer.__dict__


def test_inference_keeps_the_factors_until_the_angles_change(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 24)),
        hirank.QuantumPeftConfig(target_modules=["0", "1"], rank=2, init_weights=False),
    )
    calls = []
    simulate = pauli.stiefel_columns
    monkeypatch.setattr(pauli, "stiefel_columns", lambda *a, **k: calls.append(1) or simulate(*a, **k))
    x = torch.randn(5, 16)
    with torch.no_grad():
        first = model(x)
        assert len(calls) > 0
        calls.clear()
        assert torch.equal(model(x), first) and calls == []  # no circuit simulated again
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).square().sum().backward()  # grad on: factors are always regenerated (they need a graph)
    assert len(calls) > 0
    optimizer.step()  # edits the angles in place
    with torch.no_grad():
        calls.clear()
        after_step = model(x)
        assert len(calls) > 0 and not torch.allclose(after_step, first)
        model.load_state_dict(model.state_dict() | {
            name: torch.zeros_like(t) for name, t in model.state_dict().items() if "qpeft_angles" in name})
        calls.clear()
        reloaded = model(x)
        assert len(calls) > 0 and not torch.allclose(reloaded, after_step)
        calls.clear()
        assert torch.equal(model.get_base_model()(x), reloaded) and calls == []  # per-layer path reads it too


@pytest.mark.parametrize("memory_lean", [True, False])
def test_the_circuit_runs_in_the_angles_dtype_under_bf16_autocast(memory_lean: bool) -> None:
    """Mixed-precision training (TRL's default bf16 autocast) must not turn the circuit's products into bf16:
    its in-place products (``out=``) failed with a dtype error, and bf16 would round U away from orthonormal."""
    angles = torch.randn(pauli.pauli_angle_count(6, 4), generator=torch.Generator().manual_seed(0), requires_grad=True)
    expected = pauli.pauli_circuit_columns(angles, 6, 4, 16, memory_lean=memory_lean)
    (expected_grad,) = torch.autograd.grad(expected.square().mul(torch.arange(16.0)).sum(), angles)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        columns = pauli.pauli_circuit_columns(angles, 6, 4, 16, memory_lean=memory_lean)
        loss = columns.square().mul(torch.arange(16.0)).sum()
    (grad,) = torch.autograd.grad(loss, angles)
    assert columns.dtype == torch.float32
    torch.testing.assert_close(columns, expected)
    torch.testing.assert_close(grad, expected_grad)
