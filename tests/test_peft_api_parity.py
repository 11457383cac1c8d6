"""Small API behaviours PEFT 0.21.2's own test suite relies on (conformance/), checked against the real peft."""

import warnings

import peft as real_peft
import pytest
import torch
from torch import nn

import peftfast


class _Net(nn.Module):
    def __init__(self, imposter: str = "lora_foobar"):
        super().__init__()
        self.lin0 = nn.Linear(7, 5)
        setattr(self, imposter, nn.Linear(5, 3))
        self.imposter = imposter

    def forward(self, x):
        return getattr(self, self.imposter)(self.lin0(x))


def test_constants_at_peft_import_paths():
    from peftfast.utils.constants import DUMMY_MODEL_CONFIG, MIN_TARGET_MODULES_FOR_OPTIMIZATION
    from peft.utils import constants as real

    assert DUMMY_MODEL_CONFIG == real.DUMMY_MODEL_CONFIG
    assert MIN_TARGET_MODULES_FOR_OPTIMIZATION == real.MIN_TARGET_MODULES_FOR_OPTIMIZATION
    assert peftfast.tuners.tuners_utils.BaseTuner.get_model_config(nn.Linear(2, 2)) == real.DUMMY_MODEL_CONFIG


@pytest.mark.parametrize("method, prefix", [("LoraConfig", "lora_"), ("LoKrConfig", "lokr_"), ("IA3Config", "ia3_")])
def test_base_module_named_like_the_prefix_stays_frozen_and_unsaved(method, prefix):
    def build(lib):
        torch.manual_seed(0)
        kwargs = {"feedforward_modules": []} if method == "IA3Config" else {}
        return lib.get_peft_model(_Net(f"{prefix}head"), getattr(lib, method)(target_modules=["lin0"], **kwargs))

    ours, theirs = build(peftfast), build(real_peft)
    for model in (ours, theirs):
        head = getattr(model.base_model.model, f"{prefix}head")
        assert not head.weight.requires_grad and not head.bias.requires_grad
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert trainable  # the adapter itself is trainable
    ours_sd = peftfast.get_peft_model_state_dict(ours)
    assert set(ours_sd) == set(real_peft.get_peft_model_state_dict(theirs))
    assert not any(f"{prefix}head" in k for k in ours_sd)


def test_save_warns_for_unsharded_lora_tensor_and_still_writes(tmp_path):
    model = peftfast.get_peft_model(_Net(), peftfast.LoraConfig(target_modules=["lin0"], r=3))
    model.base_model.model.lin0.lora_A["default"].weight.data = torch.randn(21)  # a flat, ungathered shard
    with pytest.warns(peftfast.PeftWarning, match=r"DeepSpeed ZeRO-3 / FSDP shards"):
        model.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_config.json").exists()

    fine = peftfast.get_peft_model(_Net(), peftfast.LoraConfig(target_modules=["lin0"], r=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftfast.PeftWarning)
        fine.save_pretrained(tmp_path / "b")


def test_modules_to_save_with_a_broken_active_name_raises_attribute_error():
    model = peftfast.get_peft_model(_Net("head"), peftfast.LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
    wrapper = model.base_model.model.head
    assert wrapper.weight is wrapper.modules_to_save["default"].weight
    wrapper._active_adapter = "does-not-exist"  # PEFT's failsafe test sets this directly
    with pytest.raises(AttributeError, match="has no attribute 'weight'"):
        wrapper.weight
    with model.disable_adapter():
        assert wrapper.weight is wrapper.original_module.weight



def test_include_linear_layers_shorthand_at_peft_utils():
    from peftfast.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND
    from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND as real

    assert INCLUDE_LINEAR_LAYERS_SHORTHAND == real


def test_peft_model_modules_to_save_and_checkpointing_helper_as_peft():
    """``PeftModel.modules_to_save`` (the union of the configs' lists, None when empty) and
    ``prepare_model_for_gradient_checkpointing`` (inputs' embeddings then require a gradient) as in PEFT."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))

    for lib in (peftfast, real_peft):
        plain = lib.get_peft_model(net(), lib.LoraConfig(target_modules=["0"]))
        assert plain.modules_to_save is None, lib
        pm = lib.get_peft_model(net(), lib.LoraConfig(target_modules=["0"], modules_to_save=["2"]))
        pm.add_adapter("other", lib.LoraConfig(target_modules=["0"], modules_to_save=["1"]))
        assert pm.modules_to_save == {"1", "2"}, lib

    results = []
    for lib in (peftfast, real_peft):
        torch.manual_seed(0)
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=31, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1))
        pm = lib.get_peft_model(llama, lib.LoraConfig(target_modules=["q_proj"]))
        ids = torch.randint(0, 31, (2, 5))
        before = llama.get_input_embeddings()(ids).requires_grad
        assert pm.prepare_model_for_gradient_checkpointing(llama) is None
        results.append((before, llama.get_input_embeddings()(ids).requires_grad))
    assert results[0] == results[1] == (False, True)
