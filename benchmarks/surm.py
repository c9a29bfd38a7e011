"""SURM step time: the structured products (FFT / reshape) vs materializing S every step, and vs peft LoRA.

1. One d×d layer, 8 × 128 tokens, forward + backward (input gradient included, as inside a network):
   peft LoRA r=1 and r=8, and each SURM structure with its fast product and with S built densely each step.
2. The MiniLM-shaped encoder (query, value adapted; the adapter placement on its default targets):
   training-step time (forward + backward + AdamW) and trainable parameters.

    .venv/bin/python benchmarks/surm.py [--threads N] [--dims 384 768] [--rounds 8] [--skip-model]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, PeftConfig, get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import hirank  # noqa: E402
from common import adapted, batch, print_table  # noqa: E402
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
def materialized_s():
    """Variant: build the dense α·S (as merging does) in every forward, then one x·Sᵀ matmul."""
    original = SurmLayer.adapter_output

    def adapter_output(self, x, adapter_name):
        delta = self.delta_weight(adapter_name)
        return self.surm_dropout[adapter_name](x.to(delta.dtype)) @ delta.T

    SurmLayer.adapter_output = adapter_output
    try:
        yield
    finally:
        SurmLayer.adapter_output = original


class Single(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def clock() -> Callable[[], float]:
    """With one torch thread, the CPU time of this thread (time slices taken by other processes on a shared
    machine do not count); with more threads, wall time."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def best_seconds(steps: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Best time of each step over ``rounds`` rounds that run every step once, in turn, so that changes in
    machine load hit all methods alike."""
    now = clock()
    for _ in range(warmup):
        for step in steps.values():
            step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            start = now()
            step()
            best[name] = min(best[name], now() - start)
    return best


def layer_step(config: PeftConfig, d: int, tokens: int) -> Callable[[], None]:
    """Forward + backward through one adapted d×d layer (gradients for x and the adapter)."""
    torch.manual_seed(0)
    model = get_peft_model(Single(d), config)
    x = torch.randn(tokens // 128, 128, d, requires_grad=True)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x).square().mean().backward()

    return step


def materialized(step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with materialized_s():
            step()

    return run


def layer_table(dims: list[int], tokens: int, rounds: int) -> None:
    configs = {f"peft lora r={r}": LoraConfig(target_modules=["proj"], r=r, lora_alpha=2 * r) for r in (1, 8)}
    configs |= {f"surm {name}": hirank.SurmConfig(target_modules=["proj"], init_weights=False, **knobs)
                for name, knobs in SURM_VARIANTS.items()}
    times: dict[int, dict[str, float]] = {}
    for d in dims:
        steps = {name: layer_step(config, d, tokens) for name, config in configs.items()}
        steps |= {f"{name} (S materialized per step)": materialized(steps[name])
                  for name in configs if name.startswith("surm")}
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
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, optimizer=optimizer) -> None:
            optimizer.zero_grad()
            model(**inputs).loss.backward()
            optimizer.step()

        steps[name] = step
    times = best_seconds(steps, rounds, warmup=1)
    rows = [{"method": name, "trainable": counts[name], "train step ms": f"{1e3 * times[name]:.1f}"}
            for name in configs]
    print(f"\nMiniLM-shaped encoder (6 × 384, FFN 1536), batch 8 × {seq_len}, forward + backward + AdamW, "
          f"best of {rounds} interleaved rounds, {torch.get_num_threads()} thread(s), {clock().__name__}")
    print_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: then steps are timed in CPU time of the thread, which "
                             "other processes on a shared machine do not disturb")
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 768])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (a multiple of 128)")
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length of the encoder benchmark")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds of the single-layer table")
    parser.add_argument("--model-rounds", type=int, default=4, help="timed rounds of the encoder table")
    parser.add_argument("--skip-model", action="store_true", help="only the single-layer table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layer_table(args.dims, args.tokens, args.rounds)
    if not args.skip_model:
        model_table(args.seq_len, args.model_rounds)


if __name__ == "__main__":
    main()
