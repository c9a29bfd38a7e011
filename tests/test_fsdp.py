"""Every method under torch FSDP2 (``fully_shard``) on 2 CPU processes (gloo) trains, saves and merges exactly
as without sharding.

The test spawns this file under ``torch.distributed.run``; each process runs :func:`main`, which, per method,
trains a tiny 2-layer MLP twice from the same start — once unsharded on the whole batch, once with both adapted
Linear layers and the root wrapped by ``fully_shard`` and each process on its half of the batch — and checks on
every rank that the outputs, the adapter state dict gathered from the shards (``get_model_state_dict`` with
``full_state_dict=True``, then ``get_peft_model_state_dict``) and the merged weights are equal.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
#: battery cases (tests/cases.py) that stand for every method family
CASE_IDS = ("lora", "quanta", "quanta-folded", "quantum_peft", "quantum_peft-L2-masked", "mtlora-ctcm", "loratrf",
            "surm-ldr-lora", "surm-circulant-lora", "surm-circulant-adapter")
TOLERANCE = 1e-5
#: DeepSpeed clips the global gradient norm at 1.0 unless told otherwise (its GRADIENT_CLIPPING_DEFAULT); the
#: unsharded reference clips the same way, so a ZeRO-3 run is compared with what the user's config does.
ZERO3_GRADIENT_CLIPPING = 1.0


class TwoLayerMLP(nn.Module):
    """32 → 48 → 32: one square-free rectangular layer each way (non-power-of-two widths for Quantum-PEFT)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(32, 48)
        self.lin1 = nn.Linear(48, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.nn.functional.gelu(self.lin0(x)))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_every_method_under_fsdp2_equals_unsharded_training(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(_free_port()), str(Path(__file__).resolve()), str(report)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                   "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    finished = subprocess.run(launch, env=environment, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-6000:]
    differences = json.loads(report.read_text())
    assert sorted(differences) == sorted(CASE_IDS)
    for case_id, result in differences.items():
        assert result["smallest update"] > 1e-4, f"{case_id}: training left an adapter tensor unchanged"
        for check, difference in result["differences"].items():
            assert difference <= TOLERANCE, f"{case_id}: {check} differs by {difference:.3g}"


def test_every_method_under_deepspeed_zero3_equals_unsharded_training(tmp_path: Path) -> None:
    """DeepSpeed is not a dependency: ``pip install deepspeed`` (0.19.8 was tried) runs it on the CPU, over gloo."""
    pytest.importorskip("deepspeed")
    report = tmp_path / "report.json"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(_free_port()), str(Path(__file__).resolve()), str(report), "--deepspeed"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
                   "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    finished = subprocess.run(launch, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-6000:]
    differences = json.loads(report.read_text())
    assert sorted(differences) == sorted(CASE_IDS)
    for case_id, checks in differences.items():
        for check, difference in checks.items():
            assert difference <= TOLERANCE, f"{case_id}: {check} differs by {difference:.3g}"


def _compare(launcher: list[str], out: Path, data: Path) -> tuple[dict, str]:
    """One tiny ``hirank compare`` of Quantum-PEFT (global batch 4), launched by ``launcher``: (record, stderr)."""
    per_process_batch = "2" if launcher else "4"
    command = launcher + ["-m", "hirank.cli"] if launcher else [sys.executable, "-m", "hirank.cli"]
    command += ["compare", "--no-references", "--model", "tiny-bert", "--task", "sst2", "--methods", "quantum_peft", "--budget", "lora-r4",
                "--seeds", "1", "--epochs", "1", "--batch-size", per_process_batch, "--max-length", "32",
                "--train-limit", "16", "--eval-limit", "10", "--out", str(out)]
    environment = {**os.environ, "HIRANK_DATA_DIR": str(data), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                   "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return record, finished.stderr


def test_compare_under_accelerate_fsdp_config_matches_one_process(tmp_path: Path) -> None:
    """accelerate applies FSDP only on GPU-like devices: on 2 CPU processes the FSDP config trains with DDP (and
    says so); the result equals one process on the same global batch up to dropout noise."""
    from .test_bench_tasks import write_fake_data

    data = write_fake_data(tmp_path / "data")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "examples" / "accelerate_fsdp.yaml"), "--main_process_port", str(_free_port())]
    sharded, messages = _compare(launcher, tmp_path / "two", data)
    single, _ = _compare([], tmp_path / "one", data)
    assert "applies its FSDP plugin only on GPUs" in messages
    assert sharded["world_size"] == 2 and single["world_size"] == 1
    assert sharded["steps"] == single["steps"] == 4  # 16 examples, a global batch of 4
    assert sharded["trainable_params"] == single["trainable_params"]
    # dropout masks differ between one and two processes (and rank 0's final loss is that of its half batch)
    assert abs(sharded["test_accuracy"] - single["test_accuracy"]) <= 0.1 + 1e-6  # one example of 10
    assert abs(sharded["general_loss_after"] - single["general_loss_after"]) < 1e-3


def test_training_clips_the_parameters_of_the_prepared_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP2 (accelerate's ``fsdp_version: 2`` on a GPU) replaces every parameter by a new DTensor parameter inside
    ``accelerator.prepare`` and points the optimizer at them. Simulated here on the CPU by a prepare that swaps the
    parameters in the same way: gradient clipping must see the parameters that get gradients, not the old ones."""
    import accelerate

    from hirank.bench.compare import CompareOptions, compare

    from .test_bench_tasks import write_fake_data

    monkeypatch.setenv("HIRANK_DATA_DIR", str(write_fake_data(tmp_path / "data")))
    real_prepare, real_clip = accelerate.Accelerator.prepare, accelerate.Accelerator.clip_grad_norm_

    def prepare_replacing_parameters(self, *objects):
        prepared = real_prepare(self, *objects)
        models = [item for item in prepared if isinstance(item, nn.Module)]
        optimizers = [item for item in prepared if isinstance(item, accelerate.optimizer.AcceleratedOptimizer)]
        replaced = {}
        for module in (m for model in models for m in model.modules()):
            for name, parameter in list(module._parameters.items()):
                if parameter is not None and parameter.requires_grad:
                    replaced[id(parameter)] = module._parameters[name] = nn.Parameter(parameter.detach().clone())
        for group in (g for optimizer in optimizers for g in optimizer.param_groups):
            group["params"] = [replaced.get(id(p), p) for p in group["params"]]
        return prepared

    clipped: list[tuple[int, int]] = []  # per step: (parameters clipped, of which with a gradient)

    def recording_clip(self, parameters, *args, **kwargs):
        parameters = list(parameters)
        clipped.append((len(parameters), sum(p.grad is not None for p in parameters)))
        return real_clip(self, parameters, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "prepare", prepare_replacing_parameters)
    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", recording_clip)
    options = CompareOptions(model="tiny-bert", task="sst2", methods=("lora",), budget="lora-r4", seeds=1, epochs=1,
                             batch_size=4, max_length=16, train_limit=8, eval_limit=4, general_text_pairs=4,
                             references=False, out=tmp_path / "out")
    (record,) = compare(options)
    assert record["steps"] == len(clipped) == 2
    assert all(count > 0 and with_gradient == count for count, with_gradient in clipped), clipped


# ---- what each of the two processes runs ---------------------------------------------------------------------
def _max_difference(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> float:
    assert left.keys() == right.keys(), sorted(set(left) ^ set(right))
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(left.values(), (right[k] for k in left)))


def _train(model: nn.Module, batch: torch.Tensor, target: torch.Tensor) -> None:
    """3 SGD steps, then 3 AdamW steps (mean-squared error: the mean over the two halves is the full mean)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for optimizer in (torch.optim.SGD(trainable, lr=0.01), torch.optim.AdamW(trainable, lr=1e-3)):
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(model(batch), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def _check_case(case, rank: int, world_size: int) -> dict[str, float]:
    import peft
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    start = peft.get_peft_model(TwoLayerMLP(), case.config(["lin0", "lin1"], init_weights=False))
    batch, target = torch.randn(8, 32), torch.randn(8, 32)
    reference, sharded, untrained = start, copy.deepcopy(start), copy.deepcopy(start)
    _train(reference, batch, target)

    for layer in (sharded.base_model.model.lin0, sharded.base_model.model.lin1):
        fully_shard(layer)
    fully_shard(sharded)
    half = batch.shape[0] // world_size
    local = slice(rank * half, (rank + 1) * half)
    with torch.no_grad():  # an evaluation before training: factors kept for inference must not outlive the steps
        sharded(batch[local])
    _train(sharded, batch[local], target[local])

    probe = torch.randn(5, 32)
    with torch.no_grad():
        checks = {"output": (sharded(probe) - reference(probe)).abs().max().item()}
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    saved = get_peft_model_state_dict(sharded, state_dict=full)
    checks["saved adapter"] = _max_difference(saved, get_peft_model_state_dict(reference))
    before = dict(untrained.named_parameters())
    updates = [(p - before[n]).abs().max().item() for n, p in reference.named_parameters() if p.requires_grad]

    if case.mergeable:  # merged in place on the sharded model (every rank merges its shard), then unmerged
        with torch.no_grad():
            unmerged_output = reference(probe)
            sharded.merge_adapter()
            merged_output = sharded(probe)
            sharded.unmerge_adapter()
            checks["unmerged again, sharded"] = (sharded(probe) - unmerged_output).abs().max().item()
    # merge after training: load the gathered adapter into a fresh unsharded model, as after a sharded run
    restored = untrained
    set_peft_model_state_dict(restored, saved)
    if case.mergeable:
        merged = restored.merge_and_unload()
        expected = copy.deepcopy(reference).merge_and_unload()
        checks["merged weights"] = _max_difference(merged.state_dict(), expected.state_dict())
        with torch.no_grad():
            checks["merged output"] = (merged(probe) - reference(probe)).abs().max().item()
            checks["merged output, sharded"] = (merged_output - merged(probe)).abs().max().item()
    return {"differences": checks, "smallest update": min(updates)}


def _check_case_zero3(case, rank: int, world_size: int) -> dict[str, float]:
    """3 SGD steps (gradients clipped at norm 1, as DeepSpeed does by default) under DeepSpeed ZeRO-3 against
    unsharded ones; then merge (peft's gather_params_ctx)."""
    import deepspeed
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(TwoLayerMLP(), case.config(["lin0", "lin1"], init_weights=False))
    reference = copy.deepcopy(model)
    batch, target = torch.randn(8, 32), torch.randn(8, 32)
    trainable = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.01)
    for _ in range(3):
        torch.nn.functional.mse_loss(reference(batch), target).backward()
        torch.nn.utils.clip_grad_norm_(trainable, ZERO3_GRADIENT_CLIPPING)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    half = batch.shape[0] // world_size
    config = {"train_micro_batch_size_per_gpu": half, "zero_optimization": {"stage": 3},
              "gradient_clipping": ZERO3_GRADIENT_CLIPPING,
              "optimizer": {"type": "SGD", "params": {"lr": 0.01}}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=config)
    local = slice(rank * half, (rank + 1) * half)
    for _ in range(3):
        engine.backward(torch.nn.functional.mse_loss(engine(batch[local]), target[local]))
        engine.step()
    probe = torch.randn(5, 32)
    with torch.no_grad():
        checks = {"output": (engine(probe) - reference(probe)).abs().max().item()}
        if case.mergeable:
            engine.module.merge_adapter()
            expected = copy.deepcopy(reference).merge_and_unload()
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                merged = {name: engine.module.base_model.model.get_submodule(name).get_base_layer().weight.clone()
                          for name in ("lin0", "lin1")}
            expected_weights = {n: getattr(expected.get_submodule(n), "base_layer", expected.get_submodule(n)).weight
                                for n in merged}  # LoRATRF leaves its live filter around the merged layer
            checks["merged weights"] = max((merged[n] - expected_weights[n]).abs().max().item() for n in merged)
    return checks


def main(report: str, zero3: bool) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    from tests.cases import CASES

    if zero3:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed("gloo")
        zero3_config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}})  # noqa: F841 (as Trainer keeps one)
    else:
        dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    cases = {case.id: case for case in CASES}
    check = _check_case_zero3 if zero3 else _check_case
    differences = {case_id: check(cases[case_id], rank, world_size) for case_id in CASE_IDS}
    if rank == 0:
        Path(report).write_text(json.dumps(differences, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], zero3="--deepspeed" in sys.argv[2:])
