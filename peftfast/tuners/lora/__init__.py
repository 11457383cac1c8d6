from .config import LoraConfig
from .layer import Conv1d, Conv2d, Conv3d, ConvNd, Embedding, Linear, LoraLayer
from .model import LoraModel

__all__ = ["Conv1d", "Conv2d", "Conv3d", "ConvNd", "Embedding", "Linear", "LoraConfig", "LoraLayer", "LoraModel"]
