from .config import SurmConfig
from .layer import SurmLayer
from .model import SurmModel

__all__ = ["SurmConfig", "SurmLayer", "SurmModel"]
