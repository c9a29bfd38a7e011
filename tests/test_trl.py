"""trl.SFTTrainer with a hirank ``peft_config``, offline: QuanTA on the packaged SmolLM2-135M (a real LLM and its
tokenizer), the other methods on the tiny Llama with the character tokenizer (the same path, at a fraction of the
cost)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

import hirank
from hirank.bench.models import load_model
from tests.cases import CASES, MethodCase

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

ONE_PER_METHOD = [case for i, case in enumerate(CASES)
                  if case.id != "lora" and case.id.split("-")[0] not in {c.id.split("-")[0] for c in CASES[:i]}]
TARGETS = ["q_proj", "v_proj"]
ON_SMOLLM2 = {"quanta"}  # SmolLM2 costs ~2 s per step on a CPU core; one method there, the rest on tiny-llama


def _model_name(case: MethodCase) -> str:
    return "smollm2" if case.id in ON_SMOLLM2 else "tiny-llama"


@pytest.mark.parametrize("case", ONE_PER_METHOD, ids=lambda c: f"{c.id}-{_model_name(c)}")
def test_sft_trainer_trains_and_saves_a_hirank_adapter(case: MethodCase, tmp_path) -> None:
    model_name = _model_name(case)
    loaded = load_model(model_name, "causal_lm")
    base_weights = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    steps, batch_size = (3, 2) if model_name == "smollm2" else (4, 4)
    data = datasets.Dataset.from_dict({"text": ["The cat sat on the mat. A dog ran in the park."] * 8})  # same batches
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, max_length=64, disable_tqdm=True,
        bf16=model_name != "smollm2",  # TRL's default bf16 autocast on the tiny model; float32 (~2x faster) on SmolLM2
    )
    config = case.config(TARGETS, task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(model=loaded.model, args=args, train_dataset=data, processing_class=loaded.tokenizer,
                             peft_config=config)
    assert isinstance(trainer.model, PeftModel) and trainer.model.peft_config["default"].peft_type == config.peft_type
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == steps and losses[-1] < losses[0], f"SFT did not lower the loss: {losses}"
    for name, parameter in trainer.model.get_base_model().named_parameters():
        original = name.replace(".base_layer.", ".")
        if original in base_weights:  # the frozen base is untouched
            assert torch.equal(parameter, base_weights[original]), name

    trainer.save_model(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == config.peft_type.value
    inputs = loaded.tokenizer(["The cat"], return_tensors="pt")
    # under bf16, accelerate wraps forward in autocast: compare the plain float32 model
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    reloaded = PeftModel.from_pretrained(load_model(model_name, "causal_lm").model, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trained(**inputs).logits, rtol=0, atol=1e-6)
    assert hirank.analysis.trainable_parameters(trained) > 0
