from .config import IA3Config
from .layer import IA3Layer, Linear
from .model import IA3Model
from . import bnb  # noqa: F401  (registers the bitsandbytes dispatcher)

__all__ = ["IA3Config", "IA3Layer", "IA3Model", "Linear"]
