"""Structured unrestricted-rank matrices of SURM (spec: methods/mtlora_loratrf_surm.md §3).

Four structures, each with a fast product ``S·x`` on the last axis of ``x`` and a dense
materialization built from the definition (for merging and as the reference in tests):

* circulant ``Circ(c)``: ``Circ(c)[i, j] = c[(i - j) mod N]`` (first column c), product by rfft (§3.2a);
* Toeplitz ``Toep(t)`` (m × n, m+n−1 diagonals): ``Toep(t)[i, j] = t[i - j + n - 1]``, product by FFT
  after embedding in a circulant (§3.2b, general rectangular form of §3.3);
* Kronecker ``B ⊗ A``, applied as ``B · X · Aᵀ`` on the reshaped input, never materialized (§3.2c);
* low displacement rank ``W(G, H) = Σ_{i<r} Circ(g_i) · SkewCirc(h_i)`` (§3.2d), with the skew-circulant
  diagonalized by ``η = exp(iπ/N)``, so that ``ηᴺ = −1`` exactly (the reference code's root is wrong).

Rectangular m × n (choice, spec §3.3): circulant and LDR are *truncated*: the N × N matrix with
N = max(m, n) acting on x zero-padded to N, keeping the first m outputs, i.e. ``S[:m, :n]``.
FFTs run in float32 (float64 stays float64) whatever the activation dtype; the result has that dtype.
"""

from __future__ import annotations

import math

import torch

# ---- helpers ------------------------------------------------------------------------------------


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 if any input is float64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def fast_fft_length(n: int) -> int:
    """The smallest 5-smooth number (2^a·3^b·5^c) ≥ n: an FFT size without slow prime factors."""
    best = 1 << max(n - 1, 0).bit_length()  # the next power of two
    power5 = 1
    while power5 < best:
        odd = power5  # 3^b·5^c
        while odd < best:
            candidate = odd
            while candidate < n:
                candidate *= 2
            best = min(best, candidate)
            odd *= 3
        power5 *= 5
    return best


def _skew_root_powers(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size,) complex: η^k for k < size with η = exp(iπ/size), so η^size = −1 (spec §3.2d)."""
    angles = torch.arange(size, dtype=dtype, device=device) * (math.pi / size)
    return torch.polar(torch.ones_like(angles), angles)


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """x zero-padded on the last axis to ``size``."""
    return torch.nn.functional.pad(x, (0, size - x.shape[-1])) if x.shape[-1] < size else x


# ---- circulant ----------------------------------------------------------------------------------


def circulant_matvec(c: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """Circ(c)[:m, :n] · x.  c: (N,), x: (..., n) with n ≤ N → (..., m) with m = out_features ≤ N."""
    size = c.shape[-1]
    dtype = _compute_dtype(c, x)
    spectrum = torch.fft.rfft(c.to(dtype)) * torch.fft.rfft(_pad_last(x.to(dtype), size))  # (..., N//2+1)
    return torch.fft.irfft(spectrum, n=size)[..., :out_features].to(x.dtype)


def circulant_dense(c: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Circ(c)[:m, :n] with Circ(c)[i, j] = c[(i − j) mod N].  c: (N,) → (m, n)."""
    size = c.shape[-1]
    rows = torch.arange(out_features, device=c.device)[:, None]
    cols = torch.arange(in_features, device=c.device)[None, :]
    return c[(rows - cols) % size]


# ---- skew-circulant (f = −1 circulant, negacyclic) -------------------------------------------


def skew_circulant_dense(h: torch.Tensor) -> torch.Tensor:
    """SkewCirc(h) (N, N), first column h: h[i − j] for i ≥ j, −h[N + i − j] for i < j."""
    size = h.shape[-1]
    rows = torch.arange(size, device=h.device)[:, None]
    cols = torch.arange(size, device=h.device)[None, :]
    sign = torch.where(rows >= cols, 1.0, -1.0).to(h.dtype)
    return sign * h[(rows - cols) % size]


def skew_circulant_matvec(h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SkewCirc(h) · z = η̄ ⊙ ifft(fft(η ⊙ h) ⊙ fft(η ⊙ z)) with η = exp(iπ/N), so η^N = −1.

    (The reference code's default root solves x^(N+1) = −1 instead, which gives a wrong product.)
    h: (..., N) real, z: (..., N) real or complex, broadcast against each other → (..., N), real for a real z.
    """
    dtype = _compute_dtype(h, z)  # float32/64, or complex64/128 for a complex z
    powers = _skew_root_powers(h.shape[-1], dtype.to_real(), h.device)  # (N,)
    h_spectrum = torch.fft.fft(powers * h.to(dtype.to_real()))
    product = powers.conj() * torch.fft.ifft(h_spectrum * torch.fft.fft(powers * z.to(dtype)))
    return product if z.is_complex() else product.real.to(z.dtype)


# ---- Toeplitz -------------------------------------------------------------------------------------


def toeplitz_matvec(t: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """Toep(t) · x.  t: (m+n−1,), x: (..., n) → (..., m), m = out_features.

    y[i] = Σ_j t[i − j + n − 1] x[j] is entry n−1+i of the linear convolution t ∗ x; a cyclic
    convolution of length L ≥ m+n−1 computes those entries without wrap-around.
    """
    in_features = x.shape[-1]
    if t.shape[-1] != out_features + in_features - 1:
        raise ValueError(f"a {out_features}×{in_features} Toeplitz matrix has {out_features + in_features - 1} "
                         f"diagonals, got {t.shape[-1]}")
    dtype = _compute_dtype(t, x)
    length = fast_fft_length(out_features + in_features - 1)
    # explicit zero-padding: the backward of rfft(x, n=length) was measured 1.3-2× slower
    spectrum = torch.fft.rfft(t.to(dtype), n=length) * torch.fft.rfft(_pad_last(x.to(dtype), length))
    full = torch.fft.irfft(spectrum, n=length)  # (..., L)
    return full[..., in_features - 1: in_features - 1 + out_features].to(x.dtype)


def toeplitz_dense(t: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Toep(t) (m, n) with Toep(t)[i, j] = t[i − j + n − 1]: first row reversed t[:n], first column t[n−1:]."""
    rows = torch.arange(out_features, device=t.device)[:, None]
    cols = torch.arange(in_features, device=t.device)[None, :]
    return t[rows - cols + in_features - 1]


# ---- Kronecker ------------------------------------------------------------------------------------


def kronecker_matvec(b: torch.Tensor, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B ⊗ A) · x = vec(B · X · Aᵀ) with X = x reshaped row-major to (q, k).

    B: (p, q), A: (s, k), x: (..., q·k) → (..., p·s); never forms the (p·s, q·k) matrix.
    """
    dtype = _compute_dtype(b, a, x)
    p, q = b.shape
    s, k = a.shape
    matrix = x.to(dtype).reshape(*x.shape[:-1], q, k)  # (..., q, k)
    product = b.to(dtype) @ (matrix @ a.to(dtype).T)  # (p, q) @ (..., q, s) → (..., p, s)
    return product.reshape(*x.shape[:-1], p * s).to(x.dtype)


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


def ldr_matvec(g: torch.Tensor, h: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """W(G, H)[:m, :n] · x with W = Σ_i Circ(g_i)·SkewCirc(h_i).  G, H: (r, N), x: (..., n ≤ N) → (..., m ≤ N).

    W is real, so W(x₁ + i·x₂) = Wx₁ + i·Wx₂: the rows of x travel in pairs as one complex row, which halves
    the FFTs (measured ≈ 1.3× faster at r = 1 and ≈ 3× at r = 4 than real rows with rfft; d = 384, one thread).
    Cost O(r·N log N) per pair of rows: one FFT of the pair, per generator one inverse FFT (skew product) and
    one FFT (circulant product), the r circulant spectra summed before one inverse FFT.
    """
    size = g.shape[-1]
    dtype = _compute_dtype(g, h, x)
    rows = _pad_last(x.to(dtype), size).reshape(-1, size)  # (T, N)
    count = rows.shape[0]
    half = (count + 1) // 2
    if count % 2:
        rows = torch.cat([rows, rows.new_zeros(1, size)])
    packed = torch.complex(rows[:half], rows[half:])  # (T/2, N)
    skew = skew_circulant_matvec(h.to(dtype), packed.unsqueeze(-2))  # (T/2, r, N)
    spectrum = (torch.fft.fft(g.to(dtype)) * torch.fft.fft(skew)).sum(dim=-2)  # (T/2, N)
    product = torch.fft.ifft(spectrum)
    rows_out = torch.cat([product.real, product.imag])[:count, :out_features]  # (T, m)
    return rows_out.reshape(*x.shape[:-1], out_features).to(x.dtype)


def ldr_dense(g: torch.Tensor, h: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """W(G, H)[:m, :n] from the definition: [Circ(g_1) … Circ(g_r)] · [SkewCirc(h_1); …; SkewCirc(h_r)]."""
    size = g.shape[-1]
    circulants = torch.cat([circulant_dense(gi, out_features, size) for gi in g], dim=1)  # (m, r·N)
    skews = torch.cat([skew_circulant_dense(hi)[:, :in_features] for hi in h], dim=0)  # (r·N, n)
    return circulants @ skews
