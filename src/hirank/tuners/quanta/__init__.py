from .config import QuantaConfig
from .layer import QuantaLayer
from .model import QuantaModel

__all__ = ["QuantaConfig", "QuantaLayer", "QuantaModel"]
