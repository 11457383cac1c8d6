"""AdaLoRA: LoRA in SVD form with ranks pruned during training; the package registers the method on import."""
from ...utils.registry import register_load_checked_fields, register_peft_method
from .allocator import RankAllocator
from .bnb import SVDLinear4bit, SVDLinear8bitLt
from .config import AdaLoraConfig
from .layer import AdaLoraLayer, SVDConv2d, SVDLinear
from .model import AdaLoraModel

register_peft_method(name="adalora", config_cls=AdaLoraConfig, model_cls=AdaLoraModel, prefix="lora_",
                     is_mixed_compatible=True)
register_load_checked_fields("adalora", ("init_r", "target_r", "lora_alpha", "target_modules", "rank_pattern",
                                         "bias", "modules_to_save"))

__all__ = ["AdaLoraConfig", "AdaLoraLayer", "AdaLoraModel", "RankAllocator", "SVDConv2d", "SVDLinear", "SVDLinear4bit",
           "SVDLinear8bitLt"]
