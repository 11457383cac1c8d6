"""PeftModel and its task-specific subclasses: PEFT's wrapper surface over a tuner.

``peft_model.base_model`` is the tuner (LoraModel, IA3Model); ``peft_model.base_model.model`` is
the user's model with adapter layers injected. Attribute access falls through to both, so
``peft_model.generate``, ``peft_model.config`` and ``peft_model.merge_and_unload`` work as in PEFT.
Every operation that changes adapters is all-or-nothing: on error the model, its adapters,
``peft_config`` and which parameters train are exactly as before (an ``UndoLog`` records each step).

The tuner comes from the method registry (``peftfast.utils.registry``). The task wrappers
(``PeftModelForCausalLM``, ...) own ``forward`` and ``generate`` with PEFT's explicit signatures:
layer-injecting methods (LoRA, IA3) run the base model with the caller's arguments; when the active
adapter's config ``is_prompt_learning``, the call goes to the prompt-learning handler registered for
that method (``peftfast.tuners.prompt_learning``), where virtual tokens or the prefix cache are added; a
prompt-learning method without a handler raises NotImplementedError naming it. A model made with a prompt-learning
config has PEFT's tree for it: ``base_model`` is the user's model itself, and the encoders sit in
``prompt_encoder[adapter_name]``.
"""
from __future__ import annotations

import copy
import os
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
from torch import nn

from .config import PeftConfig
from .utils import registry
from .utils.errors import AdapterError
from .utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .utils.io import SaveTransaction, atomic_write_text
from .utils.other import require_input_grads
from .utils.peft_types import PeftType, TaskType
from .utils.registry import PEFT_TYPE_TO_TUNER_MAPPING
from .utils.save_and_load import (check_adapter_has_weights, get_peft_model_state_dict, load_adapter_weights,
                                  set_peft_model_state_dict, warn_unsharded_lora_tensors)
from .tuners import prompt_learning
from .tuners.tuners_utils import validate_adapter_name
from .tuners.status import TunerLayerStatus, TunerModelStatus, count_parameters, get_layer_status, get_model_status
from .utils.undo import UndoLog
from .version import __version__

try:  # PEFT's PeftModel is a transformers PushToHubMixin: push_to_hub(repo_id, ...) saves and uploads
    from transformers.utils import PushToHubMixin
except Exception:  # transformers is a dependency; keep the core importable without it
    class PushToHubMixin:  # type: ignore[no-redef]
        def push_to_hub(self, repo_id: str, *, commit_message: Optional[str] = None,
                        commit_description: Optional[str] = None, private: Optional[bool] = None,
                        token: bool | str | None = None, revision: Optional[str] = None, create_pr: bool = False,
                        max_shard_size: int | str | None = "50GB", tags: Optional[list[str]] = None) -> str:
            raise RuntimeError("push_to_hub needs transformers and huggingface_hub; install them, or save with "
                               "save_pretrained() and upload the folder yourself")

_HEADS: dict[str, list[str]] = {
    TaskType.SEQ_CLS.value: ["classifier", "score"],
    TaskType.TOKEN_CLS.value: ["classifier", "score"],
    TaskType.QUESTION_ANS.value: ["qa_outputs"],
}


def _add_head_modules(config: PeftConfig, task_type: Optional[str]) -> None:
    heads = _HEADS.get(task_type.value if isinstance(task_type, TaskType) else str(task_type))
    if not heads or not hasattr(config, "modules_to_save"):
        return
    current = list(config.modules_to_save or [])
    config.modules_to_save = current + [h for h in heads if h not in current]


def _tuner_cls(peft_type: Any) -> type:
    key = PeftType(peft_type.value if isinstance(peft_type, PeftType) else peft_type)
    try:
        return registry.tuner_class(key)
    except registry.UnknownPeftTypeError:
        raise ValueError(f"peft_type {key.value} is not supported by peftfast; supported: "
                         f"{', '.join(t.value for t in PEFT_TYPE_TO_TUNER_MAPPING)}") from None


class PeftModel(PushToHubMixin, nn.Module):
    """Base model with adapters (same constructor and methods as ``peft.PeftModel``)."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        validate_adapter_name(adapter_name)
        _add_head_modules(peft_config, getattr(self, "_task_type", None))
        self.peft_type = peft_config.peft_type
        self.special_peft_forward_args = {"adapter_names"}
        self._adapters_disabled = False
        self._peft_config: Optional[dict[str, PeftConfig]] = None
        if peft_config.is_prompt_learning:
            # Prompt learning injects no layers: base_model is the model itself, the encoders live here (PEFT's tree).
            self._peft_config = {}
            self._prompt_active_adapter: str | list[str] = adapter_name
            self.base_model = model
            self.add_adapter(adapter_name, peft_config)
        else:
            cls = _tuner_cls(peft_config.peft_type)
            self.base_model = cls(model, {adapter_name: peft_config}, adapter_name,
                                  autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage)
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if hasattr(self.base_model, "config") and hasattr(self.base_model.config, "pretraining_tp"):
            self.base_model.config.pretraining_tp = 1

    # -- attributes -----------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # private names stay unforwarded, but for the tuner methods PEFT documents for users (KaSA's loss)
            if (name.startswith("_") and name != "_get_kasa_loss") or name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """The names every adapter's config lists in ``modules_to_save`` (None when none does), as PEFT's attribute."""
        names: set[str] = set()
        for config in self.peft_config.values():
            names.update(getattr(config, "modules_to_save", None) or ())
        return names or None

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> None:
        """PEFT's helper: unless ``model`` is quantised, make its input embeddings' output require a gradient (so a
        checkpointed block with frozen inputs still back-propagates into the adapters). Returns None, as PEFT's."""
        require_input_grads(model)

    @property
    def _prompt_model(self) -> bool:
        """Whether this model holds prompt-learning adapters (base_model is then the user's model itself)."""
        return self.__dict__.get("_peft_config") is not None

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        if self._prompt_model:
            return self._peft_config
        return self.base_model.peft_config

    @peft_config.setter
    def peft_config(self, value: dict[str, PeftConfig]) -> None:
        if self._prompt_model:
            self._peft_config = value
        else:
            self.base_model.peft_config = value

    @property
    def active_adapters(self) -> list[str]:
        if self._prompt_model:
            active = self._prompt_active_adapter
            return [active] if isinstance(active, str) else list(active)
        return self.base_model.active_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        if self._prompt_model:
            return self._prompt_active_adapter
        # PEFT's PeftModel holds one adapter name (its set_adapter takes one; after a delete, the one left active);
        # the tuner keeps what it was given (a list of one name stays a list there)
        active = self.base_model.active_adapter
        return active[0] if isinstance(active, list) and len(active) == 1 else active

    @property
    def base_model_torch_dtype(self) -> Optional[torch.dtype]:
        return getattr(self.base_model, "dtype", None)

    def get_base_model(self) -> nn.Module:
        return self.base_model if self._prompt_model else self.base_model.model

    @property
    def active_peft_config(self) -> PeftConfig:
        """The config of the active adapter (the first one when several are active)."""
        active = self.active_adapter
        if not active:
            # PEFT raises a bare KeyError of the deleted name here; a KeyError still, saying what to do
            raise KeyError(f"The model has no active adapter (adapters held: {sorted(self.peft_config)}; the last "
                           "active one was deleted?): add or load one with add_adapter / load_adapter, or activate "
                           "one with set_adapter")
        return self.peft_config[active if isinstance(active, str) else active[0]]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """Whether adapters are neither disabled with ``disable_adapter()`` nor all inactive (PEFT's rule)."""
        if self.active_peft_config.is_prompt_learning:
            return not self._adapters_disabled
        return not self._adapters_disabled or not self.active_adapters

    @property
    def _is_prompt_learning(self) -> bool:  # PEFT's attribute name, derived from the active adapter's config
        return self.active_peft_config.is_prompt_learning

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._prompt_model:  # PEFT's PeftModel.forward runs the base model as is for prompt learning
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.base_model(*args, **kwargs)
        with self.base_model._enable_peft_forward_hooks(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate`` with PEFT's own arguments (``adapter_names``) routed to the adapter layers,
        as PEFT's ``PeftModel.generate`` (a model made without ``task_type``); the task wrappers have their own."""
        if self._prompt_model:  # as ``forward``: PEFT runs the base model as is
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.base_model.generate(*args, **kwargs)
        return self._task_generate(args, kwargs)

    # -- the task wrappers' shared path -----------------------------------------------------------------
    def _task_forward(self, inputs: dict[str, Any], kwargs: dict[str, Any]) -> Any:
        """Run a task wrapper's forward: ``inputs`` are its named arguments, ``kwargs`` the rest. The base model
        gets the named arguments the caller set (not None) plus ``kwargs``, less PEFT's own (``adapter_names``)."""
        config = self.active_peft_config
        if config.is_prompt_learning:
            return self._prompt_learning_call("forward", config, inputs, kwargs)
        given = {k: v for k, v in inputs.items() if v is not None}
        with self.base_model._enable_peft_forward_hooks(**given, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model()(**given, **kwargs)

    def _task_generate(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        config = self.active_peft_config
        if config.is_prompt_learning:
            return self._prompt_learning_call("generate", config, args, kwargs)
        with self.base_model._enable_peft_forward_hooks(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model().generate(*args, **kwargs)

    def _prompt_learning_call(self, entry: str, config: PeftConfig, inputs: Any, kwargs: dict[str, Any]) -> Any:
        """Where prompt-learning methods plug in: their registered handler prepends the virtual tokens (prompt
        tuning, p-tuning) or past_key_values (prefix tuning) and calls the base model."""
        handler = registry.prompt_learning_handler(config.peft_type)
        if handler is None:
            method = PeftType(config.peft_type).value
            raise NotImplementedError(
                f"{type(self).__name__}.{entry}: the active adapter uses {method}, a prompt-learning method "
                f"(virtual tokens / past_key_values), which peftfast does not implement; methods available: "
                f"{', '.join(t.value for t, c in PEFT_TYPE_TO_TUNER_MAPPING.items() if c is not None)}"
            )
        return getattr(handler, entry)(self, self._task_type, inputs, kwargs)

    # -- prompt learning (PEFT's attributes: prompt_encoder, prompt_tokens, word_embeddings, ...) -----------
    def _add_prompt_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        """Build the adapter's prompt encoder (and its copies of classifier heads); the caller's UndoLog takes it back
        on error."""
        if not config.is_prompt_learning:
            raise AdapterError(f"this model holds prompt-learning adapters; a {PeftType(config.peft_type).value} "
                               "adapter cannot be added to it")
        handler = registry.prompt_learning_handler(config.peft_type)
        if handler is None:
            self._prompt_learning_call("add_adapter", config, None, {})
        handler.add(self, adapter_name)
        active = adapter_name in self.active_adapters
        prompt_learning.set_head_modules(self.base_model, config, adapter_name, active=active)

    def _delete_prompt_adapter(self, adapter_name: str) -> None:
        del self.peft_config[adapter_name]
        del self.prompt_encoder[adapter_name]
        del self.prompt_tokens[adapter_name]
        for wrapper in prompt_learning.head_wrappers(self.base_model):
            wrapper.delete_adapter(adapter_name)
        if adapter_name in self.active_adapters:
            remaining = list(self.peft_config)
            if not remaining:
                self._prompt_active_adapter = []
            else:
                warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                              f"{remaining[0]}.")
                self.set_adapter(remaining[0])

    def get_prompt(self, batch_size: int, task_ids: Optional[torch.Tensor] = None,
                   max_cache_len: Optional[int] = None) -> Any:
        """The active adapter's virtual-token embeddings [batch, tokens, token_dim], or for prefix tuning the cache
        (``transformers.DynamicCache``) holding every layer's key/value prefix."""
        return prompt_learning.get_prompt(self, batch_size)

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """What the checkpoint stores as ``prompt_embeddings``: the encoder's output rows, detached, on CPU."""
        return prompt_learning.prompt_embedding_to_save(self, adapter_name)

    # -- parameter counts -----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return count_parameters(self)

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """PEFT's per-layer status report (see ``peftfast.tuners.status``)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """PEFT's whole-model status report; values that differ between layers read "irregular"."""
        return get_model_status(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- adapters (all-or-nothing) --------------------------------------------------------------------
    def _snapshot(self) -> Callable[[], None]:
        """A function that restores adapters, peft_config (and each config's fields), the active adapter, every
        layer's adapter bookkeeping, hooks and requires_grad flags to what they are now."""
        from .utils.save_and_load import snapshot_state

        configs = tuple(self.peft_config.values())
        return snapshot_state([self], objects=configs + (getattr(self.get_base_model(), "config", None),))

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add (but do not activate) a new adapter."""
        validate_adapter_name(adapter_name)
        if not isinstance(peft_config, PeftConfig):
            raise AdapterError(f"peft_config must be a PeftConfig such as LoraConfig(...), got "
                               f"{type(peft_config).__name__}; a dict can be turned into one with "
                               "peftfast.get_peft_config(d)")
        if adapter_name in self.peft_config:
            raise AdapterError(f"Adapter with name '{adapter_name}' already exists. Existing adapters: "
                               f"{', '.join(self.peft_config)}; pick another name or delete_adapter() it first.")
        if PeftType(peft_config.peft_type) != PeftType(self.peft_type):
            ours, theirs = PeftType(self.peft_type), PeftType(peft_config.peft_type)
            raise AdapterError(f"Cannot combine adapters with different peft types. Found PeftType.{ours.name} and "
                               f"PeftType.{theirs.name}. This model has {ours.value} adapters and the new config is "
                               f"{theirs.value}; add_adapter() takes configs of this model's type only.")
        from .utils.save_and_load import snapshot_state

        with UndoLog() as undo:
            undo.call(snapshot_state([], objects=(peft_config,)))
            _add_head_modules(peft_config, getattr(self, "_task_type", None))
            undo.call(self._snapshot())
            self.peft_config[adapter_name] = peft_config
            if self._prompt_model:
                self._add_prompt_adapter(adapter_name, peft_config)
            else:
                self.base_model.inject_adapter(self.base_model.model, adapter_name,
                                               autocast_adapter_dtype=autocast_adapter_dtype,
                                               low_cpu_mem_usage=low_cpu_mem_usage)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        if isinstance(adapter_name, str):
            if adapter_name not in self.peft_config:
                raise AdapterError(f"Adapter {adapter_name} not found. Available adapters: "
                                   f"{', '.join(self.peft_config)}")
        if self._prompt_model:
            if not isinstance(adapter_name, str):
                raise AdapterError(f"prompt-learning adapters are used one at a time; got {adapter_name!r}")
            self._prompt_active_adapter = adapter_name
            for wrapper in prompt_learning.head_wrappers(self.base_model):
                wrapper.set_adapter(adapter_name, inference_mode=inference_mode)
            return
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Switch gradients of the named adapters on or off, independently of which one is active (PEFT's
        method). Not available for prompt-learning methods, as in PEFT."""
        if self.active_peft_config.is_prompt_learning:
            raise TypeError("Setting `requires_grad` is not supported for prompt learning methods like "
                            f"{self.active_peft_config.peft_type}.")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterError(f"Adapter {', '.join(map(str, unknown))} does not exist; available adapters: "
                               f"{', '.join(self.peft_config)}")
        self.base_model.set_requires_grad(names, requires_grad=requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterError(f"Adapter {adapter_name} does not exist; available adapters: "
                               f"{', '.join(self.peft_config)}")
        if self._prompt_model:
            self._delete_prompt_adapter(adapter_name)
            return
        self.base_model.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self):
        """Run the base model without adapters inside the ``with`` block.

        On exit every adapter layer and modules_to_save wrapper is put back as it was on entry: a model whose
        adapters were all disabled stays disabled, and a nested ``with`` restores the outer block's (all disabled)
        state. The requires_grad flags of adapter parameters are restored too. A model entered with some adapter
        layers enabled and others disabled (most likely a mistake) gets a warning and, as in PEFT, comes back with
        every layer enabled.
        """
        was_disabled = self._adapters_disabled
        if self._prompt_model:
            layers = prompt_learning.head_wrappers(self.base_model)
            states = _adapter_states(layers)
            try:
                for m in layers:
                    m.enable_adapters(False)
                self._adapters_disabled = True
                yield
            finally:
                _restore_adapter_states(states)
                self._adapters_disabled = was_disabled
            return
        layers = self.base_model._tuner_layers() + self.base_model._wrappers()
        states = _adapter_states(layers)
        tuner_states = {m.disable_adapters for m in self.base_model._tuner_layers()}
        irregular = len(tuner_states) > 1
        if irregular:
            warnings.warn("The model contains some adapter layers that are enabled and others that are disabled. "
                          "This is most likely unintentional. After exiting the disable_adapter context, all "
                          "adapters will be enabled", UserWarning, stacklevel=3)
        try:
            self.base_model.disable_adapter_layers()
            self._adapters_disabled = True
            yield
        finally:
            if irregular:  # PEFT's rule for a mixed state: every layer comes back enabled
                self.base_model.enable_adapter_layers()
            else:
                _restore_adapter_states(states)
            self._adapters_disabled = was_disabled

    # -- saving and loading ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, save_embedding_layers: str | bool = "auto",
                        is_main_process: bool = True, **kwargs: Any) -> None:
        """Write each adapter as PEFT does: adapter_config.json plus adapter_model.safetensors (or adapter_model.bin
        when ``safe_serialization=False``), the "default" adapter in ``save_directory`` and every other adapter in
        a subfolder named after it, and a README.md model card.

        Tensor keys carry no adapter name; ``modules_to_save`` copies are saved under the original module's name,
        and the embedding layers when ``save_embedding_layers`` is True ('auto': when an embedding is targeted or
        the vocabulary was resized). The save is one transaction over all selected adapters and the model card
        (``peftfast.utils.io.SaveTransaction``): the folder is locked against other saves, every file is staged under
        a temporary name, a journal commits the save, then the files are renamed into place. After an error, Ctrl-C
        or kill at any point each adapter is entirely the old or entirely the new one (the next save or load of the
        folder finishes or undoes an interrupted save and removes its temporary files). Only ``is_main_process``
        writes. ``state_dict=`` (keyword) saves from that state dict instead of the model's.

        Raises:
            AdapterSaveError (an OSError): a file could not be written (full disk, no permission, an adapter
                subfolder name taken by a file, ...); it names the path and the cause, and the folder is as before.
        """
        save_directory, names = checked_save_request(self, save_directory, selected_adapters)
        if save_embedding_layers not in ("auto", True, False):
            raise ValueError(f"save_embedding_layers must be 'auto', True or False, got {save_embedding_layers!r}")
        state_dict = kwargs.get("state_dict")
        if not is_main_process:  # still gather the state dicts: with sharded parameters that is a collective
            for name in names:
                get_peft_model_state_dict(self, state_dict=state_dict, adapter_name=name,
                                          save_embedding_layers=save_embedding_layers)
            return
        initial_path = kwargs.get("path_initial_model_for_weight_conversion")
        edit_config = None
        if initial_path is not None:  # PiSSA / OLoRA saved as plain LoRA of the unmodified base (lora/conversion.py)
            from .tuners.lora import conversion

            for name in names:
                conversion.check_convertible(self.peft_config[name], name)
            initial = {name: conversion.read_initial_weights(initial_path, self.peft_config[name]) for name in names}
            edit_config = conversion.converted_config
        tx = SaveTransaction(save_directory)  # the model card is computed and written with the adapters
        tx.write_text(os.path.join(save_directory, "README.md"), lambda: self._model_card_text(save_directory))

        def state_of(name: str) -> dict[str, torch.Tensor]:
            state = get_peft_model_state_dict(self, state_dict=state_dict, adapter_name=name,
                                              save_embedding_layers=save_embedding_layers)
            warn_unsharded_lora_tensors(state, name)
            if initial_path is not None:
                state = conversion.convert_state(state, initial[name], initial_path)
            return state

        write_adapter_folders(tx, self, names, save_directory, safe_serialization, state_of, edit_config)
        tx.commit()

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write or update README.md as PEFT does: huggingface_hub's model card with ``library_name: peft``, the base
        model, tags (method, ``transformers``, ``base_model:adapter:<base>``, plus ``peftfast``), ``pipeline_tag``
        for causal LMs, and a framework-versions line. An existing card keeps its text and metadata."""
        text = self._model_card_text(output_dir)
        if text is not None:
            atomic_write_text(os.path.join(output_dir, "README.md"), text)

    def _model_card_text(self, output_dir: str) -> Optional[str]:
        """The new README.md text for ``output_dir``, or None (with a warning) when the card is left alone."""
        from .config import PEFT_FORMAT_VERSION
        from .utils.hub import model_card_text

        path = os.path.join(output_dir, "README.md")
        base = self.get_base_model()
        model_config = getattr(base, "config", None)
        model_config = model_config.to_dict() if hasattr(model_config, "to_dict") else {}
        base_name = model_config.get("_name_or_path") or None
        tags = ["peftfast"] + list(getattr(base, "model_tags", None) or [])
        if any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
               for c in type(base).__mro__):
            tags.append("transformers")
        peft_type = PeftType(self.peft_type)
        tags.append(peft_type.value.lower())
        name_or_path = getattr(base, "name_or_path", None)
        if name_or_path:
            tags.append(f"base_model:adapter:{name_or_path}")
        pipeline = "text-generation" if getattr(self, "_task_type", None) == TaskType.CAUSAL_LM else None
        existing = None
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    existing = f.read()
            except UnicodeDecodeError:
                warnings.warn(f"{path} is not UTF-8 text; the model card was left unchanged", UserWarning)
                return None
        text = model_card_text(existing, base_model=base_name, tags=tags, pipeline_tag=pipeline,
                               version_line=f"- peftfast {__version__} (PEFT {PEFT_FORMAT_VERSION} format)")
        if text is None:
            warnings.warn(f"{path} has metadata that is not valid YAML; the model card was left unchanged",
                          UserWarning)
            return None
        return text

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, **kwargs: Any) -> "PeftModel":
        """Load an adapter saved by peftfast or PEFT onto ``model`` (a local folder or a Hub repo id; Hub keywords
        ``subfolder``, ``revision``, ``cache_dir``, ``token``, ``force_download``, ``local_files_only``).

        Everything is read and checked before ``model`` is touched, and if anything fails ``model`` is exactly as
        before. The adapter is frozen and the model put in eval mode unless ``is_trainable``.

        Raises:
            FileNotFoundError: no such folder or Hub repo, or it lacks adapter_config.json / adapter weights.
            ConfigError: adapter_config.json is not valid JSON, has fields of the wrong type, an unknown or
                unsupported peft_type, or turns on a feature peftfast does not implement.
            AdapterLoadError: the weights file is damaged or truncated, or its tensors do not fit the model
                (unexpected or missing keys, shape mismatches naming the key and both shapes, non-float dtypes,
                NaN/inf), or the config targets modules this model does not have.
            AdapterError: ``adapter_name`` is not a valid name.
            TypeError: an argument of the wrong type (e.g. ``config`` that is not a PeftConfig).
        ConfigError, AdapterLoadError and AdapterError are ValueErrors.
        """
        from .utils.save_and_load import config_mismatch_as_load_error, snapshot_state

        validate_adapter_name(adapter_name)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        existing = getattr(model, "peft_config", None)
        if isinstance(model, PeftModel) or (isinstance(existing, dict) and existing):
            raise AdapterError(f"model already has adapters ({type(model).__name__} with "
                               f"{', '.join(map(repr, getattr(model, 'peft_config', {})))}); from_pretrained takes "
                               "the base model. To add this adapter, call model.load_adapter(model_id, adapter_name)")
        hub = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token", "force_download",
                                      "local_files_only") if k in kwargs}
        if config is None:
            config = PeftConfig.from_pretrained(model_id, **hub)
        elif not isinstance(config, PeftConfig):
            raise TypeError(f"config must be a PeftConfig, got {type(config).__name__}")
        if config.is_prompt_learning and is_trainable:
            raise ValueError("Cannot set a prompt learning adapter to trainable when loading pretrained adapter.")
        weights = load_adapter_weights(model_id, config, **hub)
        config.inference_mode = not is_trainable
        if cls is PeftModel and config.task_type is not None:
            task = config.task_type.value if isinstance(config.task_type, TaskType) else config.task_type
            cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task, PeftModel)
        with UndoLog() as undo:
            undo.call(snapshot_state([model], objects=(getattr(model, "config", None),)))
            with config_mismatch_as_load_error(model_id):
                peft_model = cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                 low_cpu_mem_usage=low_cpu_mem_usage)
            set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name, strict=True,
                                      ignore_mismatched_sizes=bool(kwargs.get("ignore_mismatched_sizes")))
            _check_nothing_left_on_meta(peft_model, model_id)
        if not is_trainable:
            peft_model.requires_grad_(False)
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False, **kwargs: Any):
        """Load another adapter into this model (added, not activated). Loading into an existing adapter name
        replaces its weights. Frozen (and the model put in eval mode) unless ``is_trainable``.

        All-or-nothing: on any error the model, its adapters, ``peft_config``, the active adapter and requires_grad
        flags are exactly as before. Raises the exceptions listed in ``PeftModel.from_pretrained``, plus
        AdapterError when the adapter's type cannot be combined with this model's adapters.
        Returns PEFT's (missing_keys, unexpected_keys) pair (both empty: anything else is an error).
        """
        from .utils.save_and_load import adapter_parameter_prefixes, config_mismatch_as_load_error

        validate_adapter_name(adapter_name)
        hub = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token", "force_download",
                                      "local_files_only") if k in kwargs}
        config = PeftConfig.from_pretrained(model_id, **hub)
        if config.is_prompt_learning and is_trainable:
            raise ValueError("Cannot set a prompt learning adapter to trainable when loading pretrained adapter.")
        weights = load_adapter_weights(model_id, config, device=torch_device, **hub)
        config.inference_mode = not is_trainable
        existing = self.peft_config.get(adapter_name)
        if existing is not None:
            fields = registry.load_checked_fields(config.peft_type)
            differ = [f for f in fields if getattr(existing, f, None) != getattr(config, f, None)]
            if differ:
                warnings.warn(f"loading weights from {model_id} into the existing adapter {adapter_name!r}, whose "
                              f"config differs in {', '.join(differ)}; the existing config is kept", UserWarning)
        # adding an adapter re-applies the trainability rule to the whole model; a load changes only its own adapter
        flags = [(p, p.requires_grad) for p in self.parameters()]
        with UndoLog() as undo:
            undo.call(self._snapshot())
            if existing is None:
                with config_mismatch_as_load_error(model_id):
                    self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype,
                                     low_cpu_mem_usage=low_cpu_mem_usage)
            # ignore_mismatched_sizes (PEFT's keyword): tensors of another shape are skipped with a warning
            result = set_peft_model_state_dict(self, weights, adapter_name=adapter_name, strict=True,
                                               ignore_mismatched_sizes=bool(kwargs.get("ignore_mismatched_sizes")))
            _check_nothing_left_on_meta(self, model_id)
        for p, flag in flags:
            p.requires_grad_(flag)
        prefixes = tuple(adapter_parameter_prefixes(self, adapter_name))
        for name, p in self.named_parameters():
            if any(name == q or name.startswith(q + ".") for q in prefixes):
                p.requires_grad_(bool(is_trainable))
        if not is_trainable:
            self.eval()
        return result


def _adapter_states(modules: list[nn.Module]) -> list:
    """Each module's disabled flag and its parameters' requires_grad flags, for ``_restore_adapter_states``."""
    return [(m, m.disable_adapters, [(p, p.requires_grad) for p in m.parameters()]) for m in modules]


def _restore_adapter_states(states: list) -> None:
    """Re-enable the modules that were enabled when ``states`` was taken, and put back every requires_grad flag."""
    for module, disabled, grads in states:
        if not disabled:
            module.enable_adapters(True)
        for p, flag in grads:
            p.requires_grad_(flag)


def _check_nothing_left_on_meta(model: nn.Module, model_id: str) -> None:
    """After a low_cpu_mem_usage load every adapter weight must have come from the checkpoint."""
    from .utils.save_and_load import AdapterLoadError, adapter_weights_left_on_meta

    left = adapter_weights_left_on_meta(model)
    if left:
        raise AdapterLoadError(f"low_cpu_mem_usage=True: the checkpoint at {model_id} does not provide "
                               f"{len(left)} adapter weight(s) (e.g. {', '.join(left[:3])}); they would stay "
                               "uninitialised on the meta device. Load without low_cpu_mem_usage to initialise them")


def checked_save_request(model: nn.Module, save_directory: Any,
                         selected_adapters: Optional[list[str] | str]) -> tuple[str, list[str]]:
    """``save_pretrained``'s argument checks (PeftModel and PeftMixedModel): the folder as a path that is not a file,
    and the adapters to write (all by default), each known to the model and still holding its weights."""
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a path, got {type(save_directory).__name__}")
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} should be a directory, not a file")
    if isinstance(selected_adapters, str):
        selected_adapters = [selected_adapters]
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise AdapterError(f"You passed an invalid `selected_adapters` arguments, current supported adapter names "
                           f"are {list(model.peft_config.keys())} - got {names}. selected_adapters {unknown} not found; "
                           f"available: {', '.join(model.peft_config)}")
    for name in names:
        validate_adapter_name(name)
        check_adapter_has_weights(model, name)
    return save_directory, names


def write_adapter_folders(tx: Any, model: nn.Module, names: list[str], save_directory: str,
                          safe_serialization: bool, state_of: Callable[[str], dict[str, torch.Tensor]],
                          edit_config: Optional[Callable[[PeftConfig], PeftConfig]] = None) -> None:
    """Stage on the save transaction ``tx`` each adapter of ``names`` as PEFT lays a folder out: "default" in
    ``save_directory``, every other adapter in a subfolder named after it, each with adapter_config.json and
    adapter_model.safetensors (adapter_model.bin when not ``safe_serialization``). ``state_of(name)``: the
    adapter's tensors with their checkpoint keys; ``model``: the PeftModel or PeftMixedModel they come from;
    ``edit_config``: maps a copy of each adapter's config to the one written."""
    from .config import PEFT_FORMAT_VERSION

    for name in names:
        out = save_directory if name == "default" else os.path.join(save_directory, name)

        def write_weights(tmp: str, name: str = name) -> None:
            state = _contiguous_unshared(state_of(name))
            if safe_serialization:
                from safetensors.torch import save

                # serialised here and written to the staged file by us: safetensors' own save_file stages through
                # a temporary file of its own beside the target, which a kill would leave in the adapter folder
                data = save(state, metadata={"format": "pt"})
                with open(tmp, "wb") as f:
                    f.write(data)
            else:
                torch.save(state, tmp)

        tx.write(os.path.join(out, SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME), write_weights)
        config = copy.deepcopy(model.peft_config[name])
        if edit_config is not None:
            config = edit_config(config)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = model.get_base_model().__dict__.get("name_or_path", None) or None
        config.inference_mode = True
        config.peft_version = PEFT_FORMAT_VERSION
        auto_mapping = None
        if config.task_type is None:
            base = model.get_base_model()
            auto_mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
        tx.write(*_save_config(config, out, auto_mapping))
        # A weights file of the other format left by an earlier save would shadow this one (.safetensors is
        # read first): it is removed in the same transaction.
        tx.remove(os.path.join(out, WEIGHTS_NAME if safe_serialization else SAFETENSORS_WEIGHTS_NAME))


def _save_config(config: PeftConfig, out: str, auto_mapping: Optional[dict]) -> tuple[str, Callable[[str], None]]:
    """(path, writer) that writes ``config`` as ``out``/adapter_config.json, for a staged atomic save."""
    import json

    config.auto_mapping = auto_mapping
    text = json.dumps(config.to_json_dict(), indent=2, sort_keys=True)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return os.path.join(out, CONFIG_NAME), write


def _contiguous_unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor with its own compact contiguous CPU storage: safetensors refuses shared or non-contiguous
    tensors, and torch.save would write the whole storage behind a view."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach()
        if v.device.type != "cpu":
            v = v.cpu()
        storage = v.untyped_storage()
        compact = storage.nbytes() == v.numel() * v.element_size() and v.storage_offset() == 0
        if storage.data_ptr() in seen or not v.is_contiguous() or not compact:
            v = v.contiguous().clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------------
# Task wrappers. Each owns ``forward`` (and ``generate`` for the language models) with PEFT 0.21's explicit
# signature. Methods that inject layers (LoRA, IA3) run the base model with the arguments the caller gave;
# prompt-learning methods plug in at ``_prompt_learning_call``, where PEFT prepends virtual tokens or
# past_key_values. ``task_ids`` belongs to methods that route by task (PEFT's Poly) and is not passed on.
# ---------------------------------------------------------------------------------------------------------
def forward_with_labels(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                        output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                        **kwargs: Any) -> Any:
    """``forward`` of the causal-LM, sequence- and token-classification wrappers (PEFT 0.21's signature)."""
    return self._task_forward(dict(
        input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
        output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
    ), kwargs)


class Generating:
    """``generate`` for the language-model wrappers: as on the base model (prompt methods plug in at
    ``_task_generate``)."""

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._task_generate(args, kwargs)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForCausalLM(Generating, PeftModel):
    """Causal LM with adapters; ``generate`` works as on the base model."""

    _task_type = TaskType.CAUSAL_LM

    forward = forward_with_labels


class PeftModelForSeq2SeqLM(Generating, PeftModel):
    """Encoder-decoder LM with adapters; ``generate`` works as on the base model."""

    _task_type = TaskType.SEQ_2_SEQ_LM

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs: Any) -> Any:
        return self._task_forward(dict(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds, labels=labels, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict,
        ), kwargs)


class PeftModelForSequenceClassification(PeftModel):
    """The classifier head ("classifier" or "score") is trained and saved in full (modules_to_save)."""

    _task_type = TaskType.SEQ_CLS

    forward = forward_with_labels


class PeftModelForTokenClassification(PeftModel):
    """The classifier head is trained and saved in full (modules_to_save)."""

    _task_type = TaskType.TOKEN_CLS

    forward = forward_with_labels


class PeftModelForQuestionAnswering(PeftModel):
    """The span head ("qa_outputs") is trained and saved in full (modules_to_save)."""

    _task_type = TaskType.QUESTION_ANS

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs: Any) -> Any:
        return self._task_forward(dict(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, start_positions=start_positions,
            end_positions=end_positions, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict,
        ), kwargs)


class PeftModelForFeatureExtraction(PeftModel):
    """Encoder outputs (hidden states) with adapters."""

    _task_type = TaskType.FEATURE_EXTRACTION

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs: Any) -> Any:
        return self._task_forward(dict(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
        ), kwargs)

MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}
