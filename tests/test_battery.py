"""The invariant battery (DESIGN.md items 1-12) on every method case × tiny model."""

from __future__ import annotations

import pytest
import torch

from tests import invariants
from tests.cases import CASES, MethodCase
from tests.tiny_models import AWKWARD_MODEL, RESIZED_MLP, TINY_MODELS, TinyModel

MODELS = list(TINY_MODELS.values())


def _pairs() -> list:
    return [
        pytest.param(case, tiny, id=f"{case.id}-{tiny.name}")
        for case in CASES
        for tiny in MODELS
    ]


def _skip_unless_mergeable(case: MethodCase) -> None:
    if not case.mergeable:
        pytest.skip(f"{case.id} is not mergeable; its own tests cover merge raising a clear error")


@pytest.mark.parametrize("case, tiny", _pairs())
class TestInvariants:
    def test_1_identity_at_init(self, case: MethodCase, tiny: TinyModel) -> None:
        invariants.check_identity_at_init(case, tiny)

    def test_2_non_identity_init_changes_output(self, case: MethodCase, tiny: TinyModel) -> None:
        invariants.check_non_identity_init_changes_output(case, tiny)

    def test_3_forward_matches_dense_delta(self, case: MethodCase, tiny: TinyModel) -> None:
        _skip_unless_mergeable(case)
        invariants.check_forward_matches_dense_delta(case, tiny)

    def test_4_merge_unmerge(self, case: MethodCase, tiny: TinyModel) -> None:
        _skip_unless_mergeable(case)
        invariants.check_merge_unmerge(case, tiny)

    def test_5_save_load_round_trip(self, case: MethodCase, tiny: TinyModel, tmp_path) -> None:
        invariants.check_save_load_round_trip(case, tiny, tmp_path)

    def test_6_only_adapters_train(self, case: MethodCase, tiny: TinyModel) -> None:
        invariants.check_only_adapters_train(case, tiny)

    def test_7_several_adapters(self, case: MethodCase, tiny: TinyModel) -> None:
        invariants.check_several_adapters(case, tiny)

    def test_8_parameter_count(self, case: MethodCase, tiny: TinyModel) -> None:
        invariants.check_parameter_count(case, tiny)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    def test_9_half_precision_base(self, case: MethodCase, tiny: TinyModel, dtype: torch.dtype) -> None:
        invariants.check_half_precision_base(case, tiny, dtype)

    def test_10_unsupported_layer_raises(self, case: MethodCase, tiny: TinyModel) -> None:
        invariants.check_unsupported_layer_raises(case, tiny)

    def test_10_unknown_target_raises(self, case: MethodCase, tiny: TinyModel) -> None:
        if not case.strict_targets:
            pytest.skip(f"{case.id} is peft's own method, which skips unmatched targets silently")
        invariants.check_unknown_target_raises(case, tiny)

    def test_11_batch_independence(self, case: MethodCase, tiny: TinyModel) -> None:
        invariants.check_batch_independence(case, tiny)

    def test_12_teardown(self, case: MethodCase, tiny: TinyModel) -> None:
        invariants.check_teardown(case, tiny)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_10_mismatched_adapter_load_raises(case: MethodCase, tmp_path) -> None:
    invariants.check_mismatched_adapter_load_raises(case, TINY_MODELS["mlp"], RESIZED_MLP, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_awkward_size_works_or_raises_clearly(case: MethodCase) -> None:
    """A prime width (61) must either be served correctly or rejected naming the module."""
    try:
        invariants.check_identity_at_init(case, AWKWARD_MODEL)
    except (TypeError, ValueError) as error:
        assert "lin0" in str(error) or "lin1" in str(error), f"error does not name the module: {error}"
        return
    if case.mergeable:
        invariants.check_forward_matches_dense_delta(case, AWKWARD_MODEL)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(case: MethodCase) -> None:
    """A batch of no samples (a data pipeline's empty last batch) runs forward and backward: an empty output and
    no gradient but 0 (the chunked passes gathered their output from no chunk; the circulant's FFT rejected it)."""
    tiny = TINY_MODELS["mlp"]
    model = invariants.make_peft(case, tiny, init_weights=False)
    x = torch.randn(0, 5, 64, requires_grad=True)
    out = tiny.output(model, {"x": x})
    assert out.shape[0] == 0 and out.shape[1:] == tiny.output(model, tiny.inputs()).shape[1:]
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is None or not g.any() for g in grads)
