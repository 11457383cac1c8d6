"""Where peftfast plugs into the libraries PEFT users train with.

``import peftfast`` calls ``install()``: it registers post-import hooks (``hooks.when_imported``) on the transformers
modules below, so the patches apply whether transformers is imported before or after peftfast, and importing
peftfast imports none of them. Every patch keeps the original behaviour for models and configs that are not
peftfast's, and none needs the real ``peft`` (it works installed or not).

    transformers.trainer_utils, .trainer, .integrations.neftune   Trainer and trainers built on it (``trainer``)
    transformers.integrations.peft                                 PeftAdapterMixin: model.add_adapter(...) and
                                                                   the rest of transformers' adapter API
                                                                   (``adapter_api``)
    transformers.models.auto.auto_factory                          AutoModelFor...from_pretrained(<adapter
                                                                   folder>) without peft (``adapter_api``)
    trl.trainer.sft_trainer, .dpo_trainer, .grpo_trainer,          TRL's trainers with a peftfast config or
    .kto_trainer, .rloo_trainer, .reward_trainer,                  a peftfast model (``trl``)
    .distillation_trainer

Set ``PEFTFAST_NO_INTEGRATIONS=1`` before importing peftfast to leave every library untouched.
"""
from __future__ import annotations

import os

from . import adapter_api, trainer, trl
from .hooks import when_imported

__all__ = ["install"]

_installed = False


def install() -> None:
    """Register the patches (idempotent)."""
    global _installed
    if _installed or os.environ.get("PEFTFAST_NO_INTEGRATIONS", "") not in ("", "0"):
        return
    _installed = True
    when_imported("transformers.trainer_utils", trainer.patch_trainer_utils)
    when_imported("transformers.trainer", trainer.patch_trainer)
    when_imported("transformers.integrations.neftune", trainer.patch_importer)
    when_imported("transformers.integrations.peft", adapter_api.patch_adapter_mixin)
    when_imported("transformers.models.auto.auto_factory", adapter_api.accept_adapter_folders)
    for module in trl.TRAINER_MODULES:
        when_imported(f"trl.trainer.{module}", trl.patch_module)
