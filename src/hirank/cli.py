"""The hirank command: compare methods on a task, rebuild a report, list what is available.

Argument parsing and ``--help`` import only the standard library; torch, transformers and peft are imported
when a command runs. Every option is checked before a model loads; a fault is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .bench.options import (
    LEARNING_RATE_PRESETS,
    NUMBER_RULES,
    OptionError,
    check_options,
    check_output_folder,
    learning_rates,
    names,
)

DESCRIPTION = (
    "Beyond-LoRA parameter-efficient fine-tuning: compare methods on a task, rebuild a report, list what is "
    "available."
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" where there is a default to show (not for None: those helps say it in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Errors as one line on stderr (exit status 2), pointing at ``--help`` instead of printing the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(flag: str):
    return NUMBER_RULES[flag].parse


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hirank", description=DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    compare = commands.add_parser(
        "compare",
        help="fine-tune every method at a matched budget, several seeds; resumable",
        formatter_class=_HelpFormatter,
        description="Fine-tune LoRA and the hirank methods at a matched trainable-parameter budget and compare them. "
        "Results go to OUT/results.jsonl (one line per finished run), OUT/report.md and OUT/*.png; re-running the "
        "same command skips finished runs.",
    )
    compare.add_argument(
        "--model", default="minilm", help="packaged short name (see 'hirank list'), local model folder or hub id"
    )
    compare.add_argument("--task", default="sst2", help="task name (see 'hirank list')")
    compare.add_argument(
        "--methods",
        type=lambda text: names(text, "--methods"),
        default=None,
        help="comma-separated method names, or a set: default (LoRA and hirank's methods), peers (LoRA and peft's "
        "DoRA, VeRA, C3A, FourierFT, LoKr, OFT, BOFT, HiRA, RandLoRA) or all (default: the default set)",
    )
    compare.add_argument(
        "--budget",
        default="lora-r4",
        help="adapter parameters: lora-r<N> (LoRA rank N's count), a count (37k) or a share (0.2%%)",
    )
    compare.add_argument(
        "--budget-tolerance",
        type=_number("--budget-tolerance"),
        default=0.10,
        help="allowed relative miss of the budget; beyond it a method runs at its nearest natural setting with a "
        "note, or is out of reach where the budget lies beyond all its settings",
    )
    compare.add_argument("--seeds", type=_number("--seeds"), default=3, help="seeds 0..N-1 per method")
    compare.add_argument("--epochs", type=_number("--epochs"), default=3, help="passes over the training split")
    compare.add_argument("--batch-size", type=_number("--batch-size"), default=16, help="examples per step and process")
    compare.add_argument(
        "--max-length", type=_number("--max-length"), default=128, help="tokens per example (at most the model's limit)"
    )
    compare.add_argument(
        "--lr-preset",
        choices=LEARNING_RATE_PRESETS,
        default="tuned",
        help="tuned: rates picked on SST-2 validation for this short schedule; paper: the published recipes",
    )
    compare.add_argument(
        "--lr",
        type=learning_rates,
        default=None,
        help="override learning rates: METHOD=LR,... or LR for all (wins over --lr-preset)",
    )
    compare.add_argument(
        "--target-modules",
        type=lambda text: names(text, "--target-modules"),
        default=None,
        help="comma-separated layer names (default: the model's usual, e.g. query,value for BERT)",
    )
    compare.add_argument(
        "--train-limit", type=_number("--train-limit"), default=None, help="use only the first N training examples"
    )
    compare.add_argument(
        "--eval-limit",
        type=_number("--eval-limit"),
        default=None,
        help="use only the first N validation and test examples",
    )
    compare.add_argument(
        "--out", type=Path, default=None, help="output folder (default: results/<model>-<task>-<budget>)"
    )
    compare.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a model folder or hub id to run its own Python code (auto_map); off: such models are refused",
    )
    compare.add_argument(
        "--no-references",
        action="store_true",
        help="skip the reference run without an adapter (head only for classification, zero shot for multiple "
        "choice) that every report shows beside the methods",
    )
    compare.add_argument(
        "--no-timing",
        action="store_true",
        help="skip the timing pass after the runs (every method's training step timed side by side with LoRA's, "
        "for the report's step and memory ratios)",
    )

    suite = commands.add_parser(
        "suite",
        help="run a named list of comparisons into one folder, with one report; resumable",
        formatter_class=_HelpFormatter,
        description="Run every (model, task) comparison of a suite (see 'hirank list') into OUT/<model>-<task>/ and "
        "write OUT/suite.md: one table per task and an overall table (mean accuracy, mean rank, params, step time "
        "and memory as ratios to LoRA). Re-running the same command skips finished runs.",
    )
    suite.add_argument("name", help="the suite's name (see 'hirank list')")
    suite.add_argument(
        "--methods",
        type=lambda text: names(text, "--methods"),
        default=None,
        help="comma-separated method names, or a set: default, peers or all (default: the default set)",
    )
    suite.add_argument("--budget", default="lora-r4", help="adapter parameters, as for 'hirank compare'")
    suite.add_argument("--seeds", type=_number("--seeds"), default=3, help="seeds 0..N-1 per method")
    suite.add_argument("--out", type=Path, default=None, help="output folder (default: results/suite-<name>)")
    suite.add_argument("--no-references", action="store_true", help="skip the reference runs without an adapter")
    suite.add_argument("--no-timing", action="store_true", help="skip each comparison's timing pass")

    report = commands.add_parser(
        "report", help="rebuild report.md and the plots of a comparison folder", formatter_class=_HelpFormatter
    )
    report.add_argument("folder", type=Path, help="the output folder of a comparison (holds results.jsonl)")

    commands.add_parser("list", help="models, tasks and methods", formatter_class=_HelpFormatter)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _compare(args: argparse.Namespace) -> int:
    from .bench.budget import read_budget
    from .bench.compare import CompareOptions, compare, make_accelerator
    from .bench.models import check_model_options
    from .bench.report import build_report
    from .bench.tasks import ClassificationTask, get_task

    options = CompareOptions(
        model=args.model,
        task=args.task,
        methods=args.methods,
        budget=args.budget,
        budget_tolerance=args.budget_tolerance,
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate_preset=args.lr_preset,
        learning_rates=args.lr or {},
        target_modules=args.target_modules,
        train_limit=args.train_limit,
        eval_limit=args.eval_limit,
        out=args.out,
        trust_remote_code=args.trust_remote_code,
        references=not args.no_references,
        timing=not args.no_timing,
    )
    # everything that needs no model first (the output folder before anything else), then the model's config
    check_output_folder(options.output_dir())
    check_options(options)
    read_budget(options.budget)
    task = get_task(options.task)
    check_model_options(
        options.model,
        task.kind,
        list(options.target_modules) if options.target_modules else None,
        options.max_length,
        num_labels=task.num_labels if isinstance(task, ClassificationTask) else 2,
        trust_remote_code=options.trust_remote_code,
        task=task.name,
    )
    accelerator = make_accelerator()
    compare(options, accelerator)
    if accelerator.is_main_process:
        print(build_report(options.output_dir()))
        print(f"\nreport: {options.output_dir() / 'report.md'}")
    return 0


def _suite(args: argparse.Namespace) -> int:
    from .bench.budget import read_budget
    from .bench.compare import CompareOptions
    from .bench.suite import get_suite, run_suite

    suite = get_suite(args.name)
    folder = args.out or Path("results") / f"suite-{suite.name}"
    check_output_folder(folder)
    base = CompareOptions(
        methods=args.methods,
        budget=args.budget,
        seeds=args.seeds,
        references=not args.no_references,
        timing=not args.no_timing,
    )
    check_options(base)
    read_budget(base.budget)
    print(run_suite(suite, base, folder))
    print(f"\nsuite report: {folder / 'suite.md'}")
    return 0


def _report(folder: Path) -> int:
    from .bench.report import build_report

    if not folder.is_dir():
        raise OptionError(f"folder not found: {folder}" if not folder.exists() else f"{folder} is not a folder")
    print(build_report(folder))
    return 0


def _list() -> int:
    from .bench.methods import METHOD_SETS, METHODS
    from .bench.models import PACKAGED_MODELS
    from .bench.suite import SUITES
    from .bench.tasks import TASKS

    print("models:")
    for name, model in PACKAGED_MODELS.items():
        source = f" [{model.install}]" if model.install else ""
        print(f"  {name:<12} {'/'.join(model.kinds):<15} {model.description}{source}")
    print("tasks:")
    for name, task in TASKS.items():
        print(f"  {name:<12} {task.kind:<15} {task.description}")
    print("methods (sets for --methods: " + ", ".join(f"{name} = {','.join(members)}" for name, members in
                                                          METHOD_SETS.items() if name != "all") + ", all):")
    for name, spec in METHODS.items():
        status = "available" if spec.available else "not in this build"
        tuned, tuned_source = spec.preset_learning_rate("tuned")
        print(f"  {name:<12} {status:<18} lr {tuned:g} (tuned: {tuned_source}), {spec.paper_learning_rate:g} (paper: "
              f"{spec.paper_learning_rate_source})")
    print("suites (hirank suite NAME):")
    for name, suite in SUITES.items():
        entries = ", ".join(
            f"{entry.model}/{entry.task}{' (control)' if entry.control else ''}" for entry in suite.entries
        )
        print(f"  {name:<12} {entries}")
    return 0


def _stay_offline_unless_asked() -> None:
    """Packaged models and data are local: keep the hub off unless the user sets HF_HUB_OFFLINE=0.

    huggingface_hub reads the variable once, when first imported, so its module flag is updated as well.
    """
    import huggingface_hub.constants

    from .bench.models import hub_allowed

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    huggingface_hub.constants.HF_HUB_OFFLINE = not hub_allowed()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hirank`` command; errors the user can fix are one line on stderr, exit status 2."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a parse error already printed
        return int(exit_.code or 0)
    try:
        if args.command in ("compare", "suite") and args.out is not None:
            check_output_folder(args.out)  # first, before seconds of imports
        if args.command == "report":
            return _report(args.folder)
        _stay_offline_unless_asked()
        # transformers' own deprecation notice, raised inside accelerate/peft on every run: not the user's to fix
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        if args.command == "compare":
            return _compare(args)
        if args.command == "suite":
            return _suite(args)
        return _list()
    except Exception as error:
        if not _is_user_error(error):
            raise
        print(f"hirank {args.command}: error: {error}", file=sys.stderr)
        return 2


# the exceptions that mean "fix your options or files": module → class names (checked only once imported)
_USER_ERRORS = {
    "hirank.bench.options": ("OptionError",),
    "hirank.bench.budget": ("BudgetError",),
    "hirank.bench.compare": ("CompareError",),
    "hirank.bench.methods": ("MethodUnavailableError",),
    "hirank.bench.models": ("UnknownModelError",),
    "hirank.bench.results": ("ResultsFileError",),
    "hirank.bench.suite": ("UnknownSuiteError",),
    "hirank.bench.tasks": ("MissingDataError", "UnknownTaskError"),
}


def _is_user_error(error: Exception) -> bool:
    """A fault in the user's options or files (one line, exit 2), as opposed to a bug (a traceback)."""
    return any(
        isinstance(error, getattr(sys.modules[module], name))
        for module, class_names in _USER_ERRORS.items()
        if module in sys.modules
        for name in class_names
    )


if __name__ == "__main__":
    sys.exit(main())
