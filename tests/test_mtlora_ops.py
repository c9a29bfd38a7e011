"""Math of MTLoRA (hirank.ops.mtlora), in float64 where exactness is claimed (spec §1.2, §1.3)."""

from __future__ import annotations

import pytest
import torch

from hirank.ops import mtlora

R, D_IN, D_OUT = 5, 12, 7


def _factors(seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=generator, dtype=torch.float64)
                 for shape in ((R, D_IN), (D_OUT, R), (R, R), (R, R)))


@pytest.mark.parametrize("variant, expected", [
    ("shim", lambda C, D: C),
    ("icfm", lambda C, D: C @ C.T),
    ("ctcm", lambda C, D: C @ D),
    ("dtsm", lambda C, D: C + D),
])
def test_transformation_per_variant(variant, expected):
    _, _, C, D = _factors()
    torch.testing.assert_close(mtlora.transformation(variant, C, D), expected(C, D), rtol=0, atol=1e-14)


def test_icfm_is_symmetric_positive_semidefinite():
    _, _, C, _ = _factors()
    T = mtlora.transformation("icfm", C)
    torch.testing.assert_close(T, T.T, rtol=0, atol=1e-14)
    assert torch.linalg.eigvalsh(T).min() > -1e-12


@pytest.mark.parametrize("variant", mtlora.VARIANTS)
def test_factored_forward_equals_dense_delta(variant):
    A, B, C, D = _factors()
    T = mtlora.transformation(variant, C, D)
    x = torch.randn(3, 4, D_IN, dtype=torch.float64)
    delta = mtlora.delta_weight(A, B, T, scaling=1.5)
    torch.testing.assert_close(delta, 1.5 * B @ T @ A, rtol=0, atol=1e-12)
    torch.testing.assert_close(mtlora.forward(x, A, B, T, 1.5), x @ delta.T, rtol=0, atol=1e-12)


def test_rank_of_delta_is_at_most_r():
    A, B, C, D = _factors()
    delta = mtlora.delta_weight(A, B, mtlora.transformation("ctcm", C, D), 1.0)
    assert torch.linalg.matrix_rank(delta) == min(R, D_OUT)  # D_OUT < R here: full rank, never more than r


@pytest.mark.parametrize("variant", mtlora.VARIANTS)
def test_identity_init_gives_identity_transformation(variant):
    C, D = mtlora.initial_factors(variant, "identity", R, torch.float64)
    assert (D is not None) == (variant in mtlora.TWO_FACTOR_VARIANTS)
    torch.testing.assert_close(mtlora.transformation(variant, C, D), torch.eye(R, dtype=torch.float64))


@pytest.mark.parametrize("variant", mtlora.VARIANTS)
def test_random_and_zero_inits(variant):
    torch.manual_seed(0)
    C, D = mtlora.initial_factors(variant, "random", R)
    assert C.abs().max() <= R**-0.5 and not torch.equal(C, torch.eye(R))
    assert D is None or not torch.equal(C, D)
    C, D = mtlora.initial_factors(variant, "zeros", R)
    assert not mtlora.transformation(variant, C, D).any()


def _grads_at_zero_T(variant: str) -> dict[str, torch.Tensor]:
    """Gradients of a loss through s·B T A x at C = D = 0 with random A and B (the LLaVA recipe)."""
    A, B, _, _ = _factors()
    C, D = mtlora.initial_factors(variant, "zeros", R, torch.float64)
    factors = {"A": A, "B": B, "C": C, **({"D": D} if D is not None else {})}
    for tensor in factors.values():
        tensor.requires_grad_()
    x = torch.randn(6, D_IN, dtype=torch.float64)
    mtlora.forward(x, A, B, mtlora.transformation(variant, C, D), 2.0).sin().sum().backward()
    return {name: tensor.grad for name, tensor in factors.items()}


@pytest.mark.parametrize("variant", ["icfm", "ctcm"])
def test_zero_T_is_a_dead_saddle_for_icfm_and_ctcm(variant):
    """Spec §1.3: at C = D = 0 every gradient is exactly zero, so MTLoRAConfig refuses this init."""
    assert all(not grad.any() for grad in _grads_at_zero_T(variant).values())


@pytest.mark.parametrize("variant", ["shim", "dtsm"])
def test_zero_T_still_trains_shim_and_dtsm(variant):
    grads = _grads_at_zero_T(variant)
    assert grads["C"].abs().sum() > 0 and not grads["A"].any() and not grads["B"].any()


def test_unknown_variant_and_init_raise():
    with pytest.raises(ValueError, match="unknown MTLoRA variant 'svd'"):
        mtlora.transformation("svd", torch.eye(2), torch.eye(2))
    with pytest.raises(ValueError, match="unknown init_T 'ones'"):
        mtlora.initial_factors("shim", "ones", 2)
    with pytest.raises(ValueError, match="needs the second factor D"):
        mtlora.transformation("ctcm", torch.eye(2))
