"""Paired statistics of a comparison: each method against LoRA on the same seeds, and ranks across tasks.

Runs of two methods with the same seed share the data order and the head's initialization, so the per-seed
difference removes that share of the seed-to-seed noise. Its mean gets a Student-t interval over seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

#: Fewer seeds than this give no interval (a t-interval from two differences is too wide to say anything).
MIN_SEEDS_FOR_INTERVAL = 3


@dataclass(frozen=True)
class PairedDifference:
    """Per-seed differences ``method − baseline`` (in the metric's unit) and their mean with a t-interval."""

    differences: tuple[float, ...]
    confidence: float = 0.95

    @property
    def seeds(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences) if self.differences else math.nan

    @property
    def interval(self) -> tuple[float, float] | None:
        """The two-sided t-interval of the mean difference; None with fewer than MIN_SEEDS_FOR_INTERVAL seeds."""
        if self.seeds < MIN_SEEDS_FOR_INTERVAL:
            return None
        half_width = student_t.ppf(0.5 + self.confidence / 2, self.seeds - 1) * statistics.stdev(self.differences)
        half_width /= math.sqrt(self.seeds)
        return self.mean - half_width, self.mean + half_width

    @property
    def verdict(self) -> str:
        """"better" or "worse" when the interval excludes 0, "no difference" when it holds 0, else "not enough seeds"."""
        interval = self.interval
        if interval is None:
            return "not enough seeds"
        if interval[0] > 0:
            return "better"
        if interval[1] < 0:
            return "worse"
        return "no difference"

    def describe(self, scale: float = 1.0, fmt: str = "{:+.1f}") -> str:
        """``+1.2 [−0.3, +2.7] better``-style text for a table cell (values multiplied by ``scale``)."""
        if not self.differences:
            return "—"
        text = fmt.format(self.mean * scale)
        interval = self.interval
        if interval is None:
            return f"{text} (not enough seeds)"
        low, high = (fmt.format(value * scale) for value in interval)
        mark = {"better": " ▲ better", "worse": " ▼ worse"}.get(self.verdict, "")
        return f"{text} [{low}, {high}]{mark}"


def paired_difference(
    values: Mapping[int, float], baseline: Mapping[int, float], confidence: float = 0.95
) -> PairedDifference:
    """The differences ``values[seed] − baseline[seed]`` over the seeds both have."""
    seeds = sorted(set(values) & set(baseline))
    return PairedDifference(tuple(values[seed] - baseline[seed] for seed in seeds), confidence)


def mean_ranks(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean rank of each method over tasks: ``scores[task][method]`` (higher is better) → method → mean rank.

    Rank 1 is the best of a task; tied scores share the mean of their ranks; a method is ranked only on the
    tasks it has a score for.
    """
    ranks: dict[str, list[float]] = {}
    for per_method in scores.values():
        ordered = sorted(per_method.items(), key=lambda item: -item[1])
        position = 0
        while position < len(ordered):
            tied = [name for name, score in ordered if score == ordered[position][1]]
            shared = position + (len(tied) + 1) / 2
            for name in tied:
                ranks.setdefault(name, []).append(shared)
            position += len(tied)
    return {name: statistics.fmean(values) for name, values in ranks.items()}


def seed_values(records: Sequence[Mapping], metric: str) -> dict[int, float]:
    """seed → value of ``metric`` for the records of one row (records without a finite value are left out)."""
    values = {}
    for record in records:
        value = record.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            values[int(record["seed"])] = float(value)
    return values
