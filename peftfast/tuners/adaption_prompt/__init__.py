"""LLaMA-Adapter (adaption prompts): gated prompt attention in the last decoder layers of Llama/Mistral models; the
package registers the method on import."""
from ...utils.registry import register_load_checked_fields, register_peft_method
from .config import AdaptionPromptConfig
from .layer import AdaptedAttention
from .model import AdaptionPromptModel

register_peft_method(name="adaption_prompt", config_cls=AdaptionPromptConfig, model_cls=AdaptionPromptModel)
register_load_checked_fields("adaption_prompt", ("target_modules", "adapter_len", "adapter_layers"))

__all__ = ["AdaptedAttention", "AdaptionPromptConfig", "AdaptionPromptModel"]
