"""PromptEncoderConfig (P-tuning): PEFT's fields, defaults and JSON layout."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import ConfigError, PromptLearningConfig
from ...utils.peft_types import PeftType


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual-token embeddings passed through a trained encoder (an MLP, or a bidirectional LSTM and an
    MLP) before they are put in front of the input embeddings. ``encoder_hidden_size`` defaults to ``token_dim``;
    ``encoder_num_layers`` and ``encoder_dropout`` apply to the LSTM only."""

    encoder_reparameterization_type: Union[str, PromptEncoderReparameterizationType] = field(
        default=PromptEncoderReparameterizationType.MLP)
    encoder_hidden_size: Optional[int] = field(default=None)
    encoder_num_layers: int = field(default=2)
    encoder_dropout: float = field(default=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.P_TUNING
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(
                self.encoder_reparameterization_type)
        except ValueError:
            raise ConfigError(f"encoder_reparameterization_type {self.encoder_reparameterization_type!r} is not one of "
                              "MLP, LSTM") from None
