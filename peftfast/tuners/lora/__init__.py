from .config import LoraConfig
from .layer import Embedding, Linear, LoraLayer
from .model import LoraModel
from . import bnb  # noqa: F401  (registers the bitsandbytes dispatcher)

__all__ = ["Embedding", "Linear", "LoraConfig", "LoraLayer", "LoraModel"]
