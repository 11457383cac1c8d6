"""transformers ``Trainer`` (and every trainer built on it) treats a peftfast ``PeftModel`` as it treats PEFT's.

transformers recognises an adapter model only through ``isinstance(model, peft.PeftModel)`` (``_is_peft_model`` in
``trainer_utils``, imported by name into ``trainer`` and ``integrations.neftune``), and only when ``peft`` is
installed. Everything Trainer does differently for such a model hangs off that test:

- the forward signature it reads to drop unused dataset columns and to find label names is the base model's
  (``unwrap_peft_model``), not the wrapper's ``forward(*args, **kwargs)``;
- a 4-bit / 8-bit base with trainable adapters is not refused as "purely quantized"
  (``validate_quantization_for_training``);
- ``resume_from_checkpoint`` and ``load_best_model_at_end`` load the adapter with ``model.load_adapter``;
- NEFTune finds the embedding through the base model.

``patch_trainer_utils`` makes that test also accept peftfast models (the original answer is kept for every other
model). ``Trainer._save`` picks its saving path with its own ``isinstance`` check on PEFT's class, so
``patch_trainer`` wraps it: for a peftfast model it writes PEFT's adapter files with ``save_pretrained`` (and, as
Trainer does, the processing class and ``training_args.bin``); any other model goes to the original ``_save``.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Optional

from ..peft_model import PeftModel

PATCHED = "__peftfast_patched__"


def is_peftfast_model(model: Any) -> bool:
    return isinstance(model, PeftModel)


def accept_peftfast(original: Any) -> Any:
    """``_is_peft_model`` that also answers True for a peftfast PeftModel."""
    if getattr(original, PATCHED, False):
        return original

    @functools.wraps(original)
    def is_peft_model(model: Any) -> bool:
        return is_peftfast_model(model) or original(model)

    setattr(is_peft_model, PATCHED, True)
    is_peft_model.original = original
    return is_peft_model


def replace_global(module: Any, name: str, original: Any, replacement: Any) -> None:
    """Rebind ``module.name`` when it still is ``original`` (a module that imported the name before the patch)."""
    if getattr(module, name, None) is original:
        setattr(module, name, replacement)


def patch_trainer_utils(module: Any) -> None:
    original = getattr(module, "_is_peft_model", None)
    if original is None or getattr(original, PATCHED, False):
        return
    patched = accept_peftfast(original)
    module._is_peft_model = patched
    import sys

    for name in ("transformers.trainer", "transformers.integrations.neftune"):
        importer = sys.modules.get(name)
        if importer is not None:
            replace_global(importer, "_is_peft_model", original, patched)


def patch_importer(module: Any) -> None:
    """A module that did ``from .trainer_utils import _is_peft_model``: give it the patched function."""
    import sys

    utils = sys.modules.get("transformers.trainer_utils")
    patched = getattr(utils, "_is_peft_model", None)
    if patched is not None and getattr(patched, PATCHED, False):
        replace_global(module, "_is_peft_model", patched.original, patched)


def patch_trainer(module: Any) -> None:
    patch_importer(module)
    trainer_cls = getattr(module, "Trainer", None)
    if trainer_cls is None or getattr(trainer_cls._save, PATCHED, False):
        return
    original_save = trainer_cls._save

    @functools.wraps(original_save)
    def _save(self: Any, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not is_peftfast_model(unwrapped):
            return original_save(self, output_dir, state_dict)
        save_adapter_checkpoint(self, unwrapped, output_dir, state_dict)

    setattr(_save, PATCHED, True)
    trainer_cls._save = _save


def save_adapter_checkpoint(trainer: Any, model: PeftModel, output_dir: Optional[str],
                            state_dict: Optional[dict]) -> None:
    """What ``Trainer._save`` does for a PEFT model: adapter files, the processing class, the training arguments."""
    import torch

    output_dir = output_dir if output_dir is not None else trainer.args.output_dir
    should_save = trainer.args.should_save
    if should_save:
        os.makedirs(output_dir, exist_ok=True)
    if state_dict is not None and trainer.model is not model:
        # a state dict of a wrapper (DDP/compile) carries its prefix; save_pretrained reads the model's own names
        own = model.state_dict().keys()
        if not set(state_dict).issubset(own):
            state_dict = None
    model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=should_save)
    if not should_save:
        return
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(output_dir)
    elif getattr(trainer.data_collator, "tokenizer", None) is not None:
        trainer.data_collator.tokenizer.save_pretrained(output_dir)
    from transformers.trainer import TRAINING_ARGS_NAME

    torch.save(trainer.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
