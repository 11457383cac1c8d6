"""PeftMixedModel: adapters of different methods (LoRA, LoHa, LoKr, AdaLoRA) on one model, PEFT's API.

``get_peft_model(model, config, mixed=True)`` or ``PeftMixedModel(model, config, adapter_name)`` creates it;
``add_adapter`` / ``load_adapter`` add adapters of any compatible method, and ``set_adapter([...])`` activates
several at once (on a module adapted by several, their outputs are summed). Beyond PEFT, ``save_pretrained`` writes
every adapter as a PeftModel of its method would (``default`` in the folder, the others in subfolders named after
them), so each folder loads with ``PeftModel.from_pretrained`` or ``PeftMixedModel.load_adapter`` here or in PEFT.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from torch import nn

from .config import PeftConfig
from .peft_model import PeftModel, checked_save_request, write_adapter_folders
from .tuners.mixed import MixedModel
from .tuners.mixed.model import check_config_compatible
from .tuners.status import count_parameters
from .utils.other import require_input_grads
from .tuners.tuners_utils import validate_adapter_name
from .utils.io import SaveTransaction
from .utils.save_and_load import (config_mismatch_as_load_error,
                                  get_peft_model_state_dict, snapshot_state)
from .utils.undo import UndoLog

try:
    from transformers.utils import PushToHubMixin
except Exception:  # transformers is a dependency; keep the core importable without it
    class PushToHubMixin:  # type: ignore[no-redef]
        pass


def _enable_input_grads(model: nn.Module) -> None:
    """PEFT's gradient-checkpointing preparation: inputs of a checkpointing, unquantised model require grad."""
    if getattr(model, "is_gradient_checkpointing", True):
        require_input_grads(model)


class PeftMixedModel(PushToHubMixin, nn.Module):
    """Adapters of different methods on one model (PEFT's ``PeftMixedModel``).

    Args:
        model: the base model; adapter layers are injected into it in place.
        peft_config: the first adapter's config (LoraConfig, LoHaConfig, LoKrConfig or AdaLoraConfig).
        adapter_name: the first adapter's name.
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        validate_adapter_name(adapter_name)
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}")
        check_config_compatible(peft_config)
        self.modules_to_save: Optional[set[str]] = None
        # the first adapter stays in the base's dtype (PEFT's PeftMixedModel does not cast it to float32; adapters
        # added later are)
        self.base_model = MixedModel(model, {adapter_name: peft_config}, adapter_name, autocast_adapter_dtype=False)
        _enable_input_grads(model)
        self._note_modules_to_save(peft_config)
        self.config = getattr(model, "config", {"model_type": "custom"})
        if hasattr(self.base_model, "config") and hasattr(self.base_model.config, "pretraining_tp"):
            self.base_model.config.pretraining_tp = 1

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- state --------------------------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def get_layer_status(self) -> Any:
        raise TypeError(f"get_layer_status is not supported for {type(self).__name__}.")

    def get_model_status(self) -> Any:
        raise TypeError(f"get_model_status is not supported for {type(self).__name__}.")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    # -- adapters (all-or-nothing) ------------------------------------------------------------------------
    def _snapshot(self) -> Any:
        configs = tuple(self.peft_config.values())
        return snapshot_state([self], objects=configs + (getattr(self.get_base_model(), "config", None),))

    def _note_modules_to_save(self, peft_config: PeftConfig) -> None:
        names = getattr(peft_config, "modules_to_save", None)
        if names:
            self.modules_to_save = set(names) if self.modules_to_save is None else self.modules_to_save | set(names)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model without any adapter inside the ``with`` block; on exit every adapter layer and
        modules_to_save wrapper is enabled or disabled as it was on entry, with its requires_grad flags."""
        layers = self.base_model._tuner_layers() + self.base_model._wrappers()
        states = [(m, m.disable_adapters, [(p, p.requires_grad) for p in m.parameters()]) for m in layers]
        try:
            self.base_model.disable_adapter_layers()
            yield
        finally:
            for module, disabled, grads in states:
                if not disabled:
                    module.enable_adapters(True)
                for p, flag in grads:
                    p.requires_grad_(flag)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add (but do not activate) an adapter of any compatible method."""
        validate_adapter_name(adapter_name)
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a PeftConfig (e.g. LoHaConfig), got {type(peft_config).__name__}")
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists. Existing adapters: "
                             f"{', '.join(self.peft_config)}")
        check_config_compatible(peft_config)
        with UndoLog() as undo:
            undo.call(snapshot_state([], objects=(peft_config,)))
            undo.call(self._snapshot())
            self.peft_config[adapter_name] = peft_config
            self.base_model.inject_adapter(self.base_model.model, adapter_name,
                                           autocast_adapter_dtype=autocast_adapter_dtype,
                                           low_cpu_mem_usage=low_cpu_mem_usage)
        self._note_modules_to_save(peft_config)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one or several adapters (of any methods). On a module adapted by several of them the outputs
        are summed; the order of the sum is the order the adapters were added, not the order given here. The
        activated adapters become trainable unless ``inference_mode``."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = sorted(set(names) - set(self.peft_config))
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} not found, available adapters: {sorted(self.peft_config)}")
        self.base_model.set_adapter(names, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        self.base_model.set_requires_grad(adapter_names, requires_grad=requires_grad)

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        self.base_model.delete_adapter(adapter_name)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Merge the active adapters (or ``adapter_names``) into the base weights and return the base model."""
        return self.base_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge,
                                                adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter layer without merging and return the base model."""
        return self.base_model.unload()

    def _check_new_adapter_config(self, peft_config: PeftConfig, is_trainable: bool) -> None:
        if peft_config.is_prompt_learning and is_trainable:
            raise ValueError("Cannot set a prompt learning adapter to trainable when loading pretrained adapter.")
        check_config_compatible(peft_config)

    # -- saving and loading -------------------------------------------------------------------------------
    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, autocast_adapter_dtype: bool = True,
                     low_cpu_mem_usage: bool = False, **kwargs: Any) -> Any:
        """Load an adapter saved by PEFT or peftfast (a PeftModel's folder of any compatible method) as
        ``adapter_name`` (added, not activated). All-or-nothing, with PeftModel.load_adapter's checks and errors;
        a method that cannot be mixed is refused before anything changes."""
        hub = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token", "force_download",
                                      "local_files_only") if k in kwargs}
        if adapter_name not in self.peft_config:
            self._check_new_adapter_config(PeftConfig.from_pretrained(model_id, **hub), is_trainable)
        result = PeftModel.load_adapter(self, model_id, adapter_name, is_trainable=is_trainable,
                                        torch_device=torch_device, autocast_adapter_dtype=autocast_adapter_dtype,
                                        low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
        return result

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        **kwargs: Any) -> "PeftMixedModel":
        """A PeftMixedModel holding the adapter saved at ``model_id`` (PEFT's or peftfast's files) as
        ``adapter_name``; more can be added with ``load_adapter``. ``model`` is left as it was on any error."""
        hub = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token", "force_download",
                                      "local_files_only") if k in kwargs}
        if config is None:
            config = PeftConfig.from_pretrained(model_id, **hub)
        elif not isinstance(config, PeftConfig):
            raise ValueError(f"The input config must be a PeftConfig, got {config.__class__}")
        check_config_compatible(config)  # prompt learning and methods that cannot be mixed are refused here
        config.inference_mode = not is_trainable
        with UndoLog() as undo:
            undo.call(snapshot_state([model], objects=(getattr(model, "config", None),)))
            with config_mismatch_as_load_error(model_id):
                mixed = cls(model, config, adapter_name)
            mixed.load_adapter(model_id, adapter_name, is_trainable=is_trainable, **kwargs)
        return mixed

    def create_or_update_model_card(self, output_dir: str) -> None:
        raise NotImplementedError(f"Model card creation is not supported for {type(self).__name__} (as in PEFT)")

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, is_main_process: bool = True,
                        **kwargs: Any) -> None:
        """Write each adapter as a PeftModel of its method writes it: adapter_config.json plus
        adapter_model.safetensors (adapter_model.bin when ``safe_serialization=False``), "default" in
        ``save_directory`` and every other adapter in a subfolder named after it, with the keys PEFT uses (no
        adapter name, no nesting of one method's layer inside another's). No model card. One transaction: after an
        error the folder is as before. (PEFT 0.21's PeftMixedModel cannot save at all.)"""
        save_directory, names = checked_save_request(self, save_directory, selected_adapters)
        if not is_main_process:
            return
        tx = SaveTransaction(save_directory)
        write_adapter_folders(tx, self, names, save_directory, safe_serialization,
                              lambda name: get_peft_model_state_dict(self, adapter_name=name, save_embedding_layers=False))
        tx.commit()


__all__ = ["PeftMixedModel"]
