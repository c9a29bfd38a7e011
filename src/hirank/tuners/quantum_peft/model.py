"""Quantum-PEFT tuner: injects :class:`QuantumPeftLayer` into the targeted Linear / Conv1D modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..base import HirankModel
from .layer import QuantumPeftLayer, shared_circuits


class QuantumPeftModel(HirankModel):
    """Creates Quantum-PEFT adapters on a model (use through ``peft.get_peft_model`` with a ``QuantumPeftConfig``)."""

    prefix = "qpeft_"
    tuner_layer_cls = QuantumPeftLayer

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """peft enters this around every forward and generate of a PeftModel: simulate every layer's circuits
        there, one batch per circuit shape (a layer called outside it generates its own U, V).
        Not under gradient checkpointing: its recomputation runs after this block, where each layer would
        simulate its own circuits, which checkpointing rejects as a different graph; each layer does so from the start."""
        checkpointing = getattr(self.model, "is_activation_checkpointing", None)
        if checkpointing is None:  # transformers < 5.x names it is_gradient_checkpointing
            checkpointing = getattr(self.model, "is_gradient_checkpointing", False)
        if checkpointing and self.model.training:
            yield
            return
        with shared_circuits(self.model):
            yield
