"""Turn a results file into ``report.md`` (one row per method and configuration, mean ± std over seeds, the best
value of each column in bold) and two PNG plots: test accuracy vs trainable parameters, and step time per method.

Each run counts once: records are keyed by run id, and a run recorded twice (e.g. by an older hirank, or by two
machines sharing a folder without working locks) is reported with a warning and counted once, never averaged in
as an extra seed. Diverged runs are counted apart and marked in the table and the plots.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .methods import METHODS, format_knobs
from .results import (
    DIVERGED,
    RESULTS_FILE,
    Record,
    ResultsFileError,
    load_out_of_reach,
    load_records,
    run_id,
    warn,
    write_atomically,
)
from .stats import PairedDifference, paired_difference, seed_values
from .timing import TIMING_FILE, Key, TimingRatio, load_timings, spread_text, timing_ratios

ACCURACY_PLOT = "accuracy_vs_params.png"
PEAK_MEMORY_HEADER = "peak mem (MiB)"
STEP_TIME_PLOT = "step_time.png"


@dataclass(frozen=True)
class Column:
    """A table column: its header, how to read a record, how to print a value, and which value is best."""

    header: str
    value: Callable[[Record], float | None]
    fmt: str
    best: str | None = None  # "max", "min" or None (not ranked)
    spread: bool = True  # show ± std over seeds


def _key(name: str, scale: float = 1.0) -> Callable[[Record], float | None]:
    return lambda record: None if record.get(name) is None else record[name] * scale


ADAPTER_PARAMS = Column("adapter params", _key("trainable_params"), "{:,.0f}", spread=False)
HEAD_PARAMS = Column("head params", _key("head_params"), "{:,.0f}", spread=False)
TEST_ACCURACY = Column("test acc (%)", _key("test_accuracy", 100), "{:.1f}", "max")
STEP_TIME = Column("step (ms)", _key("step_time_s", 1000), "{:.0f}", "min")
COLUMNS = (
    ADAPTER_PARAMS,
    HEAD_PARAMS,
    TEST_ACCURACY,
    Column("forgetting", _key("forgetting"), "{:+.4f}", "min"),
    Column("eff. rank ΔW", _key("effective_rank_mean"), "{:.1f}", "max"),
    Column("train time (s)", _key("train_time_s"), "{:.1f}", "min"),
    STEP_TIME,
    Column(PEAK_MEMORY_HEADER, _key("peak_memory_mib"), "{:.0f}", "min"),
    Column("adapter file (KiB)", _key("adapter_file_bytes", 1 / 1024), "{:.0f}", "min", spread=False),
    Column("fwd unmerged (ms)", _key("forward_unmerged_s", 1000), "{:.1f}", "min"),
    Column("fwd merged (ms)", _key("forward_merged_s", 1000), "{:.1f}", "min"),
    Column("fwd base (ms)", _key("forward_base_s", 1000), "{:.1f}"),
)


@dataclass
class Row:
    """The runs of one method with one configuration (all seeds): ``records`` the finished ones (the means),
    ``diverged`` those whose training diverged."""

    method: str
    knobs: str
    records: list[Record]
    diverged: list[Record] = field(default_factory=list)

    @property
    def seeds_text(self) -> str:
        """``"3"``, or ``"2 + 1 diverged"``."""
        return f"{len(self.records)} + {len(self.diverged)} diverged" if self.diverged else str(len(self.records))

    def diverged_text(self) -> str:
        """``"diverged (step 4)"`` / ``"diverged (steps 4, 9)"`` for a row whose every run diverged."""
        steps = sorted({record.get("diverged_at_step") for record in self.diverged} - {None})
        where = f" (step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))})" if steps else ""
        return f"diverged{where}"

    def values(self, column: Column) -> list[float]:
        return [v for v in (column.value(record) for record in self.records) if v is not None]

    def mean(self, column: Column) -> float | None:
        values = self.values(column)
        return statistics.fmean(values) if values else None

    def std(self, column: Column) -> float:
        values = self.values(column)
        return statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def is_reference(self) -> bool:
        return any(record.get("reference") for record in self.records + self.diverged)

    def versus(self, baseline: Row) -> PairedDifference:
        """Per-seed test-accuracy differences from ``baseline`` (same seeds: same data order and head init)."""
        return paired_difference(seed_values(self.records, "test_accuracy"), seed_values(baseline.records, "test_accuracy"))


DELTA_HEADER = "Δ vs LoRA (95% CI)"


def lora_row(rows: list[Row]) -> Row | None:
    """The LoRA row the others are compared with (the first, if LoRA ran with several configurations)."""
    return next((row for row in rows if row.method == "lora"), None)


def unique_runs(records: list[Record]) -> list[Record]:
    """The first record of every run id, with a warning for each run recorded more than once."""
    first: dict[str, Record] = {}
    counts: dict[str, int] = {}
    for record in records:
        key = run_id(record)
        first.setdefault(key, record)
        counts[key] = counts.get(key, 0) + 1
    for key, count in counts.items():
        if count > 1:
            warn(f"run {key} is recorded {count} times in {RESULTS_FILE}; the report counts it once (first record).")
    return list(first.values())


def group_rows(records: list[Record]) -> list[Row]:
    """One row per (method, configuration), in the method table's order; each run id counted once."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for record in unique_runs(records):
        groups.setdefault((record["method"], record["config_hash"]), []).append(record)
    order = list(METHODS)
    rows = []
    for (method, _), runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        diverged = [run for run in runs if run.get("status") == DIVERGED]
        finished = [run for run in runs if run.get("status") != DIVERGED]
        rows.append(Row(method, format_knobs(runs[0]["knobs"]), finished, diverged))
    return sorted(rows, key=lambda row: (order.index(row.method) if row.method in order else len(order), row.knobs))


STEP_RATIO_HEADER = "step ÷ LoRA"
ACTIVATIONS_RATIO_HEADER = "act. mem ÷ LoRA"
PEAK_RATIO_HEADER = "peak ÷ LoRA"


def _timing_cells(row: Row, timings: Mapping[Key, TimingRatio], peak: bool) -> dict[str, str]:
    """The timing pass's cells of ``row`` (see :mod:`hirank.bench.timing`): "—" where it was not timed."""
    ratio = timings.get((row.method, row.records[0]["config_hash"])) if row.records else None
    if ratio is None and row.diverged:
        ratio = timings.get((row.method, row.diverged[0]["config_hash"]))
    cells = {
        STEP_RATIO_HEADER: spread_text(*ratio.step) if ratio else "—",
        ACTIVATIONS_RATIO_HEADER: f"{ratio.activations:.2f}" if ratio and ratio.activations is not None else "—",
    }
    if peak:
        cells[PEAK_RATIO_HEADER] = f"{ratio.peak:.2f}" if ratio and ratio.peak is not None else "—"
    return cells


def markdown_table(rows: list[Row], timings: Mapping[Key, TimingRatio] | None = None) -> str:
    """The comparison table (mean ± std over seeds; best of each ranked column in bold). With ``timings`` (the
    timing pass's ratios), its side-by-side step time replaces each run's own ``step (ms)``, and its memory
    ratios follow the peak memory."""
    timings = timings or {}
    columns = [column for column in COLUMNS if not (timings and column is STEP_TIME)]
    best: dict[str, float | None] = {}
    for column in columns:
        means = [m for m in (row.mean(column) for row in rows) if m is not None]
        best[column.header] = (max if column.best == "max" else min)(means) if column.best and means else None
    lora = lora_row(rows)
    headers = [column.header for column in columns]
    peak = any(ratio.peak is not None for ratio in timings.values())
    timing_headers = list(_timing_cells(Row("", "", []), timings, peak)) if timings else []
    timing_at = headers.index(PEAK_MEMORY_HEADER) + 1
    headers[timing_at:timing_at] = timing_headers
    delta_at = headers.index(TEST_ACCURACY.header) + 1
    if lora is not None:
        headers.insert(delta_at, DELTA_HEADER)
    lines = ["| method | knobs | seeds | " + " | ".join(headers) + " |", "|---|---|---:|" + "---:|" * len(headers)]
    for row in rows:
        cells = []
        for column in columns:
            mean = row.mean(column)
            if mean is None and column is TEST_ACCURACY and row.diverged:
                cells.append(row.diverged_text())
                continue
            if mean is None and column in (ADAPTER_PARAMS, HEAD_PARAMS) and row.diverged:
                mean = Row(row.method, row.knobs, row.diverged).mean(column)  # known without finishing
            if mean is None:
                cells.append("—")
                continue
            text = column.fmt.format(mean)
            if column.spread and len(row.values(column)) > 1:
                text += " ± " + column.fmt.format(row.std(column)).lstrip("+")
            is_best = best[column.header] is not None and column.fmt.format(mean) == column.fmt.format(
                best[column.header]
            )
            cells.append(f"**{text}**" if is_best and len(rows) > 1 else text)
        if timings:
            cells[timing_at:timing_at] = list(_timing_cells(row, timings, peak).values())
        if lora is not None:
            cells.insert(delta_at, "(baseline)" if row is lora else row.versus(lora).describe(scale=100))
        name = f"{row.method} (reference)" if row.is_reference else row.method
        lines.append(f"| {name} | {row.knobs} | {row.seeds_text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reference_summary(rows: list[Row], records: list[Record]) -> list[str]:
    """Lines for the top of the report: the guessing score and the no-adapter reference runs, and a warning in
    words when no adapter method beats them."""
    lines = []
    baselines = {(r["baseline_kind"], r["baseline_accuracy"]) for r in records if r.get("baseline_accuracy") is not None}
    references = {f"{row.method.replace('_', ' ')} (no adapter)": row.mean(TEST_ACCURACY) for row in rows if row.is_reference}
    scores = {f"{kind} on the test split": 100 * accuracy for kind, accuracy in baselines}
    scores.update({name: value for name, value in references.items() if value is not None})
    if not scores:
        return lines
    lines.append("**References:** " + "; ".join(f"{name} {value:.1f}%" for name, value in scores.items()) + ".")
    adapters = [(row.mean(TEST_ACCURACY), row.method) for row in rows if not row.is_reference]
    adapters = [(value, method) for value, method in adapters if value is not None]
    if adapters:
        best_value, best_method = max(adapters)
        bar_name, bar = max(scores.items(), key=lambda item: item[1])
        if best_value <= bar:
            lines.append(
                f"**No adapter method beats the references here**: the best, {best_method} at {best_value:.1f}%, "
                f"does not exceed {bar_name} ({bar:.1f}%). On this model, task and schedule the table cannot tell "
                "the methods apart; train longer, or use a task the model learns."
            )
    return ["", *lines]


def _plot_accuracy(rows: list[Row], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    markers = "osD^vP*Xh<>"
    counts = []
    for index, row in enumerate(rows):
        label = row.method if len({r.method for r in rows}) == len(rows) else f"{row.method} ({row.knobs})"
        y = row.mean(TEST_ACCURACY)
        if row.is_reference:  # no adapter parameters to place it at: a horizontal line
            if y is not None:
                axes.axhline(y, linestyle="--", color="grey", linewidth=1, label=f"{label} (no adapter)")
            continue
        if y is None and row.diverged:  # every seed diverged: a cross at the bottom, at its parameter count
            x = Row(row.method, row.knobs, row.diverged).mean(ADAPTER_PARAMS)
            if x is not None:
                counts.append(x)
                axes.plot(
                    [x], [0.03], "x", color="red", markersize=10, transform=axes.get_xaxis_transform(),
                    label=f"{label}: {row.diverged_text()}",
                )
            continue
        x = row.mean(ADAPTER_PARAMS)
        if x is None or y is None:
            continue
        counts.append(x)
        if row.diverged:
            label += f" ({len(row.diverged)} diverged)"
        axes.errorbar(
            x, y, yerr=row.std(TEST_ACCURACY), fmt=markers[index % len(markers)], markersize=8, capsize=4, label=label
        )
    save_accuracy_plot(figure, axes, path, "Accuracy vs trainable parameters",
                       log_params=bool(counts) and max(counts) > 10 * min(counts))


def save_accuracy_plot(figure: object, axes: object, path: Path, title: str, log_params: bool) -> None:
    """Label an accuracy (y) vs adapter parameters (x) plot the same way everywhere, and save it."""
    from matplotlib.ticker import FuncFormatter

    if log_params:
        axes.set_xscale("log")
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axes.set_xlabel("trainable adapter parameters")
    axes.set_ylabel("test accuracy (%), mean ± std over seeds")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    save_figure(figure, path)


def save_figure(figure: object, path: Path) -> None:
    """Write the figure as PNG atomically (a concurrent ``report`` never leaves a mixed file), and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=120)
    plt.close(figure)
    write_atomically(path, png.getvalue())


def _plot_step_time(rows: list[Row], path: Path, timings: Mapping[Key, TimingRatio]) -> None:
    """Bars: the timing pass's step time ÷ LoRA (median, whiskers min–max over rounds) if there is one, else each
    row's median training step (± std over seeds)."""
    import matplotlib.pyplot as plt

    if timings:
        rows = [row for row in rows if not row.is_reference]
    labels = [
        row.method if len({r.method for r in rows}) == len(rows) else f"{row.method}\n{row.knobs}" for row in rows
    ]
    figure, axes = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 2), 4.0))
    if timings:
        ratios = [timings.get((row.method, (row.records or row.diverged)[0]["config_hash"])) for row in rows]
        heights = [ratio.step[0] if ratio else 0.0 for ratio in ratios]
        errors = [[h - r.step[1] if r else 0.0 for h, r in zip(heights, ratios, strict=True)],
                  [r.step[2] - h if r else 0.0 for h, r in zip(heights, ratios, strict=True)]]
        bars = axes.bar(labels, heights, yerr=errors, capsize=4)
        axes.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        axes.set_ylabel("training step time ÷ LoRA (timing pass)")
    else:
        bars = axes.bar(
            labels, [row.mean(STEP_TIME) or 0.0 for row in rows], yerr=[row.std(STEP_TIME) for row in rows], capsize=4
        )
        axes.set_ylabel("median optimizer step time (ms)")
    for bar, row in zip(bars, rows, strict=True):
        if row.diverged:
            text = "diverged" if not row.records else f"{len(row.diverged)} diverged"
            axes.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                          color="red", fontsize=8, xytext=(0, 2), textcoords="offset points")
    axes.set_title("Training step time per method")
    axes.grid(True, axis="y", alpha=0.3)
    save_figure(figure, path)


MEMORY_LEGEND = {
    "cpu_peak_rss_increase": "increase of the process's resident memory (CPU, sampled every 20 ms) during training "
    "over its value when that run's training started (model loaded; memory freed by earlier runs handed back to the "
    "OS first): activations, gradients and optimizer state, not the base weights, whatever the run's position in "
    "the process",
    "cuda_max_allocated_increase": "increase of peak CUDA allocated memory during training over the memory allocated "
    "when that run's training started (model loaded): activations, gradients and optimizer state, not the base "
    "weights",
    "cpu_peak_rss": "peak resident memory of the whole process (CPU; older records: it includes what earlier runs "
    "of the process left behind)",
    "cuda_max_allocated": "peak CUDA memory allocated (older records: base weights included)",
}

_NOTES = """\
- **adapter params**: trainable parameters of the adapters, the matched budget (the target is {target:,}); \
**head params**: the new classification head, trained and saved with every method (`modules_to_save`), not \
counted in the budget.
- **test acc**: accuracy on the held-out test split, after restoring the epoch with the best validation accuracy.
- **Δ vs LoRA (95% CI)**: per seed, the method's test accuracy minus LoRA's on the same seed (same data order and \
head initialization), in points: the mean, and a Student-t 95% interval over seeds (▲ better / ▼ worse when the \
interval excludes 0; fewer than 3 seeds give no interval).
- **(reference)** rows train no adapter: *head only* trains just the new classification head, *zero shot* evaluates \
the untouched causal LM. The **References** line above the table adds the score of guessing (the training split's \
majority class, or chance for multiple choice).
- **forgetting**: the base model's loss on held-out general text (BoolQ questions and Wikipedia passages) with \
the adapters enabled minus disabled; encoders: in-batch contrastive sentence-embedding loss, causal LMs: \
next-token loss. Lower is better; 0 means nothing forgotten.
- **eff. rank ΔW**: numerical rank of each adapted layer's dense update, mean over layers.
- **train time**: wall time of the training epochs; **step**: median optimizer step of the run (shown only \
without a timing pass); **peak mem**: {memory}.
- **seeds**: finished runs (the means); "+ N diverged": runs stopped at the first step whose loss or gradient \
norm was NaN or infinite (not in the means, no adapter saved; marked in the plots).
- **fwd**: median forward time of one 16-example test batch with the adapters unmerged, merged into the \
weights (— if the method cannot merge), and of the base model.
"""


def _timing_notes(folder: Path, timings: Mapping[Key, TimingRatio]) -> list[str]:
    rows = load_timings(folder)
    if not timings:
        why = "no LoRA in its timing pass to divide by" if rows else "the comparison ran with `--no-timing`"
        return ["Step time and memory above are each run's own, measured under whatever load the machine had "
                f"during that run (no ratios from `{TIMING_FILE}`: {why}).", ""]
    latest = max(rows, key=lambda row: row["pass_id"])
    batch = "×".join(map(str, latest["batch"].get("input_ids", [])))
    return [
        f"- **step ÷ LoRA**: from the timing pass after training (`{TIMING_FILE}`): one training step (forward, "
        f"backward, AdamW) of every method on one fixed batch ({batch} tokens) on this comparison's model, timed "
        f"in {len(latest['seconds'])} interleaved rounds ({latest['clock']}, {latest['device']}), so that load "
        "hits all methods alike: the median of the per-round ratios to LoRA (min–max in brackets). "
        "**act. mem ÷ LoRA**: bytes autograd saves for backward in that step (deterministic)"
        + ("; **peak ÷ LoRA**: peak CUDA memory of the step." if any(r.peak for r in timings.values()) else ".")
        + f" Each run's own step time stays in `{RESULTS_FILE}` (`step_time_s`).",
        "",
    ]


def _budget_notes(records: list[Record], out_of_reach: Mapping[str, str]) -> list[str]:
    """One line per method whose natural knobs could not reach the budget (its row is at its natural size), and
    one per method left out because the budget lies beyond all its settings."""
    notes = list(dict.fromkeys(record["budget_note"] for record in records if record.get("budget_note")))
    notes += [f"left out: {message}" for message in out_of_reach.values()]
    return ["**Budget not reached naturally:**", *(f"- {note}" for note in notes), ""] if notes else []


def build_report(folder: Path) -> str:
    """Write ``report.md`` and the plots for the results in ``folder``; returns the markdown table."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ResultsFileError(f"folder {folder} not found.")
    records = load_records(folder / RESULTS_FILE)
    if not records:
        raise ResultsFileError(f"no finished runs in {folder / RESULTS_FILE}.")
    rows = group_rows(records)
    records = [record for row in rows for record in row.records + row.diverged]  # each run once
    timings = timing_ratios(load_timings(folder))
    table = markdown_table(rows, timings)
    _plot_accuracy(rows, folder / ACCURACY_PLOT)
    _plot_step_time(rows, folder / STEP_TIME_PLOT, timings)
    first = records[0]
    kinds = sorted({record.get("memory_kind") or "cpu_peak_rss" for record in records})
    memory = "; ".join(MEMORY_LEGEND.get(kind, kind) for kind in kinds)
    diverged = sum(record.get("status") == DIVERGED for record in records)
    text = "\n".join(
        [
            f"# hirank compare: {first['model']} on {first['task']}, budget {first['budget']}",
            "",
            f"{len(records)} runs{f' ({diverged} diverged)' if diverged else ''}; "
            f"{first.get('train_examples', '?')} training and {first.get('test_examples', '?')} "
            f"test examples; {first.get('world_size', 1)} process(es) on {first.get('device', '?')}.",
            *reference_summary(rows, records),
            "",
            table,
            "",
            _NOTES.format(target=first["target_params"], memory=memory),
            *_timing_notes(folder, timings),
            *_budget_notes(records, load_out_of_reach(folder)),
            f"![test accuracy vs trainable parameters]({ACCURACY_PLOT})",
            "",
            f"![step time per method]({STEP_TIME_PLOT})",
            "",
        ]
    )
    write_atomically(folder / "report.md", text)
    return table
