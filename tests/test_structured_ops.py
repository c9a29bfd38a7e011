"""Math of hirank.ops.structured: fast products equal the dense matrices (float64), the dense matrices
equal their definitions, W(G, H) has displacement rank r, random structured matrices are full rank."""

from __future__ import annotations

import itertools

import pytest
import torch

from hirank.ops import chunks, structured

F64 = torch.float64
# square, rectangular both ways, prime and odd sizes
SHAPES = [(8, 8), (7, 7), (61, 61), (5, 12), (12, 5), (64, 192), (96, 64)]


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_rng(seed), dtype=F64)


def _shift(size: int, f: float) -> torch.Tensor:
    """Z_f: cyclic down-shift with f in the top-right corner (spec §3.2d)."""
    z = torch.diag(torch.ones(size - 1, dtype=F64), -1)
    z[0, -1] = f
    return z


# ---- dense matrices vs their definitions (element loops on small sizes) ---------------------------
def test_circulant_dense_is_the_definition():
    c = _randn(5)
    expected = torch.tensor([[c[(i - j) % 5].item() for j in range(5)] for i in range(5)], dtype=F64)
    assert torch.equal(structured.circulant_dense(c, 5, 5), expected)
    assert torch.equal(structured.circulant_dense(c, 3, 5), expected[:3])  # truncated (rectangular)
    assert torch.equal(structured.circulant_dense(c, 5, 2), expected[:, :2])


def test_skew_circulant_dense_is_the_definition():
    h = _randn(5)
    expected = torch.tensor([[h[i - j].item() if i >= j else -h[5 + i - j].item() for j in range(5)]
                             for i in range(5)], dtype=F64)
    skew = structured.skew_circulant_dense(h)
    assert torch.equal(skew, expected)
    assert torch.equal(skew[:, 0], h)  # h is the first column
    z = _shift(5, -1.0)  # skew-circulants are the polynomials in Z_{-1}
    torch.testing.assert_close(z @ skew, skew @ z, rtol=0, atol=1e-14)


def test_toeplitz_dense_is_the_definition():
    m, n = 4, 6
    t = _randn(m + n - 1)
    toep = structured.toeplitz_dense(t, m, n)
    for i, j in itertools.product(range(m), range(n)):
        assert toep[i, j] == t[i - j + n - 1]
    for i, j in itertools.product(range(1, m), range(1, n)):  # constant along diagonals
        assert toep[i, j] == toep[i - 1, j - 1]


def test_ldr_dense_is_a_sum_of_circulant_times_skew_circulant():
    g, h = _randn(3, 6, seed=1), _randn(3, 6, seed=2)
    expected = sum(structured.circulant_dense(gi, 6, 6) @ structured.skew_circulant_dense(hi) for gi, hi in zip(g, h))
    torch.testing.assert_close(structured.ldr_dense(g, h, 6, 6), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(structured.ldr_dense(g, h, 4, 5), expected[:4, :5], rtol=0, atol=1e-12)


# ---- fast products == dense (float64, 1e-10) -------------------------------------------------------
@pytest.mark.parametrize("m, n", SHAPES)
def test_circulant_matvec_matches_dense(m, n):
    c, x = _randn(max(m, n), seed=1), _randn(3, 2, n, seed=2)
    dense = structured.circulant_dense(c, m, n)
    torch.testing.assert_close(structured.circulant_matvec(c, x, m), x @ dense.T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("size", [1, 2, 7, 8, 61, 64, 384])
def test_skew_circulant_matvec_matches_dense(size):
    """Needs η^N = −1; a root of x^(N+1) + 1 (the reference code's default) fails this."""
    h, x = _randn(size, seed=3), _randn(4, size, seed=4)
    dense = structured.skew_circulant_dense(h)
    product = structured.skew_circulant_matvec(h, x)  # even sizes: half-size complex FFTs of the folded row
    assert product.dtype == F64
    torch.testing.assert_close(product, x @ dense.T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("m, n", SHAPES)
def test_toeplitz_matvec_matches_dense(m, n):
    t, x = _randn(m + n - 1, seed=5), _randn(3, 2, n, seed=6)
    dense = structured.toeplitz_dense(t, m, n)
    torch.testing.assert_close(structured.toeplitz_matvec(t, x, m), x @ dense.T, rtol=0, atol=1e-10)


def test_toeplitz_matvec_rejects_a_wrong_number_of_diagonals():
    with pytest.raises(ValueError, match="has 10 diagonals, got 9"):
        structured.toeplitz_matvec(_randn(9), _randn(2, 6), 5)


@pytest.mark.parametrize("b_shape, a_shape", [((4, 3), (5, 2)), ((8, 8), (8, 8)), ((24, 8), (8, 8)),
                                              ((1, 1), (61, 61))])
def test_kronecker_matvec_matches_torch_kron(b_shape, a_shape):
    b, a = _randn(*b_shape, seed=7), _randn(*a_shape, seed=8)
    x = _randn(3, 2, b_shape[1] * a_shape[1], seed=9)
    torch.testing.assert_close(structured.kronecker_matvec(b, a, x), x @ torch.kron(b, a).T, rtol=0, atol=1e-10)
    assert torch.equal(structured.kronecker_dense(b, a), torch.kron(b, a))


@pytest.mark.parametrize("m, n", SHAPES)
@pytest.mark.parametrize("rank", [1, 3])
def test_ldr_matvec_matches_dense(m, n, rank):
    size = max(m, n)
    g, h, x = _randn(rank, size, seed=10), _randn(rank, size, seed=11), _randn(3, 3, n, seed=12)  # odd row count
    dense = structured.ldr_dense(g, h, m, n)
    torch.testing.assert_close(structured.ldr_matvec(g, h, x, m), x @ dense.T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_products_compute_in_float32_and_return_the_activation_dtype(dtype):
    """Half inputs are multiplied in float32 inside (a half FFT would be far less accurate, or unsupported)."""
    size = 96
    c, x = torch.randn(size, generator=_rng(13)), torch.randn(4, size, generator=_rng(14))
    g, h = torch.randn(2, size, generator=_rng(15)), torch.randn(2, size, generator=_rng(16))
    t = torch.randn(2 * size - 1, generator=_rng(17))
    products = {
        "circulant": lambda v: structured.circulant_matvec(c, v, size),
        "toeplitz": lambda v: structured.toeplitz_matvec(t, v, size),
        "ldr": lambda v: structured.ldr_matvec(g, h, v, size),
    }
    x_low = x.to(dtype)
    for name, product in products.items():
        out = product(x_low)
        assert out.dtype == dtype, name
        reference = product(x_low.to(F64))  # same rounded input, float64 arithmetic
        eps = torch.finfo(dtype).eps  # within the final rounding to `dtype`
        torch.testing.assert_close(out.to(F64), reference, rtol=eps, atol=eps * reference.abs().max().item(), msg=name)


# ---- displacement rank and full rank ----------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_ldr_has_displacement_rank_r_and_full_rank(rank):
    size = 32
    w = structured.ldr_dense(_randn(rank, size, seed=rank), _randn(rank, size, seed=rank + 10), size, size)
    displacement = _shift(size, 1.0) @ w - w @ _shift(size, -1.0)  # ∇(W) = Z_1 W − W Z_{−1}
    assert torch.linalg.matrix_rank(displacement).item() == rank
    assert torch.linalg.matrix_rank(w).item() == size  # unrestricted rank even for r = 1


def test_circulant_is_ldr_with_skew_generator_e1():
    """Spec §3.2d: r = 1 with h = e_1 gives the plain circulant Circ(g)."""
    g = _randn(1, 9, seed=20)
    e1 = torch.zeros(1, 9, dtype=F64)
    e1[0, 0] = 1
    torch.testing.assert_close(structured.ldr_dense(g, e1, 9, 9), structured.circulant_dense(g[0], 9, 9))


@pytest.mark.parametrize("m, n", [(64, 64), (61, 61), (64, 192), (192, 64)])
def test_random_structured_matrices_are_full_rank(m, n):
    size, full = max(m, n), min(m, n)
    matrices = {
        "circulant": structured.circulant_dense(_randn(size, seed=21) * _randn(size, seed=22), m, n),
        "toeplitz": structured.toeplitz_dense(_randn(m + n - 1, seed=23), m, n),
        "ldr r=1": structured.ldr_dense(_randn(1, size, seed=24), _randn(1, size, seed=25), m, n),
    }
    for name, matrix in matrices.items():
        assert torch.linalg.matrix_rank(matrix).item() == full, name


@pytest.mark.parametrize("n, m", [(64, 64), (384, 384), (64, 192), (61, 61), (96, 64)])
def test_random_kronecker_reaches_its_rank_bound(n, m):
    factor = structured.choose_kronecker_factor(n, m)
    b, a = _randn(m // factor, factor, seed=26), _randn(factor, n // factor, seed=27)
    rank = torch.linalg.matrix_rank(structured.kronecker_dense(b, a)).item()
    assert rank == structured.kronecker_rank_bound(n, m, factor)


# ---- planning helpers ---------------------------------------------------------------------------------
def test_kronecker_factor_choices_and_auto_choice():
    assert structured.kronecker_factor_choices(64, 192) == [1, 2, 4, 8, 16, 32, 64]
    assert structured.kronecker_factor_choices(61, 64) == [1]
    assert structured.choose_kronecker_factor(64, 64) == 8  # B, A both 8×8: full rank 64
    assert structured.choose_kronecker_factor(64, 192) == 8  # rank bound min(24, 8)·min(8, 8) = 64, full
    for n, m in [(384, 384), (384, 1536), (96, 64)]:
        best = max(structured.kronecker_rank_bound(n, m, r) for r in structured.kronecker_factor_choices(n, m))
        assert structured.kronecker_rank_bound(n, m, structured.choose_kronecker_factor(n, m)) == best


# ---- batch independence (issue 11.3) ------------------------------------------------------------------
def _products(size: int) -> dict[str, object]:
    c, t = _randn(size, seed=30), _randn(2 * size - 1, seed=31)
    g, h = _randn(3, size, seed=32), _randn(3, size, seed=33)
    b, a = _randn(4, size // 4, seed=34), _randn(4, 4, seed=35)  # (4 ⊗ ...) factors of a size×size matrix
    return {
        "circulant": lambda v: structured.circulant_matvec(c, v, size),
        "toeplitz": lambda v: structured.toeplitz_matvec(t, v, size),
        "kronecker": lambda v: structured.kronecker_matvec(b.T.contiguous(), a, v),
        "ldr": lambda v: structured.ldr_matvec(g, h, v, size),
    }


@pytest.mark.parametrize("size", [16, 15])
@pytest.mark.parametrize("poison", ["nan", "inf", "huge"])
def test_products_never_mix_samples(size, poison):
    """One row's NaN, Inf or ×1e6 input leaves every other row's output as it was (the old LDR packed rows i
    and i + T/2 into one complex FFT, so a NaN there reached the other row)."""
    x = _randn(6, size, seed=36).to(torch.float32)
    for name, product in _products(size).items():
        if name == "kronecker" and size % 4:
            continue
        clean = product(x)
        for row in (0, 3, 5):
            poisoned = x.clone()
            poisoned[row] = {"nan": float("nan"), "inf": float("inf"), "huge": 1e6 * poisoned[row]}[poison]
            out = product(poisoned)
            others = [i for i in range(6) if i != row]
            torch.testing.assert_close(out[others], clean[others], rtol=0, atol=1e-6, msg=f"{name}, row {row}")


# ---- custom backward passes ------------------------------------------------------------------------
@pytest.mark.parametrize("m, n", [(6, 6), (7, 7), (4, 9), (9, 4)])
def test_backward_of_every_product_passes_gradcheck(m, n):
    """The hand-written backward passes (saving only x and the generators) against finite differences."""
    size = max(m, n)

    def leaf(*shape: int, seed: int) -> torch.Tensor:
        return _randn(*shape, seed=seed).requires_grad_()

    x = leaf(2, 3, n, seed=40)
    checks = {
        "circulant": (lambda c, v: structured.circulant_matvec(c, v, m), (leaf(size, seed=41), x)),
        "toeplitz": (lambda t, v: structured.toeplitz_matvec(t, v, m), (leaf(m + n - 1, seed=42), x)),
        "ldr": (lambda g, h, v: structured.ldr_matvec(g, h, v, m), (leaf(2, size, seed=43), leaf(2, size, seed=44), x)),
    }
    if n % 3 == 0:
        checks["kronecker"] = (structured.kronecker_matvec, (leaf(m, 3, seed=45), leaf(1, n // 3, seed=46), x))
    for name, (product, inputs) in checks.items():
        assert torch.autograd.gradcheck(product, inputs), name
    # only the gradients asked for: none for a frozen input
    g, h = _randn(2, size, seed=43).requires_grad_(), _randn(2, size, seed=44)
    structured.ldr_matvec(g, h, _randn(3, n, seed=47), m).sum().backward()
    assert g.grad is not None and h.grad is None


@pytest.mark.parametrize("m, n", SHAPES)
def test_ldr_dense_from_the_displacement_equation_is_the_definition(m, n):
    size = max(m, n)
    g, h = _randn(3, size, seed=50), _randn(3, size, seed=51)
    expected = sum(structured.circulant_dense(gi, size, size) @ structured.skew_circulant_dense(hi)
                   for gi, hi in zip(g, h))[:m, :n]
    torch.testing.assert_close(structured.ldr_dense(g, h, m, n), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("m, n", [(1, 5), (16, 16), (17, 40), (40, 17), (61, 61)])
def test_ldr_dense_gradients_equal_the_definitions_across_scan_blocks(m, n):
    """The build sums rows in blocks of 16 (carries between blocks, zero-padded rows) and its adjoint runs the sums
    backward: G's and H's gradients equal autograd's through Σ Circ(g)·SkewCirc(h), one block, several, ragged."""
    size = max(m, n)
    g, h = _randn(3, size, seed=59).requires_grad_(), _randn(3, size, seed=60).requires_grad_()
    weights = _randn(m, n, seed=61)
    expected = sum(structured.circulant_dense(gi, size, size) @ structured.skew_circulant_dense(hi)
                   for gi, hi in zip(g, h))[:m, :n]
    built = structured.ldr_dense(g, h, m, n)
    torch.testing.assert_close(built, expected, rtol=0, atol=1e-10)
    for got, want in zip(torch.autograd.grad((built * weights).sum(), (g, h)),
                         torch.autograd.grad((expected * weights).sum(), (g, h))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("m, n", [(6, 6), (7, 7), (4, 9), (9, 4)])
def test_ldr_dense_product_passes_gradcheck_and_equals_the_fast_product(m, n):
    """The dense path's hand-written adjoint of ldr_dense (no autograd inside backward) against finite
    differences, and its values against the fast product."""
    size = max(m, n)
    g, h = _randn(2, size, seed=56).requires_grad_(), _randn(2, size, seed=57).requires_grad_()
    x = _randn(2, 3, n, seed=58).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, v: structured.ldr_dense_product(a, b, v, m), (g, h, x))
    torch.testing.assert_close(structured.ldr_dense_product(g, h, x, m), structured.ldr_matvec(g, h, x, m),
                               rtol=0, atol=1e-10)


def test_dense_builds_pass_gradcheck():
    """The dense path trains through these builds (strided windows, cumulative sums)."""
    assert torch.autograd.gradcheck(lambda c: structured.circulant_dense(c, 5, 7), _randn(7, seed=52).requires_grad_())
    assert torch.autograd.gradcheck(lambda t: structured.toeplitz_dense(t, 5, 7), _randn(11, seed=53).requires_grad_())
    g, h = _randn(2, 7, seed=54).requires_grad_(), _randn(2, 7, seed=55).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: structured.ldr_dense(a, b, 6, 7), (g, h))


# ---- transforms per row: the cost model's counts are the code's (issue 12) ---------------------------------
class _RowTransformCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts FFT calls on tensors with ``rows`` rows (the token rows; the generators' transforms are free)."""

    FFTS = {torch.ops.aten._fft_r2c.default, torch.ops.aten._fft_c2r.default, torch.ops.aten._fft_c2c.default}

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows, self.count = rows, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.FFTS and args[0].dim() == 2 and args[0].shape[0] == self.rows:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("structure, rank", [("circulant", 1), ("toeplitz", 1), ("ldr", 1), ("ldr", 3)])
def test_a_training_step_does_the_transforms_the_cost_model_counts(structure, rank):
    """Circulant: 4 (x's spectrum is saved, not recomputed); LDR: 4 + 6r (x's skew spectrum saved: the old code
    did 5 + 6r); forward alone 2 or 2 + 2r."""
    rows, size = 10, 16
    x = _randn(rows, size, seed=60).requires_grad_()
    generators = {"circulant": (_randn(size, seed=61),), "toeplitz": (_randn(2 * size - 1, seed=62),),
                  "ldr": (_randn(rank, size, seed=63), _randn(rank, size, seed=64))}[structure]
    generators = tuple(g.requires_grad_() for g in generators)
    product = {"circulant": structured.circulant_matvec, "toeplitz": structured.toeplitz_matvec,
               "ldr": structured.ldr_matvec}[structure]
    with _RowTransformCounter(rows) as forward:
        y = product(*generators, x, size)
    with _RowTransformCounter(rows) as backward:
        y.square().sum().backward()
    assert forward.count == structured.transforms_per_row(structure, rank, training=False)
    assert forward.count + backward.count == structured.transforms_per_row(structure, rank, training=True)


@pytest.mark.parametrize("structure, rank", [("circulant", 1), ("toeplitz", 1), ("ldr", 3)])
def test_fast_products_run_in_cache_sized_row_chunks_with_the_whole_products_outputs_and_exact_gradients(
        monkeypatch, structure, rank):
    """On CPU the fast products run over chunks of rows (``chunks.CPU_CHUNK_ELEMENTS`` each; the circulant's
    beyond ``WHOLE_PASS_ELEMENTS``), every transform on one chunk; outputs equal the whole product's and the
    gradients, summed over chunks, pass gradcheck."""
    size, rows, m, n = 16, 7, 13, 14
    generators = {"circulant": (_randn(size, seed=65),), "toeplitz": (_randn(m + n - 1, seed=65),),
                  "ldr": (_randn(rank, size, seed=65), _randn(rank, size, seed=66))}[structure]
    generators = tuple(g.requires_grad_() for g in generators)
    product = {"circulant": structured.circulant_matvec, "toeplitz": structured.toeplitz_matvec,
               "ldr": structured.ldr_matvec}[structure]
    x = _randn(rows, n, seed=67).requires_grad_()
    whole = product(*generators, x, m)
    monkeypatch.setattr(chunks, "CPU_CHUNK_ELEMENTS", 2 * size)  # 4 chunks: 2+2+2+1 rows
    monkeypatch.setattr(chunks, "WHOLE_PASS_ELEMENTS", 0)
    with _RowTransformCounter(2) as forward:
        chunked = product(*generators, x, m)
    with _RowTransformCounter(2) as backward:
        chunked.square().sum().backward()
    assert forward.count == 3 * structured.transforms_per_row(structure, rank, training=False)
    assert forward.count + backward.count == 3 * structured.transforms_per_row(structure, rank, training=True)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *inputs: product(*inputs, m), (*generators, x))


class _ProductRows(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest number of token rows any matrix product (mm, bmm) works on: mm's rows of X (each token has q of
    them), bmm's batch (one per token), each divided by ``per_token``."""

    def __init__(self, per_token: dict[str, int]) -> None:
        super().__init__()
        self.per_token, self.most = per_token, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.per_token and args[0].shape[0] >= self.per_token[name]:
            self.most = max(self.most, args[0].shape[0] // self.per_token[name])
        return func(*args, **(kwargs or {}))


def test_kronecker_product_runs_in_cache_sized_row_chunks_with_the_whole_products_outputs_and_exact_gradients(
        monkeypatch):
    """Beyond ``chunks.WHOLE_PASS_ELEMENTS`` the Kronecker product runs over chunks of rows on CPU (whole passes
    wrote every x-sized intermediate to fresh memory: issue 12): no matrix product sees more than one chunk's
    tokens; outputs equal the whole product's, and the gradients, summed over chunks, pass gradcheck."""
    (p, q), (s, k), rows = (3, 4), (5, 2), 7
    b, a = _randn(p, q, seed=70).requires_grad_(), _randn(s, k, seed=71).requires_grad_()
    x = _randn(rows, q * k, seed=72).requires_grad_()
    whole = structured.kronecker_matvec(b, a, x)
    monkeypatch.setattr(chunks, "CPU_CHUNK_ELEMENTS", 2 * q * k)  # chunks of 2 + 2 + 2 + 1 rows
    monkeypatch.setattr(chunks, "WHOLE_PASS_ELEMENTS", 0)
    with _ProductRows({"mm": q, "bmm": 1}) as forward:
        chunked = structured.kronecker_matvec(b, a, x)
    with _ProductRows({"mm": q, "bmm": 1}) as backward:
        chunked.square().sum().backward()
    assert 1 <= forward.most <= 2 and 1 <= backward.most <= 2
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(structured.kronecker_matvec, (b, a, x))
