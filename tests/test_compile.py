"""torch.compile(backend="eager") of a peft model with each method: the whole model in one graph (no graph break
in the adapter branch, so no per-layer recompile of a resumed frame), nothing recompiled on a second batch,
and the eager outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from peft import get_peft_model
from torch._dynamo.utils import counters

from hirank.ops import chunks
from tests.cases import CASES
from tests.tiny_models import TINY_MODELS

COMPILED_CASES = ("lora", "quanta", "quanta-3axes", "quanta-folded", "quantum_peft", "mtlora-icfm", "loratrf",
                  "surm-circulant-lora", "surm-ldr-lora")


# both layers adapted (a per-layer recompile would show as several graphs) and the three weight shapes (square
# q_proj, GQA v_proj, rectangular down_proj), in four adapters instead of six: tracing costs per adapter
ADAPTED = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj",
           "model.layers.1.self_attn.q_proj")


def _params() -> list:
    cases = {case.id: case for case in CASES}
    return [pytest.param(cases[name], id=name) for name in COMPILED_CASES]


@pytest.mark.parametrize("case", _params())
def test_compiled_model_is_one_graph_without_recompiles_and_matches_eager(case, monkeypatch) -> None:
    # eager runs QuanTA's and SURM LDR's passes in chunks of 2–4 tokens; traced, they take all tokens at once
    monkeypatch.setattr(chunks, "CPU_CHUNK_ELEMENTS", 256)
    tiny = TINY_MODELS["llama"]  # two decoder layers: a per-layer recompile would show as several graphs
    model = get_peft_model(tiny.build(), case.config(ADAPTED, init_weights=False)).train()
    assert len(model.targeted_module_names) == len(ADAPTED)
    first, second = tiny.inputs(seed=0), tiny.inputs(seed=1)
    expected_loss = tiny.loss(model, first)
    expected_grads = torch.autograd.grad(expected_loss, [p for p in model.parameters() if p.requires_grad])

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    loss = tiny.loss(compiled, first)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        tiny.loss(compiled, second)  # same shapes, other tokens: nothing to recompile

    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
