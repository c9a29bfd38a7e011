"""trl.SFTTrainer with a hirank ``peft_config`` (offline, tiny Llama with the packaged character tokenizer)."""

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


@pytest.mark.parametrize("case", ONE_PER_METHOD, ids=lambda c: c.id)
def test_sft_trainer_trains_and_saves_a_hirank_adapter(case: MethodCase, tmp_path) -> None:
    loaded = load_model("tiny-llama", "causal_lm")
    base_weights = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    data = datasets.Dataset.from_dict({"text": ["the cat sat on the mat.", "a dog ran in the park."] * 4})
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, max_length=64, disable_tqdm=True,
    )
    config = case.config(TARGETS, task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(model=loaded.model, args=args, train_dataset=data, processing_class=loaded.tokenizer,
                             peft_config=config)
    assert isinstance(trainer.model, PeftModel) and trainer.model.peft_config["default"].peft_type == config.peft_type
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0], f"SFT did not lower the loss: {losses}"
    for name, parameter in trainer.model.get_base_model().named_parameters():
        original = name.replace(".base_layer.", ".")
        if original in base_weights:  # the frozen base is untouched
            assert torch.equal(parameter, base_weights[original]), name

    trainer.save_model(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == config.peft_type.value
    inputs = loaded.tokenizer(["the cat"], return_tensors="pt")
    # SFTConfig trains under bf16 autocast (accelerate wraps forward); compare the plain float32 model
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    reloaded = PeftModel.from_pretrained(load_model("tiny-llama", "causal_lm").model, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trained(**inputs).logits, rtol=0, atol=1e-6)
    assert hirank.analysis.trainable_parameters(trained) > 0
