"""PrefixTuningConfig: PEFT's fields, defaults and JSON layout."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ...config import ConfigError, PromptLearningConfig
from ...utils.peft_types import PeftType


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: every attention layer attends to ``num_virtual_tokens`` trained keys and values in front of the
    sequence's own (handed to the model as a prefilled cache). With ``prefix_projection`` the prefix is computed by
    a two-layer MLP (hidden ``encoder_hidden_size``) from trained token embeddings; ``init_weights="zero"`` starts
    the prefix (or the MLP's last layer) at zero."""

    init_weights: Optional[Literal["zero"]] = field(default=None)
    encoder_hidden_size: Optional[int] = field(default=None)
    prefix_projection: bool = field(default=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PREFIX_TUNING
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
