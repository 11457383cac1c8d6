"""TRL's trainers with a peftfast ``peft_config``: ``SFTTrainer(model, peft_config=peftfast.LoraConfig(...))``.

TRL checks ``isinstance(peft_config, peft.PeftConfig)`` (and needs ``peft`` installed) before it wraps the model
with ``peft.get_peft_model``. The wrapped ``__init__`` does that step with peftfast instead, for a peftfast config
only, and hands TRL the wrapped model without a config. The module's ``is_peft_model`` (accelerate's, which knows
PEFT's class only) also accepts a peftfast model, so TRL patches its fused loss onto the base model; saving, checkpoints and the rest go through the Trainer
integration (``trainer.py``). Any other ``peft_config`` reaches TRL unchanged.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

from ..config import PeftConfig
from ..mapping import get_peft_model

PATCHED = "__peftfast_patched__"
TRAINERS = ("SFTTrainer",)


def wrap_model(model: Any, peft_config: PeftConfig, args: Any) -> Any:
    if isinstance(model, str):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model, **(getattr(args, "model_init_kwargs", None) or {}))
    if getattr(args, "gradient_checkpointing", False) and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


def patch_trainer_class(cls: Any) -> None:
    if getattr(cls.__init__, PATCHED, False):
        return
    original = cls.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind_partial(self, *args, **kwargs)
        config = bound.arguments.get("peft_config")
        if isinstance(config, PeftConfig):
            bound.arguments["model"] = wrap_model(bound.arguments["model"], config, bound.arguments.get("args"))
            bound.arguments["peft_config"] = None
            return original(*bound.args, **bound.kwargs)
        return original(self, *args, **kwargs)

    setattr(__init__, PATCHED, True)
    cls.__init__ = __init__


def patch_module(module: Any) -> None:
    from .trainer import accept_peftfast

    check = getattr(module, "is_peft_model", None)  # accelerate's, imported by name: PEFT's class only
    if check is not None:
        module.is_peft_model = accept_peftfast(check)
    if not hasattr(module, "BaseTunerLayer"):  # imported from peft only when installed; its checks need one
        from ..tuners.tuners_utils import BaseTunerLayer

        module.BaseTunerLayer = BaseTunerLayer
    for name in TRAINERS:
        cls = getattr(module, name, None)
        if cls is not None:
            patch_trainer_class(cls)
