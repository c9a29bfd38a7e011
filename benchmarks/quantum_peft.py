"""Quantum-PEFT vs peft LoRA at the same rank K: training-step time, the memory-lean circuit backward,
and trainable parameters per layer as d grows.

    .venv/bin/python benchmarks/quantum_peft.py [--threads N] [--rank K]

Tables: (1) a MiniLM-shaped encoder (hidden 384, a non-power-of-two size; query and value adapted):
train-step time, forward time unmerged / merged / base; (2) one d × d layer, 256 tokens: train-step time; (3) the U/V
generation alone (forward + backward), memory-lean vs plain autograd: time and bytes autograd keeps;
(4) trainable parameters per d × d layer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).parent))
import hirank  # noqa: E402
from common import (  # noqa: E402
    SingleLinear, adapted, argument_parser, batch, forward_seconds, median_seconds, parse_args, print_table,
    train_step_seconds,
)
from hirank.analysis import trainable_parameters  # noqa: E402
from hirank.ops import pauli  # noqa: E402

TARGETS = ["query", "value"]


def encoder_rows(rank: int, seq_len: int) -> list[dict[str, object]]:
    inputs = batch(seq_len=seq_len)
    configs = {
        f"lora r={rank}": LoraConfig(target_modules=TARGETS, r=rank),
        f"quantum_peft K={rank} L=1": hirank.QuantumPeftConfig(target_modules=TARGETS, rank=rank, n_layers=1),
        f"quantum_peft K={rank} L=4": hirank.QuantumPeftConfig(target_modules=TARGETS, rank=rank, n_layers=4),
    }
    rows = []
    for name, config in configs.items():
        model, params = adapted(config)
        step = train_step_seconds(model, inputs, repeats=5)
        unmerged = forward_seconds(model, inputs, repeats=5)
        merged = forward_seconds(model.merge_and_unload(), inputs, repeats=5)
        rows.append({"method": name, "trainable": params, "train step ms": f"{step * 1e3:.1f}",
                     "fwd unmerged ms": f"{unmerged * 1e3:.1f}", "fwd merged ms": f"{merged * 1e3:.1f}"})
    base = adapted(LoraConfig(target_modules=TARGETS, r=rank))[0].unload()
    rows.append({"method": "base model (no adapter)", "trainable": 0, "train step ms": "-",
                 "fwd unmerged ms": "-", "fwd merged ms": f"{forward_seconds(base, inputs, repeats=5) * 1e3:.1f}"})
    return rows


def single_layer_rows(rank: int, dims: tuple[int, ...], tokens: int = 256) -> list[dict[str, object]]:
    rows = []
    for dim in dims:
        x = torch.randn(tokens, dim)
        for name, config in ((f"lora r={rank}", LoraConfig(target_modules=["proj"], r=rank, init_lora_weights=False)),
                             (f"quantum_peft K={rank} L=1",
                              hirank.QuantumPeftConfig(target_modules=["proj"], rank=rank, init_weights=False))):
            torch.manual_seed(0)
            model = get_peft_model(SingleLinear(dim), config)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

            def step() -> None:
                optimizer.zero_grad()
                model(x).pow(2).mean().backward()
                optimizer.step()

            rows.append({"d": dim, "method": name, "trainable": trainable_parameters(model),
                         "train step ms": f"{median_seconds(step, repeats=10) * 1e3:.2f}"})
    return rows


def circuit_rows(rank: int, dims: tuple[int, ...], n_layers: int = 1) -> list[dict[str, object]]:
    rows = []
    for dim in dims:
        angles = torch.rand(pauli.stiefel_angle_count(dim, rank, n_layers)).requires_grad_()
        upstream = torch.randn(dim, rank)
        for memory_lean in (True, False):
            saved = 0

            def pack(tensor: torch.Tensor) -> torch.Tensor:
                nonlocal saved
                saved += tensor.numel() * tensor.element_size()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                columns = pauli.stiefel_columns(angles, dim, rank, n_layers, memory_lean=memory_lean)

            def forward_backward() -> None:
                (pauli.stiefel_columns(angles, dim, rank, n_layers, memory_lean=memory_lean) * upstream).sum().backward()

            seconds = median_seconds(forward_backward, repeats=20)
            rows.append({"d": dim, "K": rank, "L": n_layers, "backward": "memory-lean" if memory_lean else "autograd",
                         "fwd+bwd ms": f"{seconds * 1e3:.2f}", "autograd keeps KiB": f"{saved / 1024:.1f}",
                         "U itself KiB": f"{columns.numel() * columns.element_size() / 1024:.1f}"})
    return rows


def parameter_rows(rank: int, dims: tuple[int, ...]) -> list[dict[str, object]]:
    rows = []
    for dim in dims:
        with torch.device("meta"):
            counts = {name: trainable_parameters(get_peft_model(SingleLinear(dim), config)) for name, config in (
                ("lora", LoraConfig(target_modules=["proj"], r=rank)),
                ("quantum_peft L=1", hirank.QuantumPeftConfig(target_modules=["proj"], rank=rank, n_layers=1)),
                ("quantum_peft L=2", hirank.QuantumPeftConfig(target_modules=["proj"], rank=rank, n_layers=2)),
            )}
        rows.append({"d": dim, **{f"{name} K={rank}": count for name, count in counts.items()}})
    return rows


def main() -> None:
    parser = argument_parser(__doc__, threads=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parse_args(parser)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU\n")
    print("(1) MiniLM-shaped encoder, batch 8 × seq", args.seq_len, "- query, value adapted")
    print_table(encoder_rows(args.rank, args.seq_len))
    print("\n(2) one d × d Linear, 256 tokens: forward + backward + AdamW")
    print_table(single_layer_rows(args.rank, (1024, 4096)))
    print("\n(3) generating U (d × K) alone: forward + backward")
    print_table(circuit_rows(args.rank, (1024, 4096, 3000)))
    print("\n(4) trainable parameters of one d × d layer (doubling d adds 2(2L+1) for Quantum-PEFT)")
    print_table(parameter_rows(args.rank, (256, 512, 1024, 2048, 4096, 8192, 11008)))


if __name__ == "__main__":
    main()
