"""Quantum-PEFT (Koike-Akino et al., ICLR 2025): Stiefel matrices from a Pauli (RY + CZ) circuit, pure torch.

ΔW = s · U Λ Vᵀ (spec §2.2), where U (d_out×K) and V (d_in×K) have orthonormal columns *by construction*:
each is the first K columns of a real orthogonal N×N "circuit" C(θ) on n = log₂N qubits (spec §2.3):

    one RY on every qubit, then L times [RY on qubits 0…n−2, CZ on (0,1),(2,3),…, RY on qubits 1…n−1,
    CZ on (1,2),(3,4),…]   →   (2L+1)·n − 2L angles,

with RY(θ) = [[cos θ/2, −sin θ/2], [sin θ/2, cos θ/2]] and CZ = diag(1, 1, 1, −1). Reconstruction (the
paper's Eq. 2 was not readable, spec §2.1): this gate order is the one that matches the reviewers' parameter
count; angles are consumed in gate order; qubit 0 is the most significant bit of the row index (the first
axis of the row-major 2×…×2 view).

The K columns are computed as a state of shape (N, K) = C(θ)·I[:, :K]: RY is a 2×2 rotation of one qubit
axis of the (2, …, 2, K) view and CZ a ±1 sign per row; no N×N matrix is ever formed. The default backward
is memory-lean: it saves only the final state and walks the circuit in reverse (every gate is orthogonal, so
the state before a gate is Rᵀ times the state after it), so autograd memory is O(N·K), not O(#gates·N·K).

Non-power-of-two N (reconstruction of the paper's QSD split, spec §2.5 option b): N = N₁ + N₂ with
N₁ = 2^⌊log₂N⌋. The columns are the first K columns of the orthogonal matrix diag(C_{N₁}, Q_{N₂}) · G(φ), where
C_{N₁} is the circuit above, Q_{N₂} the same construction recursively, and G(φ) rotates basis pairs
(j, N₁ + j) by RY(φ_j), a "cosine–sine" coupling. Only the min(K, N₂) couplings that touch the first K basis
vectors are parameterized. UᵀU = I holds exactly; nothing is padded or cropped.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

#: ("ry", qubit) consumes the next angle; ("cz", parity) applies CZ on pairs (parity, parity+1), (parity+2, …).
Gate = tuple[str, int]


def pauli_angle_count(n_qubits: int, n_layers: int) -> int:
    """Angles of the circuit on ``n_qubits`` qubits with ``n_layers`` entangling layers: (2L+1)·n − 2L (n ≥ 1)."""
    if n_qubits < 0 or n_layers < 0:
        raise ValueError(f"n_qubits and n_layers must be ≥ 0, got {n_qubits} and {n_layers}")
    return 0 if n_qubits == 0 else (2 * n_layers + 1) * n_qubits - 2 * n_layers


def _split(dim: int) -> tuple[int, int]:
    """(N₁, N₂) with N₁ the largest power of two ≤ dim and N₂ = dim − N₁ (N₂ = 0 for a power of two)."""
    top = 1 << (dim.bit_length() - 1)
    return top, dim - top


def stiefel_angle_count(dim: int, rank: int, n_layers: int) -> int:
    """Angles that generate ``rank`` orthonormal columns of length ``dim`` (see the module docstring)."""
    _check_dims(dim, rank)
    top, bottom = _split(dim)
    count = pauli_angle_count(top.bit_length() - 1, n_layers)
    if bottom:
        bottom_rank = min(rank, bottom)
        count += bottom_rank + stiefel_angle_count(bottom, bottom_rank, n_layers)
    return count


def _check_dims(dim: int, rank: int) -> None:
    if dim < 1 or not 1 <= rank <= dim:
        raise ValueError(f"need 1 ≤ rank ≤ dim for orthonormal columns, got rank={rank}, dim={dim}")


@functools.lru_cache(maxsize=None)
def circuit_gates(n_qubits: int, n_layers: int) -> tuple[Gate, ...]:
    """The gate sequence of spec §2.3, first gate first."""
    gates: list[Gate] = [("ry", q) for q in range(n_qubits)]
    for _ in range(n_layers):
        gates += [("ry", q) for q in range(n_qubits - 1)]
        gates += [("cz", 0)] if n_qubits >= 2 else []  # CZ layers without a pair are the identity: left out
        gates += [("ry", q) for q in range(1, n_qubits)]
        gates += [("cz", 1)] if n_qubits >= 3 else []
    return tuple(gates)


@functools.lru_cache(maxsize=None)
def _cz_signs(n_qubits: int, parity: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """±1 per row (shape (N, 1)): −1 where an odd number of the pairs (q, q+1), q ≡ parity mod 2, are both 1."""
    with torch.inference_mode(False):  # the cached tensor must be usable by autograd later
        return _cz_signs_uncached(n_qubits, parity).to(device, dtype)


def _cz_signs_uncached(n_qubits: int, parity: int) -> torch.Tensor:
    index = torch.arange(1 << n_qubits)
    bits = [(index >> (n_qubits - 1 - q)) & 1 for q in range(n_qubits)]  # bits[q]: qubit q, q = 0 most significant
    flips = sum((bits[q] & bits[q + 1] for q in range(parity, n_qubits - 1, 2)), torch.zeros_like(index))
    return (1 - 2 * (flips % 2)).unsqueeze(-1)


def _rotate(state: torch.Tensor, qubit: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RY on one qubit axis. state (..., N, K); cos, sin (...) broadcast over the batch dims of state."""
    axis = state.view(*state.shape[:-2], 1 << qubit, 2, -1)  # (..., 2^q, 2, 2^(n-q-1)·K)
    zero, one = axis.unbind(-2)
    cos, sin = cos[..., None, None], sin[..., None, None]
    differentiable = torch.is_grad_enabled() and (state.requires_grad or cos.requires_grad or sin.requires_grad)
    if differentiable or torch.compiler.is_compiling():  # (dynamo has no strided out=; inductor fuses the stack)
        rotated = torch.stack((torch.addcmul(cos * zero, sin, one, value=-1), torch.addcmul(cos * one, sin, zero)), -2)
        return rotated.view(state.shape)
    # eager, no autograd (the lean circuit's forward and reverse walk): written in place of a stack, one pass less
    rotated = torch.empty_like(axis)
    new_zero, new_one = rotated.unbind(-2)
    torch.mul(zero, cos, out=new_zero).addcmul_(sin, one, value=-1)
    torch.mul(one, cos, out=new_one).addcmul_(sin, zero)
    return rotated.view(state.shape)


def _run_circuit(state: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_qubits: int, n_layers: int) -> torch.Tensor:
    """Apply the circuit to state (..., N, K); cos/sin (..., P) of the half angles."""
    angle = 0
    for kind, arg in circuit_gates(n_qubits, n_layers):
        if kind == "ry":
            state = _rotate(state, arg, cos[..., angle], sin[..., angle])
            angle += 1
        else:
            state = state * _cz_signs(n_qubits, arg, state.device, state.dtype)
    return state


def _basis_columns(angles: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    """I[:, :rank] broadcast to the batch dims of angles: (..., dim, rank)."""
    eye = torch.eye(dim, rank, dtype=angles.dtype, device=angles.device)
    return eye.expand(*angles.shape[:-1], dim, rank).contiguous()


class _LeanCircuit(torch.autograd.Function):
    """The circuit with a reverse-walk backward: saves the output state only (O(N·K) memory)."""

    @staticmethod
    def forward(ctx, angles: torch.Tensor, n_qubits: int, n_layers: int, rank: int) -> torch.Tensor:
        half = angles / 2
        state = _run_circuit(_basis_columns(angles, 1 << n_qubits, rank), half.cos(), half.sin(), n_qubits, n_layers)
        ctx.save_for_backward(angles, state)
        ctx.n_qubits, ctx.n_layers = n_qubits, n_layers
        return state

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_state: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        angles, state = ctx.saved_tensors
        n_qubits = ctx.n_qubits
        half = angles / 2
        cos, sin = half.cos(), half.sin()
        grad_angles = torch.empty_like(angles)
        # both[0]: the state after the current gate, both[1]: dLoss/d(that state); walked back gate by gate.
        both = torch.stack((state, grad_state.to(state.dtype)))
        angle = angles.shape[-1]
        for kind, arg in reversed(circuit_gates(n_qubits, ctx.n_layers)):
            if kind == "cz":  # CZ is its own inverse and transpose
                both = both * _cz_signs(n_qubits, arg, state.device, state.dtype)
                continue
            angle -= 1
            # d RY(θ)/dθ = ½ J RY(θ) with J = [[0, −1], [1, 0]], so dLoss/dθ = ½ ⟨grad, J·state_after⟩.
            axis = both.view(2, *state.shape[:-2], 1 << arg, 2, -1)
            (out0, out1), (grad0, grad1) = axis[0].unbind(-2), axis[1].unbind(-2)
            grad_angles[..., angle] = 0.5 * (grad1 * out0 - grad0 * out1).sum((-2, -1))
            both = _rotate(both, arg, cos[..., angle], -sin[..., angle])  # RY(θ)ᵀ = RY(−θ)
        return grad_angles, None, None, None


def pauli_circuit_columns(angles: torch.Tensor, n_qubits: int, n_layers: int, rank: int,
                          memory_lean: bool = True) -> torch.Tensor:
    """First ``rank`` columns of the circuit C(θ): angles (..., (2L+1)n − 2L) → (..., 2ⁿ, rank).

    ``memory_lean=False`` runs the same gates under plain autograd (stores every intermediate state).
    """
    expected = pauli_angle_count(n_qubits, n_layers)
    if angles.shape[-1] != expected:
        raise ValueError(f"{n_qubits} qubits and {n_layers} layers need {expected} angles, got {angles.shape[-1]}")
    _check_dims(1 << n_qubits, rank)
    if memory_lean and angles.requires_grad and torch.is_grad_enabled():
        return _LeanCircuit.apply(angles, n_qubits, n_layers, rank)
    half = angles / 2
    return _run_circuit(_basis_columns(angles, 1 << n_qubits, rank), half.cos(), half.sin(), n_qubits, n_layers)


def stiefel_columns(angles: torch.Tensor, dim: int, rank: int, n_layers: int,
                    memory_lean: bool = True) -> torch.Tensor:
    """``rank`` orthonormal columns of length ``dim`` from angles (..., stiefel_angle_count) → (..., dim, rank).

    Angle layout: [circuit on N₁ | min(K, N₂) couplings | the N₂ part, recursively] (module docstring).
    """
    expected = stiefel_angle_count(dim, rank, n_layers)
    if angles.shape[-1] != expected:
        raise ValueError(f"dim={dim}, rank={rank}, n_layers={n_layers} need {expected} angles, got {angles.shape[-1]}")
    top, bottom = _split(dim)
    top_count = pauli_angle_count(top.bit_length() - 1, n_layers)
    top_rank = min(rank, top)
    top_cols = pauli_circuit_columns(angles[..., :top_count], top.bit_length() - 1, n_layers, top_rank, memory_lean)
    if not bottom:
        return top_cols
    bottom_rank = min(rank, bottom)  # ≤ top_rank, since N₂ < N₁
    half = angles[..., top_count:top_count + bottom_rank] / 2
    cos, sin = half.cos().unsqueeze(-2), half.sin().unsqueeze(-2)  # (..., 1, K₂)
    bottom_cols = stiefel_columns(angles[..., top_count + bottom_rank:], bottom, bottom_rank, n_layers, memory_lean)
    # G(φ) e_j = cos φ_j/2 · e_j + sin φ_j/2 · e_{N₁+j} for j < K₂; e_j itself for K₂ ≤ j < N₁.
    coupled_top = torch.cat((top_cols[..., :bottom_rank] * cos, top_cols[..., bottom_rank:]), -1)
    coupled_bottom = torch.nn.functional.pad(bottom_cols * sin, (0, top_rank - bottom_rank))
    columns = torch.cat((coupled_top, coupled_bottom), -2)  # (..., dim, min(K, N₁))
    extra = rank - top_rank
    if extra > 0:  # K > N₁: G(φ) e_{N₁+j} = −sin φ_j/2 · e_j + cos φ_j/2 · e_{N₁+j}
        partners = torch.cat((-top_cols[..., :extra] * sin[..., :extra], bottom_cols[..., :extra] * cos[..., :extra]), -2)
        columns = torch.cat((columns, partners), -1)
    return columns


def adapter_output(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
    """s·U Λ Vᵀ applied to activations: x (..., d_in), u (d_out, K), v (d_in, K), diagonal = s·Λ (K,) → (..., d_out).

    Costs K·(d_in + d_out) multiply-adds per token, as LoRA of rank K (spec §2.6). V is laid out as LoRA's A
    (K, d_in) rows: autograd then gets V's gradient as (K×n)·(n×d_in), not (d_in×n)·(n×K), whose K-wide output
    ran 9× slower (CPU, one thread, MKL, d = 1024, 512 tokens, K = 8); the copy is only d_in·K values.
    """
    return ((x @ v.mT.contiguous().mT) * diagonal) @ u.mT


def delta_weight(u: torch.Tensor, v: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
    """Dense ΔW = U diag(s·Λ) Vᵀ, shape (d_out, d_in), for merging."""
    return (u * diagonal) @ v.T


__all__ = [
    "adapter_output",
    "circuit_gates",
    "delta_weight",
    "pauli_angle_count",
    "pauli_circuit_columns",
    "stiefel_angle_count",
    "stiefel_columns",
]
