"""QuanTA vs peft LoRA on a MiniLM-shaped encoder (query, value adapted): training-step time at about
equal trainable parameters, the two ways of handling the frozen θ₀ branch, and forward time merged vs base.

    .venv/bin/python benchmarks/quanta.py [--threads N]
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).parent))
import hirank  # noqa: E402
from common import (  # noqa: E402
    DEVICE, adapted, argument_parser, batch, forward_seconds, minilm_like, parse_args, print_table, train_step_seconds,
)
from hirank.tuners.quanta import layer as quanta_layer  # noqa: E402

TARGETS = ["query", "value"]


@contextmanager
def theta0_branch(max_ratio: float):
    """Force how the frozen θ₀ branch runs: 0 → always the circuit, inf → always a cached dense M(θ₀)."""
    original = quanta_layer.DENSE_THETA0_MAX_RATIO
    quanta_layer.DENSE_THETA0_MAX_RATIO = max_ratio
    try:
        yield
    finally:
        quanta_layer.DENSE_THETA0_MAX_RATIO = original


def main() -> None:
    parser = argument_parser(__doc__, threads=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parse_args(parser)
    inputs = batch(batch_size=args.batch_size, seq_len=args.seq_len)

    rows = []
    base = minilm_like()
    rows.append({"method": "base model (full forward only)", "trainable": 0,
                 "train step ms": "-", "forward ms": f"{1e3 * forward_seconds(base, inputs):.1f}"})
    configs = {
        "lora r=3": LoraConfig(target_modules=TARGETS, r=3, lora_alpha=6),
        "lora r=4": LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8),
        "quanta 6·4·4·4 (default: θ₀ branch chosen by size)": hirank.QuantaConfig(target_modules=TARGETS),
    }
    for name, config in configs.items():
        model, count = adapted(config)
        rows.append({"method": name, "trainable": count,
                     "train step ms": f"{1e3 * train_step_seconds(model, inputs):.1f}",
                     "forward ms": f"{1e3 * forward_seconds(model, inputs):.1f}"})
    quanta = configs["quanta 6·4·4·4 (default: θ₀ branch chosen by size)"]
    for name, max_ratio in (("θ₀ as circuit", 0.0), ("θ₀ as cached dense matmul", float("inf"))):
        with theta0_branch(max_ratio):
            model, count = adapted(quanta)
            rows.append({"method": f"quanta 6·4·4·4 ({name})", "trainable": count,
                         "train step ms": f"{1e3 * train_step_seconds(model, inputs):.1f}",
                         "forward ms": f"{1e3 * forward_seconds(model, inputs):.1f}"})
    model, count = adapted(quanta)
    merged = model.merge_and_unload()
    rows.append({"method": "quanta merged (merge_and_unload)", "trainable": count,
                 "train step ms": "-", "forward ms": f"{1e3 * forward_seconds(merged, inputs):.1f}"})
    print(f"batch {args.batch_size} × {args.seq_len} tokens on {DEVICE}, {args.threads} CPU threads, median of 10")
    print_table(rows)


if __name__ == "__main__":
    main()
