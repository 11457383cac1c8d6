"""LoHa: low-rank Hadamard-product adapters; the package registers the method on import."""
from ...utils.registry import register_load_checked_fields, register_peft_method
from .config import LoHaConfig
from .layer import Conv1d, Conv2d, Linear, LoHaLayer
from .model import LoHaModel

register_peft_method(name="loha", config_cls=LoHaConfig, model_cls=LoHaModel, prefix="hada_",
                     is_mixed_compatible=True)
register_load_checked_fields("loha", ("r", "alpha", "use_effective_conv2d", "target_modules", "rank_pattern",
                                      "alpha_pattern", "modules_to_save"))

__all__ = ["Conv1d", "Conv2d", "Linear", "LoHaConfig", "LoHaLayer", "LoHaModel"]
