from .config import IA3Config
from .layer import Conv2d, Conv3d, ConvNd, IA3Layer, Linear
from .model import IA3Model

__all__ = ["Conv2d", "Conv3d", "ConvNd", "IA3Config", "IA3Layer", "IA3Model", "Linear"]
