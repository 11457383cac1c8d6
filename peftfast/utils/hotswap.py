"""Hot-swapping LoRA adapters: replace the weights of a loaded adapter with another's, in place.

``hotswap_adapter(model, path, adapter_name)`` loads the adapter saved at ``path`` into the tensors of the loaded
adapter ``adapter_name``: no module is created or replaced, so a ``torch.compile``'d model keeps its graphs. The
two adapters must target the same layers (the new one may target fewer: the others are zeroed) and agree on the
options that change the math beyond the weights (``use_rslora``, ``lora_dropout``, ``alpha_pattern``,
``use_dora``).

A compiled model bakes in what it sees as constants: the factor shapes (the rank) and a scaling held as a Python
float. ``prepare_model_for_compiled_hotswap`` (called after loading the first adapter, before compiling) turns every
LoRA scaling into a 0-d tensor, which a swap then updates in place, and, given ``target_rank``, zero-pads every
adapter's factors to that rank (zero rows of A and columns of B add nothing), so adapters of any rank up to it
swap in without a recompilation.

The layers are found by what they provide (``pad_ranks``, ``scaling``, ``lora_A``), as this package does not
import the tuners.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from ..config import PeftConfig
from .other import copy_rank_blocks, is_adapter_layer
from .patterns import get_pattern_key
from .peft_types import PeftType
from .registry import parameter_prefix as prefix_of
from .save_and_load import load_peft_weights

# per PEFT type: the config fields two adapters must agree on to be swapped for one another
CONFIG_KEYS_TO_CHECK: dict[PeftType, list[str]] = {PeftType.LORA: ["use_rslora", "lora_dropout", "alpha_pattern",
                                                                   "use_dora"]}
CHECK_COMPILED_OPTIONS = ("error", "warn", "ignore")
_COMPILED_PREFIX = "_orig_mod."


def _strip_compiled(name: str) -> str:
    while name.startswith(_COMPILED_PREFIX):
        name = name[len(_COMPILED_PREFIX):]
    return name.replace("." + _COMPILED_PREFIX, ".")


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or bool(getattr(model, "_compiled_call_impl", False))


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA layers of ``model`` by module name (a compiled wrapper's ``_orig_mod.`` left out)."""
    return {_strip_compiled(name): module for name, module in model.named_modules()
            if is_adapter_layer(module) and callable(getattr(module, "pad_ranks", None))
            and isinstance(getattr(module, "scaling", None), dict)}


def _set_scaling(layer: nn.Module, adapter_name: str, value: float) -> None:
    """The scaling of ``adapter_name`` becomes ``value``: a tensor scaling (a prepared model) is written in place,
    so a compiled graph that reads it sees the new value."""
    old = layer.scaling[adapter_name]
    if isinstance(old, torch.Tensor):
        with torch.no_grad():
            old.fill_(value)
    elif isinstance(old, (int, float)):
        layer.scaling[adapter_name] = value
    else:
        raise TypeError(f"the scaling of adapter {adapter_name!r} must be a float or a tensor, found "
                        f"{type(old).__name__}")


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: Optional[int] = None,
    config: Optional[Union[Any, dict[str, Any]]] = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Make ``model`` ready to be compiled once and then hot-swapped without recompiling.

    Call it after loading the adapter that will be swapped out and before ``torch.compile``. Every LoRA scaling
    becomes a tensor (swaps with another alpha / rank update it in place) and, with ``target_rank`` (the largest
    rank of the adapters to be swapped in), every LoRA factor of a linear or convolution layer is zero-padded to
    that rank; the model's output does not change. ``config`` (a LoraConfig or a dict of them): their ``r`` and
    ``rank_pattern`` values are set to ``target_rank``. ``check_compiled``: what to do with a model that is
    already compiled ('error', 'warn' or 'ignore').

    Raises ValueError for a compiled model (with 'error'), a model without LoRA layers, or a rank that cannot be
    padded to ``target_rank`` (larger than it, or a grouped convolution's groups not dividing it); the model is
    then unchanged.
    """
    if check_compiled not in CHECK_COMPILED_OPTIONS:
        raise ValueError(f"check_compiles should be one of 'error', 'warn', or 'ignore', got '{check_compiled}' "
                         "instead.")
    if _is_compiled(model):
        if check_compiled == "error":
            raise ValueError("Call prepare_model_for_compiled_hotswap *before* compiling the model")
        if check_compiled == "warn":
            warnings.warn("prepare_model_for_compiled_hotswap was called with a model that is already compiled. This "
                          "will likely result in re-compilation, hurting performance. Call the function before "
                          "compiling the model.")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` "
                         "after loading the first adapter and before loading the second adapter.")
    if target_rank is not None:
        if not isinstance(target_rank, int) or isinstance(target_rank, bool) or target_rank <= 0:
            raise ValueError(f"target_rank must be a positive integer or None, got {target_rank!r}")
        for name, layer in layers.items():
            problem = layer.rank_padding_problem(target_rank)
            if problem is not None:
                raise ValueError(f"{problem} (layer {name!r})")
    for layer in layers.values():
        device = layer.get_base_layer().weight.device
        for adapter, value in list(layer.scaling.items()):
            if isinstance(value, (int, float)):
                layer.scaling[adapter] = torch.tensor(float(value), device=device)
            elif not isinstance(value, torch.Tensor):
                raise TypeError(f"the scaling of adapter {adapter!r} must be a float or a tensor, found "
                                f"{type(value).__name__}")
    if target_rank is None:
        return
    for layer in layers.values():
        layer.pad_ranks(target_rank)
    if not config:
        return
    for lora_config in (config.values() if isinstance(config, dict) else [config]):
        lora_config.r = target_rank
        if lora_config.rank_pattern:
            for key in lora_config.rank_pattern:
                lora_config.rank_pattern[key] = target_rank


def _owner(layers: dict[str, nn.Module], key: str) -> tuple[str, Optional[nn.Module]]:
    """The LoRA layer whose tensor ``key`` is (the longest layer name that is a dotted prefix of it)."""
    best = ""
    for name in layers:
        if key.startswith(name + ".") and len(name) > len(best):
            best = name
    return best, layers.get(best)


def _pattern_name(layer_name: str) -> str:
    """The module name rank_pattern / alpha_pattern keys match: relative to the base model."""
    for head in ("base_model.model.", "model."):
        if layer_name.startswith(head):
            return layer_name[len(head):]
    return layer_name


def _rank_dim(key: str) -> Optional[int]:
    """The dimension of the tensor ``key`` that is the adapter's rank (None: it has none)."""
    container = next((part for part in key.split(".") if part.startswith("lora_")), "")
    if container in ("lora_A", "lora_embedding_A", "lora_diag"):
        return 0
    if container in ("lora_B", "lora_embedding_B") and not key.endswith(".bias"):
        return 1
    return None


def _fits(key: str, old: torch.Tensor, new: torch.Tensor) -> str:
    """'same', 'smaller' / 'larger' (the new tensor differs in its rank dimension only) or 'incompatible'."""
    if old.shape == new.shape:
        return "same"
    if old.dim() != new.dim():
        return "incompatible"
    differing = [i for i, (o, n) in enumerate(zip(old.shape, new.shape)) if o != n]
    if len(differing) != 1 or differing[0] != _rank_dim(key):
        return "incompatible"
    return "smaller" if old.shape[differing[0]] > new.shape[differing[0]] else "larger"


def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: Any,
    parameter_prefix: str = "lora_",
) -> None:
    """Write the adapter tensors of ``state_dict`` (keys as in the model's own state dict, adapter name included)
    into the loaded adapter ``adapter_name``, in place; its scalings follow ``config`` (r, lora_alpha,
    rank_pattern, alpha_pattern, use_rslora). Tensors of the adapter that ``state_dict`` lacks become zeros.

    Raises ValueError when the adapter is merged, RuntimeError when ``state_dict`` holds tensors the model does
    not have, ValueError when a tensor's shape cannot take the new one (pad with
    ``prepare_model_for_compiled_hotswap``); the model is unchanged then. A new tensor larger than the loaded one
    replaces it (a compiled model recompiles).
    """
    layers = lora_layers(model)
    if any(adapter_name in getattr(layer, "merged_adapters", ()) for layer in layers.values()):
        raise ValueError(
            f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base weights. Please "
            "unmerge the adapter first by calling `peft_model.unmerge_adapter()`; swapping the weights of a merged "
            "adapter would leave the merged base weights wrong.")
    tensors = {_strip_compiled(k): t for k, t in
               list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))}
    own = {k for k in tensors if parameter_prefix in k and adapter_name in k.split(".")}
    # PEFT's files name a DoRA magnitude without its '.weight'
    state_dict = {(k + ".weight" if k not in tensors and k + ".weight" in tensors else k): v
                  for k, v in state_dict.items()}
    unexpected = [k for k in state_dict if k not in tensors]
    if unexpected:
        raise RuntimeError(f"Hot swapping the adapter did not succeed, unexpected keys found: "
                           f"{', '.join(unexpected)}.")
    plan = []
    for key, new in state_dict.items():
        old = tensors[key]
        fit = _fits(key, old, new)
        if fit == "incompatible":
            raise ValueError(f"Incompatible shapes found for LoRA weights {key}: {tuple(old.shape)} vs "
                             f"{tuple(new.shape)}. Please ensure that all ranks are padded to the largest rank among "
                             "all LoRA adapters by using peft.utils.hotswap.prepare_model_for_compiled_hotswap.")
        plan.append((key, old, new, fit))
    scalings = {}
    for key, _, _, _ in plan:
        name, layer = _owner(layers, key)
        if layer is None or name in scalings:
            continue
        pattern_name = _pattern_name(name)
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), pattern_name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), pattern_name),
                                         config.lora_alpha)
        scalings[name] = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank

    with torch.no_grad():
        for key in own - set(state_dict):
            tensors[key].zero_()
        for name, value in scalings.items():
            _set_scaling(layers[name], adapter_name, value)
        for key, old, new, fit in plan:
            new = new.to(device=old.device, dtype=old.dtype)
            if fit == "same":
                old.copy_(new)
            elif fit == "smaller":
                name, layer = _owner(layers, key)
                groups = getattr(layer.get_base_layer(), "groups", 1) if layer is not None else 1
                if old.shape[0] != new.shape[0]:
                    if ".lora_A." in key and groups > 1:
                        copy_rank_blocks(old, new, groups)
                    else:
                        old.zero_()
                        old[:new.shape[0]].copy_(new)
                else:
                    old.zero_()
                    old[:, :new.shape[1]].copy_(new)
            else:  # larger: the tensor is replaced (a compiled model sees new shapes)
                old.data = new.clone()
    for layer in layers.values():
        layer.__dict__.pop("_grouped_store", None)  # the mixed-batch op's stacked copy of the factors


def check_hotswap_configs_compatible(config0: Any, config1: Any) -> None:
    """Raise ValueError unless adapters of ``config0`` and ``config1`` can be swapped for one another."""
    if config0.peft_type != config1.peft_type:
        raise ValueError(f"Incompatible PEFT types found: {PeftType(config0.peft_type).value} and "
                         f"{PeftType(config1.peft_type).value}")
    keys = CONFIG_KEYS_TO_CHECK.get(PeftType(config0.peft_type))
    if keys is None:
        raise ValueError(f"Hotswapping only supports {', '.join(t.value for t in CONFIG_KEYS_TO_CHECK)} but "
                         f"{PeftType(config0.peft_type).value} was passed.")
    d0, d1 = config0.to_dict(), config1.to_dict()
    missing = object()
    for key in keys:
        v0, v1 = d0.get(key, missing), d1.get(key, missing)
        if v0 != v1:
            raise ValueError(f"Configs are incompatible: for {key}, {v0} != {v1}")


def _insert_adapter_name(state_dict: dict[str, torch.Tensor], adapter_name: str,
                         prefix: str) -> dict[str, torch.Tensor]:
    """File keys (``x.lora_A.weight``) as the model names them (``x.lora_A.<adapter_name>.weight``)."""
    out = {}
    for key, value in state_dict.items():
        if prefix in key:
            head, _, tail = key.rpartition(prefix)
            container, dot, rest = tail.partition(".")
            key = f"{head}{prefix}{container}.{adapter_name}" + (dot + rest if dot else "")
        out[key] = value
    return out


def hotswap_adapter(model: nn.Module, model_name_or_path: str, adapter_name: str,
                    torch_device: Optional[str] = None, **kwargs: Any) -> None:
    """Replace the weights (and scalings) of the loaded adapter ``adapter_name`` of the PeftModel ``model``
    (compiled or not) by those of the adapter saved at ``model_name_or_path``; the adapter keeps its name.

    Raises ValueError when the two configs cannot be swapped (another PEFT type, a method other than LoRA, a
    different use_rslora / lora_dropout / alpha_pattern / use_dora), and as ``hotswap_adapter_from_state_dict``.
    ``torch_device``: where the new weights are read to (default: CUDA when available, else the CPU).
    ``kwargs``: ``subfolder``, ``revision``, ``cache_dir``, ``token`` for the Hub.
    """
    if torch_device is None:
        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    hub = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token") if kwargs.get(k) is not None}
    config = PeftConfig.from_pretrained(str(model_name_or_path), **hub)
    check_hotswap_configs_compatible(model.active_peft_config, config)
    state_dict = load_peft_weights(str(model_name_or_path), device=torch_device, **hub)
    prefix = prefix_of(config.peft_type)
    hotswap_adapter_from_state_dict(model, _insert_adapter_name(state_dict, adapter_name, prefix), adapter_name,
                                    config, parameter_prefix=prefix)
