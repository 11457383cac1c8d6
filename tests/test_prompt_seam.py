"""PeftModel's prompt-learning seam, in PEFT's shape.

Each task wrapper owns ``forward`` (and ``generate`` for the LMs) with PEFT 0.21's explicit signature;
``_is_prompt_learning`` follows the active adapter's config; a prompt-learning config sends the call to the
handler registered for its method, and without one raises NotImplementedError naming the method.
"""

from __future__ import annotations

import inspect
import warnings

import peft
import pytest
import torch

import peftfast as fast
from peftfast.config import PromptLearningConfig
from peftfast.utils import registry
from tests._models import causal_inputs, tiny_llama

WRAPPERS = ["PeftModelForCausalLM", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
            "PeftModelForTokenClassification", "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction"]


@pytest.mark.parametrize("name", WRAPPERS)
def test_task_wrappers_forward_has_peft_signature(name):
    ours = inspect.signature(getattr(fast, name).forward)
    theirs = inspect.signature(getattr(peft, name).forward)
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.parameters.values()]
    assert "forward" in vars(getattr(fast, name))


@pytest.mark.parametrize("name", ["PeftModelForCausalLM", "PeftModelForSeq2SeqLM"])
def test_language_models_own_generate(name):
    # defined by the wrapper's own classes (PeftModel has none: it would fall through to the base model)
    cls = getattr(fast, name)
    assert any("generate" in vars(c) for c in cls.__mro__ if not issubclass(fast.PeftModel, c))


def test_prompt_learning_config_matches_peft():
    assert PromptLearningConfig(peft_type="PROMPT_TUNING").is_prompt_learning
    assert not fast.LoraConfig().is_prompt_learning
    ours = {f for f in PromptLearningConfig.__dataclass_fields__}
    theirs = {f for f in peft.PromptLearningConfig.__dataclass_fields__}
    assert ours == theirs


def llama_with_prompt_config():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fast.get_peft_model(tiny_llama(), fast.LoraConfig(r=2, target_modules=["q_proj"],
                                                                   task_type="CAUSAL_LM"))
    assert model._is_prompt_learning is False
    model.peft_config["default"] = PromptLearningConfig(peft_type="PROMPT_TUNING", task_type="CAUSAL_LM",
                                                        num_virtual_tokens=4)
    return model


def test_a_prompt_learning_adapter_without_a_handler_is_refused_by_name():
    model = llama_with_prompt_config()
    assert model._is_prompt_learning is True
    batch = causal_inputs()
    saved = dict(registry.PEFT_TYPE_TO_PROMPT_LEARNING_HANDLER)
    registry.PEFT_TYPE_TO_PROMPT_LEARNING_HANDLER.pop(fast.PeftType.PROMPT_TUNING)
    try:
        with pytest.raises(NotImplementedError, match=r"PeftModelForCausalLM.forward: .*PROMPT_TUNING, a prompt-"):
            model(**batch)
        with pytest.raises(NotImplementedError, match=r"PeftModelForCausalLM.generate: .*PROMPT_TUNING"):
            model.generate(input_ids=batch["input_ids"], max_new_tokens=2)
    finally:
        registry.PEFT_TYPE_TO_PROMPT_LEARNING_HANDLER.update(saved)


def test_a_registered_handler_receives_the_call():
    calls = []

    class Handler:
        def forward(self, peft_model, task, inputs, kwargs):
            calls.append(("forward", task, sorted(k for k, v in inputs.items() if v is not None), sorted(kwargs)))
            return "virtual tokens added"

        def generate(self, peft_model, task, args, kwargs):
            calls.append(("generate", task, len(args), sorted(kwargs)))
            return "generated"

    model = llama_with_prompt_config()
    saved = dict(registry.PEFT_TYPE_TO_PROMPT_LEARNING_HANDLER)
    registry.register_prompt_learning_handler("prompt_tuning", Handler())
    try:
        ids = causal_inputs()["input_ids"]
        assert model(input_ids=ids, use_cache=False) == "virtual tokens added"
        assert model.generate(ids, max_new_tokens=2) == "generated"
    finally:
        registry.PEFT_TYPE_TO_PROMPT_LEARNING_HANDLER.clear()
        registry.PEFT_TYPE_TO_PROMPT_LEARNING_HANDLER.update(saved)
    assert calls == [("forward", fast.TaskType.CAUSAL_LM, ["input_ids"], ["use_cache"]),
                     ("generate", fast.TaskType.CAUSAL_LM, 1, ["max_new_tokens"])]


def test_lora_forward_through_the_wrapper_is_the_base_call():
    """Positional input_ids, named arguments, extra kwargs and adapter_names reach the model as before."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fast.get_peft_model(tiny_llama(), fast.LoraConfig(r=2, target_modules=["q_proj"],
                                                                   task_type="CAUSAL_LM"))
    model.eval()
    batch = causal_inputs()
    with torch.no_grad():
        direct = model.get_base_model()(**batch)
        positional = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        per_sample = model(**batch, adapter_names=["default", "default"])
    torch.testing.assert_close(positional.logits, direct.logits, rtol=0, atol=0)
    torch.testing.assert_close(per_sample.logits, direct.logits, rtol=0, atol=0)
    torch.testing.assert_close(positional.loss, direct.loss, rtol=0, atol=0)
