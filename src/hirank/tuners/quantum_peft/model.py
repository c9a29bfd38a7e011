"""Quantum-PEFT tuner: injects :class:`QuantumPeftLayer` into the targeted Linear / Conv1D modules."""

from __future__ import annotations

from ..base import HirankModel
from .layer import QuantumPeftLayer


class QuantumPeftModel(HirankModel):
    """Creates Quantum-PEFT adapters on a model (use through ``peft.get_peft_model`` with a ``QuantumPeftConfig``)."""

    prefix = "qpeft_"
    tuner_layer_cls = QuantumPeftLayer
