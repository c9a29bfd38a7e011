"""``hirank suite``: a tiny suite of two comparisons into one folder, one report, resumable."""

from __future__ import annotations

from pathlib import Path

import pytest

from hirank.bench import compare as compare_module
from hirank.bench.compare import CompareOptions
from hirank.bench.suite import SUITE_REPORT, UnknownSuiteError, get_suite, run_suite

from .test_bench_tasks import write_fake_data


def test_tiny_suite_runs_every_task_into_one_report_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HIRANK_DATA_DIR", str(write_fake_data(tmp_path / "data")))
    other = "mtlora"  # reaches LoRA r=4's budget on both tiny models
    base = CompareOptions(methods=("lora", other), seeds=1, general_text_pairs=16)
    suite = get_suite("tiny")
    text = run_suite(suite, base, tmp_path / "suite")
    assert text == (tmp_path / "suite" / SUITE_REPORT).read_text()
    for entry in suite.entries:
        assert (tmp_path / "suite" / entry.folder_name / "report.md").exists()
        assert f"## {entry.task} ({entry.model}" in text
    overall = text.split("## Overall")[1].split("##")[0]
    rows = {line.split("|")[1].strip(): line for line in overall.splitlines() if line.startswith("| ")}
    assert {"lora", other, "head_only", "zero_shot"} <= set(rows)
    assert rows["lora"].split("|")[2].strip() == "2"  # LoRA ran on both tasks
    assert rows["lora"].split("|")[5].strip() == "(baseline)"
    assert rows["lora"].split("|")[7].strip() == "1.00"  # its own step-time ratio

    trained = []
    monkeypatch.setattr(compare_module, "train_and_evaluate", lambda *a, **k: trained.append(a) or None)
    run_suite(suite, base, tmp_path / "suite")  # everything recorded: nothing trains again
    assert trained == []


def test_a_suite_compares_its_own_methods_unless_told_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hirank.bench import suite as suite_module

    compared: list[tuple[str, ...] | None] = []
    monkeypatch.setattr(suite_module, "compare", lambda options: compared.append(options.methods))
    monkeypatch.setattr(suite_module, "build_report", lambda folder: None)
    monkeypatch.setattr(suite_module, "build_suite_report", lambda suite, folder: "")
    peers = get_suite("sst2-peers")
    run_suite(peers, CompareOptions(), tmp_path / "peers")
    run_suite(peers, CompareOptions(methods=("lora", "dora")), tmp_path / "two")
    run_suite(get_suite("glue-small"), CompareOptions(), tmp_path / "glue")
    assert compared == [("all",), ("lora", "dora"), *[None] * len(get_suite("glue-small").entries)]
    assert set(CompareOptions(methods=("all",)).method_names()) >= {"lora", "quanta", "surm", "dora", "boft", "hira"}


def test_unknown_suite_names_the_known_ones() -> None:
    with pytest.raises(UnknownSuiteError, match="known suites: glue-small, commonsense, sst2-budgets, sst2-peers, tiny"):
        get_suite("glue")


def test_cli_suite_and_list(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from hirank import cli

    assert cli.main(["suite", "nosuch", "--out", str(tmp_path / "s")]) == 2
    assert "unknown suite 'nosuch'; known suites: glue-small, commonsense, sst2-budgets, sst2-peers, tiny" in capsys.readouterr().err
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "peers = lora,dora,vera,c3a,fourierft,lokr,oft,boft,hira,randlora" in listed
    assert "  c3a " in listed and "lr 0.05 (tuned: best of 2e-3, 5e-3, 2e-2, 5e-2, 1e-1, 2e-1" in listed and "glue-small   minilm/sst2, minilm/mrpc, minilm/rte" in listed


def test_a_control_entry_is_reported_but_left_out_of_the_overall_table(tmp_path: Path) -> None:
    from hirank.bench.results import RESULTS_FILE, append_record
    from hirank.bench.suite import Suite, SuiteEntry, build_suite_report

    suite = Suite("s", "two tasks", (SuiteEntry("m", "sst2"), SuiteEntry("m", "rte", control="not learned")))
    base = {"model": "m", "budget": "b", "target_params": 10, "knobs": {}, "status": "finished", "trainable_params": 10}
    for entry, (lora, quanta) in zip(suite.entries, [(0.8, 0.7), (0.4, 0.6)], strict=True):
        for method, accuracy in (("lora", lora), ("quanta", quanta)):
            append_record(tmp_path / entry.folder_name / RESULTS_FILE,
                          {**base, "task": entry.task, "method": method, "seed": 0, "config_hash": method,
                           "test_accuracy": accuracy})
    text = build_suite_report(suite, tmp_path)
    overall = text.split("## Overall")[1].split("\n## ")[0]
    rows = {line.split("|")[1].strip(): line.split("|") for line in overall.splitlines() if line.startswith("| ")}
    # only SST-2 counts: LoRA first with 80.0%, quanta second (on RTE, quanta would have won)
    assert [cell.strip() for cell in rows["lora"][2:5]] == ["1", "80.0", "1.00"]
    assert [cell.strip() for cell in rows["quanta"][2:6]] == ["1", "70.0", "2.00", "-10.0 (not enough seeds)"]
    assert "Left out of the overall table (controls): rte (m): not learned." in overall
    assert "## rte (m, 3 epochs, control)" in text and "| quanta |" in text.split("## rte")[1]


def test_the_overall_table_pairs_each_seeds_task_average_with_loras(tmp_path: Path) -> None:
    from hirank.bench.results import RESULTS_FILE, append_record
    from hirank.bench.suite import Suite, SuiteEntry, build_suite_report

    suite = Suite("s", "two tasks", (SuiteEntry("m", "sst2"), SuiteEntry("m", "mrpc")))
    accuracies = {  # task: method: accuracy per seed 0, 1, 2
        "sst2": {"lora": [0.80, 0.70, 0.90], "mtlora": [0.82, 0.71, 0.93], "quanta": [0.70, 0.60, 0.80]},
        "mrpc": {"lora": [0.60, 0.62, 0.64], "mtlora": [0.62, 0.65, 0.65], "quanta": [0.50, 0.52, 0.54]},
    }
    base = {"model": "m", "budget": "b", "target_params": 10, "knobs": {}, "status": "finished", "trainable_params": 10}
    for entry in suite.entries:
        for method, values in accuracies[entry.task].items():
            for seed, accuracy in enumerate(values):
                append_record(tmp_path / entry.folder_name / RESULTS_FILE,
                              {**base, "task": entry.task, "method": method, "seed": seed, "config_hash": method,
                               "test_accuracy": accuracy})
    overall = build_suite_report(suite, tmp_path).split("## Overall")[1].split("\n## ")[0]
    rows = {line.split("|")[1].strip(): line.split("|") for line in overall.splitlines() if line.startswith("| ")}
    assert "mean Δ vs LoRA (95% CI)" in overall
    # MTLoRA's per-seed task averages minus LoRA's: (2 + 2)/2, (1 + 3)/2, (3 + 1)/2 = 2, 2, 2 points: no spread
    assert rows["mtlora"][5].strip() == "+2.0 [+2.0, +2.0] ▲ better"
    assert rows["quanta"][5].strip() == "-10.0 [-10.0, -10.0] ▼ worse"
    assert rows["lora"][5].strip() == "(baseline)"


def test_a_budget_sweep_runs_each_budget_in_its_own_folder_and_tabulates_accuracy_against_params(
    tmp_path: Path,
) -> None:
    from hirank.bench.results import RESULTS_FILE, append_record, write_out_of_reach
    from hirank.bench.suite import SWEEP_PLOT, Suite, SuiteEntry, build_suite_report

    entries = tuple(SuiteEntry("m", "sst2", budget=budget) for budget in ("lora-r1", "lora-r8"))
    assert [entry.folder_name for entry in entries] == ["m-sst2-lora-r1", "m-sst2-lora-r8"]
    assert [entry.options(CompareOptions(budget="lora-r4"), tmp_path).budget for entry in entries] == [
        "lora-r1", "lora-r8"]
    assert all(entry.options(CompareOptions(), tmp_path).skip_out_of_reach for entry in entries)
    unswept = SuiteEntry("m", "sst2").options(CompareOptions(budget="lora-r4"), tmp_path)
    assert unswept.budget == "lora-r4" and not unswept.skip_out_of_reach
    base = {"model": "m", "task": "sst2", "knobs": {}, "status": "finished", "target_params": 10}
    runs = {  # entry: method: (params, accuracies over seeds)
        entries[0]: {"lora": (100, [0.70, 0.72]), "quanta": (90, [0.80, 0.82]), "head_only": (0, [0.6, 0.6])},
        entries[1]: {"lora": (800, [0.84, 0.86]), "quanta": (700, [0.85, 0.85]), "head_only": (0, [0.6, 0.6])},
    }
    for entry, methods in runs.items():
        for method, (params, accuracies) in methods.items():
            for seed, accuracy in enumerate(accuracies):
                append_record(tmp_path / entry.folder_name / RESULTS_FILE,
                              {**base, "budget": entry.budget, "method": method, "seed": seed, "config_hash": method,
                               "trainable_params": params, "test_accuracy": accuracy,
                               "reference": method == "head_only"})
    write_out_of_reach(tmp_path / entries[0].folder_name, {"vera": "a budget of 10 is out of reach for vera: ..."})
    text = build_suite_report(Suite("sweep", "two budgets", entries), tmp_path)
    sweep = text.split("## Accuracy vs adapter budget")[1].split("\n## ")[0]
    assert "| method | lora-r1 | lora-r8 |" in sweep
    assert "| vera | out of reach | — |" in sweep
    assert "| lora | 71.0 ± 1.4 (100) | 85.0 ± 1.4 (800) |" in sweep
    assert "| quanta | 81.0 ± 1.4 (90) | 85.0 ± 0.0 (700) |" in sweep
    assert "head_only" not in sweep.split("![")[0]  # a reference has no adapter budget: not a row of the sweep
    assert (tmp_path / SWEEP_PLOT).stat().st_size > 0
    assert "## sst2 (m, 3 epochs, budget lora-r1)" in text and "## sst2 (m, 3 epochs, budget lora-r8)" in text
