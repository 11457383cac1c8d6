"""What every tuner shares: the adapter-layer mixin and the model-level injector.

`BaseTunerLayer` is mixed into each adapter layer (LoRA, IA3, ...): it owns the bookkeeping of
adapter names, activation, merging state and the base layer. `BaseTuner` walks a model, decides
which modules to wrap, wraps them (all or nothing: every step goes into an `UndoLog`, so a failure
leaves the model untouched), and implements merge / unload / adapter switching once for all methods.

Targets are matched by PEFT's rules (a list entry matches a name or a dotted suffix, a string is a
full-match regex, 'all-linear' expands to the linear layers, then layers_to_transform and
exclude_modules). Whatever the form, a module inside an existing adapter layer or modules_to_save
wrapper (``base_layer``, ``lora_A.<name>``, ``ia3_l``, ``original_module``, ...) is never a target:
a second adapter lands on the adapter layer itself (`adapter_internal_names`).
"""
from __future__ import annotations

import heapq
import os
import re
import warnings
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn
from tqdm import tqdm

from ..config import PeftConfig
from ..utils.constants import (
    DUMMY_MODEL_CONFIG,
    EMBEDDING_LAYER_NAMES,
    INCLUDE_LINEAR_LAYERS_SHORTHAND,
    MIN_TARGET_MODULES_FOR_OPTIMIZATION,
)
from ..utils.errors import AdapterError, NoMatchingPeftModuleError, UnsupportedTargetError, cap_message, short_repr
from ..utils.patterns import BoundedPattern, get_pattern_key
from ..utils.routing import check_names_cover_batch, earlier_routing
from ..utils.other import (AuxiliaryTrainingWrapper, ModulesToSaveWrapper, get_submodules, module_names_tied_with_embedding,
                           per_sample_adapter_names)
from ..utils.undo import UndoLog

__all__ = [
    "AdapterError", "BaseTuner", "BaseTunerLayer", "adapter_internal_names", "bnb_linear_classes",
    "check_target_module_exists", "conv1d_class", "find_minimal_target_modules", "linear_layer_classes",
    "per_sample_adapter_names", "validate_adapter_name",
]

# Names that would read as parts of parameter names, or as the base model in ``adapter_names``.
RESERVED_ADAPTER_NAMES = ("weight", "bias", "base_layer", "modules_to_save", "original_module", "__base__")
MAX_ADAPTER_NAME_BYTES = 200


def _container_attributes() -> frozenset[str]:
    """Attribute names of the containers that hold one entry per adapter (nn.ModuleDict, nn.ParameterDict): torch
    stores entries as attributes, so an adapter named ``training``, ``to`` or ``keys`` cannot be stored at all."""
    names: set[str] = set()
    for container in (nn.ModuleDict(), nn.ParameterDict()):
        names.update(dir(container))
    return frozenset(names)


_CONTAINER_ATTRIBUTES = _container_attributes()


def validate_adapter_name(name: Any) -> str:
    """Adapter names become folder names, state-dict key parts and keys of nn.ModuleDict / nn.ParameterDict: keep
    them to one plain path component that torch can store.

    Refused (AdapterError, a ValueError): non-strings; empty or padded names; path separators, '.', ':', control
    characters, a leading '~'; names longer than 200 bytes; the reserved names (``weight``, ``bias``,
    ``base_layer``, ``modules_to_save``, ``original_module``, ``__base__``); and names that are attributes of
    ``nn.Module`` / ``nn.ModuleDict`` / ``nn.ParameterDict`` (``training``, ``forward``, ``to``, ``state_dict``,
    ``keys``, ``__class__``, ...). Names that are also module names of the model (``model``, ``layers``, ``0``,
    ``q_proj``) are allowed: saving and loading find an adapter's tensors by structure, not by name.
    """
    if not isinstance(name, str):
        raise AdapterError(f"adapter name must be a str, got {type(name).__name__} ({short_repr(name)})")
    if not name.strip():
        raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise AdapterError(f"adapter name {short_repr(name, 40)} is not valid Unicode text (a lone surrogate); it "
                           "becomes a folder name and must encode as UTF-8") from None
    if size > MAX_ADAPTER_NAME_BYTES:
        raise AdapterError(f"adapter name {short_repr(name, 40)} is {size} bytes long; at most "
                           f"{MAX_ADAPTER_NAME_BYTES} are allowed (it becomes a folder name)")
    allowed = ("allowed: one folder name without path separators, '.', ':', control characters or surrounding "
               "spaces, e.g. 'default' or 'my_adapter-2'")
    if any(c in name for c in "/\\.:") or any(ord(c) < 32 or ord(c) == 127 for c in name) \
            or name != name.strip() or name.startswith("~") or os.path.isabs(name):
        raise AdapterError(f"adapter name {name!r} is not allowed: it names a subfolder when saving and a "
                           f"component of parameter names; {allowed}")
    if name in RESERVED_ADAPTER_NAMES:
        raise AdapterError(f"adapter name {name!r} is reserved: it would be read as part of parameter names or as "
                           f"the base model; reserved names: {', '.join(RESERVED_ADAPTER_NAMES)}")
    if name in _CONTAINER_ATTRIBUTES:
        raise AdapterError(f"adapter name {name!r} is not allowed: it is an attribute of torch's nn.Module / "
                           "nn.ModuleDict / nn.ParameterDict, which store one entry per adapter as an attribute "
                           "(names such as 'training', 'forward', 'to', 'state_dict', 'keys' cannot be stored); "
                           "pick another name, e.g. 'my_adapter'")
    return name


# Heads that task wrappers add to modules_to_save; a model has at most one of them, so absence is fine.
TASK_HEAD_NAMES = ("classifier", "score", "qa_outputs")


def conv1d_class() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is a dependency, but keep the core usable without it
        return None
    return Conv1D


def bnb_linear_classes() -> tuple[type, ...]:
    import sys

    if "bitsandbytes" not in sys.modules:  # never import bitsandbytes just to look at a float model
        return ()
    bnb = sys.modules["bitsandbytes"]
    return tuple(c for c in (getattr(bnb.nn, "Linear4bit", None), getattr(bnb.nn, "Linear8bitLt", None)) if c)


def linear_layer_classes() -> tuple[type, ...]:
    conv1d = conv1d_class()
    return (nn.Linear,) + ((conv1d,) if conv1d else ()) + bnb_linear_classes()


class BaseTunerLayer:
    """Mixin for adapter layers. Subclasses set ``adapter_layer_names`` (ModuleDict/ParameterDict attributes
    keyed by adapter name holding trainable weights) and ``other_param_names`` (plain per-adapter dicts)."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    _active_adapter: str | list[str] = "default"
    _disable_adapters: bool = False
    # PEFT's switch for peft.helpers.disable_input_dtype_casting.
    cast_input_dtype_enabled: bool = True
    merged_adapters: list[str]

    def get_base_layer(self) -> nn.Module:
        base = self
        while hasattr(base, "base_layer"):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.get_base_layer(), "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self._active_adapter] if isinstance(self._active_adapter, str) else list(self._active_adapter)

    def _adapter_dicts(self) -> Iterable[Any]:
        for name in self.adapter_layer_names + self.other_param_names:
            yield getattr(self, name)

    def available_adapters(self) -> set[str]:
        names: set[str] = set()
        for d in self._adapter_dicts():
            names.update(d.keys())
        return names

    def _get_available_adapters(self) -> set[str]:  # PEFT's name: adapters with trainable weights here
        names: set[str] = set()
        for layer_name in self.adapter_layer_names:
            container = getattr(self, layer_name)
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                names.update(container.keys())
        return names

    def _all_available_adapter_names(self) -> list[str]:  # PEFT's name: every adapter any per-adapter dict knows
        names: set[str] = set()
        for d in self._adapter_dicts():
            if hasattr(d, "keys"):
                names.update(d.keys())
        return sorted(names)

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for name in self.adapter_layer_names:
                getattr(self, name).requires_grad_(False)
            self._disable_adapters = True

    def set_adapter(self, adapter_names: str | Iterable[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for layer_name in self.adapter_layer_names:
            module_dict = getattr(self, layer_name)
            for key, module in module_dict.items():
                module.requires_grad_(key in names and not inference_mode)
        self._active_adapter = names

    def set_requires_grad(self, adapter_names: str | Iterable[str], requires_grad: bool = True) -> None:
        """Switch gradients of the named adapters' weights on or off here, whatever is active (PEFT's method)."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for layer_name in self.adapter_layer_names:
            for key, weights in getattr(self, layer_name).items():
                if key in names:
                    weights.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        for d in self._adapter_dicts():
            if adapter_name in d:
                del d[adapter_name]
        if adapter_name in self.active_adapters:
            # PEFT's rule, per layer: the other active adapters, else this layer's alphabetically first one left
            # (activated as set_adapter does, its weights trainable)
            remaining = [n for n in self.active_adapters if n != adapter_name]
            if not remaining:
                left = sorted(self.available_adapters())
                remaining = left[:1]
            self.set_adapter(remaining)

    # Subclasses implement: update_layer, merge, unmerge, get_delta_weight, forward.
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError

    def _adapters_to_merge(self, adapter_names: Optional[list[str]], warn: bool = True) -> list[str]:
        """PEFT's ``check_adapters_to_merge``: the adapters of ``adapter_names`` (default: the active ones) that are
        not merged yet. Already merged ones are skipped with a warning (PEFT's wording), not an error."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        if self.merged:
            merged = set(self.merged_adapters)
            names = [n for n in names if n not in merged]
            if warn and names:
                warnings.warn(f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                              f"You are now additionally merging {','.join(names)}.", UserWarning)
            elif warn:
                warnings.warn("All adapters are already merged, nothing to do.", UserWarning)
        return [n for n in names if n in self.available_adapters()]


_ON_META: ContextVar[bool] = ContextVar("peftfast_adapters_on_meta", default=False)


@contextmanager
def adapter_weights_on_meta() -> Iterator[None]:
    """Adapter weights created inside this block go on the meta device (no memory, no initialisation); a loader
    then assigns the checkpoint's tensors in their place (PEFT's ``low_cpu_mem_usage=True``)."""
    token = _ON_META.set(True)
    try:
        yield
    finally:
        _ON_META.reset(token)


def creation_device(device: torch.device) -> torch.device:
    """``device``, or the meta device inside :func:`adapter_weights_on_meta`."""
    return torch.device("meta") if _ON_META.get() else device


def _warn_unmatched_pattern_keys(config: PeftConfig, targeted: Iterable[str]) -> None:
    """rank_pattern / alpha_pattern keys that match none of the modules this adapter targets are ignored: say so
    (a typo there silently trains with the default rank or alpha). AdaLoRA keeps its own rank_pattern (per lora_E
    parameter, written by its rank allocator), which is not checked here."""
    if getattr(config, "peft_type", None) == "ADALORA":
        return
    targeted = list(targeted)
    for attr in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, attr, None)
        if not isinstance(patterns, dict) or not patterns:
            continue
        unmatched = sorted(p for p in patterns if not any(get_pattern_key([p], key, attr) == p for key in targeted))
        if unmatched:
            warnings.warn(f"The following {attr} keys did not match any targeted module and were ignored: "
                          f"{unmatched}.", RuntimeWarning, stacklevel=3)


def check_single_bias_adapter(tuner: Any) -> None:
    """At most one adapter of a model may train a bias (a bias is shared by all adapters of a layer)."""
    with_bias = [name for name, c in tuner.peft_config.items() if getattr(c, "bias", "none") != "none"]
    if len(with_bias) > 1:
        raise ValueError(f"{type(tuner).__name__} supports only 1 adapter with bias. When using multiple adapters, "
                         f"set bias='none' for all adapters but one; adapters with a bias: {', '.join(with_bias)}")


def _join_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _suffixes_of(key: str) -> list[str]:
    """'a.b.c' -> ['a.b.c', 'b.c', 'c']: the forms of ``key`` a target list entry can equal."""
    out = [key]
    i = key.find(".")
    while i != -1:
        out.append(key[i + 1:])
        i = key.find(".", i + 1)
    return out


class _NameMatcher:
    """PEFT's rule for target_modules / exclude_modules: a string is a regex that must match the whole key (matched
    in bounded time, ``peftfast.utils.patterns``); a list matches a key equal to an entry or ending with
    ``.entry``. Lists are sets, so matching a key costs its depth, not the length of the list."""

    def __init__(self, names: Any, what: str) -> None:
        self.pattern = BoundedPattern(names, what) if isinstance(names, str) else None
        self.names = None if self.pattern is not None else {n for n in names if isinstance(n, str)}

    def __call__(self, key: str) -> bool:
        if self.pattern is not None:
            return self.pattern.fullmatch(key) is not None
        return any(s in self.names for s in _suffixes_of(key))


class TargetMatcher:
    """``check_target_module_exists`` for one config and many keys: patterns compiled and lists hashed once."""

    def __init__(self, config: Any) -> None:
        exclude = getattr(config, "exclude_modules", None)
        self.exclude = _NameMatcher(exclude, "exclude_modules") if exclude else None
        targets = config.target_modules
        self.targets = None if targets is None else _NameMatcher(targets, "target_modules")
        self.layers = getattr(config, "layers_to_transform", None)
        self.regex_targets = isinstance(targets, str)
        patterns = getattr(config, "layers_pattern", None) or []
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        # PEFT's rule: the FIRST index after a pattern counts (``layers.1.layers.0`` is layer 1), at the start
        # of the key too; an empty layers_to_transform list keeps every layer.
        self.layer_patterns = [BoundedPattern(rf"(?:^|.*?\.){p}\.(\d+)\.", "layers_pattern") for p in patterns]
        if isinstance(self.layers, (list, tuple)) and not self.layers:
            self.layers = None

    def layer_index(self, key: str) -> Optional[int]:
        if not self.layer_patterns:
            m = re.match(r".*?\.[^.]*\.(\d+)\.", key)  # the first numbered segment, not a nested one
            return int(m.group(1)) if m else None
        for pattern in self.layer_patterns:
            m = pattern.match(key)
            if m:
                return int(m.group(1))
        return None

    def __call__(self, key: str) -> bool:
        if self.exclude is not None and self.exclude(key):
            return False
        if self.targets is None or not self.targets(key):
            return False
        if self.layers is None or self.regex_targets:
            return True
        index = self.layer_index(key)
        if index is None:
            return False
        return index == self.layers if isinstance(self.layers, int) else index in self.layers


def check_target_module_exists(config: Any, key: str) -> bool:
    """Whether the module at dotted path ``key`` is targeted by ``config`` (PEFT's matching rules).

    A string ``target_modules`` is a regex that must match the whole key; a list matches a key equal to an
    entry or ending with ``.entry``. ``layers_to_transform`` keeps only modules inside those layer indices.
    ``exclude_modules`` (same rules) wins over ``target_modules``. For many keys build one ``TargetMatcher``.
    """
    return TargetMatcher(config)(key)



def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]  # shortest first


def find_minimal_target_modules(targets: Iterable[str], others: Iterable[str]) -> set[str]:
    """The shortest dotted suffixes that match every name in ``targets`` and no name in ``others``. Linear in the
    number of names (set lookups), so a list of 10^6 module names is condensed in seconds."""
    forbidden = {tail for name in others for tail in _suffixes_of(name)}
    chosen: set[str] = set()
    for target in sorted(targets, key=lambda t: t.count(".")):  # shallow names first
        tails = _suffixes_of(target)  # longest first
        if chosen.isdisjoint(tails):
            chosen.add(next((tail for tail in reversed(tails) if tail not in forbidden), target))
    return chosen


def _find_minimal_target_modules(target_modules: Iterable[str], other_module_names: Iterable[str]) -> set[str]:
    """PEFT's name for :func:`find_minimal_target_modules`, with its argument checks: ``target_modules`` must be a
    non-empty list or set of non-empty strings, disjoint from ``other_module_names``."""
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError("target_modules should be a list or set of strings.")
    targets = set(target_modules)
    if "" in targets:
        raise ValueError("target_modules should not contain an empty string.")
    others = set(other_module_names)
    common = targets & others
    if common:
        raise ValueError(f"target_modules and other_module_names contain common elements, this should not happen "
                         f"({short_repr(sorted(common)[:5])}): a module cannot be both a target and a non-target")
    return find_minimal_target_modules(targets, others)


def _key_suffixes(keys: Iterable[str]) -> set[str]:
    """Every form a target entry can take to match one of ``keys`` (each key and each of its dotted suffixes)."""
    return {s for k in keys for s in _suffixes_of(k)}


def adapter_internal_names(model: nn.Module) -> set[str]:
    """Names of every module strictly inside an adapter layer or a modules_to_save wrapper: the wrapped
    ``base_layer``, the adapter weights (``lora_A.<name>``, ``ia3_l``, ...), dropouts, and the ``original_module`` /
    ``modules_to_save`` copies. Such modules belong to an adapter and must never be targeted by another one."""
    inside: set[str] = set()
    for prefix, module in model.named_modules():
        if prefix and isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            inside.update(f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix)
    return inside


class BaseTuner(nn.Module):
    """Injects one method's adapter layers into ``model`` and manages them.

    Subclasses define ``prefix`` (parameter-name prefix of adapter weights), ``tuner_layer_cls``,
    ``target_module_mapping`` (model_type -> default target names), ``_create_and_replace`` and
    ``_supported_module(module)``.
    """

    prefix: str = ""
    tuner_layer_cls: type = BaseTunerLayer
    target_module_mapping: dict[str, list[str]] = {}
    # Long target_modules lists are condensed to short suffixes; a method with another field that must stay a
    # subset of target_modules (IA3's feedforward_modules) turns this off, as PEFT does.
    target_modules_condensable: bool = True
    # PEFT's flag for methods whose adapters share weights across layers (VeRA-style); none of peftfast's do.
    uses_shared_state: bool = False

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str = "default",
                 low_cpu_mem_usage: bool = False, autocast_adapter_dtype: bool = True) -> None:
        validate_adapter_name(adapter_name)
        super().__init__()
        self.model = model
        self.targeted_module_names: list[str] = []
        self.targeted_parameter_names: list[str] = []  # LoRA's target_parameters ('lin0.weight', ...)
        if not hasattr(self, "peft_config"):
            self.peft_config = peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config}
        else:
            self.peft_config[adapter_name] = peft_config
        self.active_adapter: str | list[str] = adapter_name
        with UndoLog() as undo:
            undo.call(lambda: self.peft_config.pop(adapter_name, None))
            self.inject_adapter(self.model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                low_cpu_mem_usage=low_cpu_mem_usage)
        self.model.peft_config = self.peft_config

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.forward(*args, **kwargs)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    @property
    def active_peft_config(self) -> Any:
        """The config of the active adapter (the first one when several are active)."""
        active = self.active_adapter
        return self.peft_config[active if isinstance(active, str) else active[0]]

    def get_base_model_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's weights under its original keys (no adapter weights, no ``base_layer`` infix)."""
        from ..utils.save_and_load import base_model_state_dict

        return base_model_state_dict(self.model)

    # -- hooks for subclasses ------------------------------------------------------------------------
    def _supported_types(self) -> tuple[type, ...]:
        """The layer types the method adapts."""
        raise NotImplementedError

    def _supported_module(self, module: nn.Module) -> bool:
        return isinstance(module, self._supported_types())

    def _supported_kinds(self) -> list[str]:
        """Names of the layer types the method adapts, for messages."""
        return [c.__name__ for c in self._supported_types()]

    def _create_and_replace(self, config: Any, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str) -> None:
        raise NotImplementedError

    def _check_new_adapter_config(self, config: Any) -> None:
        """Refuse configurations that cannot coexist with the adapters already present."""

    def _prepare_adapter_config(self, config: Any, model_config: dict) -> Any:
        if config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    f"target_modules is not set and there is no default for model_type {model_type!r}. Please "
                    "specify `target_modules` in `peft_config` (defaults exist for: "
                    f"{', '.join(sorted(self.target_module_mapping))})"
                )
            default = self.target_module_mapping[model_type]
            config.target_modules = default if isinstance(default, str) else set(default)  # a str is a regex
        return config

    # -- injection -------------------------------------------------------------------------------------
    @staticmethod
    def get_model_config(model: nn.Module) -> dict:
        cfg = getattr(model, "config", None)
        if cfg is None:
            return dict(DUMMY_MODEL_CONFIG)
        return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)

    def _expand_all_linear(self, config: Any, model: nn.Module) -> None:
        """'all-linear': every Linear/Conv1D of the base model, plus the adapter layers already wrapping one (so a
        second adapter lands on the same projections), never a module inside an adapter layer, never the head."""
        if not (isinstance(config.target_modules, str) and
                config.target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
            return
        linear = linear_layer_classes()
        inside = adapter_internal_names(model)
        names = {n for n, m in model.named_modules()
                 if n not in inside and (isinstance(m, linear) or
                                         (isinstance(m, BaseTunerLayer) and isinstance(m.get_base_layer(), linear)))}
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output is not None:
            names -= {n for n, m in model.named_modules() if m is output or
                      (isinstance(m, BaseTunerLayer) and m.get_base_layer() is output)}
        else:
            for head in ("score", "classifier", "qa_outputs"):
                names -= {n for n in names if n == head or n.endswith("." + head)}
        if not names:
            raise ValueError("target_modules='all-linear' found no Linear/Conv1D layer in the model")
        config.target_modules = names

    def _condense_target_modules(self, config: Any, model: nn.Module) -> None:
        targets = config.target_modules
        if isinstance(targets, str) or targets is None or len(targets) < MIN_TARGET_MODULES_FOR_OPTIMIZATION:
            return
        if not self.target_modules_condensable:
            return
        keys = [k for k, _ in model.named_modules() if k]
        wanted = {t for t in targets if isinstance(t, str)}
        others = [k for k in keys if not any(s in wanted for s in _suffixes_of(k))]
        config.target_modules = find_minimal_target_modules(targets, others)

    def _candidate_names(self, model: nn.Module) -> list[str]:
        inside = adapter_internal_names(model)
        seen: dict[str, None] = {}
        for key, module in model.named_modules():
            if key and key not in inside and self._supported_module(module) and not isinstance(module, BaseTunerLayer):
                seen.setdefault(key.rsplit(".", 1)[-1], None)
        return list(seen)

    def _own_module_names(self) -> set[str]:
        """Attribute names of the modules adapters add (``lora_A``, ``lora_dropout``, ``ia3_l``, ``base_layer``,
        ``modules_to_save``, ...): a target entry naming one of them names no base-model module, and is ignored
        (PEFT never targets its own modules)."""
        layer = self.tuner_layer_cls
        return set(layer.adapter_layer_names) | set(layer.other_param_names) | {
            "base_layer", "modules_to_save", "original_module"}

    def _inject_parameters(self, config: Any, model: nn.Module, adapter_name: str, undo: UndoLog) -> list[str]:
        """Adapt the ``nn.Parameter`` s ``config.target_parameters`` names (LoRA; see ``lora/param.py``), recording
        every change in ``undo``; returns their names. Methods without it refuse a config that asks for it."""
        raise ValueError(f"target_parameters is not supported by {type(self).__name__}; LoRA supports it through "
                         "get_peft_model / LoraModel (not in a PeftMixedModel)")

    def _check_targets_found(self, config: Any, model: nn.Module, planned: list[str], parameters: list[str]) -> None:
        """With target_parameters: PEFT's errors when neither modules nor parameters were targeted (nothing was
        changed yet), its warnings when only one of the two lists matched."""
        if not planned and not parameters:
            if not config.target_modules:
                raise NoMatchingPeftModuleError(
                    "No `target_modules` passed but also no `target_parameters` found. Please check the values for "
                    f"these arguments. (target_parameters={short_repr(config.target_parameters)} matched no "
                    "parameter: an entry must be a parameter's full name or a dotted suffix of it, e.g. "
                    "'lin0.weight' or 'experts.gate_up_proj')")
            self._plan(config, model)  # raises the error of a target_modules that matched nothing
        if config.target_modules and not planned:
            warnings.warn(f"target_modules={config.target_modules} were set but no module was matched.",
                          RuntimeWarning, stacklevel=3)
        elif not parameters:
            warnings.warn(f"target_parameters={config.target_parameters} were set but no parameter was matched.",
                          RuntimeWarning, stacklevel=3)

    def _plan(self, config: Any, model: nn.Module, parameters_too: bool = False) -> list[str]:
        """The names of the modules ``config`` targets. Raises when there are none, unless ``parameters_too``
        (target_parameters may still target something: ``_check_targets_found`` decides)."""
        keys = [k for k, _ in model.named_modules() if k]
        inside = adapter_internal_names(model)
        saved_names = list(getattr(config, "modules_to_save", None) or ())
        # PEFT's rule: a modules_to_save module and everything inside it is trained in full, never adapted.
        saved_set = set(saved_names)
        saved = [k for k in keys if any(x in saved_set for x in _suffixes_of(k))]
        planned, excluded, unmatched_keys = [], [], []
        matcher = TargetMatcher(config)
        for key in keys:
            if key in inside:  # an existing adapter's own modules are never targets, however targets are named
                continue
            if (matcher.exclude is not None and matcher.exclude(key)) or \
                    any(key == s or key.startswith(s + ".") for s in saved):
                excluded.append(key)  # PEFT's "excluded": by exclude_modules or inside a modules_to_save module
            elif matcher(key):
                planned.append(key)
            else:
                unmatched_keys.append(key)
        kinds = "/".join(sorted(set(self._supported_kinds())))
        candidates = f"modules with {kinds} layers: {', '.join(self._candidate_names(model))}"
        targets = config.target_modules  # shown as PEFT shows it (str()), in bounded size
        shown = targets if isinstance(targets, str) and len(targets) <= 200 else short_repr(targets)
        notes = ""
        if getattr(config, "layers_to_transform", None) is not None:
            notes += f" Note: You specified 'layers_to_transform': {short_repr(config.layers_to_transform)}."
        if getattr(config, "layers_pattern", None) is not None:
            notes += f" You also specified 'layers_pattern': {short_repr(config.layers_pattern)}."
        # Entries of a target list that name no module at all (a typo, or a name from another architecture);
        # entries naming the adapters' own modules (``lora_dropout``) are ignored, as PEFT ignores them.
        unmatched_entries: list = []
        if not isinstance(targets, str) and targets is not None:
            own = self._own_module_names()
            present = _key_suffixes(keys)
            unmatched_entries = [e for e in targets if e not in present and str(e).rsplit(".", 1)[-1] not in own]
        listed = ", ".join(short_repr(u, 60) for u in heapq.nsmallest(10, unmatched_entries, key=str))
        if len(unmatched_entries) > 10:
            listed += f" (and {len(unmatched_entries) - 10} more)"
        if not planned and parameters_too:
            return planned
        if not planned:
            if excluded and not unmatched_keys:
                raise NoMatchingPeftModuleError(
                    "All modules were excluded. This is likely unintended. Check your `target_modules`, "
                    f"`exclude_modules` and `modules_to_save` configuration (exclude_modules="
                    f"{short_repr(getattr(config, 'exclude_modules', None))}, modules_to_save="
                    f"{short_repr(saved_names or None)}).")
            what = (f"target_modules regex {short_repr(targets)} matched no module" if isinstance(targets, str) else
                    f"entries {listed} matched no module" if unmatched_entries else
                    "every matching module lies outside layers_to_transform")
            if not excluded:
                raise NoMatchingPeftModuleError(
                    f"Target modules {shown} not found in the base model. Please check the target modules and try "
                    f"again.{notes} ({what}; {candidates})")
            raise NoMatchingPeftModuleError(
                "No modules were targeted for adaptation. This might be caused by a combination of mismatched "
                "target modules and excluded modules. Please check your `target_modules` and `exclude_modules` "
                "configuration. You may also have only targeted modules that are marked to be saved "
                f"(`modules_to_save`).{notes} ({what}; excluded: {', '.join(excluded[:10])}; {candidates})")
        exclude = getattr(config, "exclude_modules", None)
        if exclude and not any(matcher.exclude(k) for k in excluded):
            warnings.warn(f"You have passed exclude_modules={short_repr(exclude)} but no modules were excluded. "
                          "Please check that exclude_modules was set correctly.", UserWarning, stacklevel=3)
        if unmatched_entries:
            warnings.warn(cap_message(
                f"target_modules entr{'y' if len(unmatched_entries) == 1 else 'ies'} {listed} matched no module "
                f"and {'is' if len(unmatched_entries) == 1 else 'are'} ignored; {candidates}"), UserWarning,
                stacklevel=3)
        for key in planned:
            module = model.get_submodule(key)
            if not (self._supported_module(module) or isinstance(module, self.tuner_layer_cls)):
                raise UnsupportedTargetError(
                    f"target module {key!r} is a {type(module).__name__}, which {type(self).__name__} does not "
                    f"support; supported layers: {kinds}"
                )
        return planned

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False) -> None:
        """Wrap every targeted module with an adapter layer for ``adapter_name``; all or nothing."""
        validate_adapter_name(adapter_name)
        config = self.peft_config[adapter_name]
        if not isinstance(config, PeftConfig):
            raise AdapterError(f"the config of adapter {adapter_name!r} must be a PeftConfig such as LoraConfig(...), "
                               f"got {type(config).__name__}")
        self._check_new_adapter_config(config)
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        self._check_tied_modules(model, config)
        self._expand_all_linear(config, model)
        self._condense_target_modules(config, model)
        with_parameters = bool(getattr(config, "target_parameters", None))
        planned = self._plan(config, model, parameters_too=with_parameters)
        parameters: list[str] = []

        # Adding an adapter leaves the trainability of every parameter that was already there as it was (the first
        # adapter instead freezes the base model); the new adapter's own parameters follow the rule below.
        kept = [] if not self._tuner_layers() else [
            (p, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=True)
            if f".{adapter_name}." not in n and not n.endswith(f".{adapter_name}")]
        with UndoLog() as undo:
            # low_cpu_mem_usage: the new adapter weights are created on the meta device (no memory, no init);
            # whoever loads the adapter assigns the checkpoint's tensors in their place.
            with adapter_weights_on_meta() if low_cpu_mem_usage else nullcontext():
                for key in planned:
                    parent, target, target_name = get_submodules(model, key)
                    if isinstance(target, self.tuner_layer_cls):
                        undo.delete_adapter(target, adapter_name)
                    else:
                        undo.replace(parent, target_name, target)
                    self._create_and_replace(config, adapter_name, target, target_name, parent, key)
                if with_parameters:  # after the modules, as PEFT: a parameter of an adapted module is refused
                    parameters = self._inject_parameters(config, model, adapter_name, undo)
            if with_parameters:
                self._check_targets_found(config, model, planned, parameters)
            self._set_modules_to_save(model, config, adapter_name, undo)
            self._set_auxiliary_modules(model, config, adapter_name, undo)
        # Each module once, in the order adapters first targeted it (PEFT's order).
        self.targeted_module_names = list(dict.fromkeys([*self.targeted_module_names, *planned]))
        _warn_unmatched_pattern_keys(config, planned)
        self.targeted_parameter_names = list(dict.fromkeys([*self.targeted_parameter_names, *parameters]))
        # A layer created for a new (inactive) adapter starts with that adapter active; follow the model's choice
        # instead. Trainability of existing parameters is left as it was.
        for layer in self._tuner_layers():
            layer._active_adapter = list(self.active_adapters)
        self._mark_only_adapters_as_trainable(model)
        for p, flag in kept:
            p.requires_grad_(flag)
        if config.inference_mode:
            from ..utils.save_and_load import adapter_parameter_prefixes

            prefixes = tuple(adapter_parameter_prefixes(model, adapter_name))
            for name, p in model.named_parameters():
                if any(name == q or name.startswith(q + ".") for q in prefixes):
                    p.requires_grad = False
        if autocast_adapter_dtype:
            self._cast_adapter_dtype(adapter_name)

    def _set_modules_to_save(self, model: nn.Module, config: Any, adapter_name: str, undo: UndoLog) -> None:
        """Wrap each ``modules_to_save`` module (or add the adapter's copy to its wrapper), recording every change
        in ``undo``; an entry that names no module raises, and the caller's log takes everything back."""
        names = getattr(config, "modules_to_save", None)
        if not names:
            return
        keys = [k for k, _ in model.named_modules() if k]
        found = set()
        activate = adapter_name in self.active_adapters
        for key in keys:
            if any(p in ("modules_to_save", "original_module", "base_layer") for p in key.split(".")):
                continue
            # a plain suffix, as PEFT matches it: "norm" also names every "input_layernorm" (checkpoints saved by PEFT
            # with such an entry hold a copy of each)
            match = [n for n in names if key.endswith(n)]
            if not match:
                continue
            found.update(match)
            parent, target, target_name = get_submodules(model, key)
            if isinstance(target, (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)):
                # A container has no forward of its own to route through a copy (PEFT refuses it the same way).
                raise TypeError(f"modules_to_save cannot be applied to modules of type {type(target).__name__} "
                                f"({key!r}); name the modules inside it instead (e.g. {key}.<name>)")
            self._wrap_module_to_save(parent, target_name, target, config, adapter_name, activate, undo)
        missing = [n for n in names if n not in found and n not in TASK_HEAD_NAMES]
        if missing:
            raise ValueError(f"modules_to_save entr{'y' if len(missing) == 1 else 'ies'} "
                             f"{', '.join(map(repr, missing))} matched no module in the model")
        tie = getattr(config, "modules_to_tie", None)
        embedding = model.get_input_embeddings() if tie and hasattr(model, "get_input_embeddings") else None
        if isinstance(embedding, ModulesToSaveWrapper) and adapter_name in embedding.modules_to_save:
            # ensure_weight_tying: modules tied to the embedding train the embedding's copy of the weight
            shared = embedding.modules_to_save[adapter_name]
            for key in sorted(tie):
                parent, target, target_name = get_submodules(model, key)
                self._wrap_module_to_save(parent, target_name, target, config, adapter_name, activate, undo,
                                          tied_module=shared)

    @staticmethod
    def _wrap_module_to_save(parent: nn.Module, target_name: str, target: nn.Module, config: Any, adapter_name: str,
                             activate: bool, undo: UndoLog, tied_module: Optional[nn.Module] = None) -> None:
        """Give ``target`` (a ModulesToSaveWrapper or a plain module, then wrapped) the adapter's copy, or
        ``tied_module``'s weight for ensure_weight_tying; every change is recorded in ``undo``."""
        if isinstance(target, ModulesToSaveWrapper):
            if adapter_name in target.modules_to_save:
                return
            previous = target.active_adapters
            target.update(adapter_name, tied_module=tied_module)
            undo.call(lambda t=target, prev=previous: t.set_adapter(prev))
            undo.delete_adapter(target, adapter_name)
            if activate:
                target.set_adapter(adapter_name, inference_mode=config.inference_mode)
            return
        wrapper = ModulesToSaveWrapper(target, adapter_name, tied_module=tied_module)
        if not activate:
            wrapper.set_adapter([])
        elif config.inference_mode:
            wrapper.set_adapter(adapter_name, inference_mode=True)
        undo.replace(parent, target_name, target)
        setattr(parent, target_name, wrapper)

    def _check_tied_modules(self, model: nn.Module, config: Any) -> None:
        """Input embedding and LM head sharing one weight (``tie_word_embeddings``) with one of them in
        ``modules_to_save`` or ``target_modules``: with ``ensure_weight_tying``, the embedding's modules_to_save copy
        is shared with the tied modules (recorded in ``config.modules_to_tie``); otherwise PEFT's warnings."""
        saved = list(getattr(config, "modules_to_save", None) or [])
        embedding_saved = any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in saved)
        targets = getattr(config, "target_modules", None)
        if isinstance(targets, str):
            embedding_targeted = any(re.fullmatch(targets, m) or re.search(rf"{targets}$", m)
                                     for m in EMBEDDING_LAYER_NAMES)
        else:
            embedding_targeted = any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in (targets or ()))
        tied = module_names_tied_with_embedding(model)
        if getattr(config, "ensure_weight_tying", False):
            if not tied:
                warnings.warn("You have requested `ensure_weight_tying`, but no tied modules were found in the model",
                              UserWarning, stacklevel=3)
            elif embedding_saved:
                embedding = model.get_input_embeddings()
                name = next(n for n, m in model.named_modules() if m is embedding)
                kept = [m for m in saved if not any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", t) for t in tied)]
                if name not in kept:
                    kept.append(name)
                config.modules_to_save = kept
                config.modules_to_tie = set(tied)
            elif embedding_targeted:
                raise ValueError("ensure_weight_tying=True with the embedding or LM head in target_modules (one LoRA "
                                 "shared, transposed, by the tied embedding and LM head) is not implemented in "
                                 "peftfast; list the embedding in modules_to_save instead, or set "
                                 "ensure_weight_tying=False")
            else:
                warnings.warn("You have requested `ensure_weight_tying`, but no tied modules are added in either "
                              "`modules_to_save` or `target_modules`", UserWarning, stacklevel=3)
        elif (embedding_saved or embedding_targeted) and tied:
            what = ("but `ensure_weight_tying` is not set to True" if hasattr(config, "ensure_weight_tying")
                    else "but no implementation exists to tie the adapters")
            warnings.warn(f"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, {what}. This "
                          "can lead to complications, for example when merging the adapter or converting your model "
                          "to formats other than safetensors. Check the discussion here: "
                          "https://github.com/huggingface/peft/issues/2777", UserWarning, stacklevel=3)

    def _set_auxiliary_modules(self, model: nn.Module, config: Any, adapter_name: str, undo: UndoLog) -> None:
        """Other modules the adapter trains outside its own layers (LoRA's trainable tokens, layers tied to the
        adapted ones); every change is recorded in ``undo``. None by default."""

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        # An adapter's own tensor sits directly under an adapter layer, in an attribute named with the method's
        # prefix (x.lora_A.default.weight); a base model module that merely has the prefix in its name
        # (a user's `lora_head`) is base model and stays frozen.
        # (A layer of another method inside this adapter, e.g. LoRA's trainable tokens, is known by its container
        # names: x.token_adapter.trainable_tokens_delta.default.)
        layers = {name: module.adapter_layer_names for name, module in model.named_modules()
                  if isinstance(module, BaseTunerLayer)}

        def is_adapter_tensor(name: str) -> bool:
            parts = name.split(".")
            for i in range(len(parts)):
                owner = layers.get(".".join(parts[:i]))
                if owner is not None and (self.prefix in parts[i] or parts[i] in owner):
                    return True
            return False

        for name, p in model.named_parameters():
            if "modules_to_save" not in name and not is_adapter_tensor(name):
                p.requires_grad = False
        self._mark_active_biases_trainable(model, self.tuner_layer_cls)

    def _mark_active_biases_trainable(self, model: nn.Module, layer_cls: type) -> None:
        """PEFT's ``bias`` option of each active adapter: 'all' unfreezes every bias of the model (but the
        modules_to_save originals), '<method>_only' the base biases of the ``layer_cls`` layers."""
        for active in self.active_adapters:
            bias = getattr(self.peft_config.get(active), "bias", "none")
            if bias == "none":
                continue
            if bias == "all":
                for name, p in model.named_parameters():
                    if (name == "bias" or name.endswith(".bias")) and "modules_to_save" not in name \
                            and "original_module" not in name:
                        p.requires_grad = True
            elif bias.endswith("_only"):
                for module in model.modules():
                    if isinstance(module, layer_cls):
                        b = getattr(module.get_base_layer(), "bias", None)
                        if b is not None:
                            b.requires_grad = True
            else:
                raise ValueError(f"Requested bias: {bias}, is not implemented.")

    def _cast_adapter_dtype(self, adapter_name: str) -> None:
        """PEFT's autocast_adapter_dtype: adapter weights of a half-precision base are kept in float32."""
        for module in self.model.modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            for layer_name in module.adapter_layer_names:
                container = getattr(module, layer_name)
                if adapter_name not in container:
                    continue
                for p in (container[adapter_name].parameters() if isinstance(container, nn.ModuleDict)
                          else [container[adapter_name]]):
                    if p.dtype in (torch.float16, torch.bfloat16):
                        p.data = p.data.to(torch.float32)
            for layer_name in module.other_param_names:  # buffers kept per adapter (VeLoRA's projection)
                container = getattr(module, layer_name, None)
                if type(container).__name__ == "BufferDict" and adapter_name in container \
                        and container[adapter_name].dtype in (torch.float16, torch.bfloat16):
                    container[adapter_name] = container[adapter_name].to(torch.float32)

    # -- adapters ----------------------------------------------------------------------------------------
    def _tuner_layers(self) -> list[BaseTunerLayer]:
        return [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]

    def _wrappers(self) -> list[ModulesToSaveWrapper]:
        return [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)]

    def _check_adapter_names(self, names: Iterable[str]) -> list[str]:
        if not isinstance(names, (str, list, tuple)) or \
                (not isinstance(names, str) and not all(isinstance(n, str) for n in names)):
            raise AdapterError(f"adapter names must be a str or a list of str, got {short_repr(names)} "
                               f"({type(names).__name__}); available adapters: "
                               f"{', '.join(map(repr, self.peft_config)) or 'none'}")
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterError(f"Adapter {', '.join(map(str, unknown))} does not exist; available adapters: "
                               f"{', '.join(map(repr, self.peft_config)) or 'none'}")
        return names

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = self._check_adapter_names(adapter_name)
        if not names:
            raise AdapterError("set_adapter needs at least one adapter name; to run the base model without adapters "
                               "use disable_adapter() (or disable_adapter_layers())")
        for wrapper in self._wrappers():  # checked for every wrapper before anything changes
            wrapper.check_can_activate(names)
        for layer in self._tuner_layers():
            if layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", UserWarning)
                layer.unmerge()
            layer.set_adapter(names, inference_mode=inference_mode)
        for wrapper in self._wrappers():
            wrapper.set_adapter(names, inference_mode=inference_mode)
        # as given (PEFT's): a name stays a str, a list stays a list (even of one name)
        self.active_adapter = adapter_name if isinstance(adapter_name, str) else names

    def set_requires_grad(self, adapter_names: str | Iterable[str], requires_grad: bool = True) -> None:
        """Switch gradients of the named adapters' weights (adapter layers and modules_to_save copies) on or off,
        independently of which adapter is active (PEFT's method)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"adapter_names must be a str or a list of str, got {adapter_names!r}")
        for module in self.model.modules():
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                module.set_requires_grad(names, requires_grad=requires_grad)

    def enable_adapter_layers(self) -> None:
        for m in self._tuner_layers() + self._wrappers():
            m.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        for active in self.active_adapters:
            bias = getattr(self.peft_config.get(active), "bias", "none")
            if bias != "none":
                warnings.warn(f"disabling adapter layers with bias={bias!r}: the trained biases stay in effect, "
                              "so the output differs from the base model's", UserWarning)
        for m in self._tuner_layers() + self._wrappers():
            m.enable_adapters(False)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_adapter_names(adapter_name)
        merged = [m for m in self._tuner_layers() if adapter_name in m.merged_adapters]
        if merged:
            raise AdapterError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them "
                               f"first. {adapter_name!r} is merged into the base weights of {len(merged)} layer(s); "
                               "call unmerge_adapter() before deleting it")
        del self.peft_config[adapter_name]
        layers = self._tuner_layers()
        for layer in layers:  # each layer that ran it picks its own next adapter (PEFT's rule, per layer)
            layer.delete_adapter(adapter_name)
        # the model's active adapters: the first adapter layer's (PEFT's); without layers, the others active, else
        # the alphabetically first adapter left
        if layers:
            remaining = list(layers[0].active_adapters)
        else:
            remaining = [n for n in self.active_adapters if n != adapter_name] or sorted(self.peft_config)[:1]
        for wrapper in self._wrappers():  # wrappers holding it follow the model's first adapter, as PEFT's do
            if adapter_name not in wrapper._get_available_adapters():
                continue
            wrapper.delete_adapter(adapter_name)
            if not remaining or remaining[0] not in wrapper._get_available_adapters():
                wrapper.set_adapter([])
            elif wrapper.active_adapters[:1] != remaining[:1]:
                wrapper.set_adapter(remaining[:1])
        self.active_adapter = remaining  # a list, as PEFT's

    # -- merging ---------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        layers = self._tuner_layers()
        if adapter_names is not None:
            self._check_adapter_names(adapter_names)
        # no names: each layer merges the adapters active on it (PEFT's rule; layers may have been set apart)
        names_of = {id(layer): list(layer.active_adapters) if adapter_names is None else list(adapter_names)
                    for layer in layers}
        for layer in layers:  # every layer may refuse (e.g. a grouped conv) before any of them changes
            layer._adapters_to_merge(names_of[id(layer)], warn=False)
        self._refuse_tied_merge(layers, names_of)
        if safe_merge:  # check every layer's merged weights are finite before changing any of them
            for layer in layers:
                check = getattr(layer, "check_merge", None)
                if check is not None:
                    check(names_of[id(layer)])
        with UndoLog() as undo:
            for layer in layers:
                layer.merge(safe_merge=safe_merge, adapter_names=names_of[id(layer)])
                undo.call(layer.unmerge)

    def _refuse_tied_merge(self, layers: list[BaseTunerLayer], names_of: dict[int, list[str]]) -> None:
        """Merging writes the delta into the base weight. When that tensor is tied to another module's (input and
        output embeddings sharing one matrix), the other module's output would change too, and with adapters on
        both, each delta would land in both: refuse, naming the tie."""
        merging = {id(layer) for layer in layers if layer._adapters_to_merge(names_of[id(layer)], warn=False)}
        if not merging:
            return
        users: dict[int, list[str]] = {}
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            for param_name, param in module.named_parameters(recurse=False):
                users.setdefault(id(param), []).append(_join_name(module_name, param_name))
        for key, layer in self.model.named_modules():
            if id(layer) not in merging or getattr(layer, "merge_replaces_rows", False):
                continue  # (a layer that writes rows, never adds, changes a tied module as training it does)
            target = getattr(layer, "merge_target", None)  # the tensor a merge writes (ParamWrapper: its parameter)
            weight = target() if target is not None else getattr(layer.get_base_layer(), "weight", None)
            shared = sorted(set(users.get(id(weight), [])) - {_join_name(key, "base_layer.weight")})
            shared = [n for n in shared if not n.startswith(key + ".")]
            if shared:
                raise AdapterError(
                    f"cannot merge into {key}: its base weight is tied to (the same tensor as) {', '.join(shared)}, so "
                    "merging would change that module's output too (and with adapters on both, add each delta to "
                    "both). Untie the weights first (e.g. give one module its own nn.Parameter copy) or keep the "
                    "adapter unmerged")

    def unmerge_adapter(self) -> None:
        for layer in self._tuner_layers():
            layer.unmerge()

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False,
                                     safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> nn.Module:
        if merge:
            # Adapters already merged with merge_adapter() stay merged; only the rest are merged now.
            names = self.active_adapters if adapter_names is None else list(adapter_names)
            already = {n for layer in self._tuner_layers() for n in layer.merged_adapters}
            pending = [n for n in names if n not in already]
            if pending:
                self.merge_adapter(adapter_names=pending, safe_merge=safe_merge)
        keys = [k for k, m in self.model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
        keep = self.active_adapters[0] if self.active_adapters else None
        for key in tqdm(keys, disable=not progressbar, desc="Unloading " + ("and merging " if merge else "") + "model"):
            try:
                parent, target, target_name = get_submodules(self.model, key)
            except AttributeError:
                continue  # already replaced together with an enclosing wrapper
            if isinstance(target, BaseTunerLayer):
                # a layer whose base module holds adapter layers of its own (LoRA on MultiheadAttention, whose
                # out_proj is wrapped) unwraps those too; merging was done above
                unload = getattr(target, "unload_and_optionally_merge_module", None)
                base = unload(merge=False, safe_merge=False, adapter_names=None) if unload else target.get_base_layer()
                setattr(parent, target_name, base)
            elif isinstance(target, AuxiliaryTrainingWrapper):
                setattr(parent, target_name, target.unwrapped(keep if not target.disable_adapters else None))
        if "peft_config" in getattr(self.model, "__dict__", {}):
            del self.model.peft_config  # the unloaded model is a plain model again and can be wrapped anew
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        return self._unload_and_optionally_merge(merge=True, progressbar=progressbar, safe_merge=safe_merge,
                                                 adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self._unload_and_optionally_merge(merge=False)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """A call of the model: its ``adapter_names`` routed by the tuner (``_route_adapter_names``), inside the
        handling of the routing an earlier training call left for its backward (``earlier_routing``)."""
        check_names_cover_batch(args, kwargs)
        with earlier_routing(self), self._route_adapter_names(kwargs):
            yield

    @contextmanager
    def _route_adapter_names(self, kwargs: dict):
        if kwargs.get("adapter_names") is not None:  # a tuner that mixes adapters per sample overrides this
            raise ValueError(f"adapter_names (one adapter per sample) is not supported by {type(self).__name__}; it "
                             "is supported for LoRA; use set_adapter() to choose the adapter for the whole batch")
        yield

