"""PromptTuningConfig: PEFT's fields, defaults and JSON layout for soft prompts."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import ConfigError, PromptLearningConfig
from ...utils.peft_types import PeftType


class PromptTuningInit(str, enum.Enum):
    """How the virtual-token embeddings start: from a text's token embeddings, from embeddings of tokens drawn from
    the vocabulary, or at random (nn.Embedding's N(0, 1))."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` trained embeddings are put in front of the input embeddings.

    ``prompt_tuning_init`` TEXT needs ``tokenizer_name_or_path`` (a local folder works offline) and
    ``prompt_tuning_init_text``; the text's token ids are repeated or cut to the number of virtual tokens.
    """

    prompt_tuning_init: Union[PromptTuningInit, str] = field(default=PromptTuningInit.RANDOM)
    prompt_tuning_init_text: Optional[str] = field(default=None)
    tokenizer_name_or_path: Optional[str] = field(default=None)
    tokenizer_kwargs: Optional[dict] = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PROMPT_TUNING
        allowed = ", ".join(i.value for i in PromptTuningInit)
        try:
            self.prompt_tuning_init = PromptTuningInit(self.prompt_tuning_init)
        except ValueError:
            raise ConfigError(f"prompt_tuning_init {self.prompt_tuning_init!r} is not one of {allowed}") from None
        if self.prompt_tuning_init == PromptTuningInit.TEXT and not self.tokenizer_name_or_path:
            raise ConfigError(f"When prompt_tuning_init='TEXT', tokenizer_name_or_path can't be "
                              f"{self.tokenizer_name_or_path}; give the tokenizer (a name or local folder) whose ids "
                              "pick the initial embeddings")
        if self.prompt_tuning_init == PromptTuningInit.TEXT and self.prompt_tuning_init_text is None:
            raise ConfigError("When prompt_tuning_init='TEXT', prompt_tuning_init_text can't be None; give the text "
                              "whose token embeddings start the prompt")
        if self.tokenizer_kwargs and self.prompt_tuning_init != PromptTuningInit.TEXT:
            raise ConfigError("tokenizer_kwargs only valid when using prompt_tuning_init='TEXT' (got "
                              f"prompt_tuning_init={self.prompt_tuning_init.value!r})")
