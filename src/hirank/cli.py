"""The ``hirank`` command: ``compare`` methods on a task, rebuild a ``report``, ``list`` what is available."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from .bench.methods import LEARNING_RATE_PRESETS


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _learning_rates(text: str) -> dict[str, float]:
    """``lora=5e-4,surm=2e-3``, or one number for every method (key ``*``)."""
    rates = {}
    for item in _csv(text):
        method, _, value = item.rpartition("=")
        try:
            rates[method or "*"] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot read learning rate {item!r}; use METHOD=LR or LR.") from None
    return rates


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hirank", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    compare = commands.add_parser(
        "compare",
        help="fine-tune every method at a matched budget, several seeds; resumable",
        description="Fine-tune LoRA and the hirank methods at a matched trainable-parameter budget and compare them. "
        "Results go to OUT/results.jsonl (one line per finished run), OUT/report.md and OUT/*.png; re-running the "
        "same command skips finished runs.",
    )
    compare.add_argument(
        "--model", default="minilm", help="packaged short name (see `hirank list`), local path or hub id"
    )
    compare.add_argument("--task", default="sst2", help="task name (see `hirank list`)")
    compare.add_argument("--methods", type=_csv, default=None, help="comma-separated; default: every available method")
    compare.add_argument(
        "--budget",
        default="lora-r4",
        help="adapter parameters: lora-r<N> (LoRA rank N's count), a count (37k) or a share (0.2%%)",
    )
    compare.add_argument("--budget-tolerance", type=float, default=0.10, help="allowed relative miss of the budget")
    compare.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method")
    compare.add_argument("--epochs", type=int, default=3)
    compare.add_argument("--batch-size", type=int, default=16, help="per process")
    compare.add_argument("--max-length", type=int, default=128, help="tokens per example")
    compare.add_argument(
        "--lr-preset",
        choices=LEARNING_RATE_PRESETS,
        default="tuned",
        help="tuned: rates picked on SST-2 validation for this short schedule (default); paper: the published recipes",
    )
    compare.add_argument(
        "--lr",
        type=_learning_rates,
        default={},
        help="override learning rates: METHOD=LR,... or LR for all (wins over --lr-preset)",
    )
    compare.add_argument(
        "--target-modules", type=_csv, default=None, help="comma-separated; default: the model's usual"
    )
    compare.add_argument("--train-limit", type=int, default=None, help="use only the first N training examples")
    compare.add_argument("--eval-limit", type=int, default=None, help="use only the first N validation/test examples")
    compare.add_argument(
        "--out", type=Path, default=None, help="output folder; default results/<model>-<task>-<budget>"
    )

    report = commands.add_parser("report", help="rebuild report.md and the plots of a comparison folder")
    report.add_argument("folder", type=Path)

    commands.add_parser("list", help="models, tasks and methods")
    return parser


def _compare(args: argparse.Namespace) -> int:
    from .bench.compare import CompareOptions, compare, make_accelerator
    from .bench.report import build_report

    options = CompareOptions(
        model=args.model,
        task=args.task,
        methods=args.methods or None,
        budget=args.budget,
        budget_tolerance=args.budget_tolerance,
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate_preset=args.lr_preset,
        learning_rates=args.lr,
        target_modules=args.target_modules,
        train_limit=args.train_limit,
        eval_limit=args.eval_limit,
        out=args.out,
    )
    accelerator = make_accelerator()
    compare(options, accelerator)
    if accelerator.is_main_process:
        print(build_report(options.output_dir()))
        print(f"\nreport: {options.output_dir() / 'report.md'}")
    return 0


def _list() -> int:
    from .bench.methods import METHODS
    from .bench.models import PACKAGED_MODELS
    from .bench.tasks import TASKS

    print("models:")
    for name, model in PACKAGED_MODELS.items():
        source = f" [{model.install}]" if model.install else ""
        print(f"  {name:<12} {'/'.join(model.kinds):<15} {model.description}{source}")
    print("tasks:")
    for name, task in TASKS.items():
        print(f"  {name:<12} {task.kind:<15} {task.description}")
    print("methods:")
    for name, spec in METHODS.items():
        status = "available" if spec.available else "not in this build"
        print(f"  {name:<12} {status:<18} lr {spec.learning_rate:g} (tuned), {spec.paper_learning_rate:g} (paper: "
              f"{spec.paper_learning_rate_source})")
    return 0


def _stay_offline_unless_asked() -> None:
    """Packaged models and data are local: keep the hub off unless the user sets HF_HUB_OFFLINE=0.

    huggingface_hub reads the variable once, when first imported (``import hirank`` already did), so its
    module flag is updated as well.
    """
    import huggingface_hub.constants

    from .bench.models import hub_allowed

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    huggingface_hub.constants.HF_HUB_OFFLINE = not hub_allowed()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hirank`` command; errors the user can fix are one line on stderr, exit status 2."""
    args = _parser().parse_args(argv)
    _stay_offline_unless_asked()
    # transformers' own deprecation notice, raised inside accelerate/peft on every run: not the user's to fix
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    from .bench.budget import BudgetError
    from .bench.compare import CompareError
    from .bench.methods import MethodUnavailableError
    from .bench.models import UnknownModelError
    from .bench.results import ResultsFileError
    from .bench.tasks import MissingDataError, UnknownTaskError

    try:
        if args.command == "compare":
            return _compare(args)
        if args.command == "report":
            from .bench.report import build_report

            print(build_report(args.folder))
            return 0
        return _list()
    except (
        BudgetError,
        CompareError,
        MethodUnavailableError,
        UnknownModelError,
        UnknownTaskError,
        MissingDataError,
        ResultsFileError,
    ) as error:
        print(f"hirank {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
