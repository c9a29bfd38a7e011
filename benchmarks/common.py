"""Shared helpers for the benchmark scripts (not tests): a BERT-like model, step/forward timers, a one-Linear
module and the pieces the single-layer and encoder tables share. The timers, train steps and the saved-activation
measure are the package's (``hirank.bench.timing``, which ``hirank compare``'s timing pass uses too), bound here
to the benchmark device.

Run a benchmark as ``.venv/bin/python benchmarks/<name>.py``; each prints a small table. Set
``HIRANK_BENCH_DEVICE=cuda`` to run the models and batches on a GPU (timers then synchronize).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from peft import PeftConfig, get_peft_model
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from hirank.analysis import trainable_parameters
from hirank.bench import timing
from hirank.bench.timing import (  # noqa: F401  (re-exported: the benchmarks import them from here)
    saved_activation_bytes, shared_copy, tensor_step, train_step,
)
from hirank.ops import chunks

DEVICE = torch.device(os.environ.get("HIRANK_BENCH_DEVICE", "cpu"))


def use_device(name: str) -> torch.device:
    """Run this process's benchmarks on ``name`` (``cpu``, ``cuda``): what ``HIRANK_BENCH_DEVICE`` sets."""
    global DEVICE
    DEVICE = torch.device(name)
    return DEVICE


def synchronize() -> None:
    timing.synchronize(DEVICE)


def argument_parser(description: str | None, threads: int, threads_help: str | None = None) -> argparse.ArgumentParser:
    """A parser with the ``--threads`` option every benchmark takes; read it with :func:`parse_args`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=threads, help=threads_help)
    return parser


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed command line, after setting torch's thread count to ``--threads``."""
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def minilm_like(seed: int = 0) -> nn.Module:
    """A config-built encoder with MiniLM-L6's shapes (hidden 384, 6 layers, FFN 1536), random weights."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=1000, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        max_position_embeddings=512, num_labels=2,
    )
    return BertForSequenceClassification(config).to(DEVICE)


class SingleLinear(nn.Module):
    """One d×d ``nn.Linear`` named ``proj``: the smallest model an adapter can target."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def median_seconds(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def clock() -> Callable[[], float]:
    """:func:`hirank.bench.timing.clock` on this process's benchmark device."""
    return timing.clock(DEVICE)


def interleaved_seconds(
    steps: dict[str, Callable[[], object]], rounds: int, warmup: int = 2, progress: Callable[[int], None] | None = None
) -> dict[str, list[float]]:
    """:func:`hirank.bench.timing.interleaved_seconds` on this process's benchmark device."""
    return timing.interleaved_seconds(steps, rounds, warmup, progress, device=DEVICE)


def best_seconds(steps: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Best time of each step over :func:`interleaved_seconds` rounds (the minimum filters load out)."""
    return {name: min(times) for name, times in interleaved_seconds(steps, rounds, warmup).items()}


class LinearStack(nn.Module):
    """``depth`` d×d ``nn.Linear`` layers (``linears.0`` …) with GELU between: a small MLP tower whose every layer
    an adapter targets, so that adapters read and feed activations as inside a network."""

    def __init__(self, d: int, depth: int = 4) -> None:
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, linear in enumerate(self.linears):
            x = linear(x if index == 0 else nn.functional.gelu(x))
        return x

    def target_modules(self) -> list[str]:
        return [f"linears.{index}" for index in range(len(self.linears))]


def batch(batch_size: int = 8, seq_len: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 1000, (batch_size, seq_len), generator=generator).to(DEVICE),
        "labels": torch.randint(0, 2, (batch_size,), generator=generator).to(DEVICE),
    }


def train_step_seconds(model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 10) -> float:
    """Median time of one forward + backward + AdamW step."""
    return median_seconds(train_step(model, inputs), repeats)


def forward_seconds(model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 10) -> float:
    model.eval()
    with torch.no_grad():
        return median_seconds(lambda: model(**inputs), repeats)


@contextmanager
def dense_delta_forward(layer_cls: type[nn.Module], dropout_attr: str) -> Iterator[None]:
    """Swap ``layer_cls.adapter_output`` for a variant that builds the dense ΔW (``delta_weight``, as merging
    does) in every forward, then applies one ``dropout(x) @ ΔWᵀ`` matmul; ``dropout_attr`` names the layer's
    per-adapter dropout dict."""
    original = layer_cls.adapter_output

    def adapter_output(self: nn.Module, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        delta = self.delta_weight(adapter_name)
        return getattr(self, dropout_attr)[adapter_name](x.to(delta.dtype)) @ delta.T

    layer_cls.adapter_output = adapter_output
    try:
        yield
    finally:
        layer_cls.adapter_output = original


def round_ratios(seconds: list[float], reference: list[float]) -> str:
    """``"median (min–max)"`` of the per-round ratios of two interleaved timings, round by round (``spread_text``)."""
    per_round = [a / b for a, b in zip(seconds, reference)]
    return timing.spread_text(statistics.median(per_round), min(per_round), max(per_round))


def whole_passes(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` with every chunked pass (QuanTA's circuit, SURM's fast products) run over all tokens at
    once instead of in cache-sized chunks (``hirank.ops.chunks.CPU_CHUNK_ELEMENTS``)."""
    def run() -> object:
        chunk_elements = chunks.CPU_CHUNK_ELEMENTS
        chunks.CPU_CHUNK_ELEMENTS = 1 << 62
        try:
            return step()
        finally:
            chunks.CPU_CHUNK_ELEMENTS = chunk_elements
    return run


def layer_step(config: PeftConfig, d: int, tokens: int,
               context: Callable[[], AbstractContextManager[object]] = nullcontext) -> Callable[[], None]:
    """Forward + backward through one adapted d×d layer on ``tokens // 128`` sequences of 128 (gradients for x
    and the adapter), with forward and backward run inside ``context()``."""
    torch.manual_seed(0)
    model = get_peft_model(SingleLinear(d), config).to(DEVICE)
    x = torch.randn(tokens // 128, 128, d, device=DEVICE, requires_grad=True)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        x.grad = None
        with context():
            model(x).square().mean().backward()

    return step


def adapted(config: PeftConfig, seed: int = 0) -> tuple[nn.Module, int]:
    """The MiniLM-like model with ``config`` applied, and its trainable-parameter count."""
    model = get_peft_model(minilm_like(seed), config)
    return model, trainable_parameters(model)


def print_table(rows: list[dict[str, object]]) -> None:
    """A plain aligned table of dict rows."""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(f"{r[c]}") for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(f"{row[c]}".ljust(widths[c]) for c in columns))
