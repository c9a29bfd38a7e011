"""The timing pass of ``hirank compare`` (``hirank.bench.timing``): side-by-side step times as ratios to LoRA,
resumable, skippable; and the helpers the benchmarks share with it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from hirank.bench import compare as compare_module
from hirank.bench import timing
from hirank.bench.compare import CompareOptions, compare
from hirank.bench.report import build_report
from hirank.bench.timing import TIMING_FILE, saved_activation_bytes, timing_ratios, untimed

from .test_bench_tasks import write_fake_data


def _row(pass_id: str, method: str, seconds: list[float], saved: int, config: str = "h") -> dict:
    return {"pass_id": pass_id, "method": method, "config_hash": config, "seconds": seconds,
            "saved_activation_bytes": saved, "peak_step_bytes": None}


def test_ratios_are_per_round_against_lora_of_the_same_pass() -> None:
    rows = [
        _row("1", "lora", [1.0, 2.0, 1.0], 100),
        _row("1", "quanta", [2.0, 2.0, 3.0], 150),  # per round: 2, 1, 3
        _row("1", "mtlora", [1.0, 1.0, 1.0], 100, config="old"),
        _row("2", "lora", [2.0, 2.0, 2.0], 100),  # a later pass re-times mtlora's new configuration
        _row("2", "mtlora", [3.0, 1.0, 2.0], 50, config="new"),
    ]
    ratios = timing_ratios(rows)
    assert ratios[("quanta", "h")].step == (2.0, 1.0, 3.0) and ratios[("quanta", "h")].activations == 1.5
    assert ratios[("mtlora", "new")].step == (1.0, 0.5, 1.5) and ratios[("mtlora", "new")].activations == 0.5
    assert ratios[("lora", "h")].step == (1.0, 1.0, 1.0) and ratios[("quanta", "h")].peak is None
    assert timing.spread_text(*ratios[("lora", "h")].step) == "1.00"
    assert timing.spread_text(*ratios[("quanta", "h")].step) == "2.00 (1.00–3.00)"
    # what still needs a pass: keys never timed beside the current LoRA
    keys = [("lora", "h"), ("quanta", "h"), ("mtlora", "newer"), ("surm", "h")]
    assert untimed(keys, ("lora", "h"), rows) == [("mtlora", "newer"), ("surm", "h")]
    assert untimed(keys, ("lora", "changed"), rows) == keys  # LoRA's configuration changed: no ratio holds


def test_saved_activation_bytes_counts_activations_not_weights() -> None:
    torch.manual_seed(0)
    linear, x = nn.Linear(8, 4), torch.randn(3, 8)
    # trainable weight: the input (3×8 floats, for the weight gradient) and the output (3×4, for the square)
    assert saved_activation_bytes(lambda: linear(x).square().mean(), linear) == (3 * 8 + 3 * 4) * 4
    linear.requires_grad_(False)
    x.requires_grad_(True)  # frozen: the weight it saves for the input gradient is not counted
    assert saved_activation_bytes(lambda: linear(x).square().mean(), linear) == 3 * 4 * 4


def test_interleaved_rounds_stop_at_the_budget_after_the_minimum() -> None:
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    times = timing.interleaved_seconds(steps, rounds=10, warmup=1, budget_s=0.0, min_rounds=3)
    assert {name: len(seconds) for name, seconds in times.items()} == {"a": 3, "b": 3}
    assert calls == ["a", "b"] * 4  # one warm-up round, then rounds that each run every step once, in turn


def test_timing_pass_is_stored_resumed_and_skippable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("HIRANK_DATA_DIR", str(write_fake_data(tmp_path / "data")))
    options = CompareOptions(
        model="tiny-bert", task="sst2", methods=("lora", "mtlora"), seeds=1, epochs=1, batch_size=8, max_length=32,
        train_limit=16, eval_limit=8, general_text_pairs=16, references=False, out=tmp_path / "out",
    )
    records = compare(options)
    path = options.output_dir() / TIMING_FILE
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["method"] for line in lines] == ["lora", "mtlora"] and len({line["pass_id"] for line in lines}) == 1
    assert {line["config_hash"] for line in lines} == {record["config_hash"] for record in records}
    assert all(len(line["seconds"]) >= timing.MIN_ROUNDS and line["saved_activation_bytes"] > 0 for line in lines)
    assert lines[0]["batch"]["input_ids"][0] == 8  # one training batch of the comparison's batch size
    assert all(record["step_time_s"] > 0 for record in records)  # each run's own time stays in results.jsonl

    table = build_report(options.output_dir())
    header = table.splitlines()[0]
    assert "step ÷ LoRA" in header and "act. mem ÷ LoRA" in header and "step (ms)" not in header
    cells = dict(zip([h.strip() for h in header.split("|")], table.splitlines()[2].split("|"), strict=True))
    assert cells["step ÷ LoRA"].strip() == "1.00" and cells["act. mem ÷ LoRA"].strip() == "1.00"
    assert "timing pass after training" in (options.output_dir() / "report.md").read_text()

    timed = []
    monkeypatch.setattr(compare_module, "timing_pass", lambda *args, **kwargs: timed.append(args[1]))
    compare(options)  # everything timed: no new pass
    assert timed == []
    compare(dataclasses.replace(options, learning_rates={"mtlora": 1e-3}))  # mtlora's configuration changed
    assert [[model.method for model in models] for models in timed] == [["lora", "mtlora"]]

    skipped = dataclasses.replace(options, timing=False, out=tmp_path / "skipped")
    compare(skipped)
    assert not (skipped.output_dir() / TIMING_FILE).exists()
    table = build_report(skipped.output_dir())
    assert "step (ms)" in table.splitlines()[0] and "step ÷ LoRA" not in table
    assert "--no-timing" in (skipped.output_dir() / "report.md").read_text()
