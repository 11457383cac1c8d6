"""AdaptionPromptModel: wraps the attention modules of the last ``adapter_layers`` decoder layers with
``AdaptedAttention`` (LLaMA-Adapter, https://huggingface.co/papers/2303.16199).

PEFT 0.21 keeps one set of wrapped modules per adapter and swaps them in and out of the model; here every adapter's
prompt and gate sit side by side in one wrapper per attention module (``adaption_prompt.<name>``,
``adaption_gate.<name>``), and the active adapter picks which one runs. On disk the keys are PEFT's
(``...self_attn.adaption_prompt``, ``...self_attn.adaption_gate``). As in PEFT, one adapter is active at a time,
adapters cannot be merged, and the supported model types are Llama and Mistral.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ...config import ConfigError
from ...utils.errors import AdapterError
from ...utils.other import get_submodules
from ...utils.undo import UndoLog
from ..tuners_utils import BaseTuner, adapter_internal_names
from .config import TRANSFORMERS_MODEL_TO_ADAPTION_PROMPT_TARGET, AdaptionPromptConfig
from .layer import AdaptedAttention


def is_adaption_prompt_trainable(name: str) -> bool:
    """Whether a parameter name belongs to an adaption prompt (a component starting with ``adaption_``)."""
    return any(part.startswith("adaption_") for part in name.split("."))


class AdaptionPromptModel(BaseTuner):
    """The tuner of adaption prompts (PEFT's ``AdaptionPromptModel`` surface: add/set/delete adapters, disable,
    unload)."""

    prefix = "adaption_prompt_"
    tuner_layer_cls = AdaptedAttention
    target_module_mapping = TRANSFORMERS_MODEL_TO_ADAPTION_PROMPT_TARGET

    def __init__(self, model: nn.Module, configs: Any, adapter_name: str = "default",
                 low_cpu_mem_usage: bool = False, autocast_adapter_dtype: bool = True) -> None:
        super().__init__(model, configs, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                         autocast_adapter_dtype=autocast_adapter_dtype)

    def _prepare_adapter_config(self, config: Any, model_config: dict) -> Any:
        model_type = model_config.get("model_type")
        if model_type not in TRANSFORMERS_MODEL_TO_ADAPTION_PROMPT_TARGET:
            also = " (PEFT 0.21 also has GPT-2 adaption prompts; peftfast does not implement them)" \
                if model_type == "gpt2" else ""
            raise ValueError(f"Unsupported model type for adaption prompt: '{model_type}'. Supported model types: "
                             f"{', '.join(sorted(TRANSFORMERS_MODEL_TO_ADAPTION_PROMPT_TARGET))}{also}")
        if config.target_modules is None:
            config.target_modules = TRANSFORMERS_MODEL_TO_ADAPTION_PROMPT_TARGET[model_type]
        for name in ("adapter_len", "adapter_layers"):
            if getattr(config, name) is None:
                raise ConfigError(f"AdaptionPromptConfig.{name} must be set to a positive integer, got None")
        return config

    def _attention_keys(self, config: AdaptionPromptConfig, model: nn.Module) -> list[str]:
        """Names of the attention modules to wrap, in model order (the decoder layers' order)."""
        inside = adapter_internal_names(model)
        suffix = "." + config.target_modules
        return [k for k, _ in model.named_modules() if k.endswith(suffix) and k not in inside]

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False) -> None:
        """Wrap (or extend the wrappers of) the last ``adapter_layers`` attention modules; all or nothing."""
        config = self.peft_config[adapter_name]
        if not isinstance(config, AdaptionPromptConfig):
            raise AdapterError(f"AdaptionPromptModel takes AdaptionPromptConfig adapters, got {type(config).__name__}")
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        keys = self._attention_keys(config, model)
        if len(keys) < config.adapter_layers:
            raise ValueError(f"Config specifies more adapter layers '{config.adapter_layers}' than the model has "
                             f"'{len(keys)}' (attention modules named '{config.target_modules}'); adapter_layers "
                             f"must be between 1 and {len(keys)}")
        planned = keys[-config.adapter_layers:]
        active = adapter_name in self.active_adapters
        with UndoLog() as undo:
            for key in planned:
                parent, target, target_name = get_submodules(model, key)
                if isinstance(target, AdaptedAttention):
                    undo.delete_adapter(target, adapter_name)
                    target.update_layer(adapter_name, config)
                else:
                    layer = AdaptedAttention(target, adapter_name, config)
                    undo.replace(parent, target_name, target)
                    setattr(parent, target_name, layer)
        self.targeted_module_names = sorted(set(self.targeted_module_names) | set(planned))
        for layer in self._tuner_layers():
            layer._active_adapter = list(self.active_adapters)
            if adapter_name in layer.adaption_prompt:
                for container in (layer.adaption_prompt, layer.adaption_gate):
                    container[adapter_name].requires_grad_(active and not config.inference_mode)
        self._mark_only_adapters_as_trainable(model)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if not is_adaption_prompt_trainable(name):
                p.requires_grad = False

    def _cast_adapter_dtype(self, adapter_name: str) -> None:
        """Prompts and gates are kept in the attention's dtype, as PEFT keeps them (no float32 autocast)."""

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = self._check_adapter_names(adapter_name)
        if len(names) != 1:
            raise AdapterError(f"adaption prompts are active one at a time; got {names!r}, pass one adapter name")
        if inference_mode:
            raise ValueError("inference_mode is not supported for AdaptionPromptModel.")
        super().set_adapter(names[0])

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter; when it was active, the first remaining adapter (in the order they were added)
        becomes active, as in PEFT. Attention modules left without any adapter are unwrapped."""
        self._check_adapter_names(adapter_name)
        was_active = adapter_name in self.active_adapters
        del self.peft_config[adapter_name]
        for key, layer in [(k, m) for k, m in self.model.named_modules() if isinstance(m, AdaptedAttention)]:
            layer.delete_adapter(adapter_name)
            if not layer.adaption_prompt:
                parent, _, target_name = get_submodules(self.model, key)
                setattr(parent, target_name, layer.base_layer)
        self.targeted_module_names = sorted(k for k, m in self.model.named_modules() if isinstance(m, AdaptedAttention))
        if was_active:
            remaining = list(self.peft_config)
            if remaining:
                self.set_adapter(remaining[0])
            else:
                self.active_adapter = []
                for layer in self._tuner_layers():
                    layer._active_adapter = []

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        raise AdapterError("adaption prompts cannot be merged into the base weights (the prompt attention has its own "
                           "softmax); use unload() to get the base model back")

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        self.merge_adapter()
        return self.model  # not reached
