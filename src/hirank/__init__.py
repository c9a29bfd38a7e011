"""hirank: beyond-LoRA parameter-efficient fine-tuning methods for PyTorch and HuggingFace peft.

Importing hirank registers every method with peft, so ``peft.get_peft_model(model, hirank.XConfig(...))``,
``save_pretrained``, ``PeftModel.from_pretrained`` and ``merge_and_unload`` work as with LoRA.

``import hirank`` itself is light (no torch, no peft): the public names below load on first use (PEP 562),
and registration happens at once if peft is already imported, else when peft finishes importing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._peft import register_when_peft_loads

__version__ = "0.1.0"

# public name → the module that defines it, imported on first access
_LAZY = {
    "HirankPeftType": "hirank._peft",
    "LoraTRFConfig": "hirank.tuners.loratrf",
    "MTLoraConfig": "hirank.tuners.mtlora",
    "QuantaConfig": "hirank.tuners.quanta",
    "QuantumPeftConfig": "hirank.tuners.quantum_peft",
    "SurmConfig": "hirank.tuners.surm",
    "analysis": "hirank.analysis",
}

if TYPE_CHECKING:
    from . import analysis
    from ._peft import HirankPeftType
    from .tuners.loratrf import LoraTRFConfig
    from .tuners.mtlora import MTLoraConfig
    from .tuners.quanta import QuantaConfig
    from .tuners.quantum_peft import QuantumPeftConfig
    from .tuners.surm import SurmConfig


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'hirank' has no attribute {name!r}")
    try:
        module = importlib.import_module(_LAZY[name])
    except ModuleNotFoundError as error:  # a method left out of this build: hirank.X is simply absent
        if error.name != _LAZY[name]:
            raise
        raise AttributeError(f"module 'hirank' has no attribute {name!r} (no {_LAZY[name]} in this build)") from None
    value = module if module.__name__ == f"hirank.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


register_when_peft_loads()

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
