"""SURM step time: the structured products (FFT / reshape) vs materializing S every step, and vs peft LoRA.

1. One d×d layer, 8 × 128 tokens, forward + backward (input gradient included, as inside a network):
   peft LoRA r=1 and r=8, and each SURM structure with its fast product and with S built densely each step.
2. The MiniLM-shaped encoder (query, value adapted; the adapter placement on its default targets):
   training-step time (forward + backward + AdamW) and trainable parameters.

    .venv/bin/python benchmarks/surm.py [--threads N] [--dims 384 768] [--rounds 8] [--skip-model]
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).parent))
import hirank  # noqa: E402
from common import (  # noqa: E402
    adapted, argument_parser, batch, best_seconds, clock, dense_delta_forward, layer_step, parse_args, print_table,
    train_step,
)
from hirank.tuners.surm.layer import SurmLayer  # noqa: E402

TARGETS = ["query", "value"]
SURM_VARIANTS = {
    "circulant": {"structure": "circulant"},
    "toeplitz": {"structure": "toeplitz"},
    "kronecker": {"structure": "kronecker"},
    "ldr r=1": {"structure": "ldr", "displacement_rank": 1},
    "ldr r=4": {"structure": "ldr", "displacement_rank": 4},
}


def materialized_s() -> AbstractContextManager[None]:
    """Variant: build the dense α·S (as merging does) in every forward, then one x·Sᵀ matmul."""
    return dense_delta_forward(SurmLayer, "surm_dropout")


def layer_table(dims: list[int], tokens: int, rounds: int) -> None:
    configs = {f"peft lora r={r}": LoraConfig(target_modules=["proj"], r=r, lora_alpha=2 * r) for r in (1, 8)}
    configs |= {f"surm {name}": hirank.SurmConfig(target_modules=["proj"], init_weights=False, **knobs)
                for name, knobs in SURM_VARIANTS.items()}
    times: dict[int, dict[str, float]] = {}
    for d in dims:
        steps = {name: layer_step(config, d, tokens) for name, config in configs.items()}
        steps |= {f"{name} (S materialized per step)": layer_step(config, d, tokens, materialized_s)
                  for name, config in configs.items() if name.startswith("surm")}
        times[d] = best_seconds(steps, rounds)
    rows = []
    for name in configs:
        rows.append({"method": name, **{f"d={d} ms": f"{1e3 * times[d][name]:.2f}" for d in dims}})
        dense = f"{name} (S materialized per step)"
        if dense in times[dims[0]]:
            rows.append({"method": dense, **{f"d={d} ms": f"{1e3 * times[d][dense]:.2f} "
                                                          f"({times[d][dense] / times[d][name]:.1f}× fast)"
                                             for d in dims}})
    print(f"one d×d layer, {tokens} tokens, forward + backward, best of {rounds} interleaved rounds, "
          f"{torch.get_num_threads()} thread(s), {clock().__name__}")
    print_table(rows)


def model_table(seq_len: int, rounds: int) -> None:
    inputs = batch(seq_len=seq_len)
    configs = {
        "peft lora r=1": LoraConfig(target_modules=TARGETS, r=1, lora_alpha=2),
        "peft lora r=8": LoraConfig(target_modules=TARGETS, r=8, lora_alpha=16),
        **{f"surm {name}": hirank.SurmConfig(target_modules=TARGETS, **knobs) for name, knobs in SURM_VARIANTS.items()
           if name != "ldr r=4"},
        "surm circulant adapter (2 per block)": hirank.SurmConfig(placement="adapter"),
    }
    steps, counts = {}, {}
    for name, config in configs.items():
        model, counts[name] = adapted(config)
        steps[name] = train_step(model, inputs)
    times = best_seconds(steps, rounds, warmup=1)
    rows = [{"method": name, "trainable": counts[name], "train step ms": f"{1e3 * times[name]:.1f}"}
            for name in configs]
    print(f"\nMiniLM-shaped encoder (6 × 384, FFN 1536), batch 8 × {seq_len}, forward + backward + AdamW, "
          f"best of {rounds} interleaved rounds, {torch.get_num_threads()} thread(s), {clock().__name__}")
    print_table(rows)


def main() -> None:
    parser = argument_parser(__doc__, threads=1,
                             threads_help="torch threads; 1 by default: then steps are timed in CPU time of the "
                                          "thread, which other processes on a shared machine do not disturb")
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 768])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (a multiple of 128)")
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length of the encoder benchmark")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds of the single-layer table")
    parser.add_argument("--model-rounds", type=int, default=4, help="timed rounds of the encoder table")
    parser.add_argument("--skip-model", action="store_true", help="only the single-layer table")
    args = parse_args(parser)
    layer_table(args.dims, args.tokens, args.rounds)
    if not args.skip_model:
        model_table(args.seq_len, args.model_rounds)


if __name__ == "__main__":
    main()
