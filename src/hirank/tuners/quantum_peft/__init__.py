from .config import QuantumPeftConfig
from .layer import QuantumPeftLayer
from .model import QuantumPeftModel

__all__ = ["QuantumPeftConfig", "QuantumPeftLayer", "QuantumPeftModel"]
