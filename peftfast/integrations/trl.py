"""TRL's trainers with peftfast: ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``, ``KTOTrainer``, ``RLOOTrainer``,
``RewardTrainer`` and ``DistillationTrainer`` given ``peft_config=peftfast.LoraConfig(...)`` or a model already
wrapped by ``peftfast.get_peft_model``.

TRL checks ``isinstance(peft_config, peft.PeftConfig)`` (and needs ``peft`` installed) before it wraps the model
with ``peft.get_peft_model``. The wrapped ``__init__`` does that step with peftfast instead, for a peftfast config
only, and hands TRL the wrapped model without a config. The module's ``is_peft_model`` (accelerate's, which knows
PEFT's class only) also accepts a peftfast model, so TRL patches its fused loss onto the base model; saving,
checkpoints and the rest go through the Trainer integration (``trainer.py``). Any other ``peft_config`` reaches
TRL unchanged.

DPOTrainer (and GRPO, KTO, RLOO) without a ``ref_model`` takes the reference log-probs from the policy itself: with
a new adapter (``peft_config``) from the model with its adapters disabled; with a model that already carries an
adapter, from a frozen copy TRL adds under the name "ref". Handing TRL a wrapped model would take the second path
for a new adapter too, so the wrapped ``__init__`` removes the "ref" copy it made TRL add, as PEFT's path never
creates it. ``use_adapter`` (TRL's switch between the policy and the reference, which requires ``peft`` installed)
runs peftfast's own ``disable_adapter`` / ``set_adapter`` for a peftfast model. Without ``peft``, the names TRL
imports from it for a wrapped model's checks (``LoraConfig``, ``peft.__version__``) are peftfast's.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import types
from typing import Any, Iterator, Optional

from ..config import PEFT_FORMAT_VERSION, PeftConfig
from ..mapping import get_peft_model
from ..peft_model import PeftModel

PATCHED = "__peftfast_patched__"
TRAINERS = ("SFTTrainer", "DPOTrainer", "GRPOTrainer", "KTOTrainer", "RLOOTrainer", "RewardTrainer",
            "DistillationTrainer")
TRAINER_MODULES = ("sft_trainer", "dpo_trainer", "grpo_trainer", "kto_trainer", "rloo_trainer", "reward_trainer",
                   "distillation_trainer")
# how a trainer loads a model given by path, where not as a causal LM: (transformers' auto class, init kwargs)
SEQUENCE_CLASSIFIERS = {"RewardTrainer": ("AutoModelForSequenceClassification", {"num_labels": 1})}
REFERENCE_ADAPTER = "ref"  # the name DPOTrainer gives its frozen copy of a wrapped model's adapter


def wrap_model(model: Any, peft_config: PeftConfig, args: Any, quantization_config: Any = None,
               load: Optional[Any] = None, trainer: str = "") -> Any:
    """What TRL's trainers do with a model and ``peft_config`` before their own set-up, with peftfast's
    ``get_peft_model``: ``set_seed(args.seed)`` first (the adapters' random init, and a model loaded from a path,
    then depend on the run's seed only, as with PEFT: TRL seeds there for that reason), a model given by path loaded
    as TRL loads it (``load``: TRL's ``create_model_from_path`` when it has one; ``args.model_init_kwargs``, the
    trainer's ``quantization_config``), input gradients for activation checkpointing, and under DeepSpeed ZeRO-3
    the adapters kept in the model's dtype for a model that is not quantised (TRL passes
    ``autocast_adapter_dtype=False`` there)."""
    from transformers import set_seed

    set_seed(getattr(args, "seed", 42))  # TRL's configs default to seed 42 when args is None
    if isinstance(model, str):
        kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
        if quantization_config is not None:
            if "quantization_config" in kwargs:
                raise ValueError("You set `quantization_config` both as a trainer argument and in "
                                 "`args.model_init_kwargs`; set it in one place only")
            kwargs["quantization_config"] = quantization_config
        state = getattr(args, "distributed_state", None)
        if state is not None and str(getattr(state, "distributed_type", "")).split(".")[-1] in ("MULTI_GPU",
                                                                                               "DEEPSPEED"):
            kwargs["device_map"] = None  # as TRL: device_map="auto" fails under distributed training
        if hasattr(args, "trust_remote_code"):
            kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        import transformers

        auto, extra = SEQUENCE_CLASSIFIERS.get(trainer, ("AutoModelForCausalLM", {}))
        kwargs.update(extra)
        if load is not None:
            model = load(model, getattr(transformers, auto), **kwargs) if extra else load(model, **kwargs)
        else:
            model = getattr(transformers, auto).from_pretrained(model, **kwargs)
    if getattr(args, "gradient_checkpointing", False) and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    quantised = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", None) == 3 and not quantised:
        return get_peft_model(model, peft_config, autocast_adapter_dtype=False)
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
            load = getattr(inspect.getmodule(original), "create_model_from_path", None)
            by_path = isinstance(bound.arguments["model"], str)
            model = wrap_model(bound.arguments["model"], config, bound.arguments.get("args"),
                               bound.arguments.get("quantization_config"), load, cls.__name__)
            bound.arguments["model"] = model
            bound.arguments["peft_config"] = None
            if by_path and "quantization_config" in bound.arguments:
                bound.arguments["quantization_config"] = None  # it loaded the model above
            original(*bound.args, **bound.kwargs)
            if REFERENCE_ADAPTER in model.peft_config:
                # made by DPOTrainer for a pre-wrapped model; a new adapter's reference is the disabled adapter
                model.delete_adapter(REFERENCE_ADAPTER)
            return None
        return original(self, *args, **kwargs)

    setattr(__init__, PATCHED, True)
    cls.__init__ = __init__


@contextlib.contextmanager
def peftfast_use_adapter(model: PeftModel, adapter_name: Optional[str]) -> Iterator[None]:
    """TRL's ``use_adapter`` for a peftfast model: all adapters disabled (``None``) or ``adapter_name`` active."""
    if adapter_name is None:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(adapter_name)
    try:
        yield
    finally:
        model.set_adapter(previous)


def accept_peftfast_in_use_adapter(original: Any) -> Any:
    if getattr(original, PATCHED, False):
        return original

    @functools.wraps(original)
    def use_adapter(model: Any, adapter_name: Optional[str]) -> Any:
        if isinstance(model, PeftModel):
            return peftfast_use_adapter(model, adapter_name)
        return original(model, adapter_name)

    setattr(use_adapter, PATCHED, True)
    return use_adapter


def patch_module(module: Any) -> None:
    from .trainer import accept_peftfast

    check = getattr(module, "is_peft_model", None)  # accelerate's, imported by name: PEFT's class only
    if check is not None:
        module.is_peft_model = accept_peftfast(check)
    if not hasattr(module, "BaseTunerLayer"):  # imported from peft only when installed; its checks need one
        from ..tuners.tuners_utils import BaseTunerLayer

        module.BaseTunerLayer = BaseTunerLayer
    if not hasattr(module, "LoraConfig"):  # likewise: a wrapped model's target_parameters check reads both
        from ..tuners.lora import LoraConfig

        module.LoraConfig = LoraConfig
    # DistillationTrainer refuses prompt-learning adapters by an isinstance check of the model's configs
    from ..config import PromptLearningConfig

    theirs = getattr(module, "PromptLearningConfig", None)
    if theirs is None:
        module.PromptLearningConfig = PromptLearningConfig
    elif isinstance(theirs, type) and theirs is not PromptLearningConfig:
        module.PromptLearningConfig = (theirs, PromptLearningConfig)  # only ever used as isinstance's second argument
    if not hasattr(module, "peft"):
        module.peft = types.SimpleNamespace(__version__=PEFT_FORMAT_VERSION)
    switch = getattr(module, "use_adapter", None)
    if switch is not None:
        module.use_adapter = accept_peftfast_in_use_adapter(switch)
    for name in TRAINERS:
        cls = getattr(module, name, None)
        if cls is not None:
            patch_trainer_class(cls)
