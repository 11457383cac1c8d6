"""TrainableTokensModel (the method on its own) and LoRA's ``trainable_token_indices`` (wrappers next to LoRA).

Both tie an LM head to the input embedding when the model's config has ``tie_word_embeddings=True`` and the
head's weight is the embedding's tensor: the head gets a layer tied to the embedding's, so the trained rows show
in both (PEFT's behaviour).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

from torch import nn

from ...utils.other import TrainableTokensWrapper, get_submodules, module_names_tied_with_embedding
from ...utils.undo import UndoLog
from ..tuners_utils import BaseTuner, BaseTunerLayer
from .config import TrainableTokensConfig
from .layer import TrainableTokensLayer, supports_trainable_tokens


def input_embeddings_name(model: nn.Module, default: Optional[str] = None) -> Optional[str]:
    """The name of ``model.get_input_embeddings()`` among its modules (PEFT's fallback: ``default``)."""
    getter = getattr(model, "get_input_embeddings", None)
    if getter is None:
        return default
    try:
        embedding = getter()
    except (AttributeError, NotImplementedError):
        return default
    for name, module in model.named_modules():
        if module is embedding and name:
            return name
    return default


def _tied_names(model: nn.Module) -> list[str]:
    return module_names_tied_with_embedding(model)


class TrainableTokensModel(BaseTuner):
    prefix: str = "trainable_tokens_"
    tuner_layer_cls = TrainableTokensLayer
    target_modules_condensable = False

    def _supported_module(self, module: nn.Module) -> bool:
        return supports_trainable_tokens(module)

    def _supported_kinds(self) -> list[str]:
        return ["Embedding", "Linear (not quantised)"]

    def _prepare_adapter_config(self, config: Any, model_config: dict) -> Any:
        if config.target_modules is None:
            config.target_modules = input_embeddings_name(self.model, "embed_tokens")
        return config

    def _create_and_replace(self, config: TrainableTokensConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str,
                            tied_adapter: Optional[TrainableTokensLayer] = None) -> None:
        if isinstance(target, TrainableTokensLayer):
            target.update_layer(adapter_name, config=config, tied_adapter=tied_adapter)
            return
        new = TrainableTokensLayer(target, adapter_name, config=config, tied_adapter=tied_adapter)
        new.update_layer(adapter_name, config=config, tied_adapter=tied_adapter)
        setattr(parent, target_name, new)

    def _set_auxiliary_modules(self, model: nn.Module, config: Any, adapter_name: str, undo: UndoLog) -> None:
        """Layers tied to the embedding's: an LM head sharing its weight reads (and trains) the same rows."""
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(embedding, TrainableTokensLayer):
            return
        for name in _tied_names(model):
            parent, target, target_name = get_submodules(model, name)
            if isinstance(target, TrainableTokensLayer):
                if target.tied_adapter is embedding:
                    continue
                base = target.base_layer  # targeted explicitly: replaced by a layer tied to the embedding's
            else:
                base = target
            undo.replace(parent, target_name, target)
            tied = TrainableTokensLayer(base, adapter_name, config=config, tied_adapter=embedding)
            tied._active_adapter = list(embedding.active_adapters)
            setattr(parent, target_name, tied)
            if name not in self.targeted_module_names:
                self.targeted_module_names.append(name)


def _token_targets(model: nn.Module, config: Any) -> dict[str, list[int]]:
    indices = config.trainable_token_indices
    if isinstance(indices, dict):
        return {str(k): list(v) for k, v in indices.items()}
    return {input_embeddings_name(model, "embed_tokens"): list(indices)}


def set_trainable_tokens(model: nn.Module, config: Any, adapter_name: str, undo: UndoLog, activate: bool) -> None:
    """LoRA's ``trainable_token_indices``: wrap each named module (default: the input embedding) in a
    TrainableTokensWrapper holding ``adapter_name``'s rows (or add them to its wrapper), and give modules tied to a
    wrapped input embedding a wrapper tied to it. Every change is recorded in ``undo``."""
    if getattr(config, "trainable_token_indices", None) is None:
        return
    targets = _token_targets(model, config)
    saved = set(getattr(config, "modules_to_save", None) or ())
    for name in targets:
        if name in saved:
            raise ValueError("The embedding layer is already marked to be trained fully, either specify "
                             f'`modules_to_save=[..., "{name}", ...]` or `trainable_tokens={{\'{name}\': x}}` but not '
                             "both.")
    model_config = BaseTuner.get_model_config(model)
    weights_tied = bool(model_config.get("tie_word_embeddings", False))
    ensure = bool(getattr(config, "ensure_weight_tying", False))
    tied_names = _tied_names(model) if weights_tied else []
    skip: set[str] = set()
    mismatch = False
    if weights_tied and len(targets) > 1 and tied_names:
        embedding_name = input_embeddings_name(model) or ""
        tied_keys = [k for k in targets if embedding_name.endswith(k)
                     or any(t.endswith(k) or k in t.split(".") for t in tied_names)]
        if len(tied_keys) >= 2:
            first = targets[tied_keys[0]]
            mismatch = not all(targets[k] == first for k in tied_keys[1:])
            if mismatch and ensure:
                info = ", ".join(f"{k}: {targets[k]}" for k in tied_keys)
                raise ValueError("Cannot ensure weight tying when different token indices are specified for tied "
                                 f"layers. Conflicting layers: {info}. Please use the same indices for all tied "
                                 "layers or set ensure_weight_tying=False.")
            if not mismatch:
                skip = {k for k in tied_keys if any(t.endswith(k) or k in t.split(".") for t in tied_names)}
    for name, indices in targets.items():
        if name in skip:
            continue
        _wrap(model, [name], adapter_name, indices, None, config, undo, activate)
    if ensure and not weights_tied:
        warnings.warn("ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). "
                      "Weight tying will not be applied for trainable_token_indices.", UserWarning)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if weights_tied and isinstance(embedding, TrainableTokensWrapper) and (ensure or not mismatch) and tied_names:
        layer = embedding.token_adapter
        _wrap(model, tied_names, adapter_name, layer.token_indices[adapter_name], layer, config, undo, activate)


def _wrap(model: nn.Module, names: list[str], adapter_name: str, indices: list[int],
          tied: Optional[TrainableTokensLayer], config: Any, undo: UndoLog, activate: bool) -> None:
    inner = ("token_adapter", "base_layer", "original_module", "modules_to_save")
    found = False
    for key, _ in list(model.named_modules(remove_duplicate=False)):
        if not key or any(p in inner for p in key.split(".")):
            continue
        if not any(key == n or key.endswith("." + n) for n in names):
            continue
        try:
            parent, target, target_name = get_submodules(model, key)
        except AttributeError:
            continue
        grandparent = model.get_submodule(key.rsplit(".", 2)[0]) if key.count(".") >= 2 else None
        if isinstance(grandparent, BaseTunerLayer):
            # e.g. the adapter is named like the module: 'foobar' matches 'embed.lora_dropout.foobar'
            raise ValueError(f"trainable_token_indices entry matches {key!r}, a module inside the adapter layer "
                             f"{type(grandparent).__name__} at {key.rsplit('.', 2)[0]!r}, which is almost certainly "
                             f"not intended: make sure the adapter name {adapter_name!r} does not conflict with the "
                             "targeted module names")
        found = True
        if isinstance(target, TrainableTokensWrapper):
            layer = target.token_adapter
            if tied is not None and layer.tied_adapter is tied:
                continue
            if adapter_name in layer.trainable_tokens_delta and tied is None:
                continue
            if tied is None and layer.tied_adapter is None:
                undo.delete_adapter(layer, adapter_name)
                target.update(adapter_name, token_indices=indices)
                continue
            target = layer.get_base_layer()  # re-tie (or untie) this module: a fresh wrapper around its base
            undo.replace(parent, target_name, getattr(parent, target_name))
        else:
            if not supports_trainable_tokens(target):
                raise TypeError(f"trainable_token_indices cannot be applied to modules of type "
                                f"{type(target).__name__} ({key!r}); it applies to nn.Embedding layers (and LM heads "
                                "tied to them)")
            undo.replace(parent, target_name, target)
        wrapper = TrainableTokensWrapper(target, adapter_name, token_indices=indices, tied_adapter=tied)
        layer = wrapper.token_adapter
        if not activate:
            layer._active_adapter = []
        if config.inference_mode:
            layer.set_adapter([adapter_name] if activate else [], inference_mode=True)
        setattr(parent, target_name, wrapper)
    if not found:
        raise ValueError(f"Target modules {names} not found in the base model. Please check the target modules and "
                         "try again (trainable_token_indices).")


__all__ = ["TrainableTokensModel", "input_embeddings_name", "set_trainable_tokens"]
