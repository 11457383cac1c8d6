"""Adapter state dicts: which model keys belong to an adapter, and their names on disk.

One mapping serves both directions. ``adapter_key_map(model, name)`` lists, for the adapter
``name``, every checkpoint key (adapter name stripped, as PEFT writes it) and the in-memory key it
corresponds to. Saving reads through it; loading checks a file against it (unexpected keys,
missing keys, shapes, dtypes, non-finite values) before anything is written into the model.

Which tensors PEFT writes for an adapter (and so which peftfast writes):

- every tensor of the adapter's containers on each tuner layer (``lora_A.<name>``, ...), found
  structurally from the layers, so a base module whose name happens to contain ``lora_`` is not
  mistaken for adapter state;
- with ``bias='all'`` every ``*.bias`` of the model, with ``bias='lora_only'`` the base-layer
  bias of every tuner layer;
- the adapter's copy of each ``modules_to_save`` module, under the original module's name;
- the input/output embeddings when ``save_embedding_layers`` resolves to True: their wrapped
  ``base_layer`` when an embedding is targeted, the whole module otherwise.

Loading accepts exactly those keys, plus the spellings other writers use for the same tensors:
keys with or without the ``base_model.model.`` prefix, and embedding weights from either
``save_embedding_layers`` mode.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from contextlib import contextmanager
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from .constants import EMBEDDING_LAYER_NAMES, INCLUDE_LINEAR_LAYERS_SHORTHAND
from .errors import AdapterError, CappedMessage, ConfigError, PeftWarning, short_repr
from .other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, is_adapter_layer
from .patterns import BoundedPattern
from .registry import PEFT_TYPE_TO_TUNER_MAPPING, as_peft_type
from .undo import UndoLog
PEFT_PREFIX = "base_model.model."
PROMPT_EMBEDDINGS = "prompt_embeddings"  # prompt learning's key on disk (the encoder's rows)
_MAX_LISTED = 10


class AdapterLoadError(CappedMessage, ValueError):
    """Adapter weights cannot be used with this model: the file is damaged or unreadable, or its tensors do not fit
    the adapter (unexpected or missing keys, wrong shapes, non-floating-point dtypes, NaN/inf values).

    Floating-point tensors of any width (float8_e4m3fn / e5m2, float16, bfloat16, float64, ...) are checked for
    NaN/inf and cast to the adapter's dtype, as PEFT's load casts them. Integer, bool and complex tensors are
    refused for floating-point weights (PEFT would cast them silently, dropping a complex tensor's imaginary
    part)."""


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


FSDP_WRAPPED_MODULE = "_fsdp_wrapped_module"


def clean_named_modules(model: nn.Module):
    """``model.named_modules()`` under the names its state dict uses: FSDP (and PEFT with it) drops every
    ``_fsdp_wrapped_module.`` level from state-dict keys, so module names are matched to keys without them."""
    for name, module in model.named_modules():
        if FSDP_WRAPPED_MODULE in name:
            name = ".".join(p for p in name.split(".") if p != FSDP_WRAPPED_MODULE)
        yield name, module


def _strip_adapter_name(key: str, adapter_name: str) -> str:
    """'x.lora_A.default.weight' -> 'x.lora_A.weight'; 'x.lora_embedding_A.default' -> 'x.lora_embedding_A'."""
    if "." not in key:
        return key
    if key.endswith(f".{adapter_name}"):  # an nn.Parameter stored directly in a ParameterDict
        return key[: -len(adapter_name) - 1]
    head, _, leaf = key.rpartition(".")
    head = re.sub(re.escape(f".{adapter_name}") + r"$", "", head)
    return f"{head}.{leaf}"


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _join(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def _inside_wrapper(module_name: str) -> bool:
    parts = module_name.split(".")
    return "modules_to_save" in parts or "original_module" in parts


def _tuner_prefixes(model: nn.Module, adapter_name: str) -> tuple[list[str], list[str]]:
    """(key prefixes of ``adapter_name``'s containers on every tuner layer, names of all tuner layers)."""
    prefixes, layers = [], []
    for name, module in clean_named_modules(model):
        if not is_adapter_layer(module) or _inside_wrapper(name):
            continue
        layers.append(name)
        if getattr(module, "tied_adapter", None) is not None and name.rpartition(".")[2] == "token_adapter":
            continue  # LoRA's trainable tokens of an LM head tied to the embedding: saved under the embedding only
        for attr in module.adapter_layer_names:
            container = getattr(module, attr, None)
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in container:
                prefixes.append(_join(name, f"{attr}.{adapter_name}"))
        for attr in module.other_param_names:  # persistent per-adapter buffers (VeLoRA's projection vector)
            container = getattr(module, attr, None)
            if type(container).__name__ == "BufferDict" and getattr(container, "persistent", False) \
                    and adapter_name in container:
                prefixes.append(_join(name, f"{attr}.{adapter_name}"))
    return prefixes, layers


def _nested_layer_names(model: nn.Module) -> dict[str, str]:
    """Adapter layers wrapped by another adapter layer (a PeftMixedModel's module adapted by two methods:
    'x.base_layer' inside 'x') -> the outermost layer's name, under which PEFT's files keep their tensors."""
    modules = {name: module for name, module in clean_named_modules(model) if is_adapter_layer(module)}
    layers = set(modules)
    out: dict[str, str] = {}
    for name in sorted(layers, key=len):
        if getattr(modules[name], "checkpoint_keeps_nesting", False):
            continue  # LoRA on nn.Parameter: PEFT's keys keep 'x.base_layer.lora_A...' (the depth names the parameter)
        parent = name[: -len(".base_layer")] if name.endswith(".base_layer") else None
        if parent is not None and parent in layers:
            out[name] = out.get(parent, parent)
    return out


def _unnested(key: str, nested: dict[str, str]) -> str:
    for name in sorted(nested, key=len, reverse=True):
        if _under(key, name):
            return nested[name] + key[len(name):]
    return key


def _flat_keys(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """model key -> checkpoint key for containers a layer lists in ``checkpoint_flat_containers``: their one
    ``weight`` is saved under the container's name (PEFT's DoRA files: 'x.lora_magnitude_vector')."""
    out = {}
    for name, module in clean_named_modules(model):
        if not is_adapter_layer(module) or _inside_wrapper(name):
            continue
        for attr in getattr(module, "checkpoint_flat_containers", ()):
            container = getattr(module, attr, None)
            if isinstance(container, nn.ModuleDict) and adapter_name in container:
                out[_join(name, f"{attr}.{adapter_name}.weight")] = _join(name, attr)
    return out


def _without_other_adapters(keys: list[str], model: nn.Module, adapter_name: str) -> list[str]:
    """Drop the tensors of the model's other adapters (their containers on tuner layers, their modules_to_save
    copies). Found by structure, not by name: an adapter may be named like a module of the model ('layers', '0',
    'q_proj'), and matching its name in keys would drop the base tensors of every module on that path."""
    others = [n for n in getattr(model, "peft_config", {}) if n != adapter_name]
    prefixes = {p for other in others for p in adapter_parameter_prefixes(model, other)}
    if not prefixes:
        return keys

    def owned_by_other(key: str) -> bool:
        i = key.find(".")
        while i != -1:
            if key[:i] in prefixes:
                return True
            i = key.find(".", i + 1)
        return key in prefixes

    return [k for k in keys if not owned_by_other(k)]


def _embedding_is_targeted(model: nn.Module, config: Any) -> bool:
    """PEFT's rule: an entry of target_modules is literally 'embed_tokens' or 'lm_head', or the target regex fully
    matches a module whose name ends in one of them."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        if targets == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            return False
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        try:
            pattern = BoundedPattern(targets)
        except re.error:
            return False
        return any(pattern.fullmatch(name) for name, _ in base.named_modules()
                   if any(re.match(rf"(.*\.)?{e}$", name) for e in EMBEDDING_LAYER_NAMES))
    return bool(targets) and any(name in targets for name in EMBEDDING_LAYER_NAMES)


def _base_vocab_size(model_id: str) -> Optional[int]:
    """vocab_size in the base model's config.json (local folder or Hub), None if it cannot be read."""
    from .hub import resolve_file

    path = os.path.join(model_id, "config.json")
    if not os.path.isfile(path):
        path = resolve_file(model_id, "config.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    vocab = data.get("vocab_size", (data.get("text_config") or {}).get("vocab_size"))
    return vocab if isinstance(vocab, int) else None


def _vocab_was_resized(model: nn.Module, config: Any) -> bool:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    model_id = getattr(config, "base_model_name_or_path", None)
    if not vocab or not model_id:
        return False
    try:
        base_vocab = _base_vocab_size(model_id)
    except Exception:  # no such folder, offline, not on the Hub: the same outcome as PEFT's failed lookup
        warnings.warn(f"Could not find a config file in {model_id} - will assume that the vocabulary was not "
                      "modified.", UserWarning)
        return False
    if base_vocab is not None and base_vocab != vocab:
        warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                      "finetuning.", UserWarning)
        return True
    return False


def resolve_save_embedding_layers(model: nn.Module, config: Any, save_embedding_layers: str | bool) -> bool:
    """'auto' means: save the embeddings when one is targeted, or when the vocabulary differs from the base model's."""
    if save_embedding_layers not in ("auto", True, False):
        raise ValueError(f"save_embedding_layers must be 'auto', True or False, got {save_embedding_layers!r}")
    if save_embedding_layers != "auto":
        return bool(save_embedding_layers)
    # (trainable tokens save their rows, not the embedding, whether on their own or through LoRA)
    trains_tokens = str(getattr(config, "peft_type", "")) == "TRAINABLE_TOKENS" or \
        getattr(config, "trainable_token_indices", None) is not None
    if _embedding_is_targeted(model, config) and not trains_tokens:
        warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                      UserWarning)
        return True
    return _vocab_was_resized(model, config)


def _embedding_module_names(model: nn.Module, targeted: bool) -> list[str]:
    """Names of the modules whose tensors are saved as 'embedding layers' (PEFT's get_embedding_layer_name)."""
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
        base = getattr(layer, "base_layer", None)
        if targeted:  # only embeddings that are themselves adapted: save the weights under the adapter
            if not isinstance(base, (nn.Linear, nn.Embedding)):
                continue
            wanted = (base,)
        else:
            wanted = (layer, base)
        for name, module in clean_named_modules(model):
            if any(module is w for w in wanted if w is not None):
                out.append(name)
                break
    return out


def adapter_key_map(model: nn.Module, adapter_name: str = "default", save_embedding_layers: str | bool = "auto",
                    state_dict: Optional[dict[str, torch.Tensor]] = None) -> dict[str, str]:
    """checkpoint key -> model key, for every tensor saved with ``adapter_name`` (see the module docstring)."""
    if adapter_name not in model.peft_config:
        raise ValueError(f"Adapter {adapter_name} does not exist; available adapters: "
                         f"{', '.join(model.peft_config)}")
    config = model.peft_config[adapter_name]
    keys = list((state_dict if state_dict is not None else model.state_dict()).keys())
    mapping: dict[str, str] = {}

    prefixes, layers = _tuner_prefixes(model, adapter_name)
    flat = _flat_keys(model, adapter_name)
    nested = _nested_layer_names(model)
    for key in keys:
        if key in flat:
            mapping[_unnested(flat[key], nested)] = key
        elif any(_under(key, p) for p in prefixes):
            mapping[_unnested(_strip_adapter_name(key, adapter_name), nested)] = key

    bias = getattr(config, "bias", "none")
    if bias == "all":
        for key in _without_other_adapters(keys, model, adapter_name):
            if key == "bias" or key.endswith(".bias"):
                mapping.setdefault(_strip_adapter_name(key, adapter_name), key)
    elif isinstance(bias, str) and bias.endswith("_only"):
        present = set(keys)
        for layer in layers:
            key = _join(layer, "base_layer.bias")
            if key in present:
                mapping.setdefault(key, key)

    for name, module in clean_named_modules(model):
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            inner = _join(name, f"modules_to_save.{adapter_name}") + "."
            for key in keys:
                if key.startswith(inner):
                    mapping[_join(name, key[len(inner):])] = key

    if getattr(config, "is_prompt_learning", False):  # the prompt encoder's rows, under PEFT's one key
        mapping[PROMPT_EMBEDDINGS] = f"prompt_encoder.{adapter_name}.embedding.weight"
        return mapping

    if resolve_save_embedding_layers(model, config, save_embedding_layers):
        targeted = _embedding_is_targeted(model, config)
        filtered = _without_other_adapters(keys, model, adapter_name)
        for name in _embedding_module_names(model, targeted):
            for key in filtered:
                if key.startswith(name + "."):
                    mapping.setdefault(_strip_adapter_name(key, adapter_name), key)
    return mapping


def warn_unsharded_lora_tensors(state_dict: dict[str, Any], adapter_name: str) -> None:
    """Warn (the save still happens) when a LoRA matrix about to be written is not a matrix: a 1-D or empty
    ``lora_A`` / ``lora_B`` is what a DeepSpeed ZeRO-3 or FSDP shard looks like when the parameters were not gathered
    before the state dict was taken, and such a file cannot be loaded back."""
    bad = [(k, tuple(t.shape)) for k, t in state_dict.items()
           if isinstance(t, torch.Tensor) and (".lora_A." in k or ".lora_B." in k) and (t.dim() < 2 or t.numel() == 0)]
    if bad:
        shown = ", ".join(f"{k} {list(shape)}" for k, shape in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3
                                                                            else "")
        warnings.warn(f"adapter {adapter_name!r}: {len(bad)} LoRA tensor(s) to save are not 2-D matrices ({shown}); "
                      "this is what DeepSpeed ZeRO-3 / FSDP shards look like when the parameters were not gathered "
                      "before saving (gather them first, e.g. with deepspeed.zero.GatheredParameters or FSDP's "
                      "full state dict); the file is written but will not load", PeftWarning, stacklevel=3)


def check_adapter_has_weights(model: nn.Module, adapter_name: str) -> None:
    """Refuse to save an adapter of which the model holds no tensor (its layers were removed by
    ``merge_and_unload()`` / ``unload()``): the save would replace a good checkpoint with an empty one."""
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if getattr(config, "is_prompt_learning", False):  # its weights are the prompt encoder's, never unloaded
        return
    prefixes = adapter_parameter_prefixes(model, adapter_name)
    if not prefixes:
        raise AdapterError(
            f"adapter {adapter_name!r} has no weights in this model any more (its adapter layers were removed, e.g. "
            "by merge_and_unload() or unload()); saving it would write an empty checkpoint over the folder. Save "
            "before unloading, or save the merged model itself with its own save_pretrained()")


def get_peft_model_state_dict(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: str | bool = "auto") -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as PEFT writes them to disk (adapter name removed)."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    sd = model.state_dict() if state_dict is None else state_dict
    mapping = adapter_key_map(model, adapter_name, save_embedding_layers, state_dict=sd)
    out = {ckpt: sd[key] for ckpt, key in mapping.items() if ckpt != PROMPT_EMBEDDINGS or key in sd}
    config = model.peft_config[adapter_name]
    if getattr(config, "is_prompt_learning", False) and not config.inference_mode:
        # P-tuning and projected prefixes save their encoder's output, not the embedding it starts from (PEFT's rule)
        out[PROMPT_EMBEDDINGS] = model.get_prompt_embedding_to_save(adapter_name)
    hook = tuner_checkpoint_hook(model, adapter_name, "adapter_state_dict_to_save")
    return out if hook is None else hook(model, config, adapter_name, out)


def tuner_checkpoint_hook(model: nn.Module, adapter_name: str, name: str) -> Optional[Callable[..., Any]]:
    """The tuner class's checkpoint hook ``name`` for ``adapter_name``'s method, if it has one: a method whose files
    hold other shapes than its live tensors (AdaLoRA keeps only its unpruned ranks) defines
    ``adapter_state_dict_to_save(model, config, adapter_name, state_dict) -> state_dict`` and
    ``prepare_adapter_load(model, config, adapter_name)`` (reshape the adapter before its weights are checked)."""
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is None or getattr(config, "peft_type", None) is None:
        return None
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING.get(as_peft_type(config.peft_type))
    return getattr(tuner_cls, name, None)


def base_model_key_map(model: nn.Module) -> dict[str, str]:
    """For each tensor of ``model``'s state dict that belongs to the base model: the key it had before adapters
    were injected -> its key now (``x.weight`` -> ``x.base_layer.weight``, ``head.weight`` ->
    ``head.original_module.weight``). Adapter weights, dropouts and modules_to_save copies have no entry."""
    wrapped: list[tuple[str, str]] = []  # (module name, the attribute holding the original module)
    for name, module in clean_named_modules(model):
        if isinstance(module, AuxiliaryTrainingWrapper):
            wrapped.append((name, module.original_attr))
        elif is_adapter_layer(module):
            wrapped.append((name, "base_layer"))
    # Deepest first, so that a key below nested wrappers is rewritten from the inside out.
    wrapped.sort(key=lambda w: -len(w[0]))
    out: dict[str, str] = {}
    for key in model.state_dict(keep_vars=True):
        new_key: Optional[str] = key
        for name, attr in wrapped:
            inner = _join(name, attr)
            if new_key is not None and _under(new_key, inner):
                new_key = name + new_key[len(inner):] if name else new_key[len(attr) + 1:]
            elif new_key is not None and (not name or new_key.startswith(name + ".")):
                new_key = None  # an adapter's own tensor (lora_A.<name>, modules_to_save.<name>, ...)
        if new_key is not None:
            out[new_key] = key
    return out


def base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict without adapter tensors and under the keys the model had before adapters were
    injected: ``x.base_layer.weight`` -> ``x.weight``, ``head.original_module.weight`` -> ``head.weight``; adapter
    weights, dropouts and modules_to_save copies are left out."""
    sd = model.state_dict()
    return {original: sd[key] for original, key in base_model_key_map(model).items()}


def _inner_base_model(model: nn.Module) -> nn.Module:
    return model.base_model.model if hasattr(model, "base_model") and hasattr(model.base_model, "model") else model


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's ``get_base_model_state_dict``: the base model's weights of a PeftModel under their original keys."""
    return base_model_state_dict(_inner_base_model(model))


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor],
                              strict: bool = True) -> IncompatibleKeys:
    """PEFT's ``set_base_model_state_dict``: load base-model weights given under the model's original keys (as
    :func:`get_base_model_state_dict` returns them, or as a checkpoint of the model without adapters has them)
    into a model with adapters injected. Adapter weights are not touched. With ``strict``, missing or unexpected
    keys raise RuntimeError before anything is loaded; returns (missing_keys, unexpected_keys)."""
    base = _inner_base_model(model)
    key_map = base_model_key_map(base)
    unexpected = [k for k in state_dict if k not in key_map]
    missing = [k for k in key_map if k not in state_dict]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"Missing key(s) in state_dict: {_listed(missing)}")
        if unexpected:
            parts.append(f"Unexpected key(s) in state_dict: {_listed(unexpected)}")
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(parts))
    mapped = {key_map[k]: v for k, v in state_dict.items() if k in key_map}
    base.load_state_dict(mapped, strict=False)
    return IncompatibleKeys(missing, unexpected)


def _load_key_map(model: nn.Module, adapter_name: str, own_keys: list[str]) -> tuple[dict[str, str], set[str]]:
    """(every accepted checkpoint spelling -> model key, checkpoint keys the adapter cannot do without)."""
    mapping = adapter_key_map(model, adapter_name, save_embedding_layers=False)
    prefixes, _ = _tuner_prefixes(model, adapter_name)
    required = {c for c, k in mapping.items()
                if any(_under(k, p) for p in prefixes) or f"modules_to_save.{adapter_name}." in k
                or c == PROMPT_EMBEDDINGS}
    # Embedding weights, as written in either save_embedding_layers mode (PEFT loads whichever are present).
    filtered = _without_other_adapters(own_keys, model, adapter_name)
    for targeted in (True, False):
        for name in _embedding_module_names(model, targeted):
            for key in filtered:
                if key.startswith(name + "."):
                    mapping.setdefault(_strip_adapter_name(key, adapter_name), key)
    # Base biases, as an adapter trained with bias='all' or '<method>_only' writes them: PEFT loads them whatever
    # the loading config's `bias` says (the checks on shape, dtype and finiteness below still apply).
    for key in filtered:
        if key == "bias" or key.endswith(".bias"):
            mapping.setdefault(_strip_adapter_name(key, adapter_name), key)
    # Embedding weights written before PEFT wrapped targeted embeddings (no '.base_layer' in the key).
    for ckpt, key in list(mapping.items()):
        if ".base_layer." in ckpt and not any(_under(key, p) for p in prefixes):
            mapping.setdefault(ckpt.replace(".base_layer.", ".", 1), key)
    # With and without the PeftModel prefix (a model with injected layers has none; PEFT's files always do).
    prefixed = any(k.startswith(PEFT_PREFIX) for k in own_keys)
    for ckpt, key in list(mapping.items()):
        if not prefixed:
            mapping.setdefault(PEFT_PREFIX + ckpt, key)
        elif ckpt.startswith(PEFT_PREFIX):
            mapping.setdefault(ckpt[len(PEFT_PREFIX):], key)
    return mapping, required


def _listed(items: list[str]) -> str:
    more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return "; ".join(items[:_MAX_LISTED]) + more


def _all_finite(tensor: torch.Tensor) -> Optional[bool]:
    """Whether every value is finite; None when the dtype cannot even be converted to float32. torch has no
    isfinite for the float8 dtypes (and others may follow), so those are checked in float32, which holds each of
    their values exactly."""
    try:
        return bool(torch.isfinite(tensor).all())
    except (NotImplementedError, RuntimeError, TypeError):
        pass
    try:
        return bool(torch.isfinite(tensor.to(torch.float32)).all())
    except (NotImplementedError, RuntimeError, TypeError):
        return None


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == b.dtype:
        try:
            return torch.equal(a, b)
        except (NotImplementedError, RuntimeError):
            pass
    return torch.equal(a.to(torch.float32), b.to(torch.float32))


def check_adapter_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str,
                             ignore_mismatched_sizes: bool = False, strict: bool = False) -> tuple[dict, list[str]]:
    """Map checkpoint keys onto the model's; raise AdapterLoadError for anything that does not fit.

    Returns (model key -> tensor, missing checkpoint keys). With ``strict`` a missing adapter weight is an
    error too; without it, only a checkpoint holding none of the adapter's weights is. Nothing is modified.
    """
    if not isinstance(peft_model_state_dict, dict):
        raise AdapterLoadError(f"adapter weights must be a dict of name -> tensor, got "
                               f"{type(peft_model_state_dict).__name__}")
    own = model.state_dict()
    mapping, required = _load_key_map(model, adapter_name, list(own))
    inverse: dict[str, set[str]] = {}
    for ckpt, key in mapping.items():
        inverse.setdefault(key, set()).add(ckpt)
    canonical = {c: c for c in required}
    for c in required:
        for alias in inverse.get(mapping[c], ()):
            canonical.setdefault(alias, c)

    unexpected, mismatched, bad, conflicts = [], [], [], []
    out: dict[str, torch.Tensor] = {}
    provided: set[str] = set()
    for ckpt_key, tensor in peft_model_state_dict.items():
        model_key = mapping.get(ckpt_key) if isinstance(ckpt_key, str) else None
        if model_key is None:
            unexpected.append(repr(ckpt_key) if not isinstance(ckpt_key, str) else ckpt_key)
            continue
        provided.add(canonical.get(ckpt_key, ckpt_key))
        if not isinstance(tensor, torch.Tensor):
            bad.append(f"{ckpt_key}: not a tensor but a {type(tensor).__name__}")
            continue
        target = own[model_key]
        if tuple(tensor.shape) != tuple(target.shape):
            mismatched.append(f"{ckpt_key}: checkpoint has shape {tuple(tensor.shape)}, the model expects "
                              f"{tuple(target.shape)}")
            continue
        if tensor.is_sparse or tensor.layout != torch.strided:
            bad.append(f"{ckpt_key}: layout {tensor.layout} (expected a dense tensor)")
            continue
        if target.is_floating_point() and not tensor.is_floating_point():
            bad.append(f"{ckpt_key}: dtype {tensor.dtype}, the model expects a floating-point tensor "
                       f"({target.dtype})")
            continue
        if not target.is_floating_point() and tensor.dtype != target.dtype:
            bad.append(f"{ckpt_key}: dtype {tensor.dtype}, the model expects {target.dtype}")
            continue
        if tensor.is_floating_point():
            finite = _all_finite(tensor)
            if finite is None:
                bad.append(f"{ckpt_key}: dtype {tensor.dtype} cannot be converted to the model's {target.dtype}")
                continue
            if not finite:
                bad.append(f"{ckpt_key}: holds NaN or inf values")
                continue
        if model_key in out and not _same_values(out[model_key], tensor):
            conflicts.append(f"{ckpt_key} and another key both name {model_key} with different values")
            continue
        out[model_key] = tensor

    if mismatched and ignore_mismatched_sizes:
        warnings.warn("ignore_mismatched_sizes=True: these checkpoint tensors were not loaded: " + _listed(mismatched),
                      UserWarning)
        mismatched = []
    problems = []
    if unexpected:
        problems.append(f"unexpected keys (not part of adapter {adapter_name!r} of this model): "
                        f"{_listed(sorted(unexpected))}")
    if mismatched:
        problems.append("shape mismatch (was it saved with another r, or for another base model?): "
                        + _listed(mismatched))
    if bad:
        problems.append("bad values: " + _listed(bad))
    if conflicts:
        problems.append("conflicting duplicates: " + _listed(conflicts))
    missing = sorted(c for c in required if c not in provided)
    if missing and (strict or len(missing) == len(required)):
        if len(missing) == len(required):
            problems.append(f"none of the adapter's {len(required)} weights are in the checkpoint (e.g. "
                            f"{', '.join(missing[:3])}); is this an adapter for this model?")
        else:
            problems.append(f"missing keys ({len(missing)} of the adapter's {len(required)} weights are not in the "
                            f"checkpoint): {_listed(missing)}")
    if problems:
        raise AdapterLoadError("adapter weights do not fit the model: " + " | ".join(problems))
    return out, missing


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False, strict: bool = False) -> IncompatibleKeys:
    """Load checkpoint-keyed adapter tensors into ``model``'s adapter ``adapter_name``.

    Everything is checked first (see ``check_adapter_state_dict``); on any problem AdapterLoadError is raised and
    the model is unchanged. Values are cast to each parameter's dtype and device. Returns PEFT's
    (missing_keys, unexpected_keys) pair, in model-key terms.
    """
    if adapter_name not in getattr(model, "peft_config", {}):
        raise AdapterLoadError(f"adapter {adapter_name!r} not found in the model; available: "
                               f"{', '.join(getattr(model, 'peft_config', {})) or 'none'}")
    merged = [name for name, m in clean_named_modules(model)
              if is_adapter_layer(m) and adapter_name in getattr(m, "merged_adapters", ())]
    if merged:
        raise AdapterError(
            f"adapter {adapter_name!r} is merged into the base weights of {len(merged)} layer(s) (e.g. "
            f"{merged[0]}); loading new weights into it now would make a later unmerge subtract the new weights "
            "instead of the merged ones and corrupt the base weights. Call unmerge_adapter() first")
    prepare = tuner_checkpoint_hook(model, adapter_name, "prepare_adapter_load")
    restore = snapshot_state([model], objects=(model.peft_config[adapter_name],)) if prepare else None
    try:
        if prepare is not None:
            prepare(model, model.peft_config[adapter_name], adapter_name)
        to_load, missing = check_adapter_state_dict(model, peft_model_state_dict, adapter_name,
                                                    ignore_mismatched_sizes=ignore_mismatched_sizes, strict=strict)
    except BaseException:
        if restore is not None:
            restore()  # the adapter's tensors back as they were before the reshape
        raise
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad(), UndoLog() as undo:  # e.g. out of memory mid-way: put back what was already overwritten
        for key, tensor in to_load.items():
            target = targets[key]
            if target.is_meta:  # created by low_cpu_mem_usage: the checkpoint's tensor takes its place
                _assign(model, key, target, tensor, undo)
                continue
            undo.call(lambda target=target, old=target.detach().clone(): target.copy_(old))
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    mapping = adapter_key_map(model, adapter_name, save_embedding_layers=False)
    return IncompatibleKeys(missing_keys=[mapping[m] for m in missing], unexpected_keys=[])


def _assign(model: nn.Module, key: str, target: torch.Tensor, tensor: torch.Tensor, undo: UndoLog) -> None:
    """Put ``tensor`` (cast to the adapter's dtype, on the device its layer keeps adapters on) in place of the
    meta tensor ``target`` at ``key``, keeping the slot's Parameter-ness and requires_grad; undone by ``undo``."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    device = None
    parts = owner_name.split(".") if owner_name else []
    for i in range(len(parts), -1, -1):  # the nearest enclosing adapter layer says where its weights live
        layer = model.get_submodule(".".join(parts[:i])) if i else model
        if hasattr(layer, "adapter_device_dtype"):
            device = layer.adapter_device_dtype()[0]
            break
    if device is None or device.type == "meta":
        device = torch.device("cpu")
    value = tensor.to(device=device, dtype=target.dtype)
    new = nn.Parameter(value, requires_grad=target.requires_grad) if isinstance(target, nn.Parameter) else value
    if isinstance(target, nn.Parameter):
        undo.call(lambda: owner.register_parameter(attr, target))
        owner.register_parameter(attr, new)
    else:
        undo.call(lambda: owner.register_buffer(attr, target))
        owner.register_buffer(attr, new)


def adapter_weights_left_on_meta(model: nn.Module) -> list[str]:
    """Names of parameters and buffers still on the meta device (an adapter created with low_cpu_mem_usage whose
    checkpoint did not provide them)."""
    return [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]


def load_peft_weights(model_id: str, device: Optional[str] = None, **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """Read adapter_model.safetensors (preferred) or adapter_model.bin from a folder or the Hub.

    ``.bin`` files are read with ``torch.load(weights_only=True)``: no code from the file runs.
    Raises FileNotFoundError when neither file exists, AdapterLoadError when the file cannot be parsed.
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
            return load_file(path, device=str(map_location))
        except (PermissionError, IsADirectoryError):
            raise
        except Exception as e:  # SafetensorError: bad header, truncated data, unknown dtype, ...
            raise AdapterLoadError(f"{path} is not a readable safetensors file (truncated or damaged?): "
                                   f"{type(e).__name__}: {e}") from None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (PermissionError, IsADirectoryError):
        raise
    except Exception as e:  # UnpicklingError (including refused globals), EOFError, RuntimeError on bad zip, ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch's first line suggests weights_only=False; the useful part is which global was refused
        detail = next((line for line in lines if "global" in line.lower() and "weights_only" not in line),
                      lines[0] if lines else "")
        raise AdapterLoadError(f"{path} could not be read as a PyTorch weights file (truncated, damaged, or holding "
                               f"objects other than tensors, which weights_only loading refuses): "
                               f"{type(e).__name__}: {detail}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise AdapterLoadError(f"{path} must hold a dict of name -> tensor, found {type(state).__name__}")
    return state


def _safetensors_shapes(path: str) -> Optional[dict[str, tuple[int, ...]]]:
    """Tensor shapes from a safetensors file's header, without reading any tensor data; None when the header
    cannot be read (``load_peft_weights`` then reports the damage)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:
        return None


def check_ranks_fit_weights(config: Any, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse a config whose rank (``r``, ``rank_pattern`` values) no tensor of the weights could hold: each adapter
    weight of rank r has r as one of its dimensions, so a rank larger than every dimension in the file means the
    config does not belong to these weights. Run before the adapter is created, so that ``r=10**9`` is refused
    instead of allocating 10^9 x d_in floats per layer."""
    ranks = []
    r = getattr(config, "r", None)
    if isinstance(r, int) and not isinstance(r, bool):
        ranks.append(("r", r))
    pattern = getattr(config, "rank_pattern", None)
    if isinstance(pattern, dict):
        ranks.extend((f"rank_pattern[{short_repr(k, 60)}]", v) for k, v in pattern.items()
                     if isinstance(v, int) and not isinstance(v, bool))
    if not ranks:
        return
    peft_type = getattr(config, "peft_type", None)
    low_rank = ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")
    if getattr(peft_type, "value", peft_type) == "LOKR" and not any(k.rsplit(".", 1)[-1] in low_rank for k in shapes):
        return  # LoKr keeps full Kronecker factors (no rank-sized tensor) where r reaches half a layer's size
    largest = max((d for shape in shapes.values() for d in shape), default=0)
    too_big = [f"{name}={value}" for name, value in ranks if value > largest]
    if too_big:
        raise AdapterLoadError(
            f"adapter config and weights at {source!r} do not match: the config asks for rank "
            f"{', '.join(too_big[:5])}{' ...' if len(too_big) > 5 else ''}, but no tensor in the weights file has a "
            f"dimension that large (largest: {largest}); nothing was allocated. Is the adapter_config.json from "
            "another adapter?")


def load_adapter_weights(model_id: str, config: Any, device: Optional[str] = None,
                         **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """``load_peft_weights``, with the config's ranks checked against the file's shapes first: from the safetensors
    header before any tensor is read, and for a .bin file on the loaded tensors (before the adapter is created)."""
    from .constants import SAFETENSORS_WEIGHTS_NAME
    from .hub import resolve_file

    try:
        path = resolve_file(model_id, SAFETENSORS_WEIGHTS_NAME, **hub_kwargs)
    except FileNotFoundError:
        path = None
    if path is not None:
        shapes = _safetensors_shapes(path)
        if shapes is not None:
            check_ranks_fit_weights(config, shapes, str(model_id))
    weights = load_peft_weights(model_id, device=device, **hub_kwargs)
    check_ranks_fit_weights(config, {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)},
                            str(model_id))
    return weights


def adapter_parameter_prefixes(model: nn.Module, adapter_name: str) -> list[str]:
    """Name prefixes of ``adapter_name``'s own parameters: its containers on tuner layers and its copies of
    ``modules_to_save`` modules (what PEFT's ``set_requires_grad(adapter_name)`` switches)."""
    prefixes, _ = _tuner_prefixes(model, adapter_name)
    for name, module in clean_named_modules(model):
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            prefixes.append(_join(name, f"modules_to_save.{adapter_name}"))
    return prefixes


def snapshot_state(modules: list[nn.Module], objects: tuple = ()) -> Callable[[], None]:
    """A function that puts back the Python-level state of ``modules`` (every submodule's attributes, children,
    parameter/buffer slots, hooks, adapter dicts) and of plain ``objects`` (configs), plus every parameter's
    requires_grad flag, as they are now. Tensor values are not copied: loaders restore those themselves."""
    saved: list[tuple[Any, dict[str, Any], dict[str, Any]]] = []

    def record(obj: Any) -> None:
        attrs = dict(vars(obj))
        contents = {k: (type(v), v.copy() if isinstance(v, (dict, set)) else list(v))
                    for k, v in attrs.items() if isinstance(v, (dict, list, set))}
        saved.append((obj, attrs, contents))

    seen: set[int] = set()
    flags: list[tuple[torch.Tensor, bool]] = []
    for root in modules:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            record(module)
            flags.extend((p, p.requires_grad) for p in module.parameters(recurse=False))
    for obj in objects:
        if obj is not None and hasattr(obj, "__dict__"):
            record(obj)

    def restore() -> None:
        for obj, attrs, contents in saved:
            current = vars(obj)
            for extra in [k for k in current if k not in attrs]:
                del current[extra]
            for key, value in attrs.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value
                if key in contents:
                    _, old = contents[key]
                    if isinstance(value, dict):
                        value.clear()
                        value.update(old)
                    elif isinstance(value, set):
                        value.clear()
                        value.update(old)
                    else:
                        value[:] = old
        for p, flag in flags:
            p.requires_grad_(flag)

    return restore


_MISSING = object()


@contextmanager
def config_mismatch_as_load_error(model_id: Any):
    """Errors raised while applying a checkpoint's config to a model (a target module the model lacks, a regex that
    does not compile, ...) are load errors: re-raise them as AdapterLoadError naming the checkpoint."""
    try:
        yield
    except (ConfigError, AdapterError, AdapterLoadError):
        raise
    except (ValueError, re.error) as e:
        raise AdapterLoadError(f"the adapter at {model_id!r} does not fit this model: {e}") from e
