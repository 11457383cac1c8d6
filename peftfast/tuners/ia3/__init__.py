"""IA3: learned per-channel scales on targeted layers; the package registers the method on import."""
from ...utils.registry import register_load_checked_fields, register_peft_method
from .config import IA3Config
from .layer import Conv2d, Conv3d, ConvNd, IA3Layer, Linear
from .model import IA3Model

register_peft_method(name="ia3", config_cls=IA3Config, model_cls=IA3Model, prefix="ia3_", is_mixed_compatible=True)
register_load_checked_fields("ia3", ("target_modules", "modules_to_save"))

__all__ = ["Conv2d", "Conv3d", "ConvNd", "IA3Config", "IA3Layer", "IA3Model", "Linear"]
