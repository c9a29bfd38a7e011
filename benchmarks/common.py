"""Shared helpers for the benchmark scripts (not tests): a BERT-like model and step/forward timers.

Run a benchmark as ``.venv/bin/python benchmarks/<name>.py``; each prints a small table.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from peft import PeftConfig, get_peft_model
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from hirank.analysis import trainable_parameters


def minilm_like(seed: int = 0) -> nn.Module:
    """A config-built encoder with MiniLM-L6's shapes (hidden 384, 6 layers, FFN 1536), random weights."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=1000, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        max_position_embeddings=512, num_labels=2,
    )
    return BertForSequenceClassification(config)


def median_seconds(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def batch(batch_size: int = 8, seq_len: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 1000, (batch_size, seq_len), generator=generator),
        "labels": torch.randint(0, 2, (batch_size,), generator=generator),
    }


def train_step_seconds(model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 10) -> float:
    """Median time of one forward + backward + AdamW step."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()

    return median_seconds(step, repeats)


def forward_seconds(model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 10) -> float:
    model.eval()
    with torch.no_grad():
        return median_seconds(lambda: model(**inputs), repeats)


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
