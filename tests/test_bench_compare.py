"""``hirank compare`` end to end on a tiny model and synthetic data: two methods, resume, report, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open

from hirank import cli
from hirank.bench import compare as compare_module
from hirank.bench.compare import CompareError, CompareOptions, compare
from hirank.bench.methods import available_methods
from hirank.bench.report import ACCURACY_PLOT, STEP_TIME_PLOT, build_report
from hirank.bench.results import RESULTS_FILE, load_records

from .test_bench_tasks import write_fake_data

OTHER_METHODS = [name for name in available_methods() if name != "lora"]


def _options(out: Path, methods: tuple[str, ...]) -> CompareOptions:
    return CompareOptions(
        model="tiny-bert",
        task="sst2",
        methods=methods,
        budget="lora-r4",
        seeds=2,
        epochs=2,
        batch_size=8,
        max_length=32,
        train_limit=24,
        eval_limit=16,
        general_text_pairs=32,
        references=False,  # the reference runs have their own test
        out=out,
    )


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = write_fake_data(tmp_path_factory.mktemp("data"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HIRANK_DATA_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, fake_data: Path) -> tuple[CompareOptions, list[dict]]:
    """A finished comparison of LoRA and one hirank method, 2 seeds each (tests must not modify it)."""
    if not OTHER_METHODS:
        pytest.skip("only LoRA is available in this build; a comparison needs a second method")
    options = _options(tmp_path_factory.mktemp("compare") / "out", ("lora", OTHER_METHODS[0]))
    return options, compare(options)


def _copy(options: CompareOptions, folder: Path) -> CompareOptions:
    shutil.copytree(options.output_dir(), folder)
    return dataclasses.replace(options, out=folder)


def test_compare_two_methods_records_every_run(finished: tuple[CompareOptions, list[dict]]) -> None:
    options, records = finished
    assert sorted((r["method"], r["seed"]) for r in records) == sorted(
        (m, s) for m in options.methods for s in range(options.seeds)
    )
    lines = (options.output_dir() / RESULTS_FILE).read_text().splitlines()
    assert [json.loads(line)["run_id"] for line in lines] == [r["run_id"] for r in records]
    for record in records:
        if record["budget_note"]:  # QuanTA: only factors of several 2s reach LoRA r=4 on 64-wide layers
            assert "kept the nearest natural setting" in record["budget_note"]
        else:
            assert abs(record["trainable_params"] - record["target_params"]) <= 0.1 * record["target_params"]
        assert record["trainable_params_per_rank"] == [record["trainable_params"]]
        assert record["head_params"] == 64 * 2 + 2  # BERT classifier 64 → 2, trained and saved too
        assert 0.0 <= record["test_accuracy"] <= 1.0 and len(record["validation_accuracy"]) == options.epochs
        assert record["steps"] == options.epochs * 3  # 24 examples, batch 8
        for key in ("train_time_s", "step_time_s", "peak_memory_mib", "forward_unmerged_s", "forward_base_s"):
            assert record[key] > 0, key
        assert math.isfinite(record["forgetting"])
        assert record["effective_rank_mean"] >= 1  # ΔW moved away from zero
        saved = options.output_dir() / "adapters" / record["run_id"] / "adapter_model.safetensors"
        assert saved.stat().st_size == record["adapter_file_bytes"]
        with safe_open(saved, "pt") as tensors:
            stored = sum(math.prod(tensors.get_slice(key).get_shape()) for key in tensors.keys())
        # adapters and head; a method may also store frozen tensors it needs (QuanTA: its initial gates θ₀)
        assert stored >= record["trainable_params"] + record["head_params"]
    lora = [r for r in records if r["method"] == "lora"]
    assert all(r["knobs"] == {"r": 4, "lora_alpha": 8} and r["trainable_params"] == r["target_params"] for r in lora)
    lora_file = options.output_dir() / "adapters" / lora[0]["run_id"] / "adapter_model.safetensors"
    with safe_open(lora_file, "pt") as tensors:
        assert sum(math.prod(tensors.get_slice(k).get_shape()) for k in tensors.keys()) == 2048 + 130
    assert lora[0]["effective_rank_max"] <= 4


def test_rerun_resumes_only_missing_runs(
    finished: tuple[CompareOptions, list[dict]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options, records = finished
    options = _copy(options, tmp_path / "out")
    results = options.output_dir() / RESULTS_FILE
    trained = []
    real_train = compare_module.train_and_evaluate

    def counting_train(*args, **kwargs):
        trained.append(kwargs.get("description") or args[-1])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(compare_module, "train_and_evaluate", counting_train)
    assert compare(options) == records  # everything finished: nothing runs
    assert trained == []
    # as if the comparison had been killed before its last run was written
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:-1]) + "\n")
    again = compare(options)
    assert len(trained) == 1 and trained[0] == f"{records[-1]['method']} seed {records[-1]['seed']}"
    assert [r["run_id"] for r in again] == [r["run_id"] for r in records]
    # a changed setting is a new configuration: its runs are done, the old ones stay in the file
    changed = dataclasses.replace(options, methods=("lora",), seeds=1, epochs=1)
    assert len(compare(changed)) == 1 and len(load_records(results)) == len(records) + 1


def test_report_rebuild(
    finished: tuple[CompareOptions, list[dict]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    options, records = finished
    folder = _copy(options, tmp_path / "out").output_dir()
    for name in ("report.md", ACCURACY_PLOT, STEP_TIME_PLOT):
        (folder / name).unlink(missing_ok=True)
    assert cli.main(["report", str(folder)]) == 0
    table = capsys.readouterr().out
    assert all((folder / name).stat().st_size > 0 for name in ("report.md", ACCURACY_PLOT, STEP_TIME_PLOT))
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split("|")[1].strip() for row in rows] == list(options.methods)
    assert all(" ± " in row for row in rows)  # two seeds: mean ± std
    assert "**" in table  # best of each ranked column marked
    report = (folder / "report.md").read_text()
    assert table in report
    for note in {record["budget_note"] for record in records if record["budget_note"]}:
        assert f"- {note}" in report


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--task", "sst5"], "unknown task 'sst5'; known tasks: sst2"),
        (["--methods", "lora,nosuch"], "unknown method 'nosuch'; available methods: lora"),
        (["--model", "tiny-llama"], "task sst2 needs a classification model"),
        (["--budget", "12"], "a budget of 12 adapter parameters is out of reach for lora"),
        (["--budget", "lots"], "cannot read budget 'lots'"),
        (["--lr", "dora=1e-3"], "learning rates given for methods not compared: dora"),
    ],
)
def test_cli_errors_are_clear(
    arguments: list[str], message: str, fake_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    command = ["compare", "--model", "tiny-bert", "--methods", "lora", "--out", str(tmp_path / "out"), *arguments]
    assert cli.main(command) == 2
    assert message in capsys.readouterr().err


def test_compare_runs_a_multiple_choice_task_on_a_causal_lm(tmp_path: Path, fake_data: Path) -> None:
    options = CompareOptions(
        model="tiny-llama",
        task="arc_easy",
        methods=("lora",),
        budget="lora-r1",
        seeds=1,
        epochs=1,
        batch_size=8,
        max_length=32,
        train_limit=16,
        eval_limit=8,
        general_text_pairs=16,
        out=tmp_path / "mc",
    )
    zero_shot, record = sorted(compare(options), key=lambda r: r["reference"], reverse=True)
    assert zero_shot["method"] == "zero_shot" and zero_shot["seed"] == 0 and zero_shot["steps"] == 0
    assert zero_shot["trainable_params"] == zero_shot["head_params"] == 0
    assert zero_shot["baseline_kind"] == "chance" and 0 < zero_shot["baseline_accuracy"] < 1
    assert record["target_modules"] == ["q_proj", "v_proj"] and record["head_params"] == 0
    assert record["test_examples"] == 8 and 0.0 <= record["test_accuracy"] <= 1.0
    assert math.isfinite(record["forgetting"]) and record["general_loss_before"] > 0


def test_learning_rate_presets_and_overrides(fake_data: Path) -> None:
    from hirank.bench.methods import METHODS, TUNED_SOURCE

    lora, surm = METHODS["lora"], METHODS["surm"]
    assert CompareOptions().learning_rate(lora) == (lora.learning_rate, TUNED_SOURCE)
    paper = CompareOptions(learning_rate_preset="paper")
    assert paper.learning_rate(lora) == (5e-4, lora.paper_learning_rate_source)
    assert "LoRA paper" in lora.paper_learning_rate_source and paper.learning_rate(surm)[0] == 2e-3
    overridden = CompareOptions(learning_rate_preset="paper", learning_rates={"lora": 1e-2, "*": 3e-3})
    assert overridden.learning_rate(lora) == (1e-2, "command line")
    assert overridden.learning_rate(surm) == (3e-3, "command line")
    with pytest.raises(CompareError, match="unknown learning-rate preset 'fast'; use one of tuned, paper"):
        compare(dataclasses.replace(_options(Path("unused"), ("lora",)), learning_rate_preset="fast"))


def test_reference_rows_and_paired_differences_in_the_report(tmp_path: Path, fake_data: Path) -> None:
    options = dataclasses.replace(
        _options(tmp_path / "refs", ("lora", OTHER_METHODS[0])), seeds=3, epochs=1, train_limit=16, references=True
    )
    records = compare(options)
    head_only = [r for r in records if r["method"] == "head_only"]
    assert sorted(r["seed"] for r in head_only) == [0, 1, 2] and all(r["reference"] for r in head_only)
    assert all(r["trainable_params"] == 0 and r["head_params"] == 64 * 2 + 2 for r in head_only)
    splits = compare_module._splits(compare_module.get_task("sst2"), options)
    train_labels = [example["label"] for example in splits.train]
    majority = max((0, 1), key=train_labels.count)  # the training split's majority class, scored on the test split
    expected = sum(example["label"] == majority for example in splits.test) / len(splits.test)
    assert {(r["baseline_kind"], r["baseline_accuracy"]) for r in records} == {("majority class", expected)}
    report = build_report(options.output_dir())
    text = (options.output_dir() / "report.md").read_text()
    assert "**References:** majority class on the test split" in text and "head only (no adapter)" in text
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert "Δ vs LoRA (95% CI)" in header
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ") and "---" not in line}
    assert "(baseline)" in rows["lora"] and "head_only (reference)" in rows
    other = rows[OTHER_METHODS[0]].split("|")[header.split("|").index(" Δ vs LoRA (95% CI) ")].strip()
    assert other.count("[") == 1 and other.count(",") == 1  # mean [low, high], three seeds


def test_report_says_when_nothing_beats_the_references(tmp_path: Path) -> None:
    from hirank.bench.results import append_record

    folder = tmp_path / "weak"
    base = {"model": "m", "task": "t", "budget": "b", "target_params": 10, "knobs": {}, "status": "finished",
            "baseline_accuracy": 0.6, "baseline_kind": "majority class", "trainable_params": 10}
    for seed, (lora, quanta, head) in enumerate([(0.55, 0.58, 0.62), (0.57, 0.56, 0.61), (0.52, 0.59, 0.6)]):
        for method, accuracy in (("lora", lora), ("quanta", quanta), ("head_only", head)):
            append_record(folder / RESULTS_FILE, {**base, "method": method, "seed": seed, "config_hash": method,
                                                  "run_id": f"{method}-{seed}", "test_accuracy": accuracy,
                                                  "reference": method == "head_only"})
    build_report(folder)
    text = (folder / "report.md").read_text()
    assert "**No adapter method beats the references here**: the best, quanta at 57.7%" in text
    assert "head only (no adapter) 61.0%" in text


def test_peft_peers_compare_as_rows_beside_hirank_methods(tmp_path: Path, fake_data: Path) -> None:
    methods = ("lora", "c3a", "oft", "hira", "quanta")
    options = dataclasses.replace(_options(tmp_path / "peers", methods), seeds=1, epochs=1, train_limit=16)
    records = compare(options)
    assert sorted(r["method"] for r in records) == sorted(methods)
    assert all(abs(r["budget_relative_error"]) <= 0.1 or r.get("budget_note") for r in records)
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["adapter_file_bytes"] > 0 for r in records)
    table = build_report(options.output_dir())
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["lora", "quanta", "c3a", "oft", "hira"]


def test_method_sets_expand() -> None:
    from hirank.bench.methods import PEERS, available_methods

    assert CompareOptions(methods=("peers",)).method_names() == ["lora", *PEERS]
    assert CompareOptions(methods=("all",)).method_names() == available_methods() + list(PEERS)
    assert CompareOptions().method_names() == available_methods() and not set(PEERS) & set(available_methods())


def test_a_method_out_of_the_budgets_reach_stops_a_comparison_unless_it_may_be_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DoRA's smallest setting on tiny-bert (r=1 and its magnitudes) is 50% above LoRA r=1's count: a plain comparison
    refuses before any training; a budget sweep's (``skip_out_of_reach``) leaves DoRA out and says so in
    out_of_reach.json and the report."""
    from hirank.budget import BudgetError

    monkeypatch.setenv("HIRANK_DATA_DIR", str(write_fake_data(tmp_path / "data")))
    options = dataclasses.replace(
        _options(tmp_path / "out", ("lora", "dora")), budget="lora-r1", seeds=1, epochs=1, references=False,
        timing=False,
    )
    with pytest.raises(BudgetError, match="out of reach for dora"):
        compare(options)
    assert not (tmp_path / "out" / RESULTS_FILE).exists()
    records = compare(dataclasses.replace(options, skip_out_of_reach=True))
    assert [record["method"] for record in records] == ["lora"]
    left_out = json.loads((tmp_path / "out" / "out_of_reach.json").read_text())
    assert list(left_out) == ["dora"] and "out of reach for dora" in left_out["dora"]
    build_report(tmp_path / "out")
    assert "- left out: a budget of 512 adapter parameters is out of reach for dora" in (
        tmp_path / "out" / "report.md").read_text()


def test_evaluation_shows_its_progress(capsys: pytest.CaptureFixture) -> None:
    """Scoring a multiple-choice split on an LLM takes minutes on a CPU: it gets a named progress bar."""
    import torch
    from accelerate import Accelerator

    from hirank.bench.train import evaluate

    class EveryOtherRight:
        @staticmethod
        def correct(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
            return batch % 2 == 0

    batches = [torch.arange(4), torch.arange(4, 8)]
    accelerator, model = Accelerator(cpu=True), torch.nn.Linear(2, 2)
    assert evaluate(accelerator, model, EveryOtherRight(), batches, "lora seed 0 validation 1") == 0.5
    assert "lora seed 0 validation 1" in capsys.readouterr().err
    assert evaluate(accelerator, model, EveryOtherRight(), batches) == 0.5
    assert capsys.readouterr().err == ""


def test_the_base_models_general_loss_is_measured_once(
    finished: tuple[CompareOptions, list[dict]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forgetting compares each trained model's loss on general text with the base model's, which is the same for
    every run on one model: measured by the first run, then taken from the records (an LLM's pass is minutes)."""
    from hirank.bench import measure

    options, records = finished
    assert len({r["general_loss_before"] for r in records}) == 1
    options = _copy(options, tmp_path / "out")
    results = options.output_dir() / RESULTS_FILE
    passes = []
    real_loss = measure.contrastive_loss

    def counting_loss(*args, **kwargs):
        passes.append(1)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(measure, "contrastive_loss", counting_loss)
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:-1]) + "\n")  # one run to do, the others recorded
    again = compare(options)
    assert len(passes) == 1  # the trained model's loss only
    assert again[-1]["general_loss_before"] == records[-1]["general_loss_before"]
    assert again[-1]["general_loss_after"] == records[-1]["general_loss_after"]
    results.write_text("")  # every run to do: the first measures the base model, the others reuse it
    passes.clear()
    again = compare(options)
    assert len(passes) == len(records) + 1
    assert [r["general_loss_before"] for r in again] == [r["general_loss_before"] for r in records]
