"""Small API behaviours PEFT 0.21.2's own test suite relies on (conformance/), checked against the real peft."""

import warnings

import peft as real_peft
import pytest
import torch
from torch import nn

import peftfast
from peftfast.utils.save_and_load import AdapterLoadError


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


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 7), nn.Linear(7, 5)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


@pytest.mark.parametrize("method", ["LoraConfig", "LoHaConfig", "LoKrConfig"])
def test_deleting_the_active_adapter_picks_each_layers_next_as_peft(method):
    """The active adapter deleted: each layer activates its own alphabetically first adapter left (PEFT's rule,
    per layer), so a layer without the model's next adapter runs another one, not none; the model's active
    adapters are the first layer's, as a list; outputs and trainable parameters equal PEFT's."""
    x = torch.randn(3, 8)
    init = {"init_lora_weights": False} if method == "LoraConfig" else {"init_weights": False}
    models = []
    for lib in (real_peft, peftfast):
        torch.manual_seed(0)
        cfg = getattr(lib, method)
        m = lib.get_peft_model(_Two(), cfg(r=2, target_modules=["l1", "l2"], **init))
        m.add_adapter("b", cfg(r=2, target_modules=["l1"], **init))  # b only on l1
        m.add_adapter("c", cfg(r=2, target_modules=["l1", "l2"], **init))
        models.append(m)
    models[1].load_state_dict(models[0].state_dict())
    outs = []
    for m in models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.delete_adapter("default")
        assert m.base_model.model.l1.active_adapters == ["b"] and m.base_model.model.l2.active_adapters == ["c"]
        with torch.no_grad():
            outs.append(m.eval()(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    assert models[1].active_adapter == models[0].active_adapter == "b"
    assert models[1].base_model.active_adapter == models[0].base_model.active_adapter == ["b"]
    assert [n for n, p in models[1].named_parameters() if p.requires_grad] == \
        [n for n, p in models[0].named_parameters() if p.requires_grad]


def test_active_adapter_keeps_the_type_it_was_set_with():
    """BaseTuner.set_adapter keeps what it was given (PEFT's): a list of one name stays a list (code iterating
    over active_adapter would otherwise walk the characters of a name); deleting leaves a list. The mixed model's
    active_adapter is its tuner's."""
    for lib in (real_peft, peftfast):
        m = lib.get_peft_model(_Two(), lib.LoraConfig(r=2, target_modules=["l1"]))
        m.add_adapter("b", lib.LoraConfig(r=2, target_modules=["l1"]))
        m.base_model.set_adapter(["b"])
        assert m.base_model.active_adapter == ["b"], lib.__name__
        m.base_model.set_adapter("default")
        assert m.base_model.active_adapter == "default", lib.__name__
        mixed = lib.get_peft_model(_Two(), lib.LoHaConfig(r=2, target_modules=["l1"]), adapter_name="loha", mixed=True)
        mixed.add_adapter("lokr", lib.LoKrConfig(r=2, target_modules=["l2"]))
        mixed.set_adapter(["loha", "lokr"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mixed.delete_adapter("lokr")
        assert mixed.active_adapter == ["loha"], lib.__name__


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_scale_layer_unscale_layer_and_set_scale_as_peft(rslora):
    """LoraLayer.scale_layer / unscale_layer (PEFT's methods, used by its scaling helpers) and set_scale, with
    rsLoRA's alpha / sqrt(r) as the initial scale."""
    got = {}
    for lib in (real_peft, peftfast):
        m = lib.get_peft_model(_Two(), lib.LoraConfig(r=4, lora_alpha=6, use_rslora=rslora, target_modules=["l1"]))
        layer = m.base_model.model.l1
        steps = [layer.scaling["default"]]
        layer.scale_layer(2.5)
        steps.append(layer.scaling["default"])
        layer.unscale_layer(5.0)
        steps.append(layer.scaling["default"])
        layer.unscale_layer()
        steps.append(layer.scaling["default"])
        layer.set_scale("default", 3.0)
        steps.append(layer.scaling["default"])
        got[lib.__name__] = steps
    assert got["peftfast"] == pytest.approx(got["peft"], rel=1e-12)
    assert len(set(got["peft"])) == 4


def test_modules_to_save_matches_a_plain_suffix_as_peft(tmp_path):
    """modules_to_save=["norm"] names every module whose name ends with "norm" (PEFT matches a plain suffix: also
    each input_layernorm / post_attention_layernorm), so the same modules are wrapped and an adapter saved by PEFT
    with such an entry loads here with the same outputs (before: only model.norm, and the load failed)."""
    from tests._models import tiny_llama

    def wrapped(m):
        return sorted(n for n, mod in m.named_modules() if type(mod).__name__ == "ModulesToSaveWrapper")

    torch.manual_seed(0)
    theirs = real_peft.get_peft_model(tiny_llama(), real_peft.LoraConfig(target_modules=["q_proj"],
                                                                         modules_to_save=["norm"]))
    ours = peftfast.get_peft_model(tiny_llama(), peftfast.LoraConfig(target_modules=["q_proj"],
                                                                     modules_to_save=["norm"]))
    assert wrapped(ours) == wrapped(theirs) and len(wrapped(ours)) > 1
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path)
    loaded = peftfast.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ids = torch.randint(3, 50, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_ignore_mismatched_sizes_reaches_the_load(tmp_path):
    """PeftModel.from_pretrained / load_adapter(..., ignore_mismatched_sizes=True): tensors of another shape are
    skipped with a warning and the rest loaded, as PEFT does (the keyword was swallowed: the load raised)."""
    import json

    torch.manual_seed(0)
    src = real_peft.get_peft_model(_Two(), real_peft.LoraConfig(r=4, target_modules=["l1", "l2"],
                                                                rank_pattern={"l2": 2}, init_lora_weights=False))
    src.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {}  # l2 now made with r=4; the file holds r=2
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterLoadError, match="shape mismatch"):
        peftfast.PeftModel.from_pretrained(_Two(), tmp_path)
    want = src.base_model.model.l1.lora_A["default"].weight
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes"):
        m = peftfast.PeftModel.from_pretrained(_Two(), tmp_path, ignore_mismatched_sizes=True)
    assert torch.equal(m.base_model.model.l1.lora_A["default"].weight, want)
    assert m.base_model.model.l2.lora_A["default"].weight.shape == (4, 7)
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes"):
        m.load_adapter(tmp_path, adapter_name="x", ignore_mismatched_sizes=True)
    assert torch.equal(m.base_model.model.l1.lora_A["x"].weight, want)
