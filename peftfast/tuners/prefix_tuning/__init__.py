"""Prefix tuning: trained keys and values in front of every attention layer's own (a prefilled cache); the package
registers the method and its PeftModel handler (peftfast.tuners.prompt_learning) on import."""
from ...utils.registry import register_load_checked_fields, register_peft_method
from ..prompt_learning import register_prompt_method
from .config import PrefixTuningConfig
from .model import PrefixEncoder

register_peft_method(name="prefix_tuning", config_cls=PrefixTuningConfig, model_cls=PrefixEncoder)
register_load_checked_fields("prefix_tuning", ("num_virtual_tokens", "token_dim", "num_transformer_submodules"))
register_prompt_method("prefix_tuning", PrefixEncoder)

__all__ = ["PrefixEncoder", "PrefixTuningConfig"]
