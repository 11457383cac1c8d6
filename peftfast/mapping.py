"""The entry points get_peft_model, get_peft_config, inject_adapter_in_model, and PEFT's name -> class tables.

``PEFT_TYPE_TO_CONFIG_MAPPING``, ``PEFT_TYPE_TO_TUNER_MAPPING``, ``PEFT_TYPE_TO_MIXED_MODEL_MAPPING`` and
``PEFT_TYPE_TO_PREFIX_MAPPING`` are the registry's own dicts (``peftfast.utils.registry``), re-exported under
PEFT's names; the methods fill them when their packages are imported (``peftfast.tuners`` below).
``MODEL_TYPE_TO_PEFT_MODEL_MAPPING`` picks the PeftModel wrapper for a task type.
"""
from __future__ import annotations

import warnings

from typing import Any, Optional

from torch import nn

from . import tuners  # noqa: F401  (each method package registers itself on import)
from .config import PeftConfig
from .peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    validate_adapter_name,
)
from .utils import registry
from .utils.peft_types import PeftType, TaskType
from .utils.registry import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    register_peft_method,
)


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """Build the config named by ``config_dict['peft_type']``."""
    return PeftConfig.from_peft_type(**config_dict)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   mixed: bool = False, autocast_adapter_dtype: bool = True, revision: Optional[str] = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap ``model`` with a new adapter; the PeftModel subclass follows ``peft_config.task_type``."""
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}")
    validate_adapter_name(adapter_name)
    if hasattr(model, "peft_config") and isinstance(getattr(model, "peft_config"), dict):
        raise ValueError("this model already has adapters injected (it has a peft_config); call get_peft_model "
                         "on a fresh base model, or use add_adapter/load_adapter on the PeftModel")
    # the config names the model it wraps (PEFT's rule: the model's name replaces the config's, with a warning)
    old_name = peft_config.base_model_name_or_path
    new_name = (model.__dict__.get("name_or_path", None)
                or getattr(getattr(model, "config", None), "_name_or_path", None) or None)
    peft_config.base_model_name_or_path = new_name
    if old_name is not None and old_name != new_name:
        warnings.warn(f"The PEFT config's `base_model_name_or_path` was renamed from '{old_name}' to '{new_name}' "
                      "(the name of the model it wraps): make sure this base model is loaded when loading this "
                      "checkpoint", UserWarning)
    if revision is not None:
        peft_config.revision = revision
    if mixed:  # adapters of several methods on one model (no task-specific wrapper, as in PEFT)
        from .mixed_model import PeftMixedModel

        return PeftMixedModel(model, peft_config, adapter_name=adapter_name)
    task = peft_config.task_type.value if isinstance(peft_config.task_type, TaskType) else peft_config.task_type
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task, PeftModel) if task is not None else PeftModel
    return cls(model, peft_config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> nn.Module:
    """Inject adapter layers into ``model`` in place (no PeftModel wrapper) and return it."""
    validate_adapter_name(adapter_name)
    key = PeftType(peft_config.peft_type)
    if peft_config.is_prompt_learning:
        raise ValueError("`create_and_replace` does not support prompt learning and adaption prompt yet: "
                         f"{key.value} adds virtual tokens through a PeftModel; use get_peft_model instead")
    if PEFT_TYPE_TO_TUNER_MAPPING.get(key) is None:
        raise ValueError(f"peft_type {key.value} is not supported; supported: {registry.supported_names()}")
    if getattr(peft_config, "target_parameters", None) and state_dict:
        raise ValueError("Trying to inject a PEFT adapter from a state_dict but the PEFT config uses "
                         "`target_parameters`. This is not supported -- when using `target_parameters`, please inject "
                         "the adapter without the state_dict.")
    tuner_cls = registry.tuner_class(key)
    tuner = tuner_cls(model, peft_config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    return tuner.model


__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING", "PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "get_peft_config", "get_peft_model",
    "inject_adapter_in_model", "register_peft_method",
]
