"""Quantum-PEFT (Koike-Akino et al., ICLR 2025): Stiefel matrices from a Pauli (RY + CZ) circuit, pure torch.

ΔW = s · U Λ Vᵀ (spec §2.2), where U (d_out×K) and V (d_in×K) have orthonormal columns *by construction*:
each is the first K columns of a real orthogonal N×N "circuit" C(θ) on n = log₂N qubits (spec §2.3):

    one RY on every qubit, then L times [RY on qubits 0…n−2, CZ on (0,1),(2,3),…, RY on qubits 1…n−1,
    CZ on (1,2),(3,4),…]   →   (2L+1)·n − 2L angles,

with RY(θ) = [[cos θ/2, −sin θ/2], [sin θ/2, cos θ/2]] and CZ = diag(1, 1, 1, −1). Reconstruction (the
paper's Eq. 2 was not readable, spec §2.1): this gate order is the one that matches the reviewers' parameter
count; angles are consumed in gate order; qubit 0 is the most significant bit of the row index (the first
axis of the row-major 2×…×2 view).

The K columns are computed as a state of shape (N, K) = C(θ)·I[:, :K]; no N×N matrix is ever formed. By
default the circuit runs in blocks of rotation layers (the RY's between CZ layers), each block a Kronecker product
of two small orthogonal matrices applied as two GEMMs, with a CZ that couples the two halves a ±1 sign per row
(see "the layered simulation" below). Its backward is memory-lean: it saves only the final state and walks the
blocks in reverse (each is orthogonal, so the state before it is Pᵀ times the state after it), so autograd memory
is O(N·K), not O(#gates·N·K).
``memory_lean=False`` applies the gates one by one under plain autograd (RY a 2×2 rotation of one qubit axis of
the (2, …, 2, K) view): the reference the layered path is tested against.

Non-power-of-two N (reconstruction of the paper's QSD split, spec §2.5 option b): N = N₁ + N₂ with
N₁ = 2^⌊log₂N⌋. The columns are the first K columns of the orthogonal matrix diag(C_{N₁}, Q_{N₂}) · G(φ), where
C_{N₁} is the circuit above, Q_{N₂} the same construction recursively, and G(φ) rotates basis pairs
(j, N₁ + j) by RY(φ_j), a "cosine–sine" coupling. Only the min(K, N₂) couplings that touch the first K basis
vectors are parameterized. UᵀU = I holds exactly; nothing is padded or cropped.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

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
    rotated = torch.stack((torch.addcmul(cos * zero, sin, one, value=-1), torch.addcmul(cos * one, sin, zero)), -2)
    return rotated.view(state.shape)


def _run_circuit(state: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_qubits: int, n_layers: int) -> torch.Tensor:
    """Apply the circuit gate by gate to state (..., N, K); cos/sin (..., P) of the half angles (the plain-autograd
    path, ``memory_lean=False``, and the reference the layered path is tested against)."""
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


# ---- the layered simulation (the default): blocks of rotation layers as two GEMMs ------------------------------
# The RY's between two CZ layers act on distinct qubits or compose on one (RY(a)·RY(b) = RY(a+b), e.g. the first
# RY on every qubit and the layer's first RY on qubits 0…n−2), so each such "rotation layer" is ⊗_q RY(φ_q) with
# φ_q the sum of its angles on qubit q (0 for an idle qubit). Split at qubit h, it is A_top ⊗ A_low
# (2^h × 2^h and 2^(n−h) × 2^(n−h)). A CZ layer without the pair (h−1, h) is D_top ⊗ D_low (signs), so the layers
# between two CZ layers *with* that pair compose into one Kronecker pair, a "block": P_top ⊗ P_low with
# P = D_k A_k ⋯ D_1 A_1. h = 2⌊(n+1)/4⌋ is even and near n/2, so only CZ(1) has the pair (h−1, h) and the blocks
# are the rotation layers in pairs (4 blocks for L = 4, the first one free, instead of 8 layers). The state is kept as
# (B, 2^h, K, 2^(n−h)): the column index between the two qubit groups, the low group's qubits ordered n−1, h, …,
# n−2. P_top is one GEMM from the left on the (2^h, K·2^(n−h)) view and P_low one from the right on the
# (2^h·K, 2^(n−h)) view; the first block on I[:, :K] is an outer product; a CZ with the pair (h−1, h) is one ±1
# multiply. Angle gradient of layer i from the state S_i after its A_i (before its CZ) and the gradient G_i there:
# with dRY/dθ = ½ J RY, J = [[0, −1], [1, 0]], dLoss/dφ_q = ½ ⟨G_i, J_q S_i⟩ = ½ Σ_{r: bit_q(r)=1}
# (M_i[r, r⊕b_q] − M_i[r⊕b_q, r]) with M_i = G_i·S_iᵀ over the group of qubit q. Only the block's output is
# visited by the reverse walk; since S_out = Q S_i with Q = Q_top ⊗ Q_low orthogonal (the factors after A_i),
# M_i = Q_topᵀ M_out Q_top (the other group's factor cancels): small-matrix products, not passes over the state.
# Merged angles share their φ's gradient.


@dataclass(frozen=True)
class _LayerPlan:
    """The circuit of (n_qubits, n_layers) as rotation layers, each followed by a CZ layer or nothing."""

    n_qubits: int
    split: int  # h: qubits 0…h−1 form the top group, h…n−1 the low group
    slot_of_angle: torch.Tensor  # (P,) long: angle i rotates qubit q of rotation layer l, slot l·n + q
    cz_after: tuple[int | None, ...]  # parity of the CZ layer after each rotation layer (None: no CZ)
    straddles: tuple[bool, ...]  # per layer: its CZ has the pair (h−1, h) (applied as a ±1 multiply)
    blocks: tuple[tuple[int, ...], ...]  # rotation layers composed into one Kronecker pair
    top_pairs: tuple[torch.Tensor, torch.Tensor]  # (h, 2^(h−1)) rows r with bit_q(r)=1 and their partners r⊕b_q
    low_pairs: tuple[torch.Tensor, torch.Tensor]  # the same within the low group, in its layout order
    low_order: tuple[int, ...]  # layout index of each low index in natural order (its last bit moved first)
    low_source: tuple[int, ...]  # natural low index of each layout index (the inverse of low_order)

    @property
    def rotation_layers(self) -> int:
        return len(self.cz_after)


def _bit_pairs(group_qubits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each qubit i of a group (i = 0 most significant): the indices with its bit set, and those with it cleared."""
    masks = [1 << (group_qubits - 1 - i) for i in range(group_qubits)]
    rows = [[r for r in range(1 << group_qubits) if r & mask] for mask in masks]
    partners = [[r ^ mask for r in row] for row, mask in zip(rows, masks)]
    shape = (group_qubits, (1 << group_qubits) // 2)
    return torch.tensor(rows, dtype=torch.long).view(shape), torch.tensor(partners, dtype=torch.long).view(shape)


def _last_bit_first(bits: int) -> tuple[int, ...]:
    """Each index of ``bits`` bits with its least significant bit moved to the most significant place."""
    return tuple(((index & 1) << (bits - 1)) | (index >> 1) for index in range(1 << bits)) if bits else (0,)


@functools.lru_cache(maxsize=None)
def _layer_plan(n_qubits: int, n_layers: int) -> _LayerPlan:
    slots: list[int] = []
    cz_after: list[int | None] = []
    for kind, arg in circuit_gates(n_qubits, n_layers):
        if kind == "ry":
            slots.append(len(cz_after) * n_qubits + arg)
        else:
            cz_after.append(arg)
    if not cz_after or slots[-1] >= len(cz_after) * n_qubits:  # rotations after the last CZ: one more layer
        cz_after.append(None)
    split = 2 * ((n_qubits + 1) // 4)  # even: see the comment above
    # CZ(p) acts on the pairs (p, p+1), (p+2, p+3), …: it holds (h−1, h) when h−1 ≥ p has p's parity
    straddles = tuple(p is not None and split >= 1 and split - 1 >= p and (split - 1 - p) % 2 == 0 for p in cz_after)
    blocks: list[list[int]] = [[]]
    for layer, straddling in enumerate(straddles):
        blocks[-1].append(layer)
        if straddling and layer + 1 < len(straddles):
            blocks.append([])
    order = _last_bit_first(n_qubits - split)
    return _LayerPlan(n_qubits, split, torch.tensor(slots, dtype=torch.long), tuple(cz_after), straddles,
                      tuple(tuple(block) for block in blocks), _bit_pairs(split), _bit_pairs(n_qubits - split),
                      order, tuple(order.index(i) for i in range(len(order))))


def _kron_rotations(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """⊗_i RY_i for half-angle cos, sin (..., g) → (..., 2^g, 2^g); factor 0 acts on the most significant bit."""
    matrix = torch.ones(*cos.shape[:-1], 1, 1, dtype=cos.dtype, device=cos.device)
    for c, s in zip(cos.unbind(-1), sin.unbind(-1)):
        rotation = torch.stack((torch.stack((c, -s), -1), torch.stack((s, c), -1)), -2)  # (..., 2, 2)
        size = matrix.shape[-1] * 2
        matrix = (matrix[..., :, None, :, None] * rotation[..., None, :, None, :]).reshape(*cos.shape[:-1], size, size)
    return matrix


def _layer_matrices(angles: torch.Tensor, plan: _LayerPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """A_top (layers, B, 2^h, 2^h) and A_low (layers, B, 2^(n−h), 2^(n−h)) of each rotation layer, in the state
    layout; angles (B, P)."""
    n, split = plan.n_qubits, plan.split
    slots = plan.slot_of_angle.to(angles.device)
    phi = angles.new_zeros(angles.shape[0], plan.rotation_layers * n).index_add_(1, slots, angles)
    half = (phi / 2).view(angles.shape[0], plan.rotation_layers, n).transpose(0, 1)  # (layers, B, n)
    cos, sin = half.cos(), half.sin()
    low_cos, low_sin = cos[..., split:].roll(1, -1), sin[..., split:].roll(1, -1)  # layout order n−1, h, …, n−2
    return _kron_rotations(cos[..., :split], sin[..., :split]), _kron_rotations(low_cos, low_sin)


_Signs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ±1 as (2^h, 1, 2^(n−h)) and its top / low factors


def _layer_signs(plan: _LayerPlan, device: torch.device, dtype: torch.dtype) -> list[_Signs | None]:
    """The CZ after each rotation layer in the state layout, or None; the factors (2^h,) and (2^(n−h),) are what
    it is when it does not straddle the split (sign[t, l] = sign[t, 0]·sign[0, l], sign[0, 0] = 1)."""
    low = 1 << (plan.n_qubits - plan.split)
    source = torch.tensor(plan.low_source, device=device)
    signs: list[_Signs | None] = []
    for parity in plan.cz_after:
        if parity is None:
            signs.append(None)
            continue
        full = _cz_signs(plan.n_qubits, parity, device, dtype).view(-1, low)[:, source]
        signs.append((full.unsqueeze(1), full[:, 0], full[0, :]))
    return signs


def _block_matrices(a_top: torch.Tensor, a_low: torch.Tensor, signs: list[_Signs | None],
                    plan: _LayerPlan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(P_top, P_low) (B, G, G) of each block: P = D_k A_k ⋯ D_1 A_1, D the CZ signs that do not straddle."""
    products = []
    for block in plan.blocks:
        top, low = a_top[block[0]], a_low[block[0]]
        for layer in block:
            if layer != block[0]:
                top, low = a_top[layer] @ top, a_low[layer] @ low
            if signs[layer] is not None and not plan.straddles[layer]:
                top, low = top * signs[layer][1][:, None], low * signs[layer][2][:, None]
        products.append((top, low))
    return products


def _layout_views(plan: _LayerPlan, batch: int, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes (B, 2^h, 2^(n−h−1), 2, K) of the natural (B, N, K) and (B, 2^h, K, 2, 2^(n−h−1)) of the state layout:
    permute(0, 1, 4, 3, 2) maps either to the other (qubit n−1 is the 2)."""
    low = 1 << (plan.n_qubits - plan.split)
    pair = min(low, 2)
    return (batch, 1 << plan.split, low // pair, pair, rank), (batch, 1 << plan.split, rank, pair, low // pair)


def _without_autocast(function):
    """Run a circuit computation in the angles' own dtype even under autocast (mixed-precision training): its
    in-place products (``out=``) reject autocast's bf16 results, and bf16 would round U away from orthonormal."""

    @functools.wraps(function)
    def in_own_dtype(angles: torch.Tensor, *args):
        with torch.autocast(angles.device.type, enabled=False):
            return function(angles, *args)

    return in_own_dtype


@_without_autocast
def _layered_forward(angles: torch.Tensor, plan: _LayerPlan, rank: int) -> torch.Tensor:
    """Circuit columns (B, N, K) from angles (B, P), no autograd."""
    batch, top, low = angles.shape[0], 1 << plan.split, 1 << (plan.n_qubits - plan.split)
    a_top, a_low = _layer_matrices(angles, plan)
    signs = _layer_signs(plan, angles.device, angles.dtype)
    blocks = _block_matrices(a_top, a_low, signs, plan)
    # the first block on I[:, :K]: column k = (k // low, k % low) of P_top ⊗ P_low, an outer product
    column = torch.arange(rank, device=angles.device)
    low_column = torch.tensor(plan.low_order, device=angles.device)[column % low]
    first_top, first_low = blocks[0]
    state = (first_top[:, :, column // low, None] * first_low[:, None, :, low_column].transpose(-1, -2)).contiguous()
    spare = torch.empty_like(state)  # GEMMs write into two alternating buffers: no fresh N·K allocation per block
    for index, (block, (p_top, p_low)) in enumerate(zip(plan.blocks, blocks)):  # state: (B, 2^h, K, 2^(n−h))
        if index > 0:
            torch.bmm(p_top, state.view(batch, top, -1), out=spare.view(batch, top, -1))
            torch.bmm(spare.view(batch, -1, low), p_low.mT.contiguous(), out=state.view(batch, -1, low))
        if plan.straddles[block[-1]]:
            state.mul_(signs[block[-1]][0])
    _, layout = _layout_views(plan, batch, rank)
    return state.view(layout).permute(0, 1, 4, 3, 2).reshape(batch, top * low, rank)


@_without_autocast
def _layered_backward(angles: torch.Tensor, columns: torch.Tensor, grad: torch.Tensor, plan: _LayerPlan) -> torch.Tensor:
    """dLoss/dangles (B, P) from the output columns (B, N, K) and their gradient: the reverse walk over the blocks
    (each is orthogonal, so the state before it is Pᵀ times the state after it); memory O(N·K) besides the small
    matrices."""
    batch, rank = columns.shape[0], columns.shape[-1]
    top, low = 1 << plan.split, 1 << (plan.n_qubits - plan.split)
    a_top, a_low = _layer_matrices(angles, plan)
    signs = _layer_signs(plan, angles.device, angles.dtype)
    blocks = _block_matrices(a_top, a_low, signs, plan)
    # both[0]: the state after the current block, both[1]: dLoss/d(that state); layout (2, B, 2^h, K, 2^(n−h))
    both = columns.new_empty(2, batch, top, rank, low)
    natural, layout = _layout_views(plan, batch, rank)
    for slot, tensor in zip(both.unbind(0), (columns, grad)):
        slot.view(layout).copy_(tensor.view(natural).permute(0, 1, 4, 3, 2))
    spare = torch.empty_like(both)
    m_top: list[torch.Tensor | None] = [None] * plan.rotation_layers
    m_low: list[torch.Tensor | None] = [None] * plan.rotation_layers
    for index in reversed(range(len(plan.blocks))):
        block, (p_top, p_low) = plan.blocks[index], blocks[index]
        if plan.straddles[block[-1]]:  # CZ is its own inverse and transpose
            both.mul_(signs[block[-1]][0])
        state, grad_state = both.unbind(0)
        out_top = torch.bmm(grad_state.view(batch, top, -1), state.view(batch, top, -1).mT)  # M = G·Sᵀ
        out_low = torch.bmm(grad_state.view(batch, -1, low).mT, state.view(batch, -1, low))
        for layer in reversed(block):  # M of each layer: after its A, before its CZ (Qᵀ M Q, see above)
            if layer != block[-1]:
                out_top = a_top[layer + 1].mT @ out_top @ a_top[layer + 1]
                out_low = a_low[layer + 1].mT @ out_low @ a_low[layer + 1]
            if signs[layer] is not None and not plan.straddles[layer]:  # D M D
                d_top, d_low = signs[layer][1], signs[layer][2]
                out_top, out_low = out_top * (d_top[:, None] * d_top), out_low * (d_low[:, None] * d_low)
            m_top[layer], m_low[layer] = out_top, out_low
        if index > 0:  # the state and gradient before the block (not needed before the first one)
            torch.matmul(p_top.mT.contiguous(), both.view(2, batch, top, -1), out=spare.view(2, batch, top, -1))
            torch.matmul(spare.view(2, batch, -1, low), p_low, out=both.view(2, batch, -1, low))
    low_sums = _pair_sums(torch.stack(m_low), plan.low_pairs).roll(-1, -1)  # back to qubits h…n−1
    per_qubit = torch.cat((_pair_sums(torch.stack(m_top), plan.top_pairs), low_sums), -1)  # (layers, B, n)
    return per_qubit.transpose(0, 1).reshape(batch, -1)[:, plan.slot_of_angle.to(angles.device)]


def _pair_sums(m: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """½ Σ_{r: bit_i(r)=1} (M[r, r⊕b_i] − M[r⊕b_i, r]) for each qubit i of a group: (..., G, G) → (..., g)."""
    rows, partners = (index.to(m.device) for index in pairs)
    return 0.5 * (m[..., rows, partners] - m[..., partners, rows]).sum(-1)


def _flat_batch(angles: torch.Tensor) -> torch.Tensor:
    """(..., P) → (B, P), also for P = 0."""
    return angles.reshape(math.prod(angles.shape[:-1]), angles.shape[-1])


class _LeanCircuit(torch.autograd.Function):
    """The layered circuit with a reverse-walk backward: saves the output state only (O(N·K) memory)."""

    @staticmethod
    def forward(ctx, angles: torch.Tensor, n_qubits: int, n_layers: int, rank: int) -> torch.Tensor:
        plan = _layer_plan(n_qubits, n_layers)
        columns = _layered_forward(_flat_batch(angles), plan, rank)
        columns = columns.view(*angles.shape[:-1], *columns.shape[-2:])
        ctx.save_for_backward(angles, columns)
        ctx.plan = plan
        return columns

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_columns: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        angles, columns = ctx.saved_tensors
        flat = _flat_batch(angles)
        size = columns.shape[-2:]
        grad = grad_columns.to(columns.dtype).reshape(-1, *size)
        grad_angles = _layered_backward(flat, columns.reshape(-1, *size), grad, ctx.plan)
        return grad_angles.view(angles.shape), None, None, None


def pauli_circuit_columns(angles: torch.Tensor, n_qubits: int, n_layers: int, rank: int,
                          memory_lean: bool = True) -> torch.Tensor:
    """First ``rank`` columns of the circuit C(θ): angles (..., (2L+1)n − 2L) → (..., 2ⁿ, rank).

    ``memory_lean=False`` applies the gates one by one under plain autograd (stores every intermediate state).
    """
    expected = pauli_angle_count(n_qubits, n_layers)
    if angles.shape[-1] != expected:
        raise ValueError(f"{n_qubits} qubits and {n_layers} layers need {expected} angles, got {angles.shape[-1]}")
    _check_dims(1 << n_qubits, rank)
    if not (angles.requires_grad and torch.is_grad_enabled()):
        columns = _layered_forward(_flat_batch(angles), _layer_plan(n_qubits, n_layers), rank)
        return columns.view(*angles.shape[:-1], *columns.shape[-2:])
    if memory_lean:
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
