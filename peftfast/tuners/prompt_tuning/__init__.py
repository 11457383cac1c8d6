"""Prompt tuning: trained virtual-token embeddings in front of the input embeddings; the package registers the
method and its PeftModel handler (peftfast.tuners.prompt_learning) on import."""
from ...utils.registry import register_load_checked_fields, register_peft_method
from ..prompt_learning import register_prompt_method
from .config import PromptTuningConfig, PromptTuningInit
from .model import PromptEmbedding

register_peft_method(name="prompt_tuning", config_cls=PromptTuningConfig, model_cls=PromptEmbedding)
register_load_checked_fields("prompt_tuning", ("num_virtual_tokens", "token_dim", "num_transformer_submodules"))
register_prompt_method("prompt_tuning", PromptEmbedding)

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]
