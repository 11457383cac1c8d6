"""AdaLoraConfig: PEFT 0.21's fields, defaults and JSON layout for AdaLoRA.

AdaLoRA is LoRA in SVD form (``W + B diag(E) A * alpha / ranknum``) whose ranks are pruned during
training by a budget schedule over three phases: ``tinit`` warm-up steps at the initial budget
(``init_r`` per layer), a cubic decrease to ``target_r`` per layer until ``total_step - tfinal``,
then ``tfinal`` steps at the final ranks. The allocator writes the surviving ranks into
``rank_pattern`` (module key -> one bool per initial rank), which a saved adapter carries so that it
reloads with its pruned ranks.

The config is a ``LoraConfig`` (as in PEFT); ``r`` is unused (``init_r`` is the initial rank).
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from ...config import ConfigError
from ...utils.peft_types import PeftType
from ..lora.config import LoraConfig


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def strip_adapter_from_pattern_key(key: str) -> str:
    """'model.x.q_proj.lora_E.default' -> 'model.x.q_proj.lora_E' (the form PEFT writes to adapter_config.json)."""
    head, _, last = key.rpartition(".")
    return head if head.endswith("lora_E") and last != "lora_E" else key


@dataclass
class AdaLoraConfig(LoraConfig):
    """Configuration of an AdaLoRA adapter (same fields and defaults as ``peft.AdaLoraConfig``).

    Args (besides LoraConfig's): ``target_r`` (average rank at the end of the budget schedule), ``init_r``
    (initial rank of every layer), ``tinit`` / ``tfinal`` (steps before and after the budget decrease),
    ``deltaT`` (steps between two allocations), ``beta1`` / ``beta2`` (EMA factors of the sensitivity and its
    uncertainty, in (0, 1)), ``orth_reg_weight`` (weight of the orthogonality penalty added to the loss),
    ``total_step`` (required, > 0), ``rank_pattern`` (written by the allocator: module key -> list of bools).
    """

    target_r: int = field(default=8, metadata={"help": "Target Lora matrix dimension."})
    init_r: int = field(default=12, metadata={"help": "Initial Lora matrix dimension."})
    tinit: int = field(default=0, metadata={"help": "The steps of initial warmup."})
    tfinal: int = field(default=0, metadata={"help": "The steps of final warmup."})
    deltaT: int = field(default=1, metadata={"help": "Step interval of rank allocation."})
    beta1: float = field(default=0.85, metadata={"help": "Hyperparameter of EMA."})
    beta2: float = field(default=0.85, metadata={"help": "Hyperparameter of EMA."})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "The orthogonal regularization coefficient."})
    total_step: Optional[int] = field(default=None, metadata={"help": "The total training steps."})
    rank_pattern: Optional[dict] = field(default=None, metadata={"help": "The saved rank pattern."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ADALORA
        if self.r != 8:  # LoraConfig's default
            warnings.warn("Note that `r` is not used in AdaLora and will be ignored."
                          "If you intended to set the initial rank, use `init_r` instead.", UserWarning)

    def _validate(self) -> None:
        if self.use_dora:
            raise ConfigError("ADALORA does not support DoRA; set use_dora=False")
        if self.loftq_config:
            raise ConfigError("ADALORA does not support LOFTQ; remove loftq_config")
        # LoraConfig's checks, except its rank_pattern rule (AdaLoRA's rank_pattern holds masks, not ranks)
        rank_pattern, self.rank_pattern = self.rank_pattern, None
        try:
            super()._validate()
        finally:
            self.rank_pattern = rank_pattern
        for name in ("target_r", "init_r", "deltaT"):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("tinit", "tfinal"):
            if not _non_negative_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not _finite(value) or not 0.0 < value < 1.0:
                raise ConfigError(f"{name} must be a number in (0, 1), got {value!r}")
        if self.total_step is None or not _positive_int(self.total_step):
            raise ConfigError(f"AdaLoRA does not work when `total_step` is None, supply a value > 0 (got "
                              f"{self.total_step!r}).")
        if not _finite(self.orth_reg_weight) or self.orth_reg_weight < 0:
            raise ConfigError(f"`orth_reg_weight` should be greater than or equal to 0, but the value passed is "
                              f"{self.orth_reg_weight!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError("The supplied schedule values don't allow for a budgeting phase. Decrease "
                              f"`tfinal`/`tinit` or increase `total_step` (tinit={self.tinit}, tfinal={self.tfinal}, "
                              f"total_step={self.total_step}: needs tinit < total_step - tfinal).")
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict):
                raise ConfigError(f"rank_pattern must be a dict of module key -> list of bools (one per initial "
                                  f"rank), got {type(self.rank_pattern).__name__}")
            for key, mask in self.rank_pattern.items():
                if not isinstance(key, str) or not isinstance(mask, (list, tuple)) \
                        or not all(isinstance(b, bool) for b in mask):
                    raise ConfigError(f"rank_pattern[{key!r}] must be a list of bools (one per initial rank), got "
                                      f"{mask!r}")

    def to_json_dict(self) -> dict:
        """As PEFT writes it: rank_pattern keys without the adapter name."""
        out = super().to_json_dict()
        if isinstance(out.get("rank_pattern"), dict):
            out["rank_pattern"] = {strip_adapter_from_pattern_key(k): v for k, v in out["rank_pattern"].items()}
        return out
