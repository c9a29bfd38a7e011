"""Math of the reconstructed LoRATRF task filter (hirank.ops.loratrf, spec §2.3), in float64."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from hirank.ops import loratrf

WIDTH, K = 10, 3


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return {"h": draw(2, 6, WIDTH), "t": draw(WIDTH), "C": draw(WIDTH, K), "D": draw(K, WIDTH),
            "T": draw(WIDTH, WIDTH), "diag": draw(WIDTH)}


def test_cosine_gate_is_clamped_cosine_similarity():
    h, t = _tensors()["h"], _tensors()["t"]
    gate = loratrf.task_gate(h, t, "cosine")
    expected = F.cosine_similarity(h, t.expand_as(h), dim=-1).clamp(0, 1).unsqueeze(-1)
    torch.testing.assert_close(gate, expected, rtol=0, atol=1e-14)
    assert gate.shape == (2, 6, 1) and (gate == 0).any() and (gate > 0).any()  # some tokens filtered out, some kept
    torch.testing.assert_close(loratrf.task_gate(7.5 * h, 0.1 * t, "cosine"), gate)  # scale invariant


def test_dot_gate_is_clamped_inner_product():
    h, t = _tensors()["h"], _tensors()["t"]
    gate = loratrf.task_gate(0.05 * h, t, "dot")
    torch.testing.assert_close(gate, (0.05 * h @ t).clamp(0, 1).unsqueeze(-1), rtol=0, atol=0)
    assert ((gate > 0) & (gate < 1)).any()
    assert (loratrf.task_gate(100 * h, t, "dot") == 1).any()  # large hidden states saturate the dot gate


@pytest.mark.parametrize("transform", loratrf.TRANSFORMS)
def test_structured_enhancement_equals_dense_T(transform):
    """g·h·T with the structure equals the spec's dense formula h ← h + g·h·T."""
    tensors = _tensors()
    h, t = tensors["h"], tensors["t"]
    C, D = {"low_rank": (tensors["C"], tensors["D"]), "dense": (None, tensors["T"]),
            "diagonal": (None, tensors["diag"])}[transform]
    T = loratrf.transformation(D, C)
    assert T.shape == (WIDTH, WIDTH)
    gate = F.cosine_similarity(h, t.expand_as(h), dim=-1).clamp(0, 1).unsqueeze(-1)
    expected = (gate * h) @ T
    torch.testing.assert_close(loratrf.filter_delta(h, t, D, C, "cosine"), expected, rtol=0, atol=1e-12)
    if transform == "low_rank":
        assert torch.linalg.matrix_rank(T) == K


def test_zero_D_edits_nothing():
    tensors = _tensors()
    delta = loratrf.filter_delta(tensors["h"], tensors["t"], torch.zeros(K, WIDTH, dtype=torch.float64), tensors["C"])
    assert not delta.any()


def test_positions_select_first_and_last_tokens():
    torch.testing.assert_close(loratrf.position_mask(6, 2, 1, torch.device("cpu")).squeeze(-1),
                               torch.tensor([True, True, False, False, False, True]))
    torch.testing.assert_close(loratrf.position_mask(3, 2, 2, torch.device("cpu")).squeeze(-1),
                               torch.tensor([True, True, True]))  # overlapping prefix and suffix
    tensors = _tensors()
    h, t, C, D = tensors["h"], tensors["t"], tensors["C"], tensors["D"]
    full = loratrf.filter_delta(h, t, D, C)
    edited = loratrf.filter_delta(h, t, D, C, first=2, last=1)
    torch.testing.assert_close(edited[:, [0, 1, 5]], full[:, [0, 1, 5]], rtol=0, atol=0)
    assert not edited[:, 2:5].any() and full[:, 2:5].any()


def test_unknown_similarity_raises():
    with pytest.raises(ValueError, match="unknown similarity 'l2'"):
        loratrf.task_gate(torch.ones(2, 3), torch.ones(3), "l2")


@pytest.mark.parametrize("transform", ["low_rank", "diagonal"])
@pytest.mark.parametrize("similarity", loratrf.SIMILARITIES)
@pytest.mark.parametrize("positions", [(0, 0), (2, 1)])
def test_memory_lean_filter_matches_autograd_and_keeps_no_copy_of_h(transform, similarity, positions):
    tensors = _tensors()
    h = tensors["h"].requires_grad_()
    t = (tensors["t"] * (0.3 if similarity == "dot" else 1.0)).requires_grad_()  # dot gate partly unsaturated
    C = tensors["C"].requires_grad_() if transform == "low_rank" else None
    D = (tensors["D"] if transform == "low_rank" else 0.3 * tensors["diag"]).requires_grad_()
    inputs = [x for x in (h, t, C, D) if x is not None]
    expected = h + loratrf.filter_delta(h, t, D, C, similarity, *positions)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        out = loratrf.filtered_output(h, t, D, C, similarity, *positions)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)
    grad = torch.randn_like(out)
    for ours, reference in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    # only the output is kept at full width (the next op keeps it anyway); h is recovered from it
    wide = [x for x in saved if x is not None and x.numel() >= h.numel()]
    assert len(wide) == 1 and wide[0].data_ptr() == out.data_ptr()


def test_memory_lean_filter_runs_in_the_dtype_of_h_and_keeps_only_its_output():
    """bf16 activations with float32 filter parameters (peft keeps adapters in float32): the filter computes in
    bf16, so the tensor saved for backward is the bf16 output itself, not a float32 copy of it (issue 12)."""
    tensors = _tensors()
    h = tensors["h"].to(torch.bfloat16).requires_grad_()
    t, C, D = (tensors[name].float().requires_grad_() for name in ("t", "C", "D"))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        out = loratrf.filtered_output(h, t, D, C, "cosine")
    assert out.dtype == torch.bfloat16
    wide = [x for x in saved if x is not None and x.numel() >= h.numel()]
    assert len(wide) == 1 and wide[0].data_ptr() == out.data_ptr()
    expected = h.double() + loratrf.filter_delta(h.double(), t.double(), D.double(), C.double(), "cosine")
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
    out.sum().backward()
    assert all(x.grad is not None and x.grad.dtype == x.dtype for x in (h, t, C, D))


def test_diagonal_filter_recovers_h_near_a_zero_scale_without_a_host_sync():
    """D_j near −1 with a saturated gate puts 1 + g·D_j near 0: h = y / (1 + g·D) is still exact to rounding, so
    no data-dependent branch (a host sync on GPUs, a graph break under torch.compile) chooses to keep h."""
    tensors = _tensors()
    h, t = tensors["h"].requires_grad_(), (10 * tensors["t"]).requires_grad_()  # dot gate: mostly saturated at 1
    D = torch.full((WIDTH,), -0.999, dtype=torch.float64)
    D[::2] = 0.5
    D.requires_grad_()
    compiled = torch.compile(loratrf.filtered_output, backend="eager", fullgraph=True)
    out = compiled(h, t, D, None, "dot")
    expected = h + loratrf.filter_delta(h, t, D, None, "dot")
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)
    grad = torch.randn_like(out)
    for ours, reference in zip(torch.autograd.grad(out, (h, t, D), grad), torch.autograd.grad(expected, (h, t, D), grad)):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


class _WideRowOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the computing ops (not views or allocations) whose output has more than ``rows`` rows of ``width``."""

    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.rows, self.width, self.wide = rows, width, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        computing = not func._schema.is_mutable and func.is_view is False and "empty" not in func.__name__
        if computing and isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape == (out.shape[0], self.width):
            if out.shape[0] > self.rows:
                self.wide.append(func.__name__)
        return out


@pytest.mark.parametrize("transform", ["low_rank", "diagonal"])
@pytest.mark.parametrize("similarity", loratrf.SIMILARITIES)
def test_memory_lean_filter_runs_in_cache_sized_row_chunks_with_the_whole_passes_results(
        monkeypatch, transform, similarity):
    """On CPU, beyond ``chunks.WHOLE_PASS_ELEMENTS``, the filter's forward and backward take the rows in chunks
    (``chunks.CPU_CHUNK_ELEMENTS``): every op that computes full-width rows sees one chunk (whole passes wrote
    each of them to fresh memory: issue 12); outputs and gradients equal the whole passes', positions masked or
    not, and gradcheck passes."""
    from hirank.ops import chunks

    tensors = _tensors()
    h = tensors["h"].requires_grad_()  # 12 rows
    t = (tensors["t"] * (0.3 if similarity == "dot" else 1.0)).requires_grad_()
    C = tensors["C"].requires_grad_() if transform == "low_rank" else None
    D = (tensors["D"] if transform == "low_rank" else 0.3 * tensors["diag"]).requires_grad_()
    inputs = [x for x in (h, t, C, D) if x is not None]
    grad = torch.randn_like(h)
    for positions in [(0, 0), (2, 1)]:
        whole = loratrf.filtered_output(h, t, D, C, similarity, *positions)
        whole_grads = torch.autograd.grad(whole, inputs, grad)
        monkeypatch.setattr(chunks, "CPU_CHUNK_ELEMENTS", 5 * WIDTH)  # chunks of 5 + 5 + 2 rows
        monkeypatch.setattr(chunks, "WHOLE_PASS_ELEMENTS", 0)
        with _WideRowOps(5, WIDTH) as forward:
            chunked = loratrf.filtered_output(h, t, D, C, similarity, *positions)
        with _WideRowOps(5, WIDTH) as backward:
            chunked_grads = torch.autograd.grad(chunked, inputs, grad)
        assert forward.wide == [] and backward.wide == []
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-13)
        for ours, reference in zip(chunked_grads, whole_grads):
            torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
        assert torch.autograd.gradcheck(
            lambda *args: loratrf.filtered_output(args[0], args[1], args[-1], args[2] if C is not None else None,
                                                  similarity, *positions), tuple(inputs))
        monkeypatch.undo()


def test_diagonal_filter_erasing_a_feature_counts_h_as_zero_there_in_eager_mode_too():
    """D_j = −1 with a saturated gate makes 1 + g·D_j exactly 0: y holds nothing of h in that feature, and backward
    counts h as 0 there (eager CPU, where the entry-wise test is skipped only while every D_j > −1): gradients
    equal autograd's through filter_delta, which kept h."""
    tensors = _tensors()
    h, t = tensors["h"].requires_grad_(), (10 * tensors["t"]).requires_grad_()  # dot gate: mostly saturated at 1
    D = torch.full((WIDTH,), 0.5, dtype=torch.float64)
    D[1] = -1.0
    D.requires_grad_()
    out = loratrf.filtered_output(h, t, D, None, "dot")
    expected = h + loratrf.filter_delta(h, t, D, None, "dot")
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (h, t, D), grad)
    reference = torch.autograd.grad(expected, (h, t, D), grad)
    assert all(torch.isfinite(g).all() for g in ours)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-10, atol=1e-10)
