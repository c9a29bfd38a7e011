"""MTLoRA and LoRATRF vs peft LoRA at equal rank: step time, parameters, and LoRATRF's inference cost.

1. One d×d layer, 8 × 128 tokens, forward + backward (input gradient included, as inside a network):
   peft LoRA, MTLoRA per variant (factored x → Ax → TAx → BTAx), MTLoRA with ΔW = s·BTA built every step
   (the authors' LLaVA/peft path, spec §1.2), LoRATRF (LoRA + task filter of rank k).
2. The MiniLM-shaped encoder (query, value adapted): training-step time (forward + backward + AdamW).
3. LoRATRF at inference on that encoder (eval forward): unmerged, merged (LoRA folded, filter live) and
   after merge_and_unload, against the base model (= merged LoRA) and unmerged peft LoRA.
4. ``--chunks`` instead: LoRATRF (low-rank T, and diagonal T at LoRA r=8's parameter count) in 4 Linear layers
   with GELU (``common.LinearStack``), forward + backward + AdamW, ÷ peft LoRA r=8, with its filter's passes in
   cache-sized token chunks (CPU, beyond ``hirank.ops.chunks.WHOLE_PASS_ELEMENTS``) and as whole passes
   (column "whole ÷ this"); for the diagonal T also with backward testing every entry of 1 + g·D for 0, as on
   GPUs (column "zero test ÷ this"); medians of interleaved rounds with their spread.

    .venv/bin/python benchmarks/mtlora_loratrf.py [--threads N] [--rank 8] [--filter-rank 8] [--rounds 5]
    .venv/bin/python benchmarks/mtlora_loratrf.py --chunks --dims 2048 4096 --token-counts 512 4096 --rounds 7
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import hirank  # noqa: E402
from common import (  # noqa: E402
    DEVICE, LinearStack, adapted, argument_parser, batch, best_seconds, dense_delta_forward, interleaved_seconds,
    layer_step, minilm_like, parse_args, print_table, round_ratios, tensor_step, train_step, whole_passes,
)
from hirank.ops import loratrf  # noqa: E402
from hirank.tuners.mtlora import MTLoraLayer  # noqa: E402

TARGETS = ["query", "value"]
VARIANTS = ("shim", "icfm", "ctcm", "dtsm")


def materialized_delta() -> AbstractContextManager[None]:
    """MTLoRA as the authors' peft code runs it: the dense ΔW = s·B T A built in every forward."""
    return dense_delta_forward(MTLoraLayer, "mtlora_dropout")


def configs(targets: list[str], rank: int, filter_rank: int) -> dict[str, object]:
    return {
        f"peft lora r={rank}": LoraConfig(target_modules=targets, r=rank, lora_alpha=2 * rank),
        **{f"mtlora {v} r={rank}": hirank.MTLoraConfig(target_modules=targets, r=rank, lora_alpha=2 * rank, variant=v)
           for v in VARIANTS},
        f"loratrf r={rank} k={filter_rank}": hirank.LoraTRFConfig(
            target_modules=targets, r=rank, lora_alpha=2 * rank, filter_rank=filter_rank),
    }


def layer_table(dims: list[int], tokens: int, rank: int, filter_rank: int, rounds: int) -> None:
    times = {}
    for d in dims:
        steps = {name: layer_step(config, d, tokens) for name, config in configs(["proj"], rank, filter_rank).items()}
        steps[f"mtlora shim r={rank}, ΔW built per step"] = layer_step(
            hirank.MTLoraConfig(target_modules=["proj"], r=rank, lora_alpha=2 * rank, variant="shim"), d, tokens,
            materialized_delta)
        times[d] = best_seconds(steps, rounds)
    lora = f"peft lora r={rank}"
    rows = [{"method": name, **{f"d={d} ms (× lora)": f"{1e3 * t[name]:.2f} ({t[name] / t[lora]:.2f}×)"
                                for d, t in times.items()}} for name in times[dims[0]]]
    print(f"one d×d layer on {DEVICE}, {tokens} tokens, forward + backward, best of {rounds} interleaved rounds")
    print_table(rows)


def model_table(seq_len: int, rank: int, filter_rank: int, rounds: int) -> None:
    inputs = batch(seq_len=seq_len)
    steps, counts = {}, {}
    for name, config in configs(TARGETS, rank, filter_rank).items():
        model, counts[name] = adapted(config)
        steps[name] = train_step(model, inputs)
    times = best_seconds(steps, rounds, warmup=1)
    lora = f"peft lora r={rank}"
    rows = [{"method": name, "trainable": counts[name], "train step ms": f"{1e3 * times[name]:.1f}",
             "× lora": f"{times[name] / times[lora]:.2f}"} for name in steps]
    print(f"\nMiniLM-shaped encoder (6 × 384, FFN 1536; query, value adapted) on {DEVICE}, batch 8 × {seq_len}, "
          f"forward + backward + AdamW, best of {rounds} interleaved rounds")
    print_table(rows)


def inference_table(seq_len: int, rank: int, filter_rank: int, rounds: int) -> None:
    inputs = {"input_ids": batch(seq_len=seq_len)["input_ids"]}
    trf = hirank.LoraTRFConfig(target_modules=TARGETS, r=rank, lora_alpha=2 * rank, filter_rank=filter_rank,
                               init_weights=False)
    models = {
        "base model (= merged LoRA)": minilm_like(),
        f"peft lora r={rank}, unmerged": get_peft_model(minilm_like(), LoraConfig(target_modules=TARGETS, r=rank)),
        "loratrf, unmerged": adapted(trf)[0],
        "loratrf, merged (filter live)": adapted(trf)[0],
        "loratrf, merge_and_unload (filter live)": adapted(trf)[0].merge_and_unload(),
    }
    models["loratrf, merged (filter live)"].merge_adapter()
    for model in models.values():
        model.eval()

    def forward(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(**inputs)

        return run

    times = best_seconds({name: forward(model) for name, model in models.items()}, rounds)
    base = times["base model (= merged LoRA)"]
    rows = [{"model": name, "forward ms": f"{1e3 * t:.2f}", "vs base": f"{100 * (t / base - 1):+.1f}%"}
            for name, t in times.items()]
    print(f"\nLoRATRF inference cost (r={rank}, k={filter_rank}, filters on 12 query/value outputs of width 384) "
          f"on {DEVICE}, batch 8 × {seq_len}, eval forward, best of {rounds} interleaved rounds")
    print_table(rows)


def zero_tested(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the diagonal filter's backward testing every entry of 1 + g·D for 0 (what it does on GPUs and
    under torch.compile, where reading whether every D_j > −1 would sync the device)."""
    def run() -> None:
        never_zero = loratrf._scale_never_zero
        loratrf._scale_never_zero = lambda D: False
        try:
            step()
        finally:
            loratrf._scale_never_zero = never_zero
    return run


def chunk_table(dims: list[int], token_counts: list[int], rounds: int) -> None:
    """LoRATRF's filter in token chunks and as whole passes, in a 4-layer stack, ÷ peft LoRA r=8."""
    rows = []
    for d in dims:
        targets = LinearStack(d).target_modules()
        configs = {"peft lora r=8": LoraConfig(target_modules=targets, r=8, lora_alpha=16),
                   "loratrf default (low-rank T, k=8)": hirank.LoraTRFConfig(target_modules=targets),
                   "loratrf r=7, diagonal T (LoRA r=8's count)": hirank.LoraTRFConfig(
                       target_modules=targets, r=7, lora_alpha=14, filter_transform="diagonal")}
        for tokens in token_counts:
            torch.manual_seed(0)
            x = torch.randn(tokens, d, device=DEVICE)
            models = {}
            for name, config in configs.items():
                torch.manual_seed(0)
                models[name] = get_peft_model(LinearStack(d), config).to(DEVICE)
            steps = {name: tensor_step(model, x) for name, model in models.items()}
            steps |= {f"{name}, whole": whole_passes(tensor_step(model, x))
                      for name, model in models.items() if name.startswith("loratrf")}
            steps |= {f"{name}, zero test": zero_tested(tensor_step(model, x))
                      for name, model in models.items() if "diagonal" in name}
            times = interleaved_seconds(steps, rounds, warmup=1)
            rows += [{"d": d, "tokens": tokens, "method": name,
                      "step ÷ LoRA": round_ratios(times[name], times["peft lora r=8"]),
                      "whole ÷ LoRA": round_ratios(times[f"{name}, whole"], times["peft lora r=8"]),
                      "whole ÷ this": round_ratios(times[f"{name}, whole"], times[name]),
                      "zero test ÷ this": round_ratios(times[f"{name}, zero test"], times[name])
                      if f"{name}, zero test" in times else "-"}
                     for name in models if name.startswith("loratrf")]
    print(f"4 Linear layers d×d with GELU between on {DEVICE}, forward + backward + AdamW, median (min–max) of "
          f"{rounds} interleaved rounds, {torch.get_num_threads()} thread(s)")
    print_table(rows)


def main() -> None:
    parser = argument_parser(__doc__, threads=1, threads_help="1 gives stable timings on a shared 2-core machine")
    parser.add_argument("--dims", type=int, nargs="+", default=[768])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (a multiple of 128)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--filter-rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per table")
    parser.add_argument("--chunks", action="store_true", help="only table 4 (LoRATRF's filter in token chunks)")
    parser.add_argument("--token-counts", type=int, nargs="+", default=[512, 4096], help="tokens per step (--chunks)")
    args = parse_args(parser)
    if args.chunks:
        chunk_table(args.dims, args.token_counts, args.rounds)
        return
    layer_table(args.dims, args.tokens, args.rank, args.filter_rank, args.rounds)
    model_table(args.seq_len, args.rank, args.filter_rank, args.rounds)
    inference_table(args.seq_len, args.rank, args.filter_rank, args.rounds)


if __name__ == "__main__":
    main()
