"""LoKrConfig: PEFT 0.21's fields, defaults and JSON layout for LoKr (low-rank Kronecker product)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ...config import ConfigError
from ...utils.peft_types import PeftType
from ..lycoris_utils import LycorisConfig


@dataclass
class LoKrConfig(LycorisConfig):
    """Configuration of a LoKr adapter: ``delta = kron(w1, w2) * alpha / r``.

    Args mirror ``peft.LoKrConfig``: ``r``, ``alpha``, ``rank_dropout``, ``module_dropout``,
    ``use_effective_conv2d``, ``decompose_both`` (also write w1 as w1_a @ w1_b when r is small),
    ``decompose_factor`` (the factorisation of the dimensions: -1 for the most balanced one),
    ``rank_dropout_scale``, ``target_modules``, ``exclude_modules``, ``init_weights`` (True, False or
    'lycoris'), ``layers_to_transform``, ``layers_pattern``, ``rank_pattern``, ``alpha_pattern``,
    ``modules_to_save``.
    """

    r: int = field(default=8, metadata={"help": "LoKr rank"})
    alpha: int = field(default=8, metadata={"help": "LoKr alpha"})
    rank_dropout: float = field(default=0.0, metadata={"help": "Rank dropout probability in training"})
    module_dropout: float = field(default=0.0, metadata={"help": "Module dropout probability in training"})
    use_effective_conv2d: bool = field(default=False, metadata={"help": "CP decomposition of conv kernels"})
    decompose_both: bool = field(default=False, metadata={"help": "Decompose the left Kronecker factor too"})
    decompose_factor: int = field(default=-1, metadata={"help": "Kronecker product decomposition factor."})
    rank_dropout_scale: bool = field(default=False, metadata={"help": "Rank dropout scale"})
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    init_weights: Union[bool, Literal["lycoris"]] = field(default=True)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LOKR
        self._check_common("LoKr")
        if not (self.init_weights is True or self.init_weights is False or self.init_weights == "lycoris"):
            raise ConfigError(f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
        for name in ("use_effective_conv2d", "decompose_both", "rank_dropout_scale"):
            if getattr(self, name) not in (True, False):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        f = self.decompose_factor
        if not isinstance(f, int) or isinstance(f, bool) or not (f == -1 or f > 0):
            raise ConfigError(f"decompose_factor must be -1 or a positive integer, got {f!r}")
