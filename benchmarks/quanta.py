"""QuanTA vs peft LoRA r=8 and vs the authors' einsum layer: training-step time and saved activation memory.

A model of 4 Linear(d, d) layers with GELU between, every Linear adapted; one step is forward + backward +
AdamW. Methods: peft LoRA r=8; QuanTA at its default factors and at LoRA r=8's parameter budget
(``hirank.analysis.match_budget``), each also with ``fold_frozen_copy=True`` (W₀ − M(θ₀) kept densely, no θ₀
circuit per step: the authors' execution); and, at the same factors, a reference layer written from the paper: one
``torch.einsum`` per gate on the reshaped activation, in the official gate order, with −M(θ₀) folded into a
copy of W₀ once (as the official code folds it into W at the first forward), autograd saving every gate
input; and QuanTA's default once more with each pass run whole instead of in cache-sized token chunks
(``hirank.ops.chunks.CPU_CHUNK_ELEMENTS``; column "whole ÷ this"). Timing: interleaved rounds (each method once
per round, thread CPU time), median and spread (min–max) of the per-round ratio to LoRA. Memory: bytes autograd
saves for backward during one forward (saved-tensor hooks, each storage once), deterministic.

    .venv/bin/python benchmarks/quanta.py [--dims 1024,2048,4096] [--tokens 512,d] [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import hirank  # noqa: E402
from common import (  # noqa: E402
    argument_parser, interleaved_seconds, parse_args, print_table, round_ratios, saved_activation_bytes, tensor_step,
    whole_passes,
)
from hirank.analysis import match_budget, trainable_parameters  # noqa: E402
from hirank.ops.quanta import QuantaCircuit, gate_pairs  # noqa: E402

TARGETS = ["0", "2", "4", "6"]


def mlp(d: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.GELU(),
                         nn.Linear(d, d))


class EinsumQuanta(nn.Module):
    """The paper's layer (spec §1.2–1.4): W' = W₀ − M(θ₀) computed once; y = W'x + b + chain of einsums of x."""

    def __init__(self, base: nn.Linear, circuit: QuantaCircuit, gates: torch.Tensor) -> None:
        super().__init__()
        self.circuit = circuit
        self.gates = nn.ParameterList([nn.Parameter(g.clone()) for g in circuit.split(gates)])
        with torch.no_grad():
            self.register_buffer("weight", base.weight - circuit.dense(gates))
            self.register_buffer("bias", base.bias.clone())
        letters = "abcdefghijklmnop"[: len(circuit.in_factors)]
        self.equations = []
        for a, b in gate_pairs(len(circuit.in_factors)):
            out = "".join(c.upper() if i in (a, b) else c for i, c in enumerate(letters))
            self.equations.append(f"...{letters},{letters[a].upper()}{letters[b].upper()}{letters[a]}{letters[b]}->...{out}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = x.reshape(*x.shape[:-1], *self.circuit.in_factors)
        for equation, gate in zip(self.equations, self.gates):
            state = torch.einsum(equation, state, gate)
        return nn.functional.linear(x, self.weight, self.bias) + state.reshape(x.shape)


def einsum_model(quanta_model: nn.Module, d: int) -> nn.Module:
    """The MLP with each QuanTA layer of ``quanta_model`` replaced by the reference layer (same gates)."""
    model = mlp(d)
    for index in TARGETS:
        layer = quanta_model.base_model.model[int(index)]
        model[int(index)] = EinsumQuanta(layer.get_base_layer(), layer.quanta_circuit["default"],
                                         layer.quanta_gates["default"].detach())
    for p in model.parameters():
        p.requires_grad_(isinstance(p, nn.Parameter) and p.dim() == 4)
    return model


def compare(d: int, tokens: int, rounds: int) -> list[dict[str, object]]:
    x = torch.randn(tokens, d)
    lora = get_peft_model(mlp(d), LoraConfig(target_modules=TARGETS, r=8, lora_alpha=16))
    budget = trainable_parameters(lora)
    match = match_budget("quanta", mlp(d), budget, TARGETS, tolerance=None)
    models = {"lora r=8": lora,
              "quanta default": get_peft_model(mlp(d), hirank.QuantaConfig(target_modules=TARGETS)),
              "quanta at budget": get_peft_model(mlp(d), hirank.QuantaConfig(target_modules=TARGETS, **match.knobs))}
    for name, knobs in (("quanta default", {}), ("quanta at budget", match.knobs)):  # same gates, θ₀ folded
        folded = get_peft_model(mlp(d), hirank.QuantaConfig(target_modules=TARGETS, fold_frozen_copy=True, **knobs))
        folded.load_state_dict(models[name].state_dict())
        models[f"{name}, folded"] = folded
    models["einsum ref (default factors)"] = einsum_model(models["quanta default"], d)
    models["einsum ref (budget factors)"] = einsum_model(models["quanta at budget"], d)
    steps = {name: tensor_step(model.train(), x) for name, model in models.items()}
    steps["quanta default, whole passes"] = whole_passes(tensor_step(models["quanta default"], x))
    times = interleaved_seconds(steps, rounds, 1)
    memory = {name: saved_activation_bytes(lambda m=model: m(x).square().mean(), model) for name, model in models.items()}

    def ratio(name: str, reference: str) -> str:
        return round_ratios(times[name], times[reference])

    rows = []
    for name, model in models.items():
        circuit = (model.base_model.model[0].quanta_circuit["default"] if name.startswith("quanta")
                   else model[0].circuit if name.startswith("einsum") else None)
        reference = "einsum ref (default factors)" if name.startswith("quanta default") else (
            "einsum ref (budget factors)" if name.startswith("quanta at budget") else None)
        rows.append({
            "d": d, "tokens": tokens, "method": name,
            "factors": "-" if circuit is None else "·".join(map(str, circuit.in_factors)),
            "params": trainable_parameters(model),
            "step ms": f"{1e3 * statistics.median(times[name]):.1f}",
            "step ÷ LoRA": ratio(name, "lora r=8"),
            "einsum ref ÷ this": "-" if reference is None else ratio(reference, name),
            "whole ÷ this": ratio("quanta default, whole passes", name) if name == "quanta default" else "-",
            "saved MiB": f"{memory[name] / 2**20:.1f}",
            "memory ÷ LoRA": f"{memory[name] / memory['lora r=8']:.2f}",
        })
    return rows


def main() -> None:
    parser = argument_parser(__doc__, threads=1)
    parser.add_argument("--dims", default="1024,2048,4096")
    parser.add_argument("--tokens", default="512,d", help="comma list; 'd' means as many tokens as the width")
    parser.add_argument("--rounds", type=int, default=7)
    args = parse_args(parser)
    rows = []
    for d in (int(v) for v in args.dims.split(",")):
        for tokens in dict.fromkeys(d if t == "d" else int(t) for t in args.tokens.split(",")):
            setting = compare(d, tokens, args.rounds)
            print_table(setting)
            rows += setting
            print(flush=True)
    print(f"{args.threads} CPU thread(s); median (min–max) of {args.rounds} interleaved rounds")
    print_table(rows)


if __name__ == "__main__":
    main()
