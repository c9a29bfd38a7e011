"""QuanTA tuner: injects :class:`QuantaLayer` into the targeted Linear / Conv1D modules."""

from __future__ import annotations

from ..base import HirankModel
from .layer import QuantaLayer


class QuantaModel(HirankModel):
    """Creates QuanTA adapters on a model (use through ``peft.get_peft_model`` with a ``QuantaConfig``)."""

    prefix = "quanta_"
    tuner_layer_cls = QuantaLayer
