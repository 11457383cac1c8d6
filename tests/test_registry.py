"""The method registry: each method package registers itself, and every table reads the registry.

PEFT type -> config class, tuner class and parameter prefix come from ``register_peft_method``
calls in ``peftfast.tuners.lora`` and ``peftfast.tuners.ia3``; ``peftfast.mapping``'s PEFT-named
tables are the registry's own dicts; the function has PEFT 0.21's signature and checks.
"""

from __future__ import annotations

import inspect

import peft
import peft.utils
import pytest

import peftfast
import peftfast.mapping
import peftfast.utils
from peftfast.utils import registry
from peftfast.utils.peft_types import PeftType


def test_register_peft_method_has_peft_signature():
    ours = inspect.signature(peftfast.utils.register_peft_method)
    theirs = inspect.signature(peft.utils.register_peft_method)
    assert list(ours.parameters) == list(theirs.parameters)
    for name, p in theirs.parameters.items():
        assert ours.parameters[name].kind == p.kind, name
        assert ours.parameters[name].default == p.default, name


def test_methods_register_themselves_as_peft_does():
    ours = {t.value for t in peftfast.PEFT_TYPE_TO_CONFIG_MAPPING}
    prompt = {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"}
    assert ours >= {"LORA", "IA3", "ADALORA", "LOHA", "LOKR", "ADAPTION_PROMPT"} | prompt
    assert {t.value: c.__name__ for t, c in peftfast.PEFT_TYPE_TO_CONFIG_MAPPING.items()} == \
        {t.value: c.__name__ for t, c in peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING.items() if t.value in ours}
    assert {t.value: c.__name__ for t, c in peftfast.PEFT_TYPE_TO_TUNER_MAPPING.items()} == \
        {t.value: c.__name__ for t, c in peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING.items() if t.value in ours}
    assert {t.value: p for t, p in peftfast.PEFT_TYPE_TO_PREFIX_MAPPING.items()} == \
        {t.value: p for t, p in peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items() if t.value in ours}
    for peft_type, model_cls in peftfast.PEFT_TYPE_TO_TUNER_MAPPING.items():
        if peft_type.value not in prompt:  # prompt encoders have no parameter prefix (PEFT's too)
            assert model_cls.prefix == registry.parameter_prefix(peft_type)
    assert {t.value for t in peftfast.PEFT_TYPE_TO_MIXED_MODEL_MAPPING} == \
        {t.value for t in peft.mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING if t.value in ours}


def test_mapping_tables_are_the_registry():
    for name in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
                 "PEFT_TYPE_TO_PREFIX_MAPPING"):
        assert getattr(peftfast.mapping, name) is getattr(registry, name), name
        assert getattr(peftfast, name) is getattr(registry, name), name


# The last two cases name a method PEFT has registered itself, so PEFT is not asked about them.
@pytest.mark.parametrize("kwargs, error, match, ask_peft", [
    ({"name": "lora", "config_cls": object, "model_cls": object}, KeyError, "already PEFT method", True),
    ({"name": "lora_", "config_cls": object, "model_cls": object}, ValueError, "without '_' suffix", True),
    ({"name": "LoRA", "config_cls": object, "model_cls": object}, ValueError, "lower case", True),
    ({"name": "nosuch", "config_cls": object, "model_cls": object}, ValueError, "Unknown PEFT type", True),
    ({"name": "vera", "config_cls": object, "model_cls": object, "prefix": "lora_"}, KeyError, "prefix", False),
    ({"name": "vera", "config_cls": object, "model_cls": peftfast.LoraModel}, ValueError, "Inconsistent prefixes",
     False),
])
def test_register_peft_method_refuses_what_peft_refuses(kwargs, error, match, ask_peft):
    before = {n: dict(getattr(registry, n)) for n in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING",
                                                     "PEFT_TYPE_TO_PREFIX_MAPPING")}
    with pytest.raises(error, match=match):
        peftfast.utils.register_peft_method(**kwargs)
    if ask_peft:
        with pytest.raises(error):
            peft.utils.register_peft_method(**kwargs)
    assert {n: dict(getattr(registry, n)) for n in before} == before


def test_a_registered_method_is_used_by_configs_and_models():
    """A method registered from outside resolves through PeftConfig.from_peft_type and the tuner lookup."""
    saved = {n: dict(getattr(registry, n)) for n in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING",
                                                    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
                                                    "PEFT_TYPE_TO_PREFIX_MAPPING")}

    class VeraLikeConfig(peftfast.LoraConfig):
        def __post_init__(self):
            super().__post_init__()
            self.peft_type = PeftType.VERA

    class VeraLikeModel(peftfast.LoraModel):
        prefix = "vera_lambda_"

    try:
        peftfast.utils.register_peft_method(name="vera", config_cls=VeraLikeConfig, model_cls=VeraLikeModel,
                                            prefix="vera_lambda_")
        config = peftfast.PeftConfig.from_peft_type(peft_type="VERA", r=2, target_modules=["q"])
        assert type(config) is VeraLikeConfig
        assert peftfast.PEFT_TYPE_TO_TUNER_MAPPING[PeftType.VERA] is VeraLikeModel
        assert registry.tuner_class("VERA") is VeraLikeModel
    finally:
        for name, table in saved.items():
            getattr(registry, name).clear()
            getattr(registry, name).update(table)


def test_unknown_types_are_refused_with_the_supported_list():
    with pytest.raises(registry.UnknownPeftTypeError, match="supported: LORA, IA3, PROMPT_TUNING, P_TUNING, PREFIX_TUNING, "):
        registry.config_class("VERA")
    with pytest.raises(registry.UnknownPeftTypeError, match="not a PEFT method"):
        registry.tuner_class("MAGIC")
    with pytest.raises(ValueError, match="not supported by peftfast"):
        peftfast.PeftConfig.from_peft_type(peft_type="VERA")
