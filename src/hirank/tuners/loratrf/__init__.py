from .config import LoraTRFConfig
from .layer import LoraTRFLayer, TaskFilter, TaskFilteredLayer
from .model import LoraTRFModel

__all__ = ["LoraTRFConfig", "LoraTRFLayer", "LoraTRFModel", "TaskFilter", "TaskFilteredLayer"]
