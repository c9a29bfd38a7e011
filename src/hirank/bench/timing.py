"""Step time and memory measured side by side: the comparison's timing pass and the benchmarks' timers.

A run's own step time is taken under whatever load the machine had while it trained, so two runs of one
comparison cannot be compared by it. After a comparison's runs finish, :func:`timing_pass` builds every method
on the comparison's own model (one copy of the base weights, shared), times one training step on one fixed
batch per method in interleaved rounds (each round runs every method once, so a change in load hits all alike)
and measures the bytes autograd saves for backward (deterministic) and, on CUDA, the peak memory of a step.
The results go to ``timing.jsonl`` in the comparison's folder (one line per method and pass); the report shows
them as ratios to LoRA timed in the same pass (:func:`timing_ratios`).
"""

from __future__ import annotations

import copy
import datetime
import json
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .results import Record, append_record, warn

TIMING_FILE = "timing.jsonl"
TIMING_ROUNDS = 5  # timed rounds, fewer (at least MIN_ROUNDS) once TIMING_BUDGET_S is spent
MIN_ROUNDS = 3
TIMING_BUDGET_S = 60.0
REFERENCE_METHOD = "lora"

Key = tuple[str, str]  # (method, config hash): one row of a report


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device | str) -> Callable[[], float]:
    """On CPU with one torch thread, the CPU time of this thread (time slices taken by other processes on a
    shared machine do not count); otherwise wall time."""
    one_cpu_thread = torch.device(device).type == "cpu" and torch.get_num_threads() == 1
    return time.thread_time if one_cpu_thread else time.perf_counter


def interleaved_seconds(
    steps: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 2,
    progress: Callable[[int], None] | None = None,
    device: torch.device | str = "cpu",
    budget_s: float | None = None,
    min_rounds: int = 1,
) -> dict[str, list[float]]:
    """Times (by :func:`clock`) of each step in each of ``rounds`` rounds that run every step once, in turn, so
    that changes in machine load hit all methods alike; ``progress(round)`` is called after each round. With
    ``budget_s``, rounds stop once that many seconds have passed (after at least ``min_rounds``)."""
    now = clock(device)
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    started = time.perf_counter()
    for round_index in range(rounds):
        if budget_s is not None and round_index >= min_rounds and time.perf_counter() - started > budget_s:
            break
        for name, step in steps.items():
            synchronize(device)
            start = now()
            step()
            synchronize(device)
            times[name].append(now() - start)
        if progress is not None:
            progress(round_index)
    return times


def saved_activation_bytes(run: Callable[[], torch.Tensor], model: nn.Module) -> int:
    """Bytes autograd keeps for backward while ``run()`` computes a loss (then back-propagated): every distinct
    storage saved by an op, the model's parameters and buffers (and views of them) excluded. Deterministic, so
    it compares methods on a loaded machine where timings cannot."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and storage.device.type != "meta":
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = run()
    loss.backward()
    return sum(saved.values())


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def train_step(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> Callable[[], None]:
    """One forward (``model(**inputs).loss``) + backward + AdamW step of ``model`` (put in train mode), as a
    closure."""
    model.train()
    optimizer = _optimizer(model)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        optimizer.step()

    return step


def tensor_step(model: nn.Module, x: torch.Tensor, train: bool = True) -> Callable[[], None]:
    """Forward of ``model`` on the tensor ``x``, backward of the mean square (+ AdamW on the trainable parameters
    when ``train``), as a closure."""
    optimizer = _optimizer(model) if train else None

    def step() -> None:
        x.grad = None
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
        if optimizer is not None:
            optimizer.step()

    return step


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are the very same tensors (adapters wrap them; no weight is copied)."""
    return copy.deepcopy(model, {id(p): p for p in model.parameters()})


def peak_step_bytes(step: Callable[[], None], device: torch.device | str) -> int | None:
    """CUDA: peak allocated memory during one ``step()`` minus the memory allocated at its start; CPU: None (no
    per-model peak can be told apart inside one process)."""
    if torch.device(device).type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


# --- the comparison's timing pass -------------------------------------------------------------------------


@dataclass(frozen=True)
class TimedModel:
    """One method to time: its report key, and how to build it from a shared copy of the base model."""

    method: str
    config_hash: str
    build: Callable[[nn.Module], nn.Module]  # adapts the given base-model copy (seeded by the caller)


def load_timings(folder: Path) -> list[Record]:
    """The lines of ``folder/timing.jsonl`` (none if it does not exist); unreadable lines are skipped with a
    warning."""
    path = Path(folder) / TIMING_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            warn(f"{path}:{number} skipped: not valid JSON ({error.msg}).")
            continue
        if not isinstance(row, dict) or not {"pass_id", "method", "config_hash", "seconds"} <= row.keys():
            warn(f"{path}:{number} skipped: not a timing line.")
            continue
        rows.append(row)
    return rows


def _passes(rows: Iterable[Record]) -> dict[str, dict[Key, Record]]:
    passes: dict[str, dict[Key, Record]] = {}
    for row in rows:
        passes.setdefault(row["pass_id"], {})[(row["method"], row["config_hash"])] = row
    return passes


def untimed(keys: Iterable[Key], reference: Key | None, rows: Iterable[Record]) -> list[Key]:
    """The keys not yet timed in one pass together with ``reference`` (LoRA's key; without one, not timed at
    all): a ratio to LoRA needs both in the same pass."""
    covered: set[Key] = set()
    for timed in _passes(rows).values():
        if reference is None or reference in timed:
            covered.update(timed)
    return [key for key in keys if key not in covered]


def timing_pass(
    base: nn.Module,
    models: list[TimedModel],
    inputs: Mapping[str, torch.Tensor],
    folder: Path,
    device: torch.device | str,
    rounds: int = TIMING_ROUNDS,
    budget_s: float = TIMING_BUDGET_S,
    seed: int = 0,
) -> list[Record]:
    """Time one training step of each model on ``inputs`` in interleaved rounds (after one warm-up round) and
    measure its saved activations (and CUDA peak); appends one line per model to ``folder/timing.jsonl`` and
    returns them. ``base`` is shared by all (its weights are not copied)."""
    steps: dict[str, Callable[[], None]] = {}
    memory: dict[str, tuple[int, int | None]] = {}
    for timed in models:
        torch.manual_seed(seed)
        model = timed.build(shared_copy(base)).to(device)
        model.train()
        activations = saved_activation_bytes(lambda model=model: model(**inputs).loss, model)
        model.zero_grad(set_to_none=True)
        step = train_step(model, inputs)
        memory[timed.method] = (activations, peak_step_bytes(step, device))
        steps[timed.method] = step
    times = interleaved_seconds(steps, rounds, warmup=1, device=device, budget_s=budget_s, min_rounds=MIN_ROUNDS)
    pass_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    threads = torch.get_num_threads()
    rows = []
    for timed in models:
        row = {
            "pass_id": pass_id,
            "method": timed.method,
            "config_hash": timed.config_hash,
            "seconds": times[timed.method],
            "clock": "thread CPU time" if clock(device) is time.thread_time else "wall time",
            "saved_activation_bytes": memory[timed.method][0],
            "peak_step_bytes": memory[timed.method][1],
            "batch": {name: list(tensor.shape) for name, tensor in inputs.items()},
            "device": f"{torch.device(device).type} ({threads} threads)",
        }
        append_record(Path(folder) / TIMING_FILE, row)
        rows.append(row)
    return rows


@dataclass(frozen=True)
class TimingRatio:
    """One method's timing against LoRA in the same pass: the per-round step-time ratios (median, min, max),
    saved-activation ratio and, on CUDA, peak-memory ratio."""

    step: tuple[float, float, float]
    activations: float | None
    peak: float | None


def spread_text(center: float, low: float, high: float) -> str:
    """``"1.23 (1.10–1.40)"``, or ``"1.23"`` when the range prints as one value."""
    return f"{center:.2f}" if f"{low:.2f}" == f"{high:.2f}" else f"{center:.2f} ({low:.2f}–{high:.2f})"


def _ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


def timing_ratios(rows: Iterable[Record]) -> dict[Key, TimingRatio]:
    """Per (method, config hash): its ratios to the LoRA row of the latest pass that timed both."""
    ratios: dict[Key, TimingRatio] = {}
    for _, timed in sorted(_passes(rows).items()):  # later passes win
        lora = [row for (method, _), row in timed.items() if method == REFERENCE_METHOD]
        if len(lora) != 1:
            continue
        reference = lora[0]
        for key, row in timed.items():
            per_round = [t / r for t, r in zip(row["seconds"], reference["seconds"], strict=False) if r > 0]
            if not per_round:
                continue
            ratios[key] = TimingRatio(
                (statistics.median(per_round), min(per_round), max(per_round)),
                _ratio(row.get("saved_activation_bytes"), reference.get("saved_activation_bytes")),
                _ratio(row.get("peak_step_bytes"), reference.get("peak_step_bytes")),
            )
    return ratios
