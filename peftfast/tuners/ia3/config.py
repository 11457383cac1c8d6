"""IA3Config: PEFT's fields, defaults and JSON layout for (IA)^3 adapters."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...config import ConfigError, PeftConfig
from ...utils.peft_types import PeftType


def _as_name_set(name: str, value: object) -> Optional[Union[set[str], str]]:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise ConfigError(f"{name} must hold module names (strings), got {bad[:3]!r}")
        return set(value)
    raise ConfigError(f"{name} must be a list of module names, a regex string or None, "
                      f"got {type(value).__name__}")


@dataclass
class IA3Config(PeftConfig):
    """Configuration of an (IA)^3 adapter: a learned vector ``l`` rescales each targeted layer.

    For a targeted linear ``y = W x + b`` the adapted layer computes ``y = W (l * x) + b`` when the
    module is listed in ``feedforward_modules`` (``l`` has ``in_features`` entries) and
    ``y = l * (W x + b)`` otherwise (``l`` has ``out_features`` entries).

    Args mirror ``peft.IA3Config``: ``target_modules`` (list of names, a full-match regex, or
    ``'all-linear'``; None picks the default for known architectures), ``exclude_modules``,
    ``feedforward_modules`` (names or a regex; a list must be a subset of a list ``target_modules``),
    ``fan_in_fan_out`` (True for GPT-2's Conv1D), ``modules_to_save``, ``init_ia3_weights`` (True: vectors
    of ones, so the adapter starts as the identity; False: random normal, for tests).
    """

    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    feedforward_modules: Optional[Union[list[str], str]] = field(default=None)
    fan_in_fan_out: bool = field(default=False)
    modules_to_save: Optional[list[str]] = field(default=None)
    init_ia3_weights: bool = field(default=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.IA3
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            setattr(self, name, _as_name_set(name, getattr(self, name)))
        if not isinstance(self.fan_in_fan_out, bool):
            raise ConfigError(f"fan_in_fan_out must be True or False, got {self.fan_in_fan_out!r}")
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        mts = self.modules_to_save
        if mts is not None and (isinstance(mts, str) or not all(isinstance(m, str) for m in mts)):
            raise ConfigError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        self.check_feedforward_subset()

    def check_feedforward_subset(self) -> None:
        """A feed-forward module is a target scaled on its input side, so a list of them must be drawn from a
        list of targets (names compared as written, as PEFT does)."""
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, set) and isinstance(targets, set) and not ff <= targets:
            extra = sorted(ff - targets)
            names = ", ".join(map(repr, extra))
            raise ConfigError(
                f"feedforward_modules must be a subset of target_modules: {names} "
                f"{'is' if len(extra) == 1 else 'are'} not in target_modules "
                f"({', '.join(map(repr, sorted(targets)))}); add to target_modules or drop from "
                "feedforward_modules"
            )
