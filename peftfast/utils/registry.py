"""The method registry: PEFT type -> config class, tuner class, state-dict prefix.

This is the bottom of the package: it imports only ``peft_types``. Each method package
(``peftfast.tuners.lora``, ``peftfast.tuners.ia3``) describes itself here by calling
``register_peft_method`` from its ``__init__``, as PEFT's method packages do; everything above
(configs resolving ``peft_type``, ``PeftModel`` choosing its tuner, ``mapping``'s PEFT-compatible
tables) asks this module instead of keeping its own table or importing the methods.

The four ``PEFT_TYPE_TO_*`` dicts are the registry's storage, and ``peftfast.mapping`` re-exports
these very objects, so code written for PEFT that reads (or even writes) them sees one truth.
"""
from __future__ import annotations

from typing import Any, Optional

from .peft_types import PeftType

PEFT_TYPE_TO_CONFIG_MAPPING: dict[PeftType, type] = {}
PEFT_TYPE_TO_TUNER_MAPPING: dict[PeftType, type] = {}
PEFT_TYPE_TO_MIXED_MODEL_MAPPING: dict[PeftType, type] = {}
PEFT_TYPE_TO_PREFIX_MAPPING: dict[PeftType, str] = {}

# Config fields that decide an adapter's weights and math, per method, in the order they are reported when
# PeftModel.load_adapter loads a checkpoint into an existing adapter whose config differs (peftfast's own table,
# filled by register_load_checked_fields; methods that register none are compared on target_modules alone).
PEFT_TYPE_TO_LOAD_CHECKED_FIELDS: dict[PeftType, tuple[str, ...]] = {}


# Prompt-learning methods (prompt tuning, p-tuning, prefix tuning) inject no layers: their PeftModel task wrappers
# hand the call to a handler instead, an object with ``forward(peft_model, task, inputs, kwargs)`` and
# ``generate(peft_model, task, args, kwargs)`` that adds the virtual tokens or past_key_values (and ``add`` to build an
# adapter's encoder); ``peftfast.tuners.prompt_learning`` registers one per method.
PEFT_TYPE_TO_PROMPT_LEARNING_HANDLER: dict[PeftType, Any] = {}


# The trainable-tokens layer class (set by peftfast.tuners.trainable_tokens), which utils.other's
# TrainableTokensWrapper builds without importing the tuners.
_TRAINABLE_TOKENS_LAYER: list[type] = []


def register_trainable_tokens_layer(cls: type) -> None:
    _TRAINABLE_TOKENS_LAYER[:] = [cls]


def trainable_tokens_layer_class() -> type:
    if not _TRAINABLE_TOKENS_LAYER:
        raise RuntimeError("trainable tokens are not available: import peftfast (which registers the "
                           "TrainableTokensLayer) before building a TrainableTokensWrapper")
    return _TRAINABLE_TOKENS_LAYER[0]


class UnknownPeftTypeError(KeyError):
    """A peft_type that no registered method implements."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


def register_peft_method(*, name: str, config_cls: type, model_cls: Optional[type], prefix: Optional[str] = None,
                         is_mixed_compatible: bool = False) -> None:
    """Make a method available (PEFT's signature and checks): ``name`` is the lower-case PeftType name ("lora"),
    ``prefix`` the start of its parameter names (default ``name + "_"``), which ``model_cls.prefix`` must agree
    with. A name can be registered once, and a prefix too, except by a variant of the method holding it (a config
    class derived from that method's: AdaLoRA's config is a LoraConfig and its parameters are ``lora_*``)."""
    if name.endswith("_"):
        raise ValueError(f"Please pass the name of the PEFT method without '_' suffix, got {name}.")
    if not name.islower():
        raise ValueError(f"The name of the PEFT method should be in lower case letters, got {name}.")
    if name.upper() not in {t.value for t in PeftType}:
        raise ValueError(f"Unknown PEFT type {name.upper()}, please add an entry to peftfast.utils.PeftType.")
    peft_type = PeftType(name.upper())
    if prefix is None:
        prefix = name + "_"
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING or peft_type in PEFT_TYPE_TO_TUNER_MAPPING \
            or peft_type in PEFT_TYPE_TO_MIXED_MODEL_MAPPING:
        raise KeyError(f"There is already PEFT method called '{name}', please choose a unique name.")
    holders = [t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == prefix]
    if holders and not all(isinstance(config_cls, type) and issubclass(config_cls, PEFT_TYPE_TO_CONFIG_MAPPING[t])
                           for t in holders):
        raise KeyError(f"There is already a prefix called '{prefix}', please choose a unique prefix.")
    model_prefix = getattr(model_cls, "prefix", None)
    if model_prefix is not None and model_prefix != prefix:
        raise ValueError(f"Inconsistent prefixes found: '{prefix}' and '{model_prefix}' (they should be the same).")
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    if is_mixed_compatible:
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING[peft_type] = model_cls


def register_load_checked_fields(name: str, fields: tuple[str, ...]) -> None:
    """Declare which config fields of method ``name`` must agree when weights are loaded into an existing adapter."""
    PEFT_TYPE_TO_LOAD_CHECKED_FIELDS[PeftType(name.upper())] = tuple(fields)


def as_peft_type(peft_type: object) -> PeftType:
    """``PeftType.LORA``, "LORA" -> PeftType.LORA; UnknownPeftTypeError for anything else."""
    try:
        return PeftType(peft_type.value if isinstance(peft_type, PeftType) else peft_type)
    except (ValueError, TypeError):
        raise UnknownPeftTypeError(f"peft_type {peft_type!r} is not a PEFT method; supported: "
                                   f"{supported_names()}") from None


def supported_names() -> str:
    return ", ".join(t.value for t in PEFT_TYPE_TO_CONFIG_MAPPING)


def config_class(peft_type: object) -> type:
    """The config class registered for ``peft_type``."""
    key = as_peft_type(peft_type)
    if key not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise UnknownPeftTypeError(f"peft_type {key.value} is not supported by peftfast (a PEFT method peftfast does "
                                   f"not implement); supported: {supported_names()}")
    return PEFT_TYPE_TO_CONFIG_MAPPING[key]


def tuner_class(peft_type: object) -> type:
    """The tuner (model) class registered for ``peft_type``."""
    key = as_peft_type(peft_type)
    if PEFT_TYPE_TO_TUNER_MAPPING.get(key) is None:
        raise UnknownPeftTypeError(f"peft_type {key.value} is not supported by peftfast; supported: "
                                   f"{', '.join(t.value for t, c in PEFT_TYPE_TO_TUNER_MAPPING.items() if c)}")
    return PEFT_TYPE_TO_TUNER_MAPPING[key]


def peft_type_of_config_class(config_cls: type) -> Optional[PeftType]:
    """The PeftType whose registered config class is exactly ``config_cls`` (None for a base or foreign class)."""
    return next((t for t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items() if c is config_cls), None)


def parameter_prefix(peft_type: object) -> str:
    """The start of the method's adapter parameter names ("lora_", "ia3_")."""
    return PEFT_TYPE_TO_PREFIX_MAPPING[as_peft_type(peft_type)]


def load_checked_fields(peft_type: object) -> tuple[str, ...]:
    return PEFT_TYPE_TO_LOAD_CHECKED_FIELDS.get(as_peft_type(peft_type), ("target_modules",))


def register_prompt_learning_handler(name: str, handler: Any) -> None:
    """Plug a prompt-learning method's forward/generate into PeftModel's task wrappers."""
    PEFT_TYPE_TO_PROMPT_LEARNING_HANDLER[PeftType(name.upper())] = handler


def prompt_learning_handler(peft_type: object) -> Optional[Any]:
    return PEFT_TYPE_TO_PROMPT_LEARNING_HANDLER.get(as_peft_type(peft_type))
