"""PeftModel and its task-specific subclasses: PEFT's wrapper surface over a tuner.

``peft_model.base_model`` is the tuner (LoraModel, IA3Model); ``peft_model.base_model.model`` is
the user's model with adapter layers injected. Attribute access falls through to both, so
``peft_model.generate``, ``peft_model.config`` and ``peft_model.merge_and_unload`` work as in PEFT.
Every operation that changes adapters is all-or-nothing: on error the model, its adapters,
``peft_config`` and which parameters train are exactly as before.
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
from .tuners.tuners_utils import AdapterError, BaseTunerLayer
from .utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .utils.io import atomic_write, atomic_write_text
from .utils.peft_types import PeftType, TaskType
from .utils.save_and_load import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

_HEADS: dict[str, list[str]] = {
    TaskType.SEQ_CLS.value: ["classifier", "score"],
    TaskType.TOKEN_CLS.value: ["classifier", "score"],
    TaskType.QUESTION_ANS.value: ["qa_outputs"],
}


def validate_adapter_name(name: Any) -> str:
    """Adapter names become folder names and state-dict key parts: keep them to one plain path component."""
    if not isinstance(name, str) or not name.strip():
        raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
    bad = [c for c in ("/", "\\", "\x00", ".", ":") if c in name]
    if bad or name in ("..", ".") or name.startswith("~") or os.path.isabs(name):
        raise AdapterError(
            f"adapter name {name!r} is not allowed: it must not contain path separators, '.', ':' or NUL "
            "(it names a subfolder when saving and a component of parameter names)"
        )
    return name


def _add_head_modules(config: PeftConfig, task_type: Optional[str]) -> None:
    heads = _HEADS.get(task_type.value if isinstance(task_type, TaskType) else str(task_type))
    if not heads or not hasattr(config, "modules_to_save"):
        return
    current = list(config.modules_to_save or [])
    config.modules_to_save = current + [h for h in heads if h not in current]


def _tuner_cls(peft_type: Any) -> type:
    from .mapping import PEFT_TYPE_TO_TUNER_MAPPING

    key = PeftType(peft_type.value if isinstance(peft_type, PeftType) else peft_type)
    if key not in PEFT_TYPE_TO_TUNER_MAPPING:
        raise ValueError(f"peft_type {key.value} is not supported by peftfast; supported: "
                         f"{', '.join(t.value for t in PEFT_TYPE_TO_TUNER_MAPPING)}")
    return PEFT_TYPE_TO_TUNER_MAPPING[key]


class PeftModel(nn.Module):
    """Base model with adapters (same constructor and methods as ``peft.PeftModel``)."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        validate_adapter_name(adapter_name)
        _add_head_modules(peft_config, getattr(self, "_task_type", None))
        self.peft_type = peft_config.peft_type
        self.special_peft_forward_args = {"adapter_names"}
        self._is_prompt_learning = False
        cls = _tuner_cls(peft_config.peft_type)
        self.base_model = cls(model, {adapter_name: peft_config}, adapter_name,
                              autocast_adapter_dtype=autocast_adapter_dtype)
        if getattr(model, "is_gradient_checkpointing", False) and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if hasattr(self.base_model, "config") and hasattr(self.base_model.config, "pretraining_tp"):
            self.base_model.config.pretraining_tp = 1

    # -- attributes -----------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @peft_config.setter
    def peft_config(self, value: dict[str, PeftConfig]) -> None:
        self.base_model.peft_config = value

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def base_model_torch_dtype(self) -> Optional[torch.dtype]:
        return getattr(self.base_model, "dtype", None)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.base_model._enable_peft_forward_hooks(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model()(*args, **kwargs)

    # -- parameter counts -----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = 0, 0
        for _, p in self.named_parameters():
            n = p.numel()
            if p.__class__.__name__ == "Params4bit":  # two 4-bit values per stored byte
                itemsize = getattr(getattr(p, "quant_storage", None), "itemsize", None) or p.element_size()
                n = n * 2 * itemsize
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- adapters (all-or-nothing) --------------------------------------------------------------------
    def _snapshot(self) -> Callable[[], None]:
        """A function that restores adapters, peft_config, the active adapter and requires_grad flags."""
        requires_grad = [(p, p.requires_grad) for p in self.parameters()]
        configs = dict(self.peft_config)
        active = copy.copy(self.base_model.active_adapter)
        modules = dict(self.base_model.model.named_modules())
        structure = {name: [(child_name, child) for child_name, child in m.named_children()]
                     for name, m in modules.items()}
        layer_state = {m: (m.active_adapters, m.disable_adapters, list(m.merged_adapters))
                       for m in modules.values() if isinstance(m, BaseTunerLayer)}

        def restore() -> None:
            for name, children in structure.items():
                module = modules[name]
                for child_name, child in children:
                    if getattr(module, child_name, None) is not child:
                        setattr(module, child_name, child)
            for layer, (act, disabled, merged) in layer_state.items():
                for extra in layer.available_adapters() - set(configs):
                    layer.delete_adapter(extra)
                layer._active_adapter = act
                layer._disable_adapters = disabled
                layer.merged_adapters = merged
            for m in self.base_model.model.modules():
                if hasattr(m, "modules_to_save") and isinstance(m.modules_to_save, nn.ModuleDict):
                    for extra in [k for k in m.modules_to_save if k not in configs]:
                        m.delete_adapter(extra)
            self.base_model.peft_config.clear()
            self.base_model.peft_config.update(configs)
            self.base_model.active_adapter = active
            for p, flag in requires_grad:
                p.requires_grad_(flag)

        return restore

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add (but do not activate) a new adapter."""
        validate_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterError(f"adapter {adapter_name!r} already exists; existing adapters: "
                               f"{', '.join(self.peft_config)}. Pick another name or delete_adapter() it first.")
        if PeftType(peft_config.peft_type) != PeftType(self.peft_type):
            raise AdapterError(f"cannot combine adapter types: this model has {PeftType(self.peft_type).value} "
                               f"adapters and the new config is {PeftType(peft_config.peft_type).value}")
        _add_head_modules(peft_config, getattr(self, "_task_type", None))
        restore = self._snapshot()
        try:
            self.peft_config[adapter_name] = peft_config
            self.base_model.inject_adapter(self.base_model.model, adapter_name)
        except BaseException:
            restore()
            raise

    def set_adapter(self, adapter_name: str) -> None:
        if isinstance(adapter_name, str):
            if adapter_name not in self.peft_config:
                raise AdapterError(f"adapter {adapter_name!r} not found; available: {', '.join(self.peft_config)}")
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterError(f"adapter {adapter_name!r} not found; available: {', '.join(self.peft_config)}")
        self.base_model.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self):
        """Run the base model without adapters inside the ``with`` block."""
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers()

    # -- saving and loading ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, save_embedding_layers: str | bool = "auto",
                        is_main_process: bool = True, **kwargs: Any) -> None:
        """Write adapter_config.json and adapter_model.safetensors (or .bin) per adapter, as PEFT does:
        the "default" adapter at the top, every other adapter in a subfolder named after it."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} should be a directory, not a file")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterError(f"selected_adapters {unknown} not found; available: {', '.join(self.peft_config)}")
        for name in names:
            validate_adapter_name(name)
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        self.create_or_update_model_card(save_directory)
        for name in names:
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(out, exist_ok=True)
            state = get_peft_model_state_dict(self, adapter_name=name, save_embedding_layers=save_embedding_layers)
            state = _contiguous_unshared(state)
            if safe_serialization:
                from safetensors.torch import save_file

                atomic_write(os.path.join(out, SAFETENSORS_WEIGHTS_NAME),
                             lambda tmp, s=state: save_file(s, tmp, metadata={"format": "pt"}))
            else:
                atomic_write(os.path.join(out, WEIGHTS_NAME), lambda tmp, s=state: torch.save(s, tmp))
            config = copy.deepcopy(self.peft_config[name])
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = self.get_base_model().__dict__.get("name_or_path", None)
            config.inference_mode = True
            auto_mapping = None
            if config.task_type is None:
                base = self.get_base_model()
                auto_mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
            _save_config(config, out, auto_mapping)

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write README.md with the library tag and base model (front matter updated, body kept)."""
        path = os.path.join(output_dir, "README.md")
        base = None
        for config in self.peft_config.values():
            base = base or config.base_model_name_or_path
        base = base or self.get_base_model().__dict__.get("name_or_path", None)
        tags = ["peftfast", "lora" if PeftType(self.peft_type) == PeftType.LORA else str(self.peft_type).lower()]
        if base:
            tags.insert(0, f"base_model:adapter:{base}")
        front = ["---", "library_name: peft"]
        if base:
            front.append(f"base_model: {base}")
        front.append("tags:")
        front.extend(f"- {t}" for t in tags)
        front.append("---")
        body = f"\n# Adapter\n\nAdapter weights ({', '.join(self.peft_config)}) saved by peftfast in PEFT's format.\n"
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                existing = f.read()
            if existing.startswith("---"):
                end = existing.find("\n---", 3)
                body = existing[end + 4:] if end != -1 else existing
            else:
                body = "\n" + existing
        atomic_write_text(path, "\n".join(front) + "\n\n" + body.lstrip("\n"))

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, **kwargs: Any) -> "PeftModel":
        """Load an adapter saved by peftfast or PEFT onto ``model``. If anything fails, ``model`` is unchanged."""
        from .mapping import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

        validate_adapter_name(adapter_name)
        hub = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token", "force_download",
                                      "local_files_only") if k in kwargs}
        if config is None:
            config = PeftConfig.from_pretrained(model_id, **hub)
        elif not isinstance(config, PeftConfig):
            raise TypeError(f"config must be a PeftConfig, got {type(config).__name__}")
        weights = load_peft_weights(model_id, **hub)
        config.inference_mode = not is_trainable
        if cls is PeftModel and config.task_type is not None:
            task = config.task_type.value if isinstance(config.task_type, TaskType) else config.task_type
            cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task, PeftModel)
        children = {name: list(m.named_children()) for name, m in model.named_modules()}
        modules = dict(model.named_modules())
        grads = [(p, p.requires_grad) for p in model.parameters()]
        try:
            peft_model = cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
            set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
        except BaseException:
            for name, kids in children.items():
                for child_name, child in kids:
                    if getattr(modules[name], child_name, None) is not child:
                        setattr(modules[name], child_name, child)
            for p, flag in grads:
                p.requires_grad_(flag)
            if hasattr(model, "peft_config"):
                del model.peft_config
            raise
        if not is_trainable:
            peft_model.requires_grad_(False)
        return peft_model

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     torch_device: Optional[str] = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False, **kwargs: Any):
        """Load another adapter into this model (not activated). On any error nothing changes."""
        validate_adapter_name(adapter_name)
        hub = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token", "force_download",
                                      "local_files_only") if k in kwargs}
        config = PeftConfig.from_pretrained(model_id, **hub)
        weights = load_peft_weights(model_id, device=torch_device, **hub)
        config.inference_mode = not is_trainable
        restore = self._snapshot()
        try:
            if adapter_name not in self.peft_config:
                self.add_adapter(adapter_name, config)
            result = set_peft_model_state_dict(self, weights, adapter_name=adapter_name)
        except BaseException:
            restore()
            raise
        if not is_trainable:
            for name, p in self.named_parameters():
                if f".{adapter_name}." in name or name.endswith(f".{adapter_name}"):
                    p.requires_grad_(False)
        return result


def _save_config(config: PeftConfig, out: str, auto_mapping: Optional[dict]) -> None:
    config.auto_mapping = auto_mapping
    config.save_pretrained(out)


def _contiguous_unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared or non-contiguous storage: give each tensor its own contiguous copy."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr() if v.device.type != "meta" else id(v)
        if ptr in seen or not v.is_contiguous():
            v = v.contiguous().clone()
        seen.add(ptr)
        out[k] = v.cpu() if v.device.type != "cpu" else v
    return out


class PeftModelForCausalLM(PeftModel):
    """Causal LM with adapters; ``generate`` works as on the base model."""

    _task_type = TaskType.CAUSAL_LM

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self.base_model._enable_peft_forward_hooks(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            return self.get_base_model().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModelForCausalLM):
    _task_type = TaskType.SEQ_2_SEQ_LM


class PeftModelForSequenceClassification(PeftModel):
    """The classifier head ("classifier" or "score") is trained and saved in full (modules_to_save)."""

    _task_type = TaskType.SEQ_CLS


class PeftModelForTokenClassification(PeftModel):
    _task_type = TaskType.TOKEN_CLS


class PeftModelForQuestionAnswering(PeftModel):
    _task_type = TaskType.QUESTION_ANS


class PeftModelForFeatureExtraction(PeftModel):
    _task_type = TaskType.FEATURE_EXTRACTION
