"""Step time and activation memory of every hirank method and peft's peers, as ratios to peft's LoRA r=8.

Setting: 4 Linear layers of width d with GELU between (``common.LinearStack``), every layer adapted, ``tokens``
tokens per step as sequences of 128, forward + backward (input gradient included, as inside a network) + AdamW.
Each method runs at LoRA r=8's parameter count (``hirank.analysis.match_budget``; a method that its natural knobs
cannot bring there keeps its nearest natural setting, and the note says so) and each hirank method also at its
default size; QuanTA runs twice, as ``quanta`` and as ``quanta-folded`` (``fold_frozen_copy=True``). Columns,
each the median over interleaved rounds with the min–max spread of the per-round ratios:

- **step ÷ LoRA**, **step ÷ base**: time of one training step against peft LoRA r=8 and against the frozen base
  (forward + backward to the input, no adapter, no optimizer) in the same round (CPU: thread CPU time with one
  thread, so time slices taken by other processes do not count);
- **act. mem ÷ LoRA**: bytes autograd saves for backward (``common.saved_activation_bytes``: deterministic);
  on CUDA also **peak ÷ LoRA**: ``max_memory_allocated`` during forward + backward minus the memory at its start.

    .venv/bin/python benchmarks/speed.py --quick                      # d=1024, 512 tokens, 3 rounds: ~2 min
    .venv/bin/python benchmarks/speed.py                              # d ∈ {1024, 2048, 4096}, 512 and d tokens
    .venv/bin/python benchmarks/speed.py --dims 2048 --tokens 2048 --methods lora,quanta,c3a --rounds 9
    .venv/bin/python benchmarks/speed.py --device cuda --dtype bfloat16

Writes ``benchmarks/results/speed.md`` and ``speed.json`` (raw times in seconds, bytes) unless ``--out`` says
elsewhere.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import peft
import torch
from peft import get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import hirank  # noqa: E402
from common import (  # noqa: E402
    LinearStack, argument_parser, interleaved_seconds, parse_args, saved_activation_bytes, shared_copy, tensor_step,
)
from hirank.analysis import match_budget  # noqa: E402
from hirank.bench.timing import spread_text  # noqa: E402
from hirank.budget import (  # noqa: E402
    KNOB_SPACES, BudgetError, adapter_parameters, count_adapter_parameters, format_knobs, knob_space, lora_knobs,
)

SEQ_LEN = 128
REFERENCE = "lora"
BASE = "frozen base"


@dataclass(frozen=True)
class Method:
    """A row family: ``space`` (a key of hirank.budget.KNOB_SPACES), optionally restricted to settings with
    ``restrict`` (SURM's structures), and the hirank default size (None for peft's peers: budget row only);
    ``execution``: config fields that change how the method runs, not its parameters (added to every row)."""

    name: str
    space: str
    default: dict[str, Any] | None = None
    restrict: dict[str, Any] = field(default_factory=dict)
    step_target: float | None = None  # issue 12's target for step ÷ LoRA
    execution: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # shown under the table for each of the method's rows


HIRANK_METHODS = (
    Method("quanta", "quanta", {}, step_target=1.5),
    Method("quanta-folded", "quanta", {}, step_target=1.5, execution={"fold_frozen_copy": True},
           note="fold_frozen_copy=True: each adapted layer also keeps W₀ − M(θ₀), one more weight of d² values "
                "(not an activation: outside act. mem)."),
    Method("quantum_peft", "quantum_peft", {}, step_target=1.1),
    Method("mtlora", "mtlora", {}, step_target=1.05),
    Method("loratrf", "loratrf", {}, step_target=1.25),
    *(
        Method(f"surm-{structure}", "surm", {"structure": structure}, {"structure": structure}, target)
        for structure, target in (("circulant", 1.15), ("toeplitz", 1.4), ("kronecker", 1.15), ("ldr", 1.4))
    ),
)
PEERS = tuple(Method(name, name) for name in ("dora", "c3a", "fourierft", "lokr", "oft", "boft", "hira", "vera",
                                             "randlora"))
METHODS = {method.name: method for method in (Method(REFERENCE, "lora"), *HIRANK_METHODS, *PEERS)}
MEMORY_TARGET = 1.3  # issue 12: activation memory ÷ LoRA for every hirank method


@dataclass
class Row:
    method: str
    setting: str  # "budget", "default", "budget = default"
    knobs: dict[str, Any]
    params: int = 0
    note: str = ""
    step: Callable[[], None] | None = None
    seconds: list[float] = field(default_factory=list)
    saved_bytes: int = 0
    peak_bytes: int | None = None
    step_target: float | None = None

    @property
    def label(self) -> str:
        return self.method if self.setting.startswith("budget") else f"{self.method} ({self.setting})"


def measure_memory(row: Row, model: nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    row.saved_bytes = saved_activation_bytes(lambda: model(x).float().square().mean(), model)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        model(x).float().square().mean().backward()
        torch.cuda.synchronize()
        row.peak_bytes = torch.cuda.max_memory_allocated() - start
    model.zero_grad(set_to_none=True)


def plan_rows(names: list[str], base: LinearStack, targets: list[str], budget: int) -> tuple[list[Row], list[str]]:
    """The rows to time (budget-matched and default settings) and the methods skipped, with the reason."""
    rows, skipped = [], []
    for name in names:
        method = METHODS[name]
        try:
            space = knob_space(method.space)
        except ValueError as error:
            skipped.append(f"{name}: {error}")
            continue
        if method.restrict:
            grid = space.grid
            space = replace(space, grid=lambda shapes, grid=grid: (
                k for k in grid(shapes) if all(k.get(key) == value for key, value in method.restrict.items())))
        if name == REFERENCE:
            rows.append(Row(name, "budget", lora_knobs(8)))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                match = match_budget(method.space, base, budget, targets, tolerance=None, space=space)
        except (BudgetError, ValueError, TypeError, RuntimeError) as error:
            skipped.append(f"{name}: cannot fit these layers ({error})")
            continue
        default = method.default
        same = default is not None and match.params == count_adapter_parameters(
            base, space.make_config(targets, default))
        rows.append(Row(name, "budget = default" if same else "budget", {**match.knobs, **method.execution},
                        note=" ".join(filter(None, (match.note, method.note))), step_target=method.step_target))
        if default is not None and not same:
            rows.append(Row(name, "default", {**default, **method.execution}, note=method.note,
                            step_target=method.step_target))
    return rows, skipped


def build(rows: list[Row], base: LinearStack, targets: list[str], x: torch.Tensor) -> list[Row]:
    """Adapt a shared copy of ``base`` for each row and attach its step; rows that fail to build or to run a
    step are dropped (printed with the reason)."""
    built = []
    for row in rows:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = KNOB_SPACES[METHODS[row.method].space].make_config(targets, row.knobs)
                model = get_peft_model(shared_copy(base), config).to(x.device)
                model.train()
                row.params = adapter_parameters(model)
                row.step = tensor_step(model, x, train=True)
                row.step()  # first step: lazy caches, allocator warm
                measure_memory(row, model, x)
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as error:  # e.g. a dtype a peer lacks
            print(f"  skipped {row.label} ({format_knobs(row.knobs)}): {error}")
            continue
        built.append(row)
    return built


def ratio_stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(stats: tuple[float, float, float] | None, target: float | None = None) -> str:
    if stats is None:
        return "—"
    median = stats[0]
    verdict = "" if target is None else (" ✓" if median <= target else f" ✗ (≤ {target:g})")
    return spread_text(*stats) + verdict


def run_setting(d: int, tokens: int, names: list[str], args: Any, dtype: torch.dtype) -> dict[str, Any]:
    torch.manual_seed(0)
    base = LinearStack(d).to(common.DEVICE, dtype)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    targets = base.target_modules()
    budget = count_adapter_parameters(base, KNOB_SPACES["lora"].make_config(targets, lora_knobs(8)))
    x = torch.randn(tokens // SEQ_LEN, SEQ_LEN, d, device=common.DEVICE, dtype=dtype, requires_grad=True)
    started = time.perf_counter()
    rows, skipped = plan_rows(names, base, targets, budget)
    for reason in skipped:
        print(f"  skipped {reason}")
    rows = build(rows, base, targets, x)
    reference = next((row for row in rows if row.method == REFERENCE), None)
    if reference is None:
        raise SystemExit("peft LoRA failed to build: no reference for the ratios.")
    frozen = Row(BASE, "—", {})
    frozen.step = tensor_step(base, x, train=False)
    measure_memory(frozen, base, x)
    steps = {row.label: row.step for row in [frozen, *rows]}
    print(f"  {len(rows)} models built in {time.perf_counter() - started:.0f} s; timing {args.rounds} rounds")
    times = interleaved_seconds(steps, args.rounds, args.warmup,
                                progress=lambda i: print(f"  round {i + 1}/{args.rounds}", end="\r", flush=True))
    for row in [frozen, *rows]:
        row.seconds = times[row.label]
    result_rows = []
    for row in rows:
        per_round_lora = [t / r for t, r in zip(row.seconds, reference.seconds)]
        per_round_base = [t / b for t, b in zip(row.seconds, frozen.seconds)]
        result_rows.append({
            "method": row.method, "setting": row.setting, "knobs": row.knobs, "params": row.params, "note": row.note,
            "seconds": row.seconds, "saved_bytes": row.saved_bytes, "peak_bytes": row.peak_bytes,
            "step_vs_lora": ratio_stats(per_round_lora), "step_vs_base": ratio_stats(per_round_base),
            "memory_vs_lora": row.saved_bytes / reference.saved_bytes,
            "peak_vs_lora": None if row.peak_bytes is None else row.peak_bytes / reference.peak_bytes,
            "step_target": row.step_target, "hirank": row.method in {m.name for m in HIRANK_METHODS},
        })
    return {"d": d, "tokens": tokens, "budget": budget, "rows": result_rows, "skipped": skipped,
            "base_seconds": frozen.seconds, "lora_saved_bytes": reference.saved_bytes,
            "base_saved_bytes": frozen.saved_bytes}


def markdown(setting: dict[str, Any], cuda: bool) -> str:
    lines = [
        f"### d = {setting['d']}, {setting['tokens']} tokens per step (budget: LoRA r=8 = {setting['budget']:,} "
        f"parameters; LoRA saves {setting['lora_saved_bytes'] / 2**20:.1f} MiB for backward, the frozen base "
        f"{setting['base_saved_bytes'] / 2**20:.1f} MiB)",
        "",
        "| method | setting | knobs | params | step ÷ LoRA | step ÷ base | act. mem ÷ LoRA |"
        + (" peak ÷ LoRA |" if cuda else ""),
        "|---|---|---|---:|---:|---:|---:|" + ("---:|" if cuda else ""),
    ]
    notes = []
    for row in setting["rows"]:
        memory_target = MEMORY_TARGET if row["hirank"] else None
        memory = row["memory_vs_lora"]
        memory_cell = f"{memory:.2f}" + ("" if memory_target is None else (" ✓" if memory <= memory_target
                                                                            else f" ✗ (≤ {memory_target:g})"))
        note_mark = ""
        if row["note"]:
            notes.append(row["note"])
            note_mark = f" [{len(notes)}]"
        knobs = format_knobs(row["knobs"]) or "defaults"
        lines.append(
            f"| {row['method']}{note_mark} | {row['setting']} | {knobs} | {row['params']:,} | "
            f"{fmt(row['step_vs_lora'], row['step_target'])} | {fmt(row['step_vs_base'])} | {memory_cell} |"
            + (f" {row['peak_vs_lora']:.2f} |" if cuda else "")
        )
    lines.append("")
    lines.extend(f"[{index}] {note}" for index, note in enumerate(notes, 1))
    lines.extend(f"Skipped: {reason}" for reason in setting["skipped"])
    return "\n".join(lines).rstrip() + "\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if common.DEVICE.type == "cuda":
        return f"{torch.cuda.get_device_name()} (host {cpu})"
    return cpu


def main() -> None:
    parser = argument_parser(__doc__, threads=1, threads_help="torch threads; 1 (default) gives stable timings")
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--tokens", nargs="+", default=["512", "d"],
                        help="tokens per step (multiples of 128); 'd' means max(d, 512), the LLM training regime")
    parser.add_argument("--methods", default="all",
                        help=f"comma-separated names, 'hirank', 'peers' or 'all' (LoRA always runs): "
                             f"{', '.join(METHODS)}")
    parser.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--quick", action="store_true", help="d=1024, 512 tokens, 3 rounds (about 2 minutes)")
    parser.add_argument("--device", default=common.DEVICE.type, help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="folder for speed.md and speed.json")
    args = parse_args(parser)
    if args.quick:
        args.dims, args.tokens, args.rounds = [1024], ["512"], 3
    common.use_device(args.device)
    dtype = getattr(torch, args.dtype)
    groups = {"all": [m.name for m in (*HIRANK_METHODS, *PEERS)], "hirank": [m.name for m in HIRANK_METHODS],
              "peers": [m.name for m in PEERS]}
    names = [REFERENCE]
    for item in args.methods.split(","):
        for name in groups.get(item.strip(), [item.strip()]):
            if name not in METHODS:
                parser.error(f"unknown method {name!r} in --methods; known: {', '.join(METHODS)}, hirank, peers, all")
            if name not in names:
                names.append(name)
    settings = []
    started = time.perf_counter()
    for d in args.dims:
        token_counts = sorted({max(d, 512) if t == "d" else int(t) for t in args.tokens})
        for tokens in token_counts:
            if tokens % SEQ_LEN:
                parser.error(f"--tokens {tokens} is not a multiple of {SEQ_LEN}")
            print(f"d={d}, {tokens} tokens:")
            settings.append(run_setting(d, tokens, names, args, dtype))
            print(markdown(settings[-1], common.DEVICE.type == "cuda"))
    now = datetime.datetime.now(datetime.timezone.utc)
    header = (
        f"## Step time and activation memory vs peft LoRA r=8\n\n{now:%Y-%m-%d %H:%M} UTC; {machine()}; "
        f"{common.DEVICE.type}, {args.dtype}, {torch.get_num_threads()} thread(s); torch {torch.__version__}, peft "
        f"{peft.__version__}, hirank {hirank.__version__}; {args.rounds} interleaved rounds after {args.warmup} "
        f"warm-up; 4 Linear(d, d) + GELU, forward + backward + AdamW; cells: median (min–max) of per-round ratios; "
        f"✓/✗: issue 12's targets. {time.perf_counter() - started:.0f} s.\n\n"
        f"Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`\n\n"
    )
    text = header + "\n".join(markdown(setting, common.DEVICE.type == "cuda") for setting in settings)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if common.DEVICE.type == "cpu" else f"-{common.DEVICE.type}"
    for name, content in ((f"speed{suffix}.md", text),
                          (f"speed{suffix}.json", json.dumps({"header": header, "settings": settings}, indent=1))):
        temporary = args.out / f".{name}.tmp"
        temporary.write_text(content)
        temporary.replace(args.out / name)
    print(f"wrote {args.out / f'speed{suffix}.md'} and .json")


if __name__ == "__main__":
    main()
