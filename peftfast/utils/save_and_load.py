"""Adapter state dicts: which model keys belong to an adapter, and their names on disk.

One mapping serves both directions. ``adapter_key_map(model, name)`` lists, for the adapter
``name``, every checkpoint key (adapter name stripped, as PEFT writes it) and the in-memory key it
corresponds to. Saving reads through it; loading checks a file against it (unexpected keys,
missing keys, shapes) before anything is written into the model.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from .constants import EMBEDDING_LAYER_NAMES
from .other import ModulesToSaveWrapper
from .peft_types import PeftType

PREFIXES = {PeftType.LORA: "lora_", PeftType.IA3: "ia3_"}


class AdapterLoadError(ValueError):
    """An adapter state dict does not fit the model (unexpected or missing keys, wrong shapes or dtypes)."""


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def _strip_adapter_name(key: str, adapter_name: str) -> str:
    if key.endswith(f".{adapter_name}"):  # an nn.Parameter stored directly in a ParameterDict
        return key[: -len(adapter_name) - 1]
    head, _, leaf = key.rpartition(".")
    head = re.sub(re.escape(f".{adapter_name}") + r"$", "", head)
    return f"{head}.{leaf}"


def _module_names(model: nn.Module, kind: type) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, kind)]


def _embedding_prefixes(model: nn.Module) -> list[str]:
    """Module-name prefixes of the input/output embeddings (their base layer when wrapped by an adapter)."""
    out: list[str] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        if fn is None:
            continue
        try:
            layer = fn()
        except (AttributeError, NotImplementedError):
            continue
        if layer is None:
            continue
        target = getattr(layer, "base_layer", layer)
        for name, module in model.named_modules():
            if module is target:
                out.append(name + ".")
                break
    return out


def _resolve_save_embedding_layers(config: Any, save_embedding_layers: str | bool) -> bool:
    if save_embedding_layers != "auto":
        return bool(save_embedding_layers)
    targets = getattr(config, "target_modules", None) or ()
    if isinstance(targets, str):
        targeted = any(re.search(name, targets) for name in EMBEDDING_LAYER_NAMES)
    else:
        targeted = any(t in EMBEDDING_LAYER_NAMES or t.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES for t in targets)
    if targeted:
        warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                      UserWarning)
    return targeted


def adapter_key_map(model: nn.Module, adapter_name: str = "default", save_embedding_layers: str | bool = "auto",
                    state_dict: Optional[dict[str, torch.Tensor]] = None) -> dict[str, str]:
    """checkpoint key -> model key, for every tensor that belongs to ``adapter_name``."""
    config = model.peft_config[adapter_name]
    peft_type = PeftType(config.peft_type)
    prefix = PREFIXES.get(peft_type)
    if prefix is None:
        raise ValueError(f"peft_type {peft_type.value} has no state-dict mapping in peftfast")
    keys = list((state_dict if state_dict is not None else model.state_dict()).keys())
    mapping: dict[str, str] = {}
    name_part = re.compile(rf"(^|\.){re.escape(adapter_name)}(\.|$)")
    for key in keys:
        if prefix in key and name_part.search(key.split(prefix, 1)[1]):
            mapping[_strip_adapter_name(key, adapter_name)] = key

    bias = getattr(config, "bias", "none")
    if bias == "all":
        for key in keys:
            if key.endswith("bias") and prefix not in key and "modules_to_save" not in key \
                    and "original_module" not in key:
                mapping.setdefault(key, key)
    elif bias.endswith("_only"):
        for key in list(mapping.values()):
            bias_key = key.split(prefix, 1)[0] + "bias"
            if bias_key not in keys:
                bias_key = key.split(prefix, 1)[0] + "base_layer.bias"
            if bias_key in keys:
                mapping.setdefault(bias_key, bias_key)

    marker = f".modules_to_save.{adapter_name}."
    for key in keys:
        if marker in key:
            mapping[key.replace(marker, ".")] = key

    if _resolve_save_embedding_layers(config, save_embedding_layers):
        root = model
        for prefix_name in _embedding_prefixes(root):
            for key in keys:
                if key.startswith(prefix_name) and prefix not in key:
                    mapping.setdefault(key, key)
    return mapping


def get_peft_model_state_dict(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: str | bool = "auto") -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as PEFT writes them to disk (adapter name removed)."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    if adapter_name not in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} not found; available: {', '.join(model.peft_config)}")
    sd = model.state_dict() if state_dict is None else state_dict
    mapping = adapter_key_map(model, adapter_name, save_embedding_layers, state_dict=sd)
    return {ckpt: sd[key] for ckpt, key in mapping.items()}


def check_adapter_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                             adapter_name: str, ignore_mismatched_sizes: bool = False) -> tuple[dict, list[str]]:
    """Map checkpoint keys onto the model's; raise AdapterLoadError for anything that does not fit.

    Returns (model key -> tensor, missing adapter keys). Nothing in the model is modified.
    """
    own = model.state_dict()
    mapping = adapter_key_map(model, adapter_name, save_embedding_layers=True)
    # Embedding weights and biases are optional in a checkpoint; adapter weights are required.
    prefix = PREFIXES[PeftType(model.peft_config[adapter_name].peft_type)]
    required = {c for c, k in mapping.items() if prefix in k or ".modules_to_save." in k}
    unexpected, mismatched, bad_dtype, out = [], [], [], {}
    for ckpt_key, tensor in peft_model_state_dict.items():
        model_key = mapping.get(ckpt_key)
        if model_key is None:
            unexpected.append(ckpt_key)
            continue
        if not isinstance(tensor, torch.Tensor):
            bad_dtype.append(f"{ckpt_key}: not a tensor ({type(tensor).__name__})")
            continue
        target = own[model_key]
        if tuple(tensor.shape) != tuple(target.shape):
            if ignore_mismatched_sizes:
                continue
            mismatched.append(f"{ckpt_key}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
            continue
        if target.is_floating_point() and not tensor.is_floating_point():
            bad_dtype.append(f"{ckpt_key}: checkpoint dtype {tensor.dtype}, model expects a floating-point tensor")
            continue
        if target.is_floating_point() and not torch.isfinite(tensor).all():
            bad_dtype.append(f"{ckpt_key}: holds NaN or inf values")
            continue
        out[model_key] = tensor
    problems = []
    if unexpected:
        problems.append(f"unexpected keys (not part of adapter {adapter_name!r} of this model): "
                        f"{', '.join(sorted(unexpected)[:10])}{' ...' if len(unexpected) > 10 else ''}")
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:10]))
    if bad_dtype:
        problems.append("bad values: " + "; ".join(bad_dtype[:10]))
    missing = sorted(c for c in required if c not in peft_model_state_dict)
    if missing and not problems and len(missing) == len(required):
        problems.append(f"none of the adapter's {len(required)} weights are in the checkpoint (e.g. "
                        f"{', '.join(missing[:3])}); is this an adapter for this model?")
    if problems:
        raise AdapterLoadError("adapter weights do not fit the model: " + " | ".join(problems))
    return out, missing


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> IncompatibleKeys:
    """Load checkpoint-keyed adapter tensors into ``model``'s adapter ``adapter_name``.

    Everything is checked first; on any problem AdapterLoadError is raised and the model is unchanged.
    Returns PEFT's (missing_keys, unexpected_keys) pair, in model-key terms.
    """
    to_load, missing = check_adapter_state_dict(model, peft_model_state_dict, adapter_name,
                                                ignore_mismatched_sizes=ignore_mismatched_sizes)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    with torch.no_grad():
        for key, tensor in to_load.items():
            target = params.get(key)
            if target is None:  # a state-dict entry that is not a parameter/buffer (rare): use load_state_dict
                model.load_state_dict({key: tensor}, strict=False)
                continue
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    mapping = adapter_key_map(model, adapter_name, save_embedding_layers=True)
    return IncompatibleKeys(missing_keys=[mapping[m] for m in missing], unexpected_keys=[])


def modules_to_save_wrappers(model: nn.Module) -> list[str]:
    return _module_names(model, ModulesToSaveWrapper)


def load_peft_weights(model_id: str, device: Optional[str] = None, **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """Read adapter_model.safetensors (preferred) or adapter_model.bin from a folder or the Hub.

    ``.bin`` files are read with ``torch.load(weights_only=True)``: no code from the file runs.
    """
    from .constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
    from .hub import resolve_file

    subfolder = hub_kwargs.pop("subfolder", None)
    revision = hub_kwargs.pop("revision", None)
    try:
        path = resolve_file(model_id, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, revision=revision, **hub_kwargs)
        use_safetensors = True
    except FileNotFoundError as first:
        try:
            path = resolve_file(model_id, WEIGHTS_NAME, subfolder=subfolder, revision=revision, **hub_kwargs)
        except FileNotFoundError:
            raise FileNotFoundError(f"no adapter weights ({SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME}) found: "
                                    f"{first}") from None
        use_safetensors = False
    map_location = device or "cpu"
    if use_safetensors:
        from safetensors.torch import load_file

        try:
            return load_file(path, device=map_location)
        except Exception as e:  # SafetensorError, OSError on a truncated header, ...
            raise AdapterLoadError(f"{path} could not be read as safetensors (damaged or truncated?): "
                                   f"{type(e).__name__}: {e}") from None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise AdapterLoadError(f"{path} could not be read as a PyTorch weights file (damaged, truncated, or "
                               f"holding objects other than tensors): {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise AdapterLoadError(f"{path} must hold a dict of name -> tensor, found {type(state).__name__}")
    return state
