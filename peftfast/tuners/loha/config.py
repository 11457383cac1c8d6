"""LoHaConfig: PEFT 0.21's fields, defaults and JSON layout for LoHa (low-rank Hadamard product)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import ConfigError
from ...utils.peft_types import PeftType
from ..lycoris_utils import LycorisConfig


@dataclass
class LoHaConfig(LycorisConfig):
    """Configuration of a LoHa adapter: ``delta = ((w1_a @ w1_b) * (w2_a @ w2_b)) * alpha / r``.

    Args mirror ``peft.LoHaConfig``: ``r``, ``alpha``, ``rank_dropout`` (drops rows of the delta in training),
    ``module_dropout`` (skips the whole adapter in training), ``use_effective_conv2d`` (CP decomposition of
    convolution kernels larger than 1), ``target_modules``, ``exclude_modules``, ``init_weights`` (True: the delta
    starts at zero; False: random), ``layers_to_transform``, ``layers_pattern``, ``rank_pattern``,
    ``alpha_pattern``, ``modules_to_save``.
    """

    r: int = field(default=8, metadata={"help": "LoHa rank"})
    alpha: int = field(default=8, metadata={"help": "LoHa alpha"})
    rank_dropout: float = field(default=0.0, metadata={"help": "Rank dropout probability in training"})
    module_dropout: float = field(default=0.0, metadata={"help": "Module dropout probability in training"})
    use_effective_conv2d: bool = field(default=False, metadata={"help": "CP decomposition of conv kernels"})
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    init_weights: bool = field(default=True)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LOHA
        self._check_common("LoHa")
        if self.init_weights not in (True, False):
            raise ConfigError(f"init_weights must be True or False, got {self.init_weights!r}")
        if self.use_effective_conv2d not in (True, False):
            raise ConfigError(f"use_effective_conv2d must be True or False, got {self.use_effective_conv2d!r}")
