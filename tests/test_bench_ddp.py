"""``hirank compare`` under ``torchrun`` with 2 CPU processes: accelerate sets up DDP over gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from .test_bench_tasks import write_fake_data


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_ddp_compare_has_equal_trainable_parameters_on_both_ranks(tmp_path: Path) -> None:
    data = write_fake_data(tmp_path / "data")
    out = tmp_path / "out"
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "hirank.cli",
        "compare",
        "--no-references",
        "--model",
        "tiny-bert",
        "--task",
        "sst2",
        "--methods",
        "lora",
        "--budget",
        "lora-r4",
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--max-length",
        "32",
        "--train-limit",
        "16",
        "--eval-limit",
        "10",
        "--out",
        str(out),
    ]
    environment = {**os.environ, "HIRANK_DATA_DIR": str(data), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run(launch, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert record["world_size"] == 2
    assert record["trainable_params_per_rank"] == [2048, 2048] == [record["trainable_params"]] * 2
    assert record["steps"] == 2  # 16 examples, 4 per process and step, 2 processes
    assert record["test_examples"] == 10 and 0.0 <= record["test_accuracy"] <= 1.0
    assert "| lora |" in finished.stdout  # the main process printed the table, once
    assert finished.stdout.count("| lora |") == 1
