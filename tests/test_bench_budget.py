"""Budget matching: exact counts, every method within ±10% of a LoRA-sized budget, clear errors."""

from __future__ import annotations

import copy

import pytest
from peft import get_peft_model
from torch import nn

import hirank
from hirank.analysis import trainable_parameters
from hirank.bench.budget import BudgetError, count_adapter_parameters, match_budget, parse_budget
from hirank.bench.methods import METHOD_SETS, METHODS, MethodUnavailableError, get_method
from hirank.bench.models import load_model
from hirank.budget import KNOB_SPACES

TARGETS = ["query", "value"]


@pytest.fixture(scope="module")
def bert():
    return load_model("tiny-bert", "classification").model  # hidden 64, 2 layers


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama", "causal_lm").model  # hidden 64, 2 layers, v_proj 64 → 32


@pytest.mark.parametrize("method", METHOD_SETS["default"])  # peers are sized by their own test
@pytest.mark.parametrize(
    "model_name, targets, budget, expected_target",
    [
        ("bert", TARGETS, "lora-r4", 2 * 2 * 4 * (64 + 64)),  # 2 layers × (query, value) × r(in + out)
        ("llama", ["q_proj", "v_proj"], "lora-r8", 2 * 8 * ((64 + 64) + (64 + 32))),  # rectangular v_proj
    ],
)
def test_every_method_matches_a_lora_budget_within_10_percent_or_says_why(
    method: str, model_name: str, targets: list[str], budget: str, expected_target: int, request: pytest.FixtureRequest
) -> None:
    if not METHODS[method].available:
        pytest.skip(f"{method} is not in this build yet")
    model = request.getfixturevalue(model_name)
    target = parse_budget(budget, model, targets)
    assert target == expected_target
    match = match_budget(method, model, target, targets)
    if match.note:  # only degenerate settings (beyond the method's caps) would reach this budget on 64-wide layers
        assert method in ("quanta", "quantum_peft") and "cannot reach" in match.note
        assert match.knobs.get("n_layers", 1) <= 4 and sum(f == 2 for f in match.knobs.get("factors", [])) <= 1
    else:
        assert abs(match.params - target) <= 0.10 * target
    # the reported count is the real one: build the chosen config on a real copy and count
    real = get_peft_model(copy.deepcopy(model), get_method(method).make_config(targets, match.knobs))
    assert trainable_parameters(real) == match.params


class Square(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)


@pytest.mark.parametrize("width", [768, 2048])
def test_budget_matching_keeps_quanta_and_quantum_peft_out_of_degenerate_settings(width: int) -> None:
    model = Square(width)
    target = parse_budget("lora-r8", model, ["proj"])
    quanta = match_budget("quanta", model, target, ["proj"], tolerance=None)
    assert sum(f == 2 for f in quanta.knobs.get("factors", [])) <= 1  # was [16, 6, 2, 2, 2] at 768
    quantum = match_budget("quantum_peft", model, target, ["proj"], tolerance=None)
    assert quantum.knobs["n_layers"] <= 4  # was n_layers=128
    assert quantum.note.startswith("quantum_peft misses") and "kept the nearest natural setting" in quantum.note
    with pytest.raises(BudgetError, match="out of reach for quantum_peft"):  # not even 128 layers reach it
        match_budget("quantum_peft", model, target, ["proj"])


def test_a_budget_only_degenerate_settings_reach_is_matched_naturally_with_a_note(bert) -> None:
    target = parse_budget("lora-r4", bert, TARGETS)
    match = match_budget("quantum_peft", bert, target, TARGETS)
    assert match.knobs == {"rank": 64, "n_layers": 4} and match.params < target
    assert "quantum_peft cannot reach 2,048 parameters with its natural knobs" in match.note
    assert "it would take rank=" in match.note and f"{match.relative_error:+.0%}" in match.note


def test_counting_leaves_the_model_untouched_and_excludes_the_head(bert) -> None:
    before = {name: p.clone() for name, p in bert.state_dict().items()}
    config = get_method("lora").make_config(TARGETS, {"r": 3}, modules_to_save=["classifier"])
    assert count_adapter_parameters(bert, config) == 2 * 2 * 3 * 128
    after = bert.state_dict()
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)
    assert not any("lora" in name for name, _ in bert.named_modules())


def test_closest_setting_wins_and_ties_go_to_the_first(bert) -> None:
    per_rank = 2 * 2 * 128
    assert match_budget("lora", bert, 5 * per_rank + per_rank // 3, TARGETS).knobs["r"] == 5
    assert match_budget("lora", bert, 5 * per_rank + per_rank // 2, TARGETS).knobs["r"] == 5


@pytest.mark.parametrize(
    "budget, expected",
    [("lora-r2", 2 * 2 * 2 * 128), ("1000", 1000), ("2.5k", 2500), ("1m", 1_000_000), ("100%", None)],
)
def test_parse_budget(budget: str, expected, bert) -> None:
    total = sum(p.numel() for p in bert.parameters())
    assert parse_budget(budget, bert, TARGETS) == (expected if expected is not None else total)


@pytest.mark.parametrize("budget", ["", "lora", "r4", "5 k", "%"])
def test_unreadable_budget(budget: str, bert) -> None:
    with pytest.raises(BudgetError, match="cannot read budget"):
        parse_budget(budget, bert, TARGETS)


@pytest.mark.parametrize("budget", ["-5", "0", "0%", "150%", "lora-r0"])
def test_budget_out_of_range_is_not_called_unreadable(budget: str, bert) -> None:
    with pytest.raises(BudgetError, match=f"budget '{budget}' is out of range: "):
        parse_budget(budget, bert, TARGETS)


def test_unreachable_budget_says_what_is_reachable(bert) -> None:
    with pytest.raises(BudgetError) as error:
        match_budget("lora", bert, 100, TARGETS)
    assert "out of reach for lora" in str(error.value)
    assert "512 (r=1, lora_alpha=2, +412%)" in str(error.value) and "±10%" in str(error.value)
    assert match_budget("lora", bert, 100, TARGETS, tolerance=None).knobs["r"] == 1


def test_unknown_or_unavailable_method_lists_available_ones(bert, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MethodUnavailableError, match=r"unknown method 'nosuch'; available methods: lora"):
        match_budget("nosuch", bert, 1000, TARGETS)
    import sys

    import hirank

    monkeypatch.delattr(hirank, "QuantaConfig", raising=False)
    monkeypatch.setitem(sys.modules, "hirank.tuners.quanta", None)  # a build without QuanTA (hirank loads lazily)
    with pytest.raises(
        MethodUnavailableError, match=r"'quanta' is not available in this build .*no hirank.QuantaConfig"
    ):
        get_method("quanta")


def test_match_budget_is_public_in_analysis(bert) -> None:
    import inspect

    import hirank
    from hirank.analysis import DEFAULT_BUDGET_TOLERANCE

    per_rank = 2 * 2 * 128
    assert hirank.analysis.match_budget("lora", bert, 3 * per_rank, TARGETS) == match_budget(
        "lora", bert, 3 * per_rank, TARGETS
    )
    assert inspect.signature(hirank.analysis.match_budget).parameters["tolerance"].default == DEFAULT_BUDGET_TOLERANCE
    with pytest.raises(BudgetError, match="out of reach"):
        hirank.analysis.match_budget("lora", bert, 100, TARGETS)


@pytest.mark.parametrize("method", sorted(set(KNOB_SPACES) - set(METHOD_SETS["default"])))
def test_peft_peers_match_a_lora_budget_exactly_counted(method: str) -> None:
    model = Square(64)
    target = parse_budget("lora-r4", model, ["proj"])
    match = hirank.analysis.match_budget(method, model, target, ["proj"], tolerance=None)
    assert match.note or abs(match.relative_error) <= 0.10
    real = get_peft_model(copy.deepcopy(model), KNOB_SPACES[method].make_config(["proj"], match.knobs))
    assert trainable_parameters(real) == match.params


class MiniLMLayer(nn.Module):
    """The targets of one MiniLM layer (hidden 384 = 2⁷·3), as `hirank compare` adapts them."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.value = nn.Linear(384, 384), nn.Linear(384, 384)


@pytest.mark.parametrize("method", sorted(set(KNOB_SPACES) - set(METHOD_SETS["default"])))
def test_every_peer_runs_at_the_default_budget_with_the_default_tolerance(method: str) -> None:
    """`hirank compare --methods peers` on MiniLM: no peer may stop it at LoRA r=4's count (DoRA and BOFT did:
    DoRA's ranks fall 12.5% either side of it, BOFT's block sizes 6 and 8 too)."""
    model = MiniLMLayer()
    target = parse_budget("lora-r4", model, TARGETS)
    match = match_budget(method, model, target, TARGETS)
    if method == "vera":  # its trainable vectors grow slowly with r: capped at r=1024
        assert "vera cannot reach 6,144 parameters with its natural knobs (r ≤ 1024)" in match.note
    elif match.note:
        assert f"{method} steps over {target:,} parameters (its nearest settings give " in match.note
    else:
        assert abs(match.relative_error) <= 0.10
    if method == "dora":  # a magnitude per output feature: r=3 and r=4 miss by 12.5%
        assert match.knobs["r"] in (3, 4) and abs(match.relative_error) == pytest.approx(0.125)
        assert "6,912 (r=4, lora_alpha=8, +12%)" in match.note and "kept the nearest natural setting" in match.note


def test_a_method_whose_steps_straddle_the_budget_is_still_out_of_reach_beyond_all_its_settings(bert) -> None:
    with pytest.raises(BudgetError, match="out of reach for dora"):
        match_budget("dora", bert, parse_budget("lora-r1", bert, TARGETS) // 2, TARGETS)


def test_quanta_budget_prefers_the_cheaper_of_two_equally_close_factorizations() -> None:
    """At 2048 wide, LoRA r=8's count lies between [16, 8, 4, 4] (−18%) and [16, 8, 8, 2] (+17%): as close, and the
    first runs its circuit with 6% fewer modelled operations (measured 9% faster), so it wins the near tie."""
    model = Square(2048)
    target = parse_budget("lora-r8", model, ["proj"])
    match = match_budget("quanta", model, target, ["proj"], tolerance=None)
    assert match.knobs == {"factors": [16, 8, 4, 4]} and match.params == 26_880
    far = Square(1024)  # [16, 4, 4, 4] and [8, 8, 8, 2] tie in count and cost: the earlier setting stays
    assert match_budget("quanta", far, parse_budget("lora-r8", far, ["proj"]), ["proj"], tolerance=None).knobs == {
        "factors": [16, 4, 4, 4]}
