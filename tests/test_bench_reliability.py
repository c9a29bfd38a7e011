"""``hirank compare`` / ``report`` under faults: concurrent writers and processes on one folder, diverging runs,
hand-edited results, the umask, and measurements that must not drift with a run's position in the process."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from hirank.analysis import effective_rank, spectrum
from hirank.bench import compare as compare_module
from hirank.bench.compare import CompareOptions, compare, estimate_remaining_s, eta_text
from hirank.bench.measure import PeakMemory, effective_rank_of_updates, forward_times, save_adapter
from hirank.bench.methods import available_methods
from hirank.bench.report import build_report
from hirank.bench.results import RESULTS_FILE, RunClaim, append_record, load_records, write_atomically

from .test_bench_tasks import write_fake_data

OTHER_METHODS = [name for name in available_methods() if name != "lora"]


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = write_fake_data(tmp_path_factory.mktemp("data"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HIRANK_DATA_DIR", str(root))
        yield root


def _record(method: str = "lora", seed: int = 0, accuracy: float = 0.5, **extra: object) -> dict:
    """A results record with the fields the report reads."""
    return {
        "run_id": f"{method}-seed{seed}-abc",
        "method": method,
        "seed": seed,
        "config_hash": "abc",
        "knobs": {"r": 4},
        "model": "tiny-bert",
        "task": "sst2",
        "budget": "lora-r4",
        "target_params": 2048,
        "trainable_params": 2048,
        "head_params": 130,
        "test_accuracy": accuracy,
        "step_time_s": 0.01,
        "memory_kind": "cpu_peak_rss_increase",
        **extra,
    }


def _table_rows(table: str) -> dict[str, list[str]]:
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    return {row.split("|")[1].strip(): [cell.strip() for cell in row.split("|")[2:-1]] for row in rows}


# --- concurrent writers and processes ---------------------------------------------------------------------------


def _append_rows(path: str, writer: int, rows: int, start: multiprocessing.synchronize.Barrier) -> None:
    start.wait()
    for index in range(rows):
        append_record(Path(path), _record(seed=writer * rows + index))


def test_two_concurrent_writers_lose_no_row(tmp_path: Path) -> None:
    path, rows = tmp_path / RESULTS_FILE, 200
    context = multiprocessing.get_context("fork")  # the writers only use json and os: safe to fork
    start = context.Barrier(2)
    writers = [context.Process(target=_append_rows, args=(str(path), w, rows, start)) for w in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    lines = path.read_text().splitlines()
    assert sorted(json.loads(line)["seed"] for line in lines) == list(range(2 * rows))


def _hold_claim(folder: str, run: str) -> None:
    assert RunClaim(Path(folder), run).try_acquire()
    time.sleep(600)  # killed by the test


def test_a_claim_is_exclusive_and_a_dead_processs_claim_is_taken_over(tmp_path: Path) -> None:
    holder = multiprocessing.get_context("fork").Process(target=_hold_claim, args=(str(tmp_path), "lora-seed0-abc"))
    holder.start()
    claim = RunClaim(tmp_path, "lora-seed0-abc")
    deadline = time.monotonic() + 60
    while not claim.path.exists() or not claim.holder():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not claim.try_acquire()  # a live process holds it
    assert claim.holder().startswith(str(holder.pid))
    assert RunClaim(tmp_path, "lora-seed1-abc").try_acquire()  # other runs are free
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    assert claim.try_acquire()  # the OS dropped the dead process's lock
    assert not RunClaim(tmp_path, "lora-seed0-abc").try_acquire()
    claim.release()
    assert RunClaim(tmp_path, "lora-seed0-abc").try_acquire()


def _compare_in_child(arguments: list[str], stdout: str, start: multiprocessing.synchronize.Barrier) -> None:
    from hirank import cli

    with open(stdout, "w") as output, contextlib.redirect_stdout(output):
        start.wait()
        code = cli.main(arguments)
    sys.exit(code)


def test_two_compare_processes_on_one_folder_run_each_run_once(tmp_path: Path, fake_data: Path) -> None:
    out = tmp_path / "out"
    arguments = [
        "compare", "--no-references", "--model", "tiny-bert", "--methods", "lora", "--seeds", "4", "--epochs", "1", "--batch-size", "8",
        "--max-length", "16", "--train-limit", "16", "--eval-limit", "8", "--out", str(out),
    ]  # fmt: skip
    # forked (torch already imported): two real processes, without paying the import time twice
    context = multiprocessing.get_context("fork")
    start = context.Barrier(2)
    outputs = [tmp_path / f"stdout{index}.txt" for index in range(2)]
    processes = [context.Process(target=_compare_in_child, args=(arguments, str(o), start)) for o in outputs]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=600)
        assert process.exitcode == 0
    run_ids = [json.loads(line)["run_id"] for line in (out / RESULTS_FILE).read_text().splitlines()]
    assert len(run_ids) == 4 and len(set(run_ids)) == 4  # every run once: none trained twice, none lost
    assert sorted(path.name for path in (out / "adapters").iterdir()) == sorted(run_ids)
    for output in outputs:  # both processes waited for the other's runs: both reports are complete
        assert _table_rows(output.read_text().split("\n\nreport:")[0])["lora"][1] == "4"


def test_report_counts_a_duplicated_run_once_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for record in (_record(seed=0, accuracy=0.5), _record(seed=1, accuracy=0.7), _record(seed=1, accuracy=0.9)):
        append_record(tmp_path / RESULTS_FILE, record)
    with caplog.at_level(logging.WARNING):
        table = build_report(tmp_path)
    assert "run lora-seed1-abc is recorded 2 times" in caplog.text
    seeds, _, _, accuracy = _table_rows(table)["lora"][1:5]
    assert seeds == "2" and accuracy.startswith("60.0 ±")  # seeds 0 and 1 (first record), not a third seed


# --- hand-edited results, file modes ----------------------------------------------------------------------------


def test_report_skips_bad_rows_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = [_record(seed=0, accuracy=0.5), _record(seed=1, accuracy=0.7)]
    no_hash = {key: value for key, value in _record(seed=2).items() if key != "config_hash"}
    lines = [
        json.dumps(good[0]),
        json.dumps(no_hash),
        json.dumps(_record(seed=3, accuracy="0.9")),
        '{"method": "lora", "seed": ',
        json.dumps([1, 2]),
        json.dumps(_record(seed=4, status="maybe")),
        json.dumps(good[1]),
    ]
    (tmp_path / RESULTS_FILE).write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        table = build_report(tmp_path)
    for number, reason in [
        (2, "no 'config_hash'"),
        (3, "'test_accuracy' is '0.9', not a number"),
        (4, "not valid JSON"),
        (5, "not a JSON object"),
        (6, "'status' is 'maybe'"),
    ]:
        assert f"{RESULTS_FILE}:{number} skipped: {reason}" in caplog.text
    assert _table_rows(table)["lora"][1] == "2"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_results_and_report_files_respect_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        append_record(tmp_path / RESULTS_FILE, _record())
        build_report(tmp_path)
        write_atomically(tmp_path / "other.txt", "x")
    finally:
        os.umask(previous)
    for name in (RESULTS_FILE, "report.md", "accuracy_vs_params.png", "other.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_a_rewritten_file_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "report.md"
    write_atomically(path, "one")
    path.chmod(0o640)
    write_atomically(path, "two")
    assert path.read_text() == "two" and path.stat().st_mode & 0o777 == 0o640


# --- divergence -------------------------------------------------------------------------------------------------


def _nan_loss_from_step(model: nn.Module, step: int) -> None:
    """Make the training loss NaN from the ``step``-th training forward on (as a diverging run does)."""
    calls = [0]

    def hook(module: nn.Module, args: object, output: object) -> None:
        if module.training:
            calls[0] += 1
            if calls[0] >= step:
                output.loss = output.loss * float("nan")

    model.register_forward_hook(hook)


def test_diverging_runs_are_recorded_as_diverged_and_the_comparison_goes_on(
    tmp_path: Path, fake_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not OTHER_METHODS:
        pytest.skip("only LoRA is available in this build")
    other = OTHER_METHODS[0]
    real_train = compare_module.train_and_evaluate
    trained = []

    def train_with_a_nan_loss(accelerator, model, *args, **kwargs):
        trained.append(args[-1])
        if args[-1] == f"{other} seed 0":
            _nan_loss_from_step(model, 2)
        return real_train(accelerator, model, *args, **kwargs)

    monkeypatch.setattr(compare_module, "train_and_evaluate", train_with_a_nan_loss)
    options = CompareOptions(
        model="tiny-bert", task="sst2", methods=("lora", other), learning_rates={"lora": 1e30}, seeds=2, epochs=2,
        batch_size=8, max_length=16, train_limit=24, eval_limit=8, general_text_pairs=16, references=False,
        out=tmp_path / "out",
    )  # fmt: skip
    records = {(record["method"], record["seed"]): record for record in compare(options)}
    adapters = options.output_dir() / "adapters"
    for seed in range(2):  # a learning rate of 1e30: the weights overflow after the first step
        lora = records["lora", seed]
        assert lora["status"] == "diverged" and lora["diverged_at_step"] in (2, 3) and lora["test_accuracy"] is None
        assert not (adapters / lora["run_id"]).exists()  # never saved
    nan_loss, finished = records[other, 0], records[other, 1]
    assert nan_loss["status"] == "diverged" and nan_loss["diverged_quantity"] == "loss"
    assert nan_loss["diverged_at_step"] == 2 and nan_loss["steps"] == 1 and "effective_rank_mean" not in nan_loss
    assert not (adapters / nan_loss["run_id"]).exists()
    assert finished["status"] == "finished" and 0 <= finished["test_accuracy"] <= 1 and finished["run_time_s"] > 0
    assert (adapters / finished["run_id"]).is_dir()
    text = (options.output_dir() / RESULTS_FILE).read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    table = _table_rows(build_report(options.output_dir()))
    assert table["lora"][1] == "0 + 2 diverged" and table["lora"][4].startswith("diverged (step")
    assert table["lora"][2] == f"{records['lora', 0]['trainable_params']:,}"
    assert table[other][1] == "1 + 1 diverged" and float(table[other][4].strip("*")) == 100 * finished["test_accuracy"]
    trained.clear()
    assert len(compare(options)) == 4 and trained == []  # a re-run does not retry (and crash on) diverged runs


def test_non_finite_updates_are_refused_clearly(tmp_path: Path) -> None:
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(target_modules=["0"], r=2))
    with torch.no_grad():
        model.base_model.model[0].lora_B["default"].weight.fill_(float("nan"))
    for analyse in (spectrum, effective_rank):
        with pytest.raises(ValueError, match="non-finite entries"):
            analyse(torch.full((4, 4), float("inf")))
    with pytest.raises(ValueError, match="non-finite entries"):
        effective_rank_of_updates(model)
    with pytest.raises(ValueError, match="never saved or merged"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    with pytest.raises(ValueError, match="never saved or merged"):
        forward_times(model, {"input": torch.ones(1, 8)})


def test_training_stops_at_a_non_finite_gradient_norm() -> None:
    from accelerate import Accelerator

    from hirank.bench.train import _nonfinite

    accelerator = Accelerator(cpu=True)
    assert _nonfinite(accelerator, torch.tensor(1.0), torch.tensor(2.0)) is None
    assert _nonfinite(accelerator, torch.tensor(1.0), torch.tensor(math.inf)) == "gradient norm"
    assert _nonfinite(accelerator, torch.tensor(math.nan), torch.tensor(1.0)) == "loss"


# --- measurements -----------------------------------------------------------------------------------------------


def test_peak_memory_is_the_increase_over_the_blocks_own_start() -> None:
    held = torch.ones(256 * 2**20 // 4)  # 256 MiB in use before the block: must not count
    with PeakMemory(torch.device("cpu")) as memory:
        grown = torch.ones(128 * 2**20 // 4)  # touches 128 MiB
        time.sleep(0.1)
        del grown
    assert memory.baseline_mib >= 256
    assert 100 <= memory.peak_mib <= 200, memory.peak_mib
    assert memory.kind == "cpu_peak_rss_increase"
    del held


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory_is_the_increase_over_the_blocks_own_start() -> None:
    device = torch.device("cuda")
    held = torch.ones(256 * 2**20 // 4, device=device)
    with PeakMemory(device) as memory:
        grown = torch.ones(64 * 2**20 // 4, device=device)
        del grown
    assert memory.baseline_mib >= 256 and memory.peak_mib == pytest.approx(64, abs=1)
    del held


def test_eta_sums_each_methods_measured_run_time() -> None:
    measured = {"lora": [10.0, 12.0, 100.0], "quanta": [50.0]}
    assert estimate_remaining_s(["lora", "quanta", "lora", "surm"], measured) == (74.0, 1)
    assert estimate_remaining_s(["quanta"] * 3, measured) == (150.0, 0)
    assert eta_text(3725.0, 0) == "ETA 1:02:05"
    assert eta_text(74.0, 1) == "ETA ≥ 0:01:14 (+1 runs not timed yet)"
    assert eta_text(0.0, 4) == "ETA ?"
