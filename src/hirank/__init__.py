"""hirank: beyond-LoRA parameter-efficient fine-tuning methods for PyTorch and HuggingFace peft.

Importing hirank registers every method with peft, so ``peft.get_peft_model(model, hirank.XConfig(...))``,
``save_pretrained``, ``PeftModel.from_pretrained`` and ``merge_and_unload`` work as with LoRA.
"""

from __future__ import annotations

from . import analysis
from ._peft import HirankPeftType, register_all
from .tuners.loratrf import LoraTRFConfig
from .tuners.mtlora import MTLoraConfig
from .tuners.quanta import QuantaConfig
from .tuners.quantum_peft import QuantumPeftConfig
from .tuners.surm import SurmConfig

__version__ = "0.1.0"

register_all()

__all__ = [
    "HirankPeftType",
    "LoraTRFConfig",
    "MTLoraConfig",
    "QuantaConfig",
    "QuantumPeftConfig",
    "SurmConfig",
    "analysis",
    "__version__",
]
