"""``AutoPeftModel`` and ``AutoPeftModelFor<Task>``: load an adapter and the base model it names, in one call.

``AutoPeftModelForCausalLM.from_pretrained(adapter)`` reads ``adapter``'s adapter_config.json, loads the base model
named by its ``base_model_name_or_path`` (at its ``revision``) with the matching transformers auto class (a local
folder, the Hub, or offline from the Hub cache: the usual ``cache_dir`` / ``local_files_only`` / HF_HUB_OFFLINE
rules of ``from_pretrained``), then puts the adapter on it with ``PeftModelFor<Task>.from_pretrained``. A tokenizer
saved with the adapter whose vocabulary differs from the base model's embeddings resizes them first, as PEFT does.

``AutoPeftModel`` is for adapters without a task type: the base class comes from the config's ``auto_mapping``
(written by ``save_pretrained`` for such adapters), imported only from an allowed library (``import_allowlist``,
default: transformers), since the config is data from a file.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Optional

from .config import PeftConfig
from .peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .utils.peft_types import TaskType

DEFAULT_IMPORT_ALLOWLIST = ("transformers",)
HUB_KEYS = ("subfolder", "cache_dir", "token", "force_download", "local_files_only")


def allowed_library(name: str, allowlist: Any) -> bool:
    return any(name == lib or name.startswith(lib + ".") for lib in allowlist)


class BaseAutoPeftModel:
    """Shared ``from_pretrained``; subclasses name the transformers auto class and the PeftModel class."""

    target_auto_class: Optional[str] = None  # attribute of ``transformers``
    target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise EnvironmentError(f"{type(self).__name__} is not instantiated directly; use "
                               f"{type(self).__name__}.from_pretrained(adapter_name_or_path)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[PeftConfig] = None,
                        revision: Optional[str] = None, import_allowlist: Optional[list[str]] = None,
                        **kwargs: Any) -> PeftModel:
        """Load the base model named in the adapter's config, then the adapter on it.

        ``kwargs`` go to the base model's ``from_pretrained`` (``dtype``, ``quantization_config``, ``device_map``,
        ...); the Hub keywords among them (``cache_dir``, ``token``, ``local_files_only``, ...) are used for the
        adapter too. ``revision`` is the adapter's revision; the base model's comes from the adapter config.

        Raises:
            ValueError: the config has no base_model_name_or_path; its task type does not match this class
                (e.g. a SEQ_CLS adapter through AutoPeftModelForCausalLM); ``AutoPeftModel`` with a task-type
                adapter; an auto_mapping library outside ``import_allowlist``; no way to pick the base class.
        """
        hub = {k: kwargs[k] for k in HUB_KEYS if k in kwargs}
        adapter_hub = dict(hub, **({"revision": revision} if revision is not None else {}))
        peft_config = PeftConfig.from_pretrained(pretrained_model_name_or_path, **adapter_hub)
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(f"{pretrained_model_name_or_path}: adapter_config.json has no base_model_name_or_path, "
                             "so the base model is unknown; load it yourself and use PeftModel.from_pretrained(model, "
                             "adapter)")
        target = cls.resolve_base_class(peft_config, import_allowlist)
        base_kwargs = {k: v for k, v in kwargs.items() if k != "subfolder"}
        if getattr(peft_config, "revision", None) is not None:
            base_kwargs.setdefault("revision", peft_config.revision)
        base_model = target.from_pretrained(base_path, **base_kwargs)
        resize_to_saved_tokenizer(base_model, pretrained_model_name_or_path, kwargs)
        return cls.target_peft_class.from_pretrained(
            base_model, pretrained_model_name_or_path, adapter_name=adapter_name, is_trainable=is_trainable,
            config=config, **adapter_hub)

    @classmethod
    def resolve_base_class(cls, peft_config: PeftConfig, import_allowlist: Optional[list[str]]) -> Any:
        task = peft_config.task_type
        task = task.value if isinstance(task, TaskType) else task
        if task is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task)
            if cls.target_auto_class is None:
                raise ValueError(f"AutoPeftModel loads adapters without a task type; this one has task_type={task!r}: "
                                 f"use AutoPeftModelFor... for it ({expected.__name__ if expected else task})")
            if expected is not None and expected is not cls.target_peft_class:
                raise ValueError(f"Expected target PEFT class: {expected.__name__}, but you have asked for: "
                                 f"{cls.target_peft_class.__name__} (the adapter's task_type is {task!r}); use the "
                                 "AutoPeftModelFor... class of that task")
        if cls.target_auto_class is not None:
            import transformers

            return getattr(transformers, cls.target_auto_class)
        mapping = peft_config.auto_mapping or {}
        class_name, library = mapping.get("base_model_class"), mapping.get("parent_library")
        if not class_name or not library:
            raise ValueError("the adapter has neither a task_type nor an auto_mapping naming its base model class; "
                             "use the AutoPeftModelFor... class of its task")
        allowlist = DEFAULT_IMPORT_ALLOWLIST if import_allowlist is None else tuple(import_allowlist)
        if not allowed_library(library, allowlist):
            raise ValueError(f"auto_mapping names the library {library!r}, which is not in import_allowlist "
                             f"{list(allowlist)}; pass import_allowlist=[...] including it if you trust this adapter")
        return getattr(importlib.import_module(library), class_name)


def resize_to_saved_tokenizer(model: Any, folder: str, kwargs: dict) -> None:
    """A tokenizer saved next to a local adapter with a different vocabulary size: resize the embeddings to it."""
    if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=kwargs.get("trust_remote_code", False))
    embeddings = model.get_input_embeddings()
    if embeddings is not None and len(tokenizer) != embeddings.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(BaseAutoPeftModel):
    """An adapter without a task type, on the base class its config's auto_mapping names."""


class AutoPeftModelForCausalLM(BaseAutoPeftModel):
    target_auto_class = "AutoModelForCausalLM"
    target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(BaseAutoPeftModel):
    target_auto_class = "AutoModelForSeq2SeqLM"
    target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(BaseAutoPeftModel):
    target_auto_class = "AutoModelForSequenceClassification"
    target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(BaseAutoPeftModel):
    target_auto_class = "AutoModelForTokenClassification"
    target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(BaseAutoPeftModel):
    target_auto_class = "AutoModelForQuestionAnswering"
    target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(BaseAutoPeftModel):
    target_auto_class = "AutoModel"
    target_peft_class = PeftModelForFeatureExtraction
