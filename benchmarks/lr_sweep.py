"""Pick each method's learning rate for a short comparison on the *validation* split (never the test split).

Runs ``hirank compare`` once per learning rate of the grid (seed 0 by default, every method at the same rate),
then prints, per method, the best validation accuracy reached at each rate and the rate that reached the
highest (ties: the smaller rate). Each rate's runs go to ``OUT/lr-<rate>/`` and resume like any comparison.

    .venv/bin/python benchmarks/lr_sweep.py                       # the default comparison's setting
    .venv/bin/python benchmarks/lr_sweep.py --task mrpc --grid 1e-3,3e-3
    .venv/bin/python benchmarks/lr_sweep.py --no-train --grid 5e-4,1e-3,2e-3,5e-3,1e-2,2e-2,5e-2,1e-1

The defaults in ``hirank/bench/methods.py`` (``learning_rate``) came from this script's default run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hirank.bench.compare import CompareOptions, compare
from hirank.bench.results import RESULTS_FILE, load_records


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--methods", default=None, help="comma-separated; default: every available method")
    parser.add_argument("--budget", default="lora-r4")
    parser.add_argument("--grid", default="5e-4,1e-3,2e-3,5e-3", help="comma-separated learning rates")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/lr-sweep"))
    parser.add_argument("--no-train", action="store_true", help="only tabulate the runs already in OUT")
    return parser


def main() -> None:
    args = _parser().parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rates = [float(rate) for rate in args.grid.split(",")]
    methods = tuple(args.methods.split(",")) if args.methods else None
    best: dict[str, dict[float, float]] = {}
    for rate in rates:
        options = CompareOptions(
            model=args.model, task=args.task, methods=methods, budget=args.budget, seeds=args.seeds,
            learning_rates={"*": rate}, out=args.out / f"lr-{rate:g}",
            references=False, timing=False,  # a sweep compares the methods' accuracies only
        )
        records = load_records(options.output_dir() / RESULTS_FILE) if args.no_train else compare(options)
        for record in records:
            accuracies = best.setdefault(record["method"], {})
            # mean over seeds of the best epoch's validation accuracy (what the comparison selects on)
            accuracies[rate] = accuracies.get(rate, 0.0) + max(record["validation_accuracy"]) / args.seeds
    print(f"\nbest validation accuracy (%) per learning rate — {args.model} on {args.task}, {args.seeds} seed(s)")
    print(f"{'method':<14}" + "".join(f"{rate:>9g}" for rate in rates) + "   chosen")
    for method, accuracies in best.items():
        chosen = max(rates, key=lambda rate: (accuracies.get(rate, -1.0), -rate))
        row = "".join(f"{100 * accuracies[rate]:>9.1f}" if rate in accuracies else f"{'—':>9}" for rate in rates)
        print(f"{method:<14}{row}   {chosen:g}")


if __name__ == "__main__":
    main()
