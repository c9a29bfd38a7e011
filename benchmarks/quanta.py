"""QuanTA vs peft LoRA on a MiniLM-shaped encoder (query, value adapted): training-step time at about
equal trainable parameters, the two ways of handling the frozen θ₀ branch, and forward time merged vs base.

    .venv/bin/python benchmarks/quanta.py [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).parent))
import hirank  # noqa: E402
from common import adapted, batch, forward_seconds, minilm_like, print_table, train_step_seconds  # noqa: E402
from hirank.tuners.quanta.layer import QuantaLayer  # noqa: E402

TARGETS = ["query", "value"]


@contextmanager
def dense_theta0_branch():
    """Variant: subtract a cached dense M(θ₀) (one d×d matmul) instead of running the θ₀ circuit."""
    original = QuantaLayer.adapter_output
    cache: dict[int, torch.Tensor] = {}

    def adapter_output(self, x, adapter_name):
        circuit, gates = self.quanta_circuit[adapter_name], self.quanta_gates[adapter_name]
        if id(self) not in cache:
            cache[id(self)] = circuit.dense(self.quanta_theta0[adapter_name]).detach()
        x = x.to(gates.dtype)
        return circuit.apply(x, gates) - x @ cache[id(self)].T

    QuantaLayer.adapter_output = adapter_output
    try:
        yield
    finally:
        QuantaLayer.adapter_output = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inputs = batch(seq_len=args.seq_len)

    rows = []
    base = minilm_like()
    rows.append({"method": "base model (full forward only)", "trainable": 0,
                 "train step ms": "-", "forward ms": f"{1e3 * forward_seconds(base, inputs):.1f}"})
    configs = {
        "lora r=3": LoraConfig(target_modules=TARGETS, r=3, lora_alpha=6),
        "lora r=4": LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8),
        "quanta 6·4·4·4 (θ₀ circuit, default)": hirank.QuantaConfig(target_modules=TARGETS),
    }
    for name, config in configs.items():
        model, count = adapted(config)
        rows.append({"method": name, "trainable": count,
                     "train step ms": f"{1e3 * train_step_seconds(model, inputs):.1f}",
                     "forward ms": f"{1e3 * forward_seconds(model, inputs):.1f}"})
    with dense_theta0_branch():
        model, count = adapted(configs["quanta 6·4·4·4 (θ₀ circuit, default)"])
        rows.append({"method": "quanta 6·4·4·4 (θ₀ as cached dense matmul)", "trainable": count,
                     "train step ms": f"{1e3 * train_step_seconds(model, inputs):.1f}",
                     "forward ms": f"{1e3 * forward_seconds(model, inputs):.1f}"})
    model, count = adapted(configs["quanta 6·4·4·4 (θ₀ circuit, default)"])
    merged = model.merge_and_unload()
    rows.append({"method": "quanta merged (merge_and_unload)", "trainable": count,
                 "train step ms": "-", "forward ms": f"{1e3 * forward_seconds(merged, inputs):.1f}"})
    print(f"batch 8 × {args.seq_len} tokens, {args.threads} threads, median of 10")
    print_table(rows)


if __name__ == "__main__":
    main()
