"""P-tuning: virtual-token embeddings through a trained MLP or LSTM encoder, in front of the input embeddings; the
package registers the method and its PeftModel handler (peftfast.tuners.prompt_learning) on import."""
from ...utils.registry import register_load_checked_fields, register_peft_method
from ..prompt_learning import register_prompt_method
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType
from .model import PromptEncoder

register_peft_method(name="p_tuning", config_cls=PromptEncoderConfig, model_cls=PromptEncoder)
register_load_checked_fields("p_tuning", ("num_virtual_tokens", "token_dim", "num_transformer_submodules"))
register_prompt_method("p_tuning", PromptEncoder)

__all__ = ["PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]
