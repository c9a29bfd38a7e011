"""SURM step time: the structured products (FFT / reshape) vs materializing S every step, and vs peft LoRA.

1. One d×d layer, 8 × 128 tokens, forward + backward (input gradient included, as inside a network):
   peft LoRA r=1 and r=8, and each SURM structure with its fast product and with S built densely each step.
2. The MiniLM-shaped encoder (query, value adapted; the adapter placement on its default targets):
   training-step time (forward + backward + AdamW) and trainable parameters.

3. Issue 12's targets (``--mlp``): 4 Linear layers of width d with GELU between, forward + backward + AdamW,
   step time and activation memory ÷ peft LoRA r=8 on the same layers, each structure at its default size and
   LDR at LoRA r=8's budget (2·r·d = 16·d parameters per layer: r = 8). Times are medians of interleaved
   rounds (spread: min–max ÷ the median LoRA step); memory is the bytes saved for backward (unique storages,
   parameters excluded), counted with ``torch.autograd.graph.saved_tensors_hooks``: deterministic. The Toeplitz
   and LDR rows are timed once more with each product run over all tokens at once instead of in cache-sized chunks
   (``hirank.ops.chunks.CPU_CHUNK_ELEMENTS``; column "whole ÷ this": > 1 where the chunks pay).

    .venv/bin/python benchmarks/surm.py [--threads N] [--dims 384 768] [--rounds 8] [--skip-model]
    .venv/bin/python benchmarks/surm.py --mlp --dims 1024 2048 4096 --token-counts 512 4096 --rounds 5

4. The cost model's crossover (``--crossover``): one d×d layer, forward + backward, each structure with its fast
   product and with S built once per step forced, dense ÷ fast (median of
   interleaved rounds) beside the path ``structured.fast_product_is_cheaper`` picks.

    .venv/bin/python benchmarks/surm.py --crossover --dims 512 1024 2048 --token-counts 512 2048 --rounds 5
"""

from __future__ import annotations

import statistics
import sys
from contextlib import AbstractContextManager, contextmanager
from typing import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import hirank  # noqa: E402
from common import (  # noqa: E402
    DEVICE, LinearStack, adapted, argument_parser, batch, best_seconds, clock, dense_delta_forward, layer_step,
    parse_args,
    interleaved_seconds, print_table, round_ratios, saved_activation_bytes, tensor_step, train_step, whole_passes,
)
from hirank.ops import structured  # noqa: E402
from hirank.tuners.surm.layer import SurmLayer  # noqa: E402

TARGETS = ["query", "value"]
SURM_VARIANTS = {
    "circulant": {"structure": "circulant"},
    "toeplitz": {"structure": "toeplitz"},
    "kronecker": {"structure": "kronecker"},
    "ldr r=1": {"structure": "ldr", "displacement_rank": 1},
    "ldr r=4": {"structure": "ldr", "displacement_rank": 4},
}


@contextmanager
def forced_path(fast: bool) -> Iterator[None]:
    """Every SURM layer takes the fast product (True) or the dense S built once per step (False)."""
    original = structured.fast_product_is_cheaper
    structured.fast_product_is_cheaper = lambda *args, **kwargs: fast
    try:
        yield
    finally:
        structured.fast_product_is_cheaper = original


CROSSOVER_VARIANTS = {"circulant": ("circulant", 1), "toeplitz": ("toeplitz", 1), "ldr r=1": ("ldr", 1),
                      "ldr r=8": ("ldr", 8)}


def crossover_table(dims: list[int], token_counts: list[int], rounds: int) -> None:
    """Measured dense ÷ fast step time per structure, size and tokens, and the cost model's choice."""
    rows = []
    for d in dims:
        for tokens in token_counts:
            steps = {}
            for name, (structure, rank) in CROSSOVER_VARIANTS.items():
                config = hirank.SurmConfig(target_modules=["proj"], structure=structure, displacement_rank=rank,
                                           init_weights=False)
                for fast in (True, False):
                    steps[name, fast] = layer_step(config, d, tokens, lambda fast=fast: forced_path(fast))
            times = interleaved_seconds(steps, rounds, warmup=1)
            for name, (structure, rank) in CROSSOVER_VARIANTS.items():
                ratio = statistics.median(d_ / f_ for d_, f_ in zip(times[name, False], times[name, True]))
                chosen = structured.fast_product_is_cheaper(structure, tokens, d, d, rank)
                rows.append({"d": d, "tokens": tokens, "structure": name,
                             "fast ms": f"{1e3 * statistics.median(times[name, True]):.1f}",
                             "dense ms": f"{1e3 * statistics.median(times[name, False]):.1f}",
                             "dense ÷ fast": f"{ratio:.2f}", "model picks": "fast" if chosen else "dense",
                             "right": "✓" if chosen == (ratio >= 1) else "✗"})
    print(f"one d×d layer, forward + backward (x and the generators), median of {rounds} interleaved rounds, "
          f"{torch.get_num_threads()} thread(s), {clock().__name__}")
    print_table(rows)


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


#: Issue 12's SURM rows: each structure at its default size, LDR also at LoRA r=8's budget (2·r·d = 16·d: r = 8).
MLP_VARIANTS = {
    "circulant": {"structure": "circulant"},
    "toeplitz": {"structure": "toeplitz"},
    "kronecker": {"structure": "kronecker"},
    "ldr r=1": {"structure": "ldr", "displacement_rank": 1},
    "ldr r=8 (LoRA r=8 budget)": {"structure": "ldr", "displacement_rank": 8},
}


def mlp_configs(targets: list[str]) -> dict[str, PeftConfig]:
    """peft LoRA r=8 (the reference) and the SURM rows of issue 12, all on the layers ``targets``."""
    configs: dict[str, PeftConfig] = {"peft lora r=8": LoraConfig(target_modules=targets, r=8, lora_alpha=16)}
    configs |= {f"surm {name}": hirank.SurmConfig(target_modules=targets, init_weights=False, **knobs)
                for name, knobs in MLP_VARIANTS.items()}
    return configs


def mlp_table(dims: list[int], token_counts: list[int], rounds: int) -> list[dict[str, object]]:
    """Issue 12's ratios to peft LoRA r=8: step time (median of interleaved rounds, spread) and saved bytes."""
    rows = []
    for d in dims:
        for tokens in token_counts:
            torch.manual_seed(0)
            x = torch.randn(tokens, d, device=DEVICE)
            models = {}
            targets = LinearStack(d).target_modules()
            for name, config in mlp_configs(targets).items():
                torch.manual_seed(0)
                models[name] = get_peft_model(LinearStack(d), config).to(DEVICE)
            memory = {name: saved_activation_bytes(lambda m=model: m(x).square().mean(), model) for name, model in models.items()}
            steps = {name: tensor_step(model, x) for name, model in models.items()}
            steps |= {f"{name}, whole passes": whole_passes(tensor_step(model, x))
                      for name, model in models.items() if name.startswith("surm")}
            times = interleaved_seconds(steps, rounds, warmup=1)
            lora = statistics.median(times["peft lora r=8"])
            for name in models:
                median = statistics.median(times[name])
                whole = times.get(f"{name}, whole passes")
                rows.append({
                    "d": d, "tokens": tokens, "method": name,
                    "step ms": f"{1e3 * median:.1f}",
                    "step ÷ LoRA": f"{median / lora:.2f}",
                    "spread": f"{min(times[name]) / lora:.2f}–{max(times[name]) / lora:.2f}",
                    "whole ÷ this": "-" if whole is None else round_ratios(whole, times[name]),
                    "saved MiB": f"{memory[name] / 2**20:.1f}",
                    "memory ÷ LoRA": f"{memory[name] / memory['peft lora r=8']:.2f}",
                })
            del models
    print(f"4 Linear layers d×d with GELU between, forward + backward + AdamW, median of {rounds} interleaved "
          f"rounds (spread min–max), {torch.get_num_threads()} thread(s), {clock().__name__}; memory: bytes saved "
          "for backward")
    print_table(rows)
    return rows


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
    parser.add_argument("--mlp", action="store_true", help="only issue 12's table (4 GELU layers, ÷ LoRA r=8)")
    parser.add_argument("--token-counts", type=int, nargs="+", default=[512],
                        help="tokens per step of the --mlp and --crossover tables (512 and ≥ d in issue 12)")
    parser.add_argument("--crossover", action="store_true",
                        help="only the cost model's table: fast product vs dense S per step, one layer")
    args = parse_args(parser)
    if args.crossover:
        crossover_table(args.dims, args.token_counts, args.rounds)
        return
    if args.mlp:
        mlp_table(args.dims, args.token_counts, args.rounds)
        return
    layer_table(args.dims, args.tokens, args.rounds)
    if not args.skip_model:
        model_table(args.seq_len, args.model_rounds)


if __name__ == "__main__":
    main()
