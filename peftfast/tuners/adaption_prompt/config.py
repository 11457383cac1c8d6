"""AdaptionPromptConfig: PEFT's fields, defaults and JSON layout for LLaMA-Adapter (adaption prompts)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...config import ConfigError, PeftConfig
from ...utils.peft_types import PeftType

# model_type -> the attribute name of the attention module in each decoder layer (PEFT's defaults). The attention
# must have q_proj / k_proj / v_proj / o_proj linears and receive the rotary position_embeddings (cos, sin).
TRANSFORMERS_MODEL_TO_ADAPTION_PROMPT_TARGET = {"llama": "self_attn", "mistral": "self_attn"}


def _positive_int_or_none(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class AdaptionPromptConfig(PeftConfig):
    """Configuration of a LLaMA-Adapter (https://huggingface.co/papers/2303.16199) adapter.

    The attention modules of the last ``adapter_layers`` decoder layers get a trained prompt of ``adapter_len``
    vectors of the hidden size. The layer's own k/v projections turn the prompt into extra keys/values; the queries
    attend to them in a separate softmax, and the result, scaled by a gate initialised to zero, is added to the
    attention output before ``o_proj``. ``target_modules`` is the attribute name of the attention module
    (default for Llama and Mistral: ``"self_attn"``).
    """

    target_modules: Optional[str] = field(default=None)
    adapter_len: Optional[int] = field(default=None)
    adapter_layers: Optional[int] = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ADAPTION_PROMPT
        if self.target_modules is not None and (not isinstance(self.target_modules, str) or not self.target_modules):
            raise ConfigError("target_modules of an adaption prompt is the attribute name of the attention module "
                              f"(one string such as 'self_attn'), got {self.target_modules!r}")
        _positive_int_or_none("adapter_len", self.adapter_len)
        _positive_int_or_none("adapter_layers", self.adapter_layers)

    @property
    def is_adaption_prompt(self) -> bool:
        return True
