import math

import pytest

from hirank.bench.stats import PairedDifference, mean_ranks, paired_difference, seed_values


def test_paired_difference_uses_only_the_shared_seeds_and_the_t_interval():
    difference = paired_difference({0: 0.80, 1: 0.82, 2: 0.84, 3: 0.5}, {0: 0.78, 1: 0.80, 2: 0.81})
    assert difference.differences == pytest.approx((0.02, 0.02, 0.03))
    mean = 0.07 / 3
    sd = math.sqrt(((0.02 - mean) ** 2 * 2 + (0.03 - mean) ** 2) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2}
    low, high = difference.interval
    assert (low, high) == pytest.approx((mean - half, mean + half))
    assert difference.verdict == "better"  # every seed gained, interval above 0


def test_verdicts():
    assert PairedDifference((-0.03, -0.02, -0.025)).verdict == "worse"
    assert PairedDifference((0.05, -0.04, 0.01)).verdict == "no difference"
    assert PairedDifference((0.05, 0.04)).verdict == "not enough seeds"
    assert PairedDifference((0.05, 0.04)).interval is None
    assert "not enough seeds" in PairedDifference((0.05, 0.04)).describe(100)
    assert PairedDifference((-0.03, -0.02, -0.025)).describe(100).endswith("▼ worse")
    assert PairedDifference(()).describe() == "—"


def test_mean_ranks_share_ties_and_skip_missing_tasks():
    scores = {"sst2": {"lora": 0.8, "quanta": 0.9, "surm": 0.8}, "rte": {"lora": 0.6, "quanta": 0.5}}
    assert mean_ranks(scores) == {"quanta": 1.5, "lora": 1.75, "surm": 2.5}


def test_seed_values_drop_non_finite_and_non_numeric():
    records = [{"seed": 0, "a": 0.5}, {"seed": 1, "a": float("nan")}, {"seed": 2, "a": "x"}, {"seed": 3}]
    assert seed_values(records, "a") == {0: 0.5}
