"""SURM tuner: injects :class:`SurmLayer` into the targeted Linear / Conv1D modules."""

from __future__ import annotations

from peft.config import PeftConfig

from ..base import HirankModel
from .config import SurmConfig
from .layer import SurmLayer

_BERT_LIKE = ["attention.output.dense", "output.dense"]
_LLAMA_LIKE = ["o_proj", "down_proj"]
#: Houlsby positions per transformer block, by model_type: the attention-output projection and the
#: FFN-output projection (spec §3.4); used by ``placement="adapter"`` when ``target_modules`` is None.
SURM_ADAPTER_TARGET_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2"), _BERT_LIKE),
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3"), _LLAMA_LIKE
    ),
}


class SurmModel(HirankModel):
    """Creates SURM adapters on a model (use through ``peft.get_peft_model`` with a ``SurmConfig``)."""

    prefix = "surm_"
    tuner_layer_cls = SurmLayer

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        """Default targets: LoRA's for ``placement="lora"``, the Houlsby positions for ``"adapter"``."""
        if not (isinstance(peft_config, SurmConfig) and peft_config.placement == "adapter"
                and peft_config.target_modules is None):
            return super()._prepare_adapter_config(peft_config, model_config)
        model_type = model_config.get("model_type")
        if model_type not in SURM_ADAPTER_TARGET_MODULES:
            raise ValueError(
                f"SURM placement='adapter' has no default target_modules for model_type {model_type!r} (known: "
                f"{sorted(SURM_ADAPTER_TARGET_MODULES)}). Pass target_modules naming each block's attention-output "
                "and FFN-output projections."
            )
        peft_config.target_modules = set(SURM_ADAPTER_TARGET_MODULES[model_type])
        return peft_config
