"""LoKr: low-rank Kronecker-product adapters; the package registers the method on import."""
from ...utils.registry import register_load_checked_fields, register_peft_method
from .config import LoKrConfig
from .layer import Conv1d, Conv2d, Linear, LoKrLayer, factorization
from .model import LoKrModel

register_peft_method(name="lokr", config_cls=LoKrConfig, model_cls=LoKrModel, prefix="lokr_",
                     is_mixed_compatible=True)
register_load_checked_fields("lokr", ("r", "alpha", "use_effective_conv2d", "decompose_both", "decompose_factor",
                                      "target_modules", "rank_pattern", "alpha_pattern", "modules_to_save"))

__all__ = ["Conv1d", "Conv2d", "Linear", "LoKrConfig", "LoKrLayer", "LoKrModel", "factorization"]
