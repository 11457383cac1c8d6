"""MixedModel: one tuner holding adapters of different methods (PEFT's ``peft.tuners.mixed.MixedModel``).

Each adapter is injected by its own method's tuner code (``_create_and_replace`` of LoraModel, LoHaModel, ...),
run with this tuner as ``self``. A module targeted by adapters of two methods ends up wrapped twice: the newer
method's layer wraps the older one's (``lin.base_layer`` is then itself an adapter layer), and the forward adds
each layer's delta on top of its ``base_layer``'s output, so the active adapters' outputs are summed as in PEFT.
Merging writes every delta into the one base weight at the bottom of the nest.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

from torch import nn

from ...utils import registry
from ...utils.errors import AdapterError
from ...utils.peft_types import PeftType
from ..tuners_utils import BaseTuner, BaseTunerLayer, check_single_bias_adapter

# PEFT's list; OFT and SHiRA are PEFT methods peftfast does not implement (their configs do not exist here).
COMPATIBLE_TUNER_TYPES = (PeftType.LORA, PeftType.LOHA, PeftType.LOKR, PeftType.ADALORA, PeftType.OFT, PeftType.SHIRA)

# Class attributes of a method's tuner that its ``_create_and_replace`` reads through ``self``.
_DELEGATED_ATTRIBUTES = ("tuner_layer_cls", "layers_mapping", "dispatchers", "method", "target_module_mapping",
                         "target_modules_condensable")


def compatible_names() -> str:
    return ", ".join(t.value for t in COMPATIBLE_TUNER_TYPES)


def check_config_compatible(config: Any) -> None:
    """Refuse a config whose method cannot be mixed (PEFT's rule), or that peftfast does not implement."""
    peft_type = getattr(config, "peft_type", None)
    try:
        key = registry.as_peft_type(peft_type)
    except KeyError:
        key = None
    if key not in COMPATIBLE_TUNER_TYPES:
        shown = key.value if key is not None else repr(peft_type)
        raise ValueError(f"The provided `peft_type` '{shown}' is not compatible with the `PeftMixedModel`. "
                         f"Compatible types are: {compatible_names()}")
    if registry.PEFT_TYPE_TO_TUNER_MAPPING.get(key) is None:
        raise ValueError(f"peft_type {key.value} can be mixed in PEFT but is not implemented by peftfast; "
                         f"mixable here: {', '.join(t.value for t in mixable_types())}")


def mixable_types() -> list[PeftType]:
    return [t for t in COMPATIBLE_TUNER_TYPES if registry.PEFT_TYPE_TO_TUNER_MAPPING.get(t) is not None]


def _adapter_prefixes() -> tuple[str, ...]:
    return tuple(dict.fromkeys(registry.tuner_class(t).prefix for t in mixable_types()))


def _adapter_layer_classes() -> tuple[type, ...]:
    return tuple(dict.fromkeys(registry.tuner_class(t).tuner_layer_cls for t in mixable_types()))


class MixedModel(BaseTuner):
    """Adapters of the methods in ``COMPATIBLE_TUNER_TYPES`` (those peftfast implements) on one model.

    Usually created through ``get_peft_model(model, config, mixed=True)`` or ``PeftMixedModel``.
    """

    prefix = ""
    tuner_layer_cls = BaseTunerLayer

    def __init__(self, model: nn.Module, config: Any, adapter_name: str = "default", **kwargs: Any) -> None:
        for c in (config.values() if isinstance(config, dict) else [config]):
            check_config_compatible(c)
        super().__init__(model, config, adapter_name, **kwargs)

    # -- the method whose adapter is being injected ---------------------------------------------------------
    @contextmanager
    def _as_method(self, config: Any) -> Iterator[type]:
        """Make ``self`` look like ``config``'s tuner class (its class attributes) while its code runs."""
        tuner_cls = registry.tuner_class(config.peft_type)
        saved = {name: self.__dict__[name] for name in _DELEGATED_ATTRIBUTES if name in self.__dict__}
        for name in _DELEGATED_ATTRIBUTES:
            if hasattr(tuner_cls, name):
                self.__dict__[name] = getattr(tuner_cls, name)
        self.__dict__["_method_cls"] = tuner_cls
        try:
            yield tuner_cls
        finally:
            for name in (*_DELEGATED_ATTRIBUTES, "_method_cls"):
                self.__dict__.pop(name, None)
            self.__dict__.update(saved)

    def _method(self) -> type:
        cls = self.__dict__.get("_method_cls")
        if cls is None:
            raise RuntimeError("MixedModel: no adapter is being injected")
        return cls

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False) -> None:
        config = self.peft_config[adapter_name]
        check_config_compatible(config)
        with self._as_method(config):
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage)

    def _check_new_adapter_config(self, config: Any) -> None:
        check_config_compatible(config)
        check_single_bias_adapter(self)

    def _prepare_adapter_config(self, config: Any, model_config: dict) -> Any:
        return self._method()._prepare_adapter_config(self, config, model_config)

    def _supported_module(self, module: nn.Module) -> bool:
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        return self._method()._supported_module(self, base)

    def _supported_types(self) -> tuple[type, ...]:
        return self._method()._supported_types(self)

    def _create_and_replace(self, config: Any, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str) -> None:
        self._method()._create_and_replace(self, config, adapter_name, target, target_name, parent, current_key)

    def _create_new_module(self, config: Any, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
        return self._method()._create_new_module(self, config, adapter_name, target, **kwargs)

    def _set_auxiliary_modules(self, model: nn.Module, config: Any, adapter_name: str, undo: Any) -> None:
        self._method()._set_auxiliary_modules(self, model, config, adapter_name, undo)

    def _own_module_names(self) -> set[str]:
        names: set[str] = {"base_layer", "modules_to_save", "original_module"}
        for layer in _adapter_layer_classes():
            names |= set(layer.adapter_layer_names) | set(layer.other_param_names)
        return names

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        prefixes = _adapter_prefixes()
        for name, p in model.named_parameters():
            if not any(prefix in name for prefix in prefixes) and "modules_to_save" not in name \
                    and ".token_adapter.trainable_tokens_delta." not in name:  # (LoRA's trainable tokens)
                p.requires_grad = False
        self._mark_active_biases_trainable(model, BaseTunerLayer)

    # -- adapters ----------------------------------------------------------------------------------------
    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        """Delete one or several adapters. The adapters left active are those still active on some layer (mixed
        adapters mostly sit on different layers), as in PEFT."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = sorted(set(names) - set(self.peft_config))
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} not found, available adapters: {sorted(self.peft_config)}")
        merged = sorted({n for m in self._tuner_layers() for n in m.merged_adapters if n in names})
        if merged:
            raise AdapterError(f"Cannot delete adapter(s) {merged} while they are merged. Please unmerge them first. "
                               "(unmerge_adapter() unmerges every layer; nothing was deleted)")
        still_active = [n for n in self.active_adapters if n not in names]
        for name in names:
            del self.peft_config[name]
            for layer in self._tuner_layers():
                layer.delete_adapter(name)
            for wrapper in self._wrappers():
                wrapper.delete_adapter(name)
        if not still_active:
            on_layers = {n for layer in self._tuner_layers() for n in layer.active_adapters}
            still_active = [n for n in self.peft_config if n in on_layers]
        self.active_adapter = still_active  # a list, as PEFT's

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"Weighted adapters are not supported for {type(self).__name__} (as in PEFT); "
                                  "combine adapters of one method on a PeftModel of that method")

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False,
                                     safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> nn.Module:
        if adapter_names is not None:
            self._check_adapter_names(adapter_names)
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

