from .config import MTLoraConfig
from .layer import MTLoraLayer
from .model import MTLoraModel

__all__ = ["MTLoraConfig", "MTLoraLayer", "MTLoraModel"]
