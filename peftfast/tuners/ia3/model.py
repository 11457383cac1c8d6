"""IA3Model: decides which (IA)^3 layer wraps each targeted module and injects it.

The layer class comes from ``IA3Model.dispatchers``, a fixed ordered tuple (first match wins):
bitsandbytes 4-/8-bit linears, then nn.Linear / Conv1D / nn.Conv2d / nn.Conv3d.
"""
from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn

from ...config import ConfigError
from ...utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)
from ...utils.undo import UndoLog
from ...utils.patterns import BoundedPattern
from ..adapter_layers import Dispatcher, UnsupportedLayerError, create_new_module
from ...utils.routing import route_adapter_names
from ..tuners_utils import BaseTuner, BaseTunerLayer, bnb_linear_classes, conv1d_class, linear_layer_classes
from .bnb import dispatch_bnb
from .config import IA3Config
from .layer import Conv2d, Conv3d, IA3Layer, Linear

SUPPORTED = "Linear, Conv1D, Conv2d, Conv3d"


def dispatch_default(target: nn.Module, adapter_name: str, ia3_config: IA3Config, is_feedforward: bool,
                     **kwargs: Any) -> Optional[nn.Module]:
    """nn.Linear, Conv1D, nn.Conv2d and nn.Conv3d bases. Quantised linears (bitsandbytes) are left to their own
    dispatchers: they subclass nn.Linear but cannot be merged by multiplying their packed weight. nn.Conv1d is
    refused, as PEFT 0.21 has no (IA)^3 layer for it."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    for conv, layer in ((nn.Conv2d, Conv2d), (nn.Conv3d, Conv3d)):
        if isinstance(base, conv):
            return layer(target, adapter_name, config=ia3_config, is_feedforward=is_feedforward)
    if isinstance(base, nn.Conv1d):
        raise UnsupportedLayerError(
            "(IA)^3 does not support nn.Conv1d layers (PEFT 0.21 has no (IA)^3 layer for them, so such an adapter "
            f"could not be loaded there); supported: {SUPPORTED}. LoRA supports nn.Conv1d"
        )
    quantised = bnb_linear_classes()
    if quantised and isinstance(base, quantised):
        return None
    if isinstance(base, nn.Linear):
        if ia3_config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                          "Setting fan_in_fan_out to False.", UserWarning)
            ia3_config.fan_in_fan_out = False
        return Linear(target, adapter_name, config=ia3_config, is_feedforward=is_feedforward)
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(base, conv1d):
        if not ia3_config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                          "Setting fan_in_fan_out to True.", UserWarning)
            ia3_config.fan_in_fan_out = True
        return Linear(target, adapter_name, config=ia3_config, is_feedforward=is_feedforward,
                      is_target_conv_1d_layer=True)
    return None


def is_feedforward_module(config: IA3Config, key: str) -> bool:
    """Whether the module at dotted path ``key`` is scaled on its input side.

    A regex must match the whole key; a list entry matches a key that *ends with* it, with no dot boundary.
    That is PEFT's rule, kept exactly because it decides the shape of ia3_l and so which checkpoints load.
    """
    ff = config.feedforward_modules
    if ff is None:
        return False
    if isinstance(ff, str):
        return BoundedPattern(ff, "feedforward_modules").fullmatch(key) is not None
    return any(key.endswith(name) for name in ff)


class IA3Model(BaseTuner):
    """Creates an (IA)^3 model from a pretrained transformers model (same surface as ``peft.IA3Model``)."""

    prefix = "ia3_"
    target_modules_condensable = False  # feedforward_modules must stay a subset of target_modules
    tuner_layer_cls = IA3Layer
    target_module_mapping = TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
    # First match wins: quantised linears subclass nn.Linear, so their dispatcher goes first.
    dispatchers: tuple[Dispatcher, ...] = (dispatch_bnb, dispatch_default)

    def _supported_types(self) -> tuple[type, ...]:
        # nn.Conv1d is listed so that targeting one reaches dispatch_default's message rather than a generic one
        return linear_layer_classes() + (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def _supported_kinds(self) -> list[str]:
        return [c.__name__ for c in self._supported_types() if c is not nn.Conv1d]  # Conv1d: refused with a message

    def _prepare_adapter_config(self, config: IA3Config, model_config: dict) -> IA3Config:
        targets_given = config.target_modules is not None
        config = super()._prepare_adapter_config(config, model_config)
        if not targets_given and config.feedforward_modules is not None:
            config.check_feedforward_subset()  # explicit feed-forward names against the default targets
        if config.feedforward_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING:
                raise ValueError(
                    f"feedforward_modules is not set and there is no default for model_type {model_type!r}; "
                    "set feedforward_modules (an empty list if no target module is feed-forward). Defaults "
                    f"exist for: {', '.join(sorted(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING))}"
                )
            defaults = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type]
            config.feedforward_modules = set(defaults)
        return config

    def _create_and_replace(self, config: IA3Config, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str) -> None:
        is_feedforward = is_feedforward_module(config, current_key)
        if isinstance(target, IA3Layer):
            if target.is_feedforward != is_feedforward:
                side = {True: "input (feed-forward)", False: "output"}
                raise ConfigError(
                    f"module {current_key!r} is scaled on its {side[target.is_feedforward]} side by the "
                    f"adapters already present ({', '.join(sorted(target.ia3_l))}), but adapter "
                    f"{adapter_name!r} treats it as {side[is_feedforward]}; adapters sharing a module must "
                    "agree on feedforward_modules"
                )
            target.update_layer(adapter_name, config)
            return
        new_module = self._create_new_module(config, adapter_name, target, is_feedforward=is_feedforward)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        setattr(parent, target_name, new_module)

    def _create_new_module(self, config: IA3Config, adapter_name: str, target: nn.Module,
                           is_feedforward: bool) -> nn.Module:
        return create_new_module(self.dispatchers, target, adapter_name, "(IA)^3 in peftfast",
                                 SUPPORTED, ia3_config=config, is_feedforward=is_feedforward)

    # -- merging ---------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Multiply the adapters into the base weights. With ``safe_merge`` every layer is checked before any
        is changed: undoing a partial (IA)^3 merge divides, which is exact only up to rounding."""
        if safe_merge:
            if adapter_names is not None:
                self._check_adapter_names(adapter_names)
            names = self.active_adapters if adapter_names is None else list(adapter_names)
            for layer in self._tuner_layers():
                layer.check_merge(names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Divide merged adapters back out of every layer; refused (nothing changes) if one cannot be."""
        layers = [layer for layer in self._tuner_layers() if layer.merged]
        for layer in layers:
            layer.check_unmergeable()
        for layer in layers:
            layer.unmerge()

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False,
                                     safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None) -> nn.Module:
        flags = ("is_loaded_in_8bit", "is_loaded_in_4bit")
        if merge and any(getattr(self.model, flag, False) for flag in flags):
            raise ValueError("cannot merge (IA)^3 layers into a model loaded in 8-bit or 4-bit; use unload() "
                             "to remove them, or load the base model in float precision to merge")
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar,
                                                    safe_merge=safe_merge, adapter_names=adapter_names)

    # -- combining adapters ----------------------------------------------------------------------------
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add ``adapter_name`` with vectors ``sum_i weights[i] * ia3_l[adapters[i]]`` (inactive, frozen).

        Does nothing if ``adapter_name`` exists, as in PEFT.
        """
        if adapter_name in self.peft_config:
            return
        self._check_adapter_names(adapters)
        if len(weights) != len(adapters):
            raise ValueError(f"add_weighted_adapter got {len(adapters)} adapters but {len(weights)} weights")
        for wrapper in self._wrappers():
            shared = [a for a in adapters if a in wrapper.modules_to_save]
            if len(shared) > 1:
                raise ValueError(f"cannot combine adapters {shared}: they each train their own copy of a "
                                 "modules_to_save module")
        configs = [self.peft_config[a] for a in adapters]
        merged: dict[str, Any] = {}
        for field_name in ("target_modules", "feedforward_modules"):
            values = [getattr(c, field_name) for c in configs]
            if len({type(v) for v in values}) > 1:
                raise ValueError("All adapter configs should have the same type for target and feedforward "
                                 f"modules (all lists or all regex strings); {field_name} differs: {values}")
            merged[field_name] = ("|".join(f"({v})" for v in values) if isinstance(values[0], str)
                                  else set().union(*values))
        with UndoLog() as undo:
            undo.call(lambda: self.peft_config.pop(adapter_name, None))
            self.peft_config[adapter_name] = dataclasses.replace(configs[0], **merged)
            self.inject_adapter(self.model, adapter_name)
        with torch.no_grad():
            for layer in self._tuner_layers():
                if not isinstance(layer, IA3Layer) or adapter_name not in layer.ia3_l:
                    continue
                vec = layer.ia3_l[adapter_name]
                vec.requires_grad_(False)
                vec.zero_()
                for name, weight in zip(adapters, weights):
                    if name in layer.ia3_l:
                        vec += layer.ia3_l[name] * weight
        for name, p in self.model.named_parameters():
            if f".{adapter_name}." in name or name.endswith(f".{adapter_name}"):
                p.requires_grad_(False)

    @contextmanager
    def _route_adapter_names(self, kwargs: dict):
        """PEFT's ``adapter_names=[...]`` (one adapter per sample, '__base__' for none) routed to every (IA)^3
        linear layer for one call; checked first, so a refused call changes nothing."""
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        if not isinstance(adapter_names, (list, tuple)) or not adapter_names or \
                not all(isinstance(n, str) for n in adapter_names):
            raise ValueError("adapter_names for (IA)^3 must be a non-empty list of adapter names, one per sample "
                             f"('__base__' for none), got {adapter_names!r:.200}")
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {"__base__"})
        if unknown:
            raise ValueError(f"adapter_names contains unknown adapters {unknown}; available: "
                             f"{', '.join(self.peft_config)} and '__base__'")
        layers = [m for m in self.model.modules() if isinstance(m, IA3Layer)]
        other = sorted({type(m).__name__ for m in layers if type(m) is not Linear})
        if other:
            raise ValueError(f"adapter_names with (IA)^3 is supported on linear layers only; this model has (IA)^3 "
                             f"{', '.join(other)} layers")
        if any(m.merged for m in layers):
            raise ValueError("adapter_names cannot be used while (IA)^3 adapters are merged; unmerge first")

        with route_adapter_names(self, layers, adapter_names):
            yield
