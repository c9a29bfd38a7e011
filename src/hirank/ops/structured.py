"""Structured unrestricted-rank matrices of SURM (spec: methods/mtlora_loratrf_surm.md §3).

Four structures, each with a fast product ``S·x`` on the last axis of ``x`` and a dense
materialization (for merging, for the dense path of :func:`fast_product_is_cheaper`, and as a reference):

* circulant ``Circ(c)``: ``Circ(c)[i, j] = c[(i - j) mod N]`` (first column c), product by rfft (§3.2a);
* Toeplitz ``Toep(t)`` (m × n, m+n−1 diagonals): ``Toep(t)[i, j] = t[i - j + n - 1]``, product by FFT
  as a circulant plus a skew-circulant of size max(m, n) (§3.2b, general rectangular form of §3.3);
* Kronecker ``B ⊗ A``, applied as ``B · X · Aᵀ`` on the reshaped input, never materialized (§3.2c);
* low displacement rank ``W(G, H) = Σ_{i<r} Circ(g_i) · SkewCirc(h_i)`` (§3.2d), with the skew-circulant
  diagonalized by ``η = exp(iπ/N)``, so that ``ηᴺ = −1`` exactly (the reference code's root is wrong).

Rectangular m × n (choice, spec §3.3): circulant and LDR are *truncated*: the N × N matrix with
N = max(m, n) acting on x zero-padded to N, keeping the first m outputs, i.e. ``S[:m, :n]``.
FFTs run in float32 (float64 stays float64) whatever the activation dtype; the result has that dtype.

Every fast product is a custom autograd Function that saves the small generators and one tensor of x's size:
the circulant its spectrum rfft(x), LDR its skew spectrum (both N real numbers per row, so backward does not
transform x again), Toeplitz x itself (it needs two spectra of x); the backward of a circulant product is the
circulant product with the conjugate spectrum. So the activation memory is LoRA's. Every row of x is
transformed on its own: no sample ever shares an FFT with another one (a NaN or a huge value stays in its own
sample). On CPU the Toeplitz and LDR products run over cache-sized chunks of rows (:mod:`.chunks`), so their
many passes over each row's spectra stay in cache; so do the circulant and Kronecker products beyond
``chunks.WHOLE_PASS_ELEMENTS`` (8 MiB of rows in float32).

Fast product or dense S, per layer and step (:func:`fast_product_is_cheaper`, the cost model written out at the
end of this module): both cost time linear in the tokens; the fast product ≈ (transforms per row) × N·log₂N
FFT work, the dense path 3·m·n multiply-adds per row plus one O(m·n) build of S per step. On CPU one
multiply-add costs about 1/7 of one FFT point·log₂N, so the dense S pays off for LDR with several displacement
terms (r = 4 up to N ≈ 1000, r = 8 up to N ≈ 2000 once T ≥ N), for Toeplitz and LDR r = 1 only up to
N ≈ 256, and never for the circulant.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .chunks import gather_rows, sum_over_chunks, token_chunks

# ---- helpers ------------------------------------------------------------------------------------


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 if any input is float64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """x zero-padded on the last axis to ``size``."""
    return torch.nn.functional.pad(x, (0, size - x.shape[-1])) if x.shape[-1] < size else x


def _rows(x: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """x (..., n) as rows (T, size): cast to the compute dtype, zero-padded to ``size``."""
    return _pad_last(x.to(dtype), size).reshape(-1, size)


def _spectral_row_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_t conj(a[t]) ⊙ b[t] over the rows of two (T, F) spectra: the spectrum of a cross-correlation summed
    over the samples, the gradient of a shared generator."""
    return torch.linalg.vecdot(a, b, dim=0)


# ---- circulant ----------------------------------------------------------------------------------


class _CirculantProduct(torch.autograd.Function):
    """Circ(c)[:m, :n]·x = irfft(rfft(c) ⊙ rfft(x))[:m] (spec §3.2a).

    Saves c and, when c needs a gradient, the spectrum rfft(x) (N/2 + 1 complex numbers per row: x's size)
    instead of x, so backward needs two transforms (rfft of the gradient, irfft of the input gradient), not three.
    On CPU, beyond ``chunks.WHOLE_PASS_ELEMENTS``, both passes run over cache-sized chunks of rows
    (:func:`chunks.token_chunks`): whole passes wrote a spectrum-sized product to fresh memory and reduced c's
    gradient from a product as large as x.
    """

    @staticmethod
    def forward(ctx: Any, c: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
        size, dtype = c.shape[-1], _compute_dtype(c, x)
        flat = x.reshape(-1, x.shape[-1])  # (T, n)
        c_spectrum = torch.fft.rfft(c.to(dtype))
        save, tokens = ctx.needs_input_grad[0], flat.shape[0]
        x_spectrum = product = None
        for part in token_chunks(flat.shape[0], size, x.device, few_steps=True):
            spectrum = torch.fft.rfft(_rows(flat[part], size, dtype))  # (t, N/2+1)
            if save:
                x_spectrum = gather_rows(x_spectrum, part, spectrum, tokens)
            part_product = torch.fft.irfft(spectrum * c_spectrum if save else spectrum.mul_(c_spectrum), n=size)
            product = gather_rows(product, part, part_product[:, :out_features], tokens)
        ctx.save_for_backward(c, x_spectrum)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return product.reshape(*x.shape[:-1], out_features).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        c, x_spectrum = ctx.saved_tensors
        size, dtype = c.shape[-1], _compute_dtype(c, grad_y)
        need_c, need_x = ctx.needs_input_grad[:2]
        grad_flat = grad_y.reshape(-1, grad_y.shape[-1])  # (T, m)
        c_spectrum = torch.fft.rfft(c.to(dtype))
        grad_c_spectrum = torch.zeros_like(c_spectrum) if need_c else None
        grad_x = None
        for part in token_chunks(grad_flat.shape[0], size, grad_y.device, few_steps=True):
            grad_spectrum = torch.fft.rfft(_rows(grad_flat[part], size, dtype))  # (t, N/2+1), zero-padded to N
            if need_c:  # Circ(c)·x = Circ(x)·c: Σ_t Circ(x_t)ᵀ·grad_t, summed in frequency
                grad_c_spectrum += _spectral_row_sum(x_spectrum[part], grad_spectrum)
            if need_x:  # Circ(c)ᵀ = the circulant with the conjugate spectrum (in place: last use)
                grad_rows = torch.fft.irfft(grad_spectrum.mul_(c_spectrum.conj()), n=size)
                grad_x = gather_rows(grad_x, part, grad_rows[:, :ctx.x_shape[-1]], grad_flat.shape[0])
        grad_c = torch.fft.irfft(grad_c_spectrum, n=size).to(c.dtype) if need_c else None
        grad_x = None if grad_x is None else grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        return grad_c, grad_x, None


def circulant_matvec(c: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """Circ(c)[:m, :n] · x.  c: (N,), x: (..., n) with n ≤ N → (..., m) with m = out_features ≤ N."""
    if x.numel() == 0:  # no rows: torch's MKL FFTs reject an empty batch; an empty product, c's gradient 0
        return x.new_zeros(*x.shape[:-1], out_features) + 0 * c.sum().to(x.dtype)
    return _CirculantProduct.apply(c, x, out_features)


def circulant_dense(c: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Circ(c)[:m, :n] with Circ(c)[i, j] = c[(i − j) mod N].  c: (N,) → (m, n).

    Built from windows of [c; c] (a copy, no index arithmetic): row i is c[i], c[i−1], …, c[i−N+1] (mod N).
    """
    size = c.shape[-1]
    reversed_twice = torch.cat([c, c]).flip(0)  # e[k] = c[(−k − 1) mod N]
    windows = reversed_twice.unfold(0, size, 1)[:size]  # windows[s, j] = e[s + j]; row i is s = N − 1 − i
    return windows.flip(0)[:out_features, :in_features]


# ---- skew-circulant (f = −1 circulant, negacyclic) -------------------------------------------
#
# SkewCirc(h)·v is the negacyclic convolution of h and v, i.e. the product of polynomials mod tᴺ + 1.
# With η = exp(iπ/N) (ηᴺ = −1), SkewCirc(h)·v = η̄ ⊙ ifft(fft(η ⊙ h) ⊙ fft(η ⊙ v)) (spec §3.2d). For real
# h, v and even N, the same product needs only size-N/2 FFTs ("right-angle" convolution): mod tᴺ⁄² − i,
# a real v folds to v[:N/2] + i·v[N/2:], and the product mod tᴺ + 1 of two real polynomials is read back from
# its remainder mod tᴺ⁄² − i (real part: low half, imaginary part: high half). Both stay within one row.


def _skew_twist(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(M,) complex: η^j for j < M, η = exp(iπ/N); M = N/2 for even N (η^M = i), M = N for odd N (η^N = −1)."""
    length = size // 2 if size % 2 == 0 else size
    angles = torch.arange(length, dtype=dtype, device=device) * (math.pi / size)
    return torch.polar(torch.ones_like(angles), angles)


def skew_spectrum(v: torch.Tensor) -> torch.Tensor:
    """The diagonalizing transform of SkewCirc on the last axis: (..., N) real → (..., M) complex."""
    size = v.shape[-1]
    if size % 2 == 0:
        folded = torch.complex(v[..., : size // 2], v[..., size // 2:])
    else:
        folded = torch.complex(v, torch.zeros_like(v))
    return torch.fft.fft(folded.mul_(_skew_twist(size, v.dtype, v.device)))  # in place: one 2N-long buffer fewer


def skew_inverse(spectrum: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of :func:`skew_spectrum` (for a product of two spectra of real vectors): (..., M) → (..., N) real."""
    unfolded = torch.fft.ifft(spectrum).mul_(_skew_twist(size, spectrum.real.dtype, spectrum.device).conj())
    return torch.cat([unfolded.real, unfolded.imag], dim=-1) if size % 2 == 0 else unfolded.real


def skew_circulant_dense(h: torch.Tensor) -> torch.Tensor:
    """SkewCirc(h) (N, N), first column h: h[i − j] for i ≥ j, −h[N + i − j] for i < j."""
    size = h.shape[-1]
    rows = torch.arange(size, device=h.device)[:, None]
    cols = torch.arange(size, device=h.device)[None, :]
    sign = torch.where(rows >= cols, 1.0, -1.0).to(h.dtype)
    return sign * h[(rows - cols) % size]


def skew_circulant_matvec(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SkewCirc(h) · v with η^N = −1 (the reference code's default root solves x^(N+1) = −1 instead, which gives
    a wrong product).  h: (..., N), v: (..., N) real, broadcast against each other → (..., N)."""
    dtype = _compute_dtype(h, v)
    product = skew_inverse(skew_spectrum(h.to(dtype)) * skew_spectrum(v.to(dtype)), h.shape[-1])
    return product.to(v.dtype)


# ---- Toeplitz -------------------------------------------------------------------------------------


class _CirculantPlusSkewProduct(torch.autograd.Function):
    """(Circ(c) + SkewCirc(s))[:m, :n]·x with two size-N diagonalizations of x; saves c, s and x.

    Per row 4 transforms forward (rfft and skew spectrum of x, their inverses), 6 backward (the same of the
    gradient, and x's two spectra recomputed): each about a third of a length-2N rfft's time. Both passes run
    over cache-sized chunks of rows (:func:`chunks.token_chunks`); the generators' gradients are summed over chunks
    in the frequency domain.
    """

    @staticmethod
    def forward(ctx: Any, c: torch.Tensor, s: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
        size, dtype = c.shape[-1], _compute_dtype(c, s, x)
        flat = x.reshape(-1, x.shape[-1])  # (T, n)
        c_spectrum, s_skew = torch.fft.rfft(c.to(dtype)), skew_spectrum(s.to(dtype))
        product = x.new_empty(flat.shape[0], out_features)
        for part in token_chunks(flat.shape[0], size, x.device):
            rows = _rows(flat[part], size, dtype)  # (t, N): cast and padded chunk by chunk
            part_product = torch.fft.irfft(torch.fft.rfft(rows).mul_(c_spectrum), n=size)
            part_product += skew_inverse(skew_spectrum(rows).mul_(s_skew), size)
            product[part] = part_product[:, :out_features]
        ctx.save_for_backward(c, s, x if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] else None)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return product.reshape(*x.shape[:-1], out_features)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        c, s, x = ctx.saved_tensors
        size, dtype = c.shape[-1], _compute_dtype(c, s, grad_y)
        need_c, need_s, need_x = ctx.needs_input_grad[:3]
        grad_flat = grad_y.reshape(-1, grad_y.shape[-1])  # (T, m)
        flat = x.reshape(-1, x.shape[-1]) if need_c or need_s else None  # (T, n)
        c_spectrum, s_skew = torch.fft.rfft(c.to(dtype)), skew_spectrum(s.to(dtype))
        # the generators' gradients, in the frequency domain until the end (the inverses are linear)
        grad_c_spectrum = torch.zeros_like(c_spectrum) if need_c else None
        grad_s_skew = torch.zeros_like(s_skew) if need_s else None
        grad_x = grad_y.new_empty(grad_flat.shape[0], ctx.x_shape[-1], dtype=ctx.x_dtype) if need_x else None
        for part in token_chunks(grad_flat.shape[0], size, grad_y.device):
            grad_rows = _rows(grad_flat[part], size, dtype)  # (t, N), zero-padded
            grad_spectrum, grad_skew = torch.fft.rfft(grad_rows), skew_spectrum(grad_rows)
            rows = _rows(flat[part], size, dtype) if need_c or need_s else None
            if need_c:  # Circ(c)·x = Circ(x)·c
                grad_c_spectrum += _spectral_row_sum(torch.fft.rfft(rows), grad_spectrum)
            if need_s:  # SkewCirc(s)·x = SkewCirc(x)·s
                grad_s_skew += _spectral_row_sum(skew_spectrum(rows), grad_skew)
            if need_x:  # the transposes: conjugate spectra (in place: their last use)
                grad_x_part = torch.fft.irfft(grad_spectrum.mul_(c_spectrum.conj()), n=size)
                grad_x_part += skew_inverse(grad_skew.mul_(s_skew.conj()), size)
                grad_x[part] = grad_x_part[:, :ctx.x_shape[-1]]
        grad_c = torch.fft.irfft(grad_c_spectrum, n=size).to(c.dtype) if need_c else None
        grad_s = skew_inverse(grad_s_skew, size).to(s.dtype) if need_s else None
        return grad_c, grad_s, None if grad_x is None else grad_x.reshape(ctx.x_shape), None


def toeplitz_matvec(t: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """Toep(t) · x.  t: (m+n−1,), x: (..., n) → (..., m), m = out_features.

    y[i] = Σ_j t[i − j + n − 1] x[j]. Toep(t) is the top-left m × n block of the N × N Toeplitz matrix (N =
    max(m, n)) with diagonals τ_k = t[k + n − 1] (zero outside), and every N × N Toeplitz matrix is a circulant
    plus a skew-circulant: τ_k = c_k + s_k for k ≥ 0 and τ_{k−N} = c_k − s_k, so c = (τ₊ + τ₋)/2,
    s = (τ₊ − τ₋)/2 (the circulant-skew-circulant splitting of Toeplitz matrices, spec §3.2b and §3.2d). Four
    size-N transforms per row instead of two of a length-2N embedding, a third of the work each.
    """
    in_features = x.shape[-1]
    if t.shape[-1] != out_features + in_features - 1:
        raise ValueError(f"a {out_features}×{in_features} Toeplitz matrix has {out_features + in_features - 1} "
                         f"diagonals, got {t.shape[-1]}")
    size = max(out_features, in_features)
    diagonals = torch.nn.functional.pad(t, (size - in_features, size - out_features))  # τ_k at k + N − 1, (2N−1,)
    upper = diagonals[size - 1:]  # τ_k, k = 0 … N−1
    lower = torch.nn.functional.pad(diagonals[: size - 1], (1, 0))  # τ_{k−N}, k = 0 … N−1 (τ_{−N} = 0)
    return _CirculantPlusSkewProduct.apply((upper + lower) / 2, (upper - lower) / 2, x, out_features)


def toeplitz_dense(t: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Toep(t) (m, n) with Toep(t)[i, j] = t[i − j + n − 1]: first row reversed t[:n], first column t[n−1:].

    Built from the windows t[i : i+n] (a copy, no index arithmetic), each reversed.
    """
    return t.unfold(0, in_features, 1)[:out_features].flip(1)


# ---- Kronecker ------------------------------------------------------------------------------------


class _KroneckerProduct(torch.autograd.Function):
    """(B ⊗ A)·x = vec(B·X·Aᵀ); saves B, A, x and recomputes X·Aᵀ in backward. On CPU, beyond
    ``chunks.WHOLE_PASS_ELEMENTS``, both passes run over cache-sized chunks of rows (whole passes wrote each of
    their x-sized intermediates to fresh memory)."""

    @staticmethod
    def forward(ctx: Any, b: torch.Tensor, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(b, a, x)
        (p, q), (s, k) = b.shape, a.shape
        flat = x.reshape(-1, q * k)  # (T, q·k)
        b_c, a_c = b.to(dtype), a.to(dtype)
        product = None
        for part in token_chunks(flat.shape[0], flat.shape[1], x.device, few_steps=True):
            right = (flat[part].to(dtype).reshape(-1, k) @ a_c.T).reshape(-1, q, s)  # X·Aᵀ, one GEMM: (t, q, s)
            part_product = torch.bmm(b_c.expand(right.shape[0], p, q), right)  # B·(X·Aᵀ) per row, (t, p, s)
            product = gather_rows(product, part, part_product.reshape(-1, p * s), flat.shape[0])
        ctx.save_for_backward(b, a, x)
        return product.reshape(*x.shape[:-1], p * s).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        b, a, x = ctx.saved_tensors
        dtype = _compute_dtype(b, a, x)
        (p, q), (s, k) = b.shape, a.shape
        need_b, need_a, need_x = ctx.needs_input_grad
        b_c, a_c = b.to(dtype), a.to(dtype)
        flat, grad_flat = x.reshape(-1, q * k), grad_y.reshape(-1, p * s)  # (T, q·k), (T, p·s)
        grad_b = grad_a = grad_x = None
        for part in token_chunks(flat.shape[0], max(flat.shape[1], grad_flat.shape[1]), x.device, few_steps=True):
            grad = grad_flat[part].to(dtype).reshape(-1, p, s)  # (t, p, s)
            matrix = flat[part].to(dtype).reshape(-1, k) if need_a or need_b else None  # rows of X, (t·q, k)
            if need_a or need_x:
                grad_right = torch.bmm(b_c.T.expand(grad.shape[0], q, p), grad).reshape(-1, s)  # Bᵀ·grad
                if need_x:
                    grad_x = gather_rows(grad_x, part, (grad_right @ a_c).reshape(-1, q * k), flat.shape[0])
                if need_a:
                    grad_a = sum_over_chunks(grad_a, grad_right.T @ matrix)
            if need_b:
                right = (matrix @ a_c.T).reshape(-1, q, s)
                grad_b = sum_over_chunks(grad_b, torch.bmm(grad, right.transpose(1, 2)).sum(0))  # 2× einsum's speed
        return (None if grad_b is None else grad_b.to(b.dtype), None if grad_a is None else grad_a.to(a.dtype),
                None if grad_x is None else grad_x.reshape(x.shape).to(x.dtype))


def kronecker_matvec(b: torch.Tensor, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B ⊗ A) · x = vec(B · X · Aᵀ) with X = x reshaped row-major to (q, k).

    B: (p, q), A: (s, k), x: (..., q·k) → (..., p·s); never forms the (p·s, q·k) matrix.
    """
    return _KroneckerProduct.apply(b, a, x)


def kronecker_dense(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """B ⊗ A, (p·s, q·k)."""
    return torch.kron(b, a)


def kronecker_factor_choices(in_features: int, out_features: int) -> list[int]:
    """Every r with B: (out/r, r), A: (r, in/r), i.e. the divisors of gcd(in, out)."""
    common = math.gcd(in_features, out_features)
    return [r for r in range(1, common + 1) if common % r == 0]


def kronecker_rank_bound(in_features: int, out_features: int, factor: int) -> int:
    """rank(B ⊗ A) ≤ rank(B)·rank(A) ≤ min(out/r, r)·min(r, in/r) (spec §3.2c)."""
    return min(out_features // factor, factor) * min(factor, in_features // factor)


def choose_kronecker_factor(in_features: int, out_features: int) -> int:
    """The smallest valid r with the highest rank bound (√d for a square d that is a perfect square)."""
    choices = kronecker_factor_choices(in_features, out_features)
    return max(choices, key=lambda r: (kronecker_rank_bound(in_features, out_features, r), -r))


# ---- low displacement rank W(G, H) ------------------------------------------------------------------


class _LdrProduct(torch.autograd.Function):
    """W(G, H)[:m, :n]·x = Σ_k Circ(g_k)·SkewCirc(h_k)·x (spec §3.2d).

    The skew spectrum of x is shared by the r terms and the r circulant spectra are summed before one inverse
    rfft. Saves G, H and, when G or H needs a gradient, x's skew spectrum (N real numbers per row: x's size)
    instead of x. Per row: 2 + 2r transforms forward, 2 + 4r backward (the r terms' circulant spectra are
    recomputed for G's gradient rather than saved: that would cost r times x's memory). Both passes run over
    cache-sized chunks of rows (:func:`chunks.token_chunks`), all r terms per chunk, so the 2r intermediate
    spectra of a chunk stay in cache; the generators' gradients are summed over chunks in the frequency domain.
    """

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, h: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
        size, dtype = g.shape[-1], _compute_dtype(g, h, x)
        flat = x.reshape(-1, x.shape[-1])  # (T, n)
        h_skew, g_spectrum = skew_spectrum(h.to(dtype)), torch.fft.rfft(g.to(dtype))  # (r, M), (r, N/2+1)
        save = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        x_skew = torch.empty(flat.shape[0], h_skew.shape[-1], dtype=h_skew.dtype, device=x.device) if save else None
        product = x.new_empty(flat.shape[0], out_features)
        for part in token_chunks(flat.shape[0], size, x.device):
            part_skew = skew_spectrum(_rows(flat[part], size, dtype))  # (t, M); cast and padded chunk by chunk
            if save:
                x_skew[part] = part_skew
            total = None  # Σ_k of the spectra of Circ(g_k)·SkewCirc(h_k)·x, (t, N/2+1)
            for h_k, g_k in zip(h_skew, g_spectrum):
                term = torch.fft.rfft(skew_inverse(part_skew * h_k, size))
                total = term.mul_(g_k) if total is None else total.addcmul_(term, g_k)
            product[part] = torch.fft.irfft(total, n=size)[:, :out_features]
        ctx.save_for_backward(g, h, x_skew)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return product.reshape(*x.shape[:-1], out_features)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g, h, x_skew = ctx.saved_tensors
        size, dtype = g.shape[-1], _compute_dtype(g, h, grad_y)
        need_g, need_h, need_x = ctx.needs_input_grad[:3]
        grad_flat = grad_y.reshape(-1, grad_y.shape[-1])  # (T, m)
        h_skew, g_spectrum = skew_spectrum(h.to(dtype)), torch.fft.rfft(g.to(dtype))
        # the generators' gradients, in the frequency domain until the end (the inverses are linear)
        grad_h_skew = torch.zeros_like(h_skew) if need_h else None
        grad_g_spectrum = torch.zeros_like(g_spectrum) if need_g else None
        grad_x = grad_y.new_empty(grad_flat.shape[0], ctx.x_shape[-1], dtype=ctx.x_dtype) if need_x else None
        for part in token_chunks(grad_flat.shape[0], size, grad_y.device):
            grad_spectrum = torch.fft.rfft(_rows(grad_flat[part], size, dtype))  # (t, N/2+1), zero-padded
            part_skew = None if x_skew is None else x_skew[part]
            grad_x_skew = None  # Σ_k SkewCirc(h_k)ᵀ·Circ(g_k)ᵀ·grad in the skew domain, (t, M)
            for k, (h_k, g_k) in enumerate(zip(h_skew, g_spectrum)):
                if need_h or need_x:  # the transposes: conjugate spectra, Circ(g_k)ᵀ·grad then SkewCirc(h_k)ᵀ
                    back_skew = skew_spectrum(torch.fft.irfft(g_k.conj() * grad_spectrum, n=size))  # (t, M)
                    if need_h:  # SkewCirc(h)·x = SkewCirc(x)·h
                        grad_h_skew[k] += _spectral_row_sum(part_skew, back_skew)
                    if need_x:
                        grad_x_skew = (back_skew.mul_(h_k.conj()) if grad_x_skew is None
                                       else grad_x_skew.addcmul_(back_skew, h_k.conj()))
                if need_g:  # Circ(g)·u = Circ(u)·g with u = SkewCirc(h_k)·x, recomputed
                    term = torch.fft.rfft(skew_inverse(part_skew * h_k, size))
                    grad_g_spectrum[k] += _spectral_row_sum(term, grad_spectrum)
            if need_x:
                grad_x[part] = skew_inverse(grad_x_skew, size)[:, :ctx.x_shape[-1]]
        grad_g = torch.fft.irfft(grad_g_spectrum, n=size).to(g.dtype) if need_g else None
        grad_h = skew_inverse(grad_h_skew, size).to(h.dtype) if need_h else None
        return grad_g, grad_h, None if grad_x is None else grad_x.reshape(ctx.x_shape), None


def ldr_matvec(g: torch.Tensor, h: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """W(G, H)[:m, :n] · x with W = Σ_i Circ(g_i)·SkewCirc(h_i).  G, H: (r, N), x: (..., n ≤ N) → (..., m ≤ N).

    Cost O(r·N log N) per row; each row is transformed on its own (real FFTs, or half-size complex FFTs of
    the row folded onto itself), so rows never mix. The transform of x is shared by the r terms and the terms
    are summed in the circulant's frequency domain, but each term's skew-circulant product must leave the skew
    diagonalization and enter the circulant one (an inverse/forward pair: the two diagonalizations differ by a
    dense N × N map), so a training step costs 4 + 6r transforms per row (forward 2 + 2r; backward 2r for the
    transposed products, 2r to recompute each term for G's gradient, 2 for the gradient itself).
    """
    return _LdrProduct.apply(g, h, x, out_features)


#: rows per block of the row-wise cumulative sums in the dense LDR build (in-block adds, then one carry per block)
_SCAN_BLOCK = 16


def _flip_tail(v: torch.Tensor, sign: float) -> torch.Tensor:
    """[v₀, sign·v_{N−1}, …, sign·v₁] on the last axis: sign = 1 maps g to Circ(g)'s first row, sign = −1 maps h
    to SkewCirc(h)'s first row, so that Circ(g)ᵀ = Circ(J g) and SkewCirc(h)ᵀ = SkewCirc(h̃). Both are involutions
    and symmetric, so each is its own adjoint."""
    return torch.cat([v[..., :1], sign * v[..., 1:].flip(-1)], dim=-1)


def _scan_rows(blocks: torch.Tensor, reverse: bool = False) -> None:
    """In place, cumulative sums over rows of ``blocks`` (nb, b, N) read as nb·b rows: prefix sums, or suffix sums
    when ``reverse``. Adds within blocks row by row, then carries block totals (a cumsum over nb rows): on CPU
    about 4× faster than ``cumsum(dim=0)``, which walks each column with stride N."""
    size = blocks.shape[1]
    order = range(size - 2, -1, -1) if reverse else range(1, size)
    for row in order:
        blocks[:, row] += blocks[:, row + 1 if reverse else row - 1]
    if reverse:
        carry = blocks[:, 0].flip(0).cumsum(0).flip(0)  # (nb, N): Σ of this block and the ones after it
        blocks[:-1] += carry[1:, None]
    else:
        carry = blocks[:, -1].cumsum(0)
        blocks[1:] += carry[:-1, None]


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a·b for a strided ``out`` with contiguous rows: straight into it in eager mode, through a copy when
    dynamo traces (it refuses a non-contiguous ``out=``)."""
    if torch.compiler.is_compiling():
        out.copy_(a @ b)
    else:
        torch.mm(a, b, out=out)


def _negacyclic_rows(rows: int, size: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A buffer of rows (padded to whole scan blocks) of length 2N read as [left | right] halves, and two views of
    it, (rows − 1, N) each: writing row t' of a matrix M into both, M into ``window`` and −M into
    ``wrapped``, puts M[t'] rolled negacyclically by t' into the right half of row t' + 1 (columns c ≥ N − t' take
    −M[t', c + t' − N]); the other entries they write fall into left halves, which are scratch. The buffer has one
    spare row for the last row's spill."""
    padded = -(-rows // _SCAN_BLOCK) * _SCAN_BLOCK
    doubled = like.new_empty(padded + 1, 2 * size)
    window = torch.as_strided(doubled, (rows - 1, size), (2 * size - 1, 1), 3 * size)
    wrapped = torch.as_strided(doubled, (rows - 1, size), (2 * size - 1, 1), 4 * size)
    return doubled, window, wrapped


def _ldr_dense_build(g: torch.Tensor, h: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """W(G, H)[:m, :n] (spec §3.2d) in O(r·N²) from the displacement equation, row by row.

    Z₁W − WZ₋₁ = 2·V with V = Gᵀ·flip(H) gives W[i, j+1] = W[i−1, j] − 2·V[i, j] along rows, where column N stands
    for −column 0 (Z₋₁ wraps with a sign). So A[i, c] = W[i, c + i] (the column taken mod N with that sign) is the
    cumulative sum over rows of A[0] = W[0, :] (by FFT: Σ_k SkewCirc(h̃_k)·J g_k) and of the rows t ≥ 1 of
    −2·V rolled negacyclically by t − 1; and W[i, j] = [−A, A][i, N + j − i], a strided view whose rows are
    contiguous, as the base layer's weight W₀ (m, n) is: W₀ + W costs one pass. Two GEMMs (r inner) write −2·V's
    rows straight into the rolled places, so the build allocates one buffer.
    """
    size, rows = g.shape[-1], out_features
    doubled, window, wrapped = _negacyclic_rows(rows, size, g)
    flipped, coupled = h.flip(-1), g[:, 1:rows].T  # (r, N), (m − 1, r)
    _mm_into(coupled, -2 * flipped, window)  # −2·V[1:m]
    _mm_into(coupled, 2 * flipped, wrapped)
    scan = doubled[:-1, size:]  # (padded, N): A's rows, to be summed
    scan[0] = skew_circulant_matvec(_flip_tail(h, -1.0), _flip_tail(g, 1.0)).sum(0)  # W[0, :]
    scan[rows:] = 0
    _scan_rows(scan.unflatten(0, (-1, _SCAN_BLOCK)))  # A
    doubled[:-1, :size].copy_(scan).neg_()
    return torch.as_strided(doubled, (out_features, in_features), (2 * size - 1, 1), size)


def _ldr_dense_adjoint(g: torch.Tensor, h: torch.Tensor,
                       grad_dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂/∂G, ∂/∂H) of ⟨grad_dense, ldr_dense(G, H, m, n)⟩: :func:`_ldr_dense_build`'s steps in reverse (the
    view read back, suffix sums over rows, the two GEMMs transposed), O(r·N²).  grad: (m, n)."""
    size = g.shape[-1]
    rows, cols = grad_dense.shape
    # ∂A[i, c] = Γ[i, c + i] − Γ[i, c + i − N] (Γ zero-padded to N columns): Γ's rows rolled negacyclically by i
    doubled, window, wrapped = _negacyclic_rows(rows + 1, size, grad_dense)
    doubled[:, size:] = 0
    window[:, :cols] = grad_dense
    wrapped[:, :cols].copy_(grad_dense).neg_()
    scan = doubled[1:, size:]  # (padded + 1, N) from row 1 (a multiple of the block when read from row 1 on)
    scan = scan[: -(-rows // _SCAN_BLOCK) * _SCAN_BLOCK]
    _scan_rows(scan.unflatten(0, (-1, _SCAN_BLOCK)), reverse=True)  # ∂(A[0]; the rolled −2·V rows)
    doubled[1:1 + scan.shape[0], :size].copy_(scan).neg_()
    # the rolled rows read back one buffer row down (∂A[0] is in row 1): ``window``'s places, which read from
    # [−∂T, ∂T] give ∂(−2·V[t'+1]) minus its wrapped part
    skewed = torch.as_strided(doubled, (rows - 1, size), (2 * size - 1, 1), 5 * size)
    flipped = h.flip(-1)
    grad_g = torch.zeros_like(g)
    grad_g[:, 1:rows] = -2 * (flipped @ skewed.T)
    grad_h = (-2 * (g[:, 1:rows] @ skewed)).flip(-1)
    first = scan[0]  # ∂W[0, :]: through SkewCirc(h̃)·J g = SkewCirc(J g)·h̃, each transposed
    grad_g = grad_g + _flip_tail(skew_circulant_matvec(h, first), 1.0)
    grad_h = grad_h + _flip_tail(skew_circulant_matvec(_flip_tail(_flip_tail(g, 1.0), -1.0), first), -1.0)
    return grad_g, grad_h


class _LdrDense(torch.autograd.Function):
    """:func:`_ldr_dense_build` with its hand-written adjoint (the build runs in place, outside autograd)."""

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, h: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
        ctx.save_for_backward(g, h)
        return _ldr_dense_build(g, h, out_features, in_features)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g, h = ctx.saved_tensors
        grad_g, grad_h = _ldr_dense_adjoint(g, h, grad)
        return grad_g, grad_h, None, None


def ldr_dense(g: torch.Tensor, h: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """W(G, H)[:m, :n], O(r·N²) with no FFT per row (:func:`_ldr_dense_build`).  G, H: (r, N) → (m, n), a view
    with contiguous rows."""
    return _LdrDense.apply(g, h, out_features, in_features)


class _LdrDenseProduct(torch.autograd.Function):
    """W(G, H)[:m, :n]·x with W built densely (:func:`ldr_dense`) and one matmul; saves G, H and x, not W:
    backward rebuilds W (O(r·N²)), so this path keeps the fast product's activation memory."""

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, h: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
        dtype = _compute_dtype(g, h, x)
        dense = ldr_dense(g.to(dtype), h.to(dtype), out_features, x.shape[-1])  # (m, n)
        ctx.save_for_backward(g, h, x if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] else None)
        ctx.x_shape, ctx.x_dtype, ctx.out_features = x.shape, x.dtype, out_features
        return (x.to(dtype) @ dense.T).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g, h, x = ctx.saved_tensors
        dtype = _compute_dtype(g, h, grad_y)
        g_c, h_c = g.to(dtype), h.to(dtype)
        grad = grad_y.to(dtype).reshape(-1, ctx.out_features)  # (T, m)
        grad_g = grad_h = grad_x = None
        if ctx.needs_input_grad[2]:
            dense = ldr_dense(g_c, h_c, ctx.out_features, ctx.x_shape[-1])
            grad_x = (grad @ dense).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_dense = grad.T @ x.to(dtype).reshape(-1, ctx.x_shape[-1])  # Σ_t grad_t·x_tᵀ, (m, n)
            grad_g, grad_h = _ldr_dense_adjoint(g_c, h_c, grad_dense)
            grad_g = grad_g.to(g.dtype) if ctx.needs_input_grad[0] else None
            grad_h = grad_h.to(h.dtype) if ctx.needs_input_grad[1] else None
        return grad_g, grad_h, grad_x, None


class _LdrMergedProduct(torch.autograd.Function):
    """x·(W₀ + W(G, H)[:m, :n])ᵀ + b as one product (the fused path of ``ops.merged``: 3 large GEMMs per training
    step with the frozen base's, not 5), W rebuilt in backward as in :class:`_LdrDenseProduct`: saves x, G and H
    (W₀ is the layer's parameter), so the activation memory stays the fast product's. All in one dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, g: torch.Tensor,
                h: torch.Tensor) -> torch.Tensor:
        out_features, in_features = weight.shape
        ctx.save_for_backward(x, weight, g, h)
        ctx.has_bias = bias is not None
        merged = weight + ldr_dense(g, h, out_features, in_features)  # (m, n); W(0, H) = 0: W₀ exactly
        return torch.nn.functional.linear(x, merged, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, g, h = ctx.saved_tensors
        need_x, need_weight, need_bias, need_g, need_h = ctx.needs_input_grad
        out_features, in_features = weight.shape
        rows = grad_y.reshape(-1, out_features)  # (T, m)
        grad_x = grad_weight = grad_bias = grad_g = grad_h = None
        if need_x:
            merged = weight + ldr_dense(g, h, out_features, in_features)
            grad_x = (rows @ merged).view(*grad_y.shape[:-1], in_features)
        if need_weight or need_g or need_h:
            grad_weight = rows.T @ x.reshape(-1, in_features)  # Σ_t grad_t·x_tᵀ = ∂W₀ = ∂W, (m, n)
            if need_g or need_h:
                grad_g, grad_h = _ldr_dense_adjoint(g, h, grad_weight)
        if ctx.has_bias and need_bias:
            grad_bias = rows.sum(0)
        return (grad_x, grad_weight if need_weight else None, grad_bias, grad_g if need_g else None,
                grad_h if need_h else None)


def ldr_merged_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, g: torch.Tensor,
                      h: torch.Tensor) -> torch.Tensor:
    """x·(W₀ + W(G, H)[:m, :n])ᵀ + b in one product.  x: (..., n), weight: (m, n), bias: (m,) or None, G, H: (r, N)
    → (..., m). For a layer whose cost model prefers the dense W (:func:`fast_product_is_cheaper` with ``fused``)."""
    return _LdrMergedProduct.apply(x, weight, bias, g, h)


def ldr_dense_product(g: torch.Tensor, h: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """Same as :func:`ldr_matvec` through a dense W built once per call: for the layers where the cost model
    below prefers it (many displacement terms, N up to ≈ 2000)."""
    return _LdrDenseProduct.apply(g, h, x, out_features)


# ---- fast product or dense S: the cost model (issue 12) ------------------------------------------------
#
# Both paths cost time linear in the tokens T of a step; only the dense path adds a cost per step that does not
# grow with T (building S). Per token row, training (forward + backward):
#   fast:  transforms(structure, r) × N·log₂N × FFT_SECONDS_PER_POINT × FFT_ELEMENTWISE_FACTOR, N = max(m, n);
#   dense: 3·m·n × MATMUL_SECONDS_PER_MAC (x·Sᵀ forward, grad·S and gradᵀ·x backward), or 1·m·n when ``fused``
#          into the base layer's product with W₀ + S (ops/merged.py: its forward and ∂x GEMMs replace the base's,
#          only gradᵀ·x is added; in inference it adds none),
# plus, once per step, m·n × BUILD_SECONDS_PER_ENTRY (build S and run its backward).
# Inference: 2 + 2r or 2 transforms against one matmul and one build. So the separate dense path wins only where
# N / log₂N < (transforms / 3)·(FFT point cost / MAC cost)·(elementwise factor) and the tokens amortize the
# build: at these constants LDR r = 8 from ≈ 256 tokens at N = 1024 and ≈ 1000 at N = 2048 (measured, dense ÷ fast:
# 0.65 at N = 1024 and 512 tokens, 1.03 at N = 2048 and 512, 0.68 at 1024), r = 4 from ≈ 1000 at N = 1024,
# Toeplitz and LDR r = 1 up to N ≈ 256 (at N = 1024 they tie from 1–2 thousand tokens), the circulant never
# (``benchmarks/surm.py --crossover`` measures both paths and the pick). Fused (a plain float nn.Linear base):
# LDR r = 8 from ≈ 256 tokens at N = 1024, ≈ 400 at N = 2048, ≈ 800 at N = 4096; r = 4 from ≈ 400 at N = 1024;
# LDR r = 1 and Toeplitz only up to N ≈ 512 (from 1–2 thousand tokens), the circulant up to N = 256.
# Memory: LDR's dense paths rebuild W in backward (``ldr_dense_product``, ``ldr_merged_linear``: save x, G, H, as
# the fast one). Circulant and Toeplitz (whose dense path rarely wins) save S or W₀ + S (m × n) beside x, so in
# training they take it only where that is at most half the size of the input it multiplies (T ≥ 2m): activation
# memory within 1.3× LoRA's.
# Constants measured on the development CPU, one thread, float32, N = 1024 and 2048 (matmul 512 × N × N,
# rfft of 512 rows, torch.profiler of the fast products):
MATMUL_SECONDS_PER_MAC = 4.5e-11
FFT_SECONDS_PER_POINT = 3.1e-10  # one row's real FFT of size N costs this × N·log₂N (rfft, irfft, skew ≈ same)
#: the complex multiplies, twists, folds and pads around the transforms, relative to the transforms alone
FFT_ELEMENTWISE_FACTOR = {"circulant": 1.3, "toeplitz": 1.5, "ldr": 2.0}
#: the build of S and its backward, per entry of S
#: LDR: build twice (forward, backward) and the adjoint: ≈ 2.6e-8 (N = 1024) to 3.3e-8 (N = 2048) timed alone,
#: about half of it first touches of the fresh buffers (page faults on CPU)
BUILD_SECONDS_PER_ENTRY = {"circulant": 1.5e-8, "toeplitz": 1.5e-8, "ldr": 3.5e-8}


def transforms_per_row(structure: str, displacement_rank: int = 1, training: bool = True) -> int:
    """FFTs per token row of the fast product (each of size N, or N/2 complex): forward, plus backward when
    training. Circulant: rfft x, irfft; rfft grad, irfft grad x. Toeplitz: see :func:`toeplitz_matvec`. LDR:
    see :func:`ldr_matvec`."""
    if structure == "ldr":
        return 4 + 6 * displacement_rank if training else 2 + 2 * displacement_rank
    if structure == "toeplitz":  # a circulant and a skew-circulant product, x saved (its two spectra: 2× x)
        return 10 if training else 4
    return 4 if training else 2


def fast_product_is_cheaper(structure: str, tokens: int, rows: int, cols: int, displacement_rank: int = 1,
                            training: bool = True, fused: bool = False) -> bool:
    """Whether S·x by its fast product beats building S (rows × cols) once and multiplying densely, for
    ``tokens`` rows of x (forward, plus backward when ``training``), by the cost model above; ``fused``: the dense
    S inside the base layer's product with W₀ + S. Kronecker's product (two small GEMMs) is always cheaper; in
    training, so is a circulant or Toeplitz product whose saved S would outweigh half of x (memory first)."""
    if structure == "kronecker" or (training and structure != "ldr" and tokens < 2 * rows):
        return True
    length = max(rows, cols)
    transforms = transforms_per_row(structure, displacement_rank, training)
    transform_seconds = length * math.log2(max(length, 2)) * FFT_SECONDS_PER_POINT * FFT_ELEMENTWISE_FACTOR[structure]
    fast = tokens * transforms * transform_seconds
    build = rows * cols * BUILD_SECONDS_PER_ENTRY[structure] * (1 if training else 1 / 3)  # forward ≈ a third
    gemms = (1 if training else 0) if fused else (3 if training else 1)
    dense = tokens * rows * cols * gemms * MATMUL_SECONDS_PER_MAC + build
    return fast <= dense
