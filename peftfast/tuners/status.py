"""PEFT's status report of a model's adapter layers: ``get_layer_status`` / ``get_model_status`` and their
dataclasses ``TunerLayerStatus`` / ``TunerModelStatus`` (PEFT defines them in ``peft.peft_model``; peftfast
re-exports them there and at the top level).

Works on a PeftModel (anything whose ``base_model`` is a ``BaseTuner``), a tuner, or a plain model with adapters
injected. "irregular" marks a value that differs between layers (an inconsistent model).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from ..utils.other import ModulesToSaveWrapper
from .tuners_utils import BaseTuner, BaseTunerLayer

__all__ = ["TunerLayerStatus", "TunerModelStatus", "count_parameters", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str] | Irregular


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit bitsandbytes weight counts its unpacked values."""
    trainable, total = 0, 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":  # two 4-bit values per stored byte
            itemsize = getattr(getattr(p, "quant_storage", None), "itemsize", None) or p.element_size()
            n = n * 2 * itemsize
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def _tuner_of(model: nn.Module, caller: str) -> Optional[BaseTuner]:
    base = getattr(model, "base_model", None) if not isinstance(model, BaseTuner) else model
    if isinstance(model, BaseTuner) or isinstance(base, BaseTuner):
        return base
    if base is not None and hasattr(model, "peft_config") and not isinstance(model, BaseTunerLayer):
        raise TypeError(f"{caller}() got an invalid PeftModel instance; prefix tuning and adaption prompt are not "
                        "supported.")
    return None


def _all_or_irregular(values: list[bool | Irregular]) -> bool | Irregular:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _adapter_tensors(module: nn.Module, attr: str) -> dict[str, list[torch.Tensor]]:
    container = getattr(module, attr, None)
    out: dict[str, list[torch.Tensor]] = {}
    if isinstance(container, nn.ModuleDict):
        for key, sub in container.items():
            out[key] = list(sub.parameters())
    elif isinstance(container, nn.ParameterDict) or type(container).__name__ == "BufferDict":
        for key, t in container.items():
            out[key] = [t]
    return out


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One ``TunerLayerStatus`` per adapter layer and modules_to_save wrapper of ``model`` (PEFT's fields)."""
    tuner = _tuner_of(model, "get_layer_status")
    root = tuner if tuner is not None else model
    statuses: list[TunerLayerStatus] = []
    for name, module in root.named_modules():
        if not isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            continue
        layer_names = tuple(getattr(module, "adapter_layer_names", ("modules_to_save",)))
        other_names = tuple(getattr(module, "other_param_names", ()))
        grads: dict[str, list[bool]] = collections.defaultdict(list)
        for attr in layer_names:
            for key, tensors in _adapter_tensors(module, attr).items():
                grads[key].extend(t.requires_grad for t in tensors)
        devices: dict[str, list[str]] = collections.defaultdict(list)
        for attr in layer_names + other_names:
            for key, tensors in _adapter_tensors(module, attr).items():
                devices[key].extend(t.device.type for t in tensors)
        backend = getattr(module, "quantization_backend", None)
        statuses.append(TunerLayerStatus(
            name=name,
            module_type=repr(module).partition("(")[0],
            enabled=not module.disable_adapters,
            active_adapters=list(module.active_adapters),
            merged_adapters=list(getattr(module, "merged_adapters", [])),
            requires_grad={k: _all_or_irregular(v) for k, v in grads.items()},
            available_adapters=available_adapter_names(module),
            devices={k: sorted(set(v)) for k, v in devices.items()},
            quantization_backend=getattr(backend, "backend_name", None) if backend is not None else None,
        ))
    if not statuses:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you have "
                         "PEFT adapters injected in the model.")
    return statuses


def available_adapter_names(module: nn.Module) -> list[str]:
    """Sorted adapter names an adapter layer or modules_to_save wrapper holds weights for."""
    if isinstance(module, ModulesToSaveWrapper):
        return sorted(module.modules_to_save.keys())
    names: set[str] = set()
    for attr in module.adapter_layer_names:
        container = getattr(module, attr)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            names.update(container.keys())
    return sorted(names)


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapters' state over the whole model (PEFT's ``TunerModelStatus``); a value that differs between layers
    is reported as "irregular"."""
    tuner = _tuner_of(model, "get_model_status")
    if tuner is not None:
        base = tuner.model
        base_model_type = type(base).__name__
        trainable, total = count_parameters(model)
        peft_types = {k: getattr(c.peft_type, "value", str(c.peft_type)) for k, c in tuner.peft_config.items()}
        adapter_model_type = type(tuner).__name__
    else:
        is_pretrained = any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
                            for c in type(model).__mro__)
        base_model_type = type(model).__name__ if is_pretrained else "other"
        trainable, total = count_parameters(model)
        peft_types, adapter_model_type = {}, "None"
    layers = get_layer_status(model)

    enabled_set = {s.enabled for s in layers}
    enabled: bool | Irregular = enabled_set.pop() if len(enabled_set) == 1 else "irregular"
    available = sorted(set().union(*(s.available_adapters for s in layers)))
    active_set = {tuple(s.active_adapters) for s in layers}
    active: list[str] | Irregular = list(active_set.pop()) if len(active_set) == 1 else "irregular"
    merged_all = set().union(*(s.merged_adapters for s in layers))
    merged: list[str] | Irregular = sorted(merged_all)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_all for s in layers):
        merged = "irregular"
    grads: dict[str, list[bool | Irregular]] = collections.defaultdict(list)
    devices: dict[str, list[str]] = collections.defaultdict(list)
    for s in layers:
        for k, v in s.requires_grad.items():
            grads[k].append(v)
        for k, v in s.devices.items():
            devices[k].extend(v)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=base_model_type, adapter_model_type=adapter_model_type, peft_types=peft_types,
        trainable_params=trainable, total_params=total, num_adapter_layers=len(layers), enabled=enabled,
        active_adapters=active, merged_adapters=merged,
        requires_grad={k: _all_or_irregular(v) for k, v in grads.items()}, available_adapters=available,
        devices={k: sorted(set(v)) for k, v in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
