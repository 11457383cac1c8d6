"""transformers' own adapter API (``PeftAdapterMixin`` on every ``PreTrainedModel``) backed by peftfast.

``model.add_adapter(peftfast.LoraConfig(...))`` injects peftfast's layers into the model itself (no PeftModel
wrapper); ``set_adapter``, ``disable_adapters``, ``enable_adapters``, ``active_adapters``,
``get_adapter_state_dict``, ``delete_adapter`` and ``load_adapter`` then act on them, and ``save_pretrained`` (which
calls ``get_adapter_state_dict`` and the config's ``save_pretrained``) writes PEFT's adapter files.

transformers' methods need ``peft`` >= 0.22 and PEFT's classes, so each one is wrapped: a model whose adapters are
peftfast's (marked by ``PEFTFAST_ADAPTERS``), ``add_adapter`` given a peftfast config, and ``load_adapter`` when
transformers could not do it itself (``peft`` not installed, or older than transformers' ``MIN_PEFT_VERSION``)
take peftfast's path; everything else (models with PEFT's adapters, PEFT configs) goes
to transformers' original method unchanged. A model holds adapters of one library only.

``from_pretrained(<adapter folder or repo>)`` (``AutoModelFor...`` and the model classes): transformers looks for
``adapter_config.json``, loads the base model named in it and calls ``load_adapter`` only when
``is_peft_available()``. ``accept_adapter_folders`` rebinds that name in the two modules that use it for this
lookup alone (``integrations.peft``'s ``maybe_load_adapters`` and ``models.auto.auto_factory``) to answer True:
with peftfast imported, adapters load without ``peft``. With ``peft`` installed nothing changes.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Any, Optional

from torch import nn

from ..config import PeftConfig
from ..mapping import inject_adapter_in_model
from ..tuners.tuners_utils import BaseTunerLayer
from ..utils.other import ModulesToSaveWrapper
from ..utils.save_and_load import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

PATCHED = "__peftfast_patched__"
PEFTFAST_ADAPTERS = "_peftfast_adapters"  # instance attribute set on a model whose adapters are peftfast's
HUB_KEYS = ("revision", "cache_dir", "token", "force_download", "local_files_only", "subfolder")


def uses_peftfast(model: nn.Module) -> bool:
    return bool(model.__dict__.get(PEFTFAST_ADAPTERS, False))


def transformers_can_use_peft(minimum: str) -> bool:
    """Whether transformers' own adapter methods would run: ``peft`` importable, at least ``minimum``."""
    if importlib.util.find_spec("peft") is None:
        return False
    try:
        from importlib.metadata import version

        from packaging.version import Version

        return Version(version("peft")) >= Version(minimum)
    except Exception:
        return False


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]


def require_adapters(model: nn.Module) -> None:
    if not getattr(model, "_hf_peft_config_loaded", False) or not getattr(model, "peft_config", None):
        raise ValueError("No adapter loaded. Please load an adapter first (add_adapter or load_adapter).")


def check_names(model: nn.Module, names: list[str]) -> None:
    missing = [n for n in names if n not in model.peft_config]
    if missing:
        raise ValueError(f"Following adapter(s) could not be found: {', '.join(missing)}. Make sure you are passing "
                         f"the correct adapter name(s). current loaded adapters are: {list(model.peft_config)}")


# ------------------------------------------------------------------------------------------ the methods
def add_adapter(model: nn.Module, adapter_config: PeftConfig, adapter_name: Optional[str] = None) -> None:
    adapter_name = adapter_name or "default"
    if getattr(model, "_hf_peft_config_loaded", False) and not uses_peftfast(model):
        raise ValueError("this model already holds adapters of the peft library; a model holds adapters of one "
                         "library only: add a peft config, or start from a model without adapters")
    configs = model.__dict__.get("peft_config") if uses_peftfast(model) else None
    if configs and adapter_name in configs:
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    adapter_config.base_model_name_or_path = model.__dict__.get("name_or_path", None)
    adapter_config.inference_mode = False
    inject_adapter_in_model(adapter_config, model, adapter_name)
    configs = dict(configs or {})
    configs[adapter_name] = adapter_config
    model.peft_config = configs
    model.__dict__[PEFTFAST_ADAPTERS] = True
    model._hf_peft_config_loaded = True
    set_adapter(model, adapter_name)


def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    require_adapters(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    check_names(model, names)
    for layer in adapter_layers(model):
        layer.set_adapter(names if len(names) > 1 else names[0])


def disable_adapters(model: nn.Module) -> None:
    require_adapters(model)
    for layer in adapter_layers(model):
        layer.enable_adapters(False)


def enable_adapters(model: nn.Module) -> None:
    require_adapters(model)
    for layer in adapter_layers(model):
        layer.enable_adapters(True)


def active_adapters(model: nn.Module) -> list[str]:
    require_adapters(model)
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            active = layer.active_adapter
            return [active] if isinstance(active, str) else list(active)
    return []


def get_adapter_state_dict(model: nn.Module, adapter_name: Optional[str] = None,
                           state_dict: Optional[dict] = None) -> dict:
    require_adapters(model)
    if adapter_name is None:
        adapter_name = active_adapters(model)[0]
    return get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name)


def delete_adapter(model: nn.Module, adapter_names: list[str] | str) -> None:
    require_adapters(model)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    check_names(model, names)
    for name in names:
        for layer in adapter_layers(model):
            if isinstance(layer, BaseTunerLayer):
                layer.delete_adapter(name)
            elif name in layer.modules_to_save:
                del layer.modules_to_save[name]
        del model.peft_config[name]
    if not model.peft_config:
        model._hf_peft_config_loaded = False


def load_adapter(model: nn.Module, peft_model_id: Optional[str] = None, adapter_name: Optional[str] = None,
                 peft_config: Optional[Any] = None, adapter_state_dict: Optional[dict] = None,
                 is_trainable: bool = False, adapter_kwargs: Optional[dict] = None, **kwargs: Any) -> Any:
    """Read adapter_config.json and the weights (a folder or Hub repo, or ``peft_config`` + ``adapter_state_dict``),
    inject peftfast's layers and load the weights. Frozen unless ``is_trainable``."""
    adapter_name = adapter_name or "default"
    hub = {k: v for k, v in {**(adapter_kwargs or {}), **kwargs}.items() if k in HUB_KEYS}
    if peft_config is None:
        if peft_model_id is None:
            raise ValueError("load_adapter needs peft_model_id (a folder or Hub repo) or peft_config with "
                             "adapter_state_dict")
        config = PeftConfig.from_pretrained(peft_model_id, **hub)
    elif isinstance(peft_config, PeftConfig):
        config = peft_config
    else:
        from ..mapping import get_peft_config

        config = get_peft_config(dict(peft_config))
    if adapter_state_dict is None:
        if peft_model_id is None:
            raise ValueError("load_adapter with peft_config needs adapter_state_dict or peft_model_id")
        adapter_state_dict = load_peft_weights(peft_model_id, **hub)
    config.inference_mode = not is_trainable
    weights = {}
    for key, value in adapter_state_dict.items():  # files carry PeftModel's prefix; these layers sit in the model
        weights[key[len("base_model.model."):] if key.startswith("base_model.model.") else key] = value
    add_adapter(model, config, adapter_name)
    try:
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name, strict=True)
    except BaseException:
        delete_adapter(model, adapter_name)
        raise
    if not is_trainable:
        for name, p in model.named_parameters():
            if f".{adapter_name}." in f".{name}." and ("lora_" in name or "ia3_" in name
                                                        or "modules_to_save" in name):
                p.requires_grad_(False)
    return result


# ------------------------------------------------------------------------------------------ the patch
def route(original: Any, ours: Any, take_ours: Any) -> Any:
    @functools.wraps(original)
    def method(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if take_ours(self, args, kwargs):
            return ours(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    setattr(method, PATCHED, True)
    return method


def config_arg(args: tuple, kwargs: dict) -> Any:
    return kwargs.get("adapter_config", args[0] if args else None)


def accept_adapter_folders(module: Any) -> None:
    """``module.is_peft_available`` answers True (see the module docstring); kept when already patched."""
    original = getattr(module, "is_peft_available", None)
    if original is None or getattr(original, PATCHED, False):
        return

    @functools.wraps(original)
    def is_peft_available() -> bool:
        return True  # peftfast loads the adapter when peft cannot (load_adapter above)

    setattr(is_peft_available, PATCHED, True)
    module.is_peft_available = is_peft_available


def patch_adapter_mixin(module: Any) -> None:
    accept_adapter_folders(module)
    mixin = getattr(module, "PeftAdapterMixin", None)
    if mixin is None or getattr(mixin.add_adapter, PATCHED, False):
        return
    mine = lambda self, args, kwargs: uses_peftfast(self)  # noqa: E731
    mixin.add_adapter = route(mixin.add_adapter, add_adapter, lambda self, args, kwargs: uses_peftfast(self)
                              or isinstance(config_arg(args, kwargs), PeftConfig))
    minimum = getattr(module, "MIN_PEFT_VERSION", "0")
    mixin.load_adapter = route(mixin.load_adapter, load_adapter, lambda self, args, kwargs: uses_peftfast(self)
                               or isinstance(kwargs.get("peft_config"), PeftConfig)
                               or not transformers_can_use_peft(minimum))
    for name, ours in (("set_adapter", set_adapter), ("disable_adapters", disable_adapters),
                       ("enable_adapters", enable_adapters), ("active_adapters", active_adapters),
                       ("get_adapter_state_dict", get_adapter_state_dict), ("delete_adapter", delete_adapter)):
        setattr(mixin, name, route(getattr(mixin, name), ours, mine))
