"""MTLoRA tuner: injects :class:`MTLoraLayer` into the targeted Linear / Conv1D modules."""

from __future__ import annotations

from ..base import HirankModel
from .layer import MTLoraLayer


class MTLoraModel(HirankModel):
    """Creates MTLoRA adapters on a model (use through ``peft.get_peft_model`` with an ``MTLoraConfig``)."""

    prefix = "mtlora_"
    tuner_layer_cls = MTLoraLayer
