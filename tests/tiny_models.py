"""Tiny models built from configs (never downloaded) for the invariant battery.

Hidden sizes factor well (64, 96) and include rectangular layers, so every method meets square and
non-square weights; ``awkward_mlp`` has a prime width (61) that a method must support or reject clearly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig
from transformers import LlamaForCausalLM

VOCAB = 97
#: where the battery runs: HIRANK_TEST_DEVICE=cuda runs it on a GPU (CI runs it on the CPU)
DEVICE = torch.device(os.environ.get("HIRANK_TEST_DEVICE", "cpu"))


class MLP(nn.Module):
    """64 → 96 → 64 → 4 with a LayerNorm and an Embedding (for unsupported-type tests)."""

    def __init__(self, width: int = 64, hidden: int = 96) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, width)
        self.lin0 = nn.Linear(width, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.lin1 = nn.Linear(hidden, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(self.norm(torch.relu(self.lin0(x))))))


@dataclass(frozen=True)
class TinyModel:
    """A model factory, the modules to adapt, and how to make inputs and a loss for it."""

    name: str
    build: Callable[[], nn.Module]
    target_modules: tuple[str, ...]
    unsupported_module: str  # a module of an unsupported type (for the clear-error invariant)

    def inputs(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        if self.name in ("mlp", "awkward_mlp"):
            width = 61 if self.name == "awkward_mlp" else 64
            return {"x": torch.randn(3, 5, width, generator=generator).to(DEVICE, dtype)}
        return {"input_ids": torch.randint(0, VOCAB, (2, 7), generator=generator).to(DEVICE)}

    def output(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(**inputs)
        return out if isinstance(out, torch.Tensor) else out.logits

    def loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """A task loss whose minimum is far from the start (so a few steps must lower it)."""
        logits = self.output(model, inputs)
        if self.name == "bert":
            return nn.functional.cross_entropy(logits, torch.tensor([0, 1], device=logits.device))
        if self.name in ("gpt2", "llama"):
            labels = inputs["input_ids"][:, 1:]
            return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return (logits - 1.0).pow(2).mean()


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return build().eval().to(DEVICE)

    return make


def _gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=64, n_layer=2, n_head=4))


def _llama(intermediate_size: int = 96) -> nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
    )
    return LlamaForCausalLM(config)


def _bert() -> nn.Module:
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=16, num_labels=2,
    )
    return BertForSequenceClassification(config)


TINY_MODELS = {
    model.name: model
    for model in (
        TinyModel("mlp", _seeded(MLP), ("lin0", "lin1"), "norm"),
        # Conv1D: c_attn is 64 → 192, c_fc 64 → 256 (rectangular, fan_in_fan_out)
        TinyModel("gpt2", _seeded(_gpt2), ("c_attn", "c_fc"), "ln_1"),
        # grouped-query attention: v_proj is 64 → 32
        TinyModel("llama", _seeded(_llama), ("q_proj", "v_proj", "down_proj"), "input_layernorm"),
        TinyModel("bert", _seeded(_bert), ("query", "value"), "LayerNorm"),
    )
}

# every in_features a multiple of bitsandbytes' 4-bit block (64), as in real LLMs: bitsandbytes 0.50.2 fails to pack
# down_proj (96 → 64) for its AVX512-BF16 CPU kernel ("shape '[64, 1]' is invalid for input of size 96")
QUANTIZABLE_LLAMA = TinyModel(
    "llama", _seeded(lambda: _llama(intermediate_size=128)), ("q_proj", "v_proj", "down_proj"), "input_layernorm"
)

AWKWARD_MODEL = TinyModel("awkward_mlp", _seeded(lambda: MLP(width=61, hidden=61)), ("lin0", "lin1"), "norm")

# same module names as "mlp", other shapes (lin0 is 64 → 80): an adapter saved for "mlp" must not load into it
RESIZED_MLP = TinyModel("mlp", _seeded(lambda: MLP(width=64, hidden=80)), ("lin0", "lin1"), "norm")
