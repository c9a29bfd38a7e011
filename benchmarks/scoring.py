"""Multiple-choice scoring on SmolLM2-135M: one forward of every sequence of a batch padded to its longest
choice, against ``choice_scores`` (sequences that differ only in a one-token answer share a forward; forwards
grouped by length, ``hirank.bench.tasks.SCORING_TOKENS`` tokens each, as evaluation runs them).

One batch of ``--questions`` validation questions of a commonsense task (as ``hirank suite commonsense``
scores them: 96 tokens at most); interleaved rounds of thread CPU time, median and spread (min–max) of the
per-round ratio; the padded tokens each way; and the largest difference between the two ways' scores.

    .venv/bin/python benchmarks/scoring.py [--task piqa] [--questions 64] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import argument_parser, interleaved_seconds, parse_args, round_ratios  # noqa: E402
from hirank.bench.tasks import get_task  # noqa: E402
from hirank.bench.models import load_model  # noqa: E402


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0], threads=1)
    parser.add_argument("--task", default="piqa")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parse_args(parser)
    task = get_task(args.task)
    loaded = load_model("smollm2", task.kind)
    model = loaded.model.eval()
    batch = task.eval_collator(loaded.tokenizer, 96)(task.splits().validation[: args.questions])

    def one_batch() -> torch.Tensor:
        with torch.no_grad():
            return task._grouped_choice_scores(model, batch)[0]

    def scored() -> torch.Tensor:
        with torch.no_grad():
            return task.choice_scores(model, batch)

    times = interleaved_seconds({"one padded batch": one_batch, "choice_scores": scored}, args.rounds, warmup=1)
    fed = []  # the input_ids of every forward choice_scores runs
    hook = model.register_forward_pre_hook(lambda _m, _args, kwargs: fed.append(kwargs["input_ids"]), with_kwargs=True)
    difference = (one_batch() - scored()).abs().max().item()
    hook.remove()
    fed = fed[1:]  # one_batch's single forward first
    lengths = batch["attention_mask"].sum(-1)
    padded, forwarded = sum(ids.numel() for ids in fed), sum(len(ids) for ids in fed)
    print(f"{args.task}: {args.questions} questions, {len(lengths)} sequences, {int(lengths.sum())} tokens")
    print(f"padded tokens: one batch {batch['input_ids'].numel()}, choice_scores {padded} "
          f"({forwarded} sequences forwarded)")
    for name, seconds in times.items():
        print(f"{name}: {statistics.median(seconds):.2f} s (median of {args.rounds} rounds, thread CPU time)")
    print(f"speed-up: {round_ratios(times['one padded batch'], times['choice_scores'])}; "
          f"largest score difference {difference:.1e}")


if __name__ == "__main__":
    main()
