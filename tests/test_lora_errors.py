"""Bad input: every case raises an error whose message names the problem (and what is allowed), and the
model is exactly as before: every state-dict tensor bit for bit, the module type at every path, the
peft_config keys and contents, the active adapter, merge state, and every requires_grad flag.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from torch import nn

import peftfast as fast
from tests._models import causal_inputs, tiny_gpt2, tiny_llama, tiny_net, tiny_t5



@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def snapshot(model: nn.Module) -> dict:
    layers = {
        n: m for n, m in model.named_modules() if isinstance(m, fast.tuners.tuners_utils.BaseTunerLayer)
    }
    configs = getattr(model, "peft_config", None)
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "configs": None if configs is None else {k: copy.deepcopy(v.to_dict()) for k, v in configs.items()},
        "active": copy.deepcopy(getattr(model, "active_adapter", None)) if configs is not None else None,
        "layer_state": {
            n: (list(m.active_adapters), list(m.merged_adapters), m.disable_adapters)
            for n, m in layers.items()
        },
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"], "module tree changed"
    assert list(after["tensors"]) == list(before["tensors"]), "state-dict keys changed"
    for k, v in before["tensors"].items():
        w = after["tensors"][k]
        assert w.dtype == v.dtype, f"tensor {k} changed dtype"
        torch.testing.assert_close(w, v, rtol=0, atol=0, equal_nan=True, msg=f"tensor {k} changed")
    for key in ("requires_grad", "configs", "active", "layer_state", "training"):
        assert after[key] == before[key], f"{key} changed"


def llama_peft(**kw) -> fast.PeftModel:
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    cfg.update(kw)
    pm = fast.get_peft_model(tiny_llama(), fast.LoraConfig(**cfg))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return pm


def raises(exc, *patterns: str):
    """pytest.raises that also requires every regex in ``patterns`` to occur in the message."""

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(exc)
            self.info = self._ctx.__enter__()
            return self.info

        def __exit__(self, *args):
            suppressed = self._ctx.__exit__(*args)
            message = str(self.info.value)
            for p in patterns:
                assert re.search(p, message), f"message lacks {p!r}: {message}"
            return suppressed

    return _Check()


# ------------------------------------------------------------------------------------------------------
# target_modules that match nothing: a plain model stays a plain model. An entry that matches nothing next to
# entries that do (a list written for several architectures) is only a warning, as in PEFT.
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build,targets,missing,candidates",
    [
        (tiny_llama, ["qproj", "vproj"], "qproj", ["q_proj", "k_proj", "down_proj"]),
        (tiny_gpt2, ["c_atn"], "c_atn", ["c_attn", "c_proj", "c_fc"]),
        (tiny_t5, ["q_proj"], "q_proj", ["q", "k", "wo"]),
        (tiny_net, ["lin2", "lin3"], "lin2", ["lin0", "lin1", "emb"]),
    ],
)
def test_unmatched_target_entry(build, targets, missing, candidates):
    model = build()
    before = snapshot(model)
    with raises(fast.NoMatchingPeftModuleError, "not found in the base model", re.escape(repr(missing)),
                *[rf"\b{c}\b" for c in candidates]):
        fast.get_peft_model(model, fast.LoraConfig(r=2, target_modules=targets))
    assert_unchanged(model, before)
    assert not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "build,targets,missing,matched",
    [
        (tiny_llama, ["q_proj", "qproj"], "qproj", "q_proj"),
        (tiny_net, ["lin0", "lin2", "lin3"], "lin2", "lin0"),
    ],
)
def test_partly_unmatched_target_list_warns(build, targets, missing, matched):
    with pytest.warns(UserWarning, match=re.escape(repr(missing)) + ".*matched no module"):
        pm = fast.get_peft_model(build(), fast.LoraConfig(r=2, target_modules=targets))
    names = pm.base_model.targeted_module_names
    assert names and all(n == matched or n.endswith("." + matched) for n in names)


def test_unmatched_regex_target():
    model = tiny_llama()
    before = snapshot(model)
    with raises(ValueError, re.escape(".*nothing_here"), r"\bq_proj\b", r"\bgate_proj\b"):
        fast.get_peft_model(model, fast.LoraConfig(r=2, target_modules=".*nothing_here"))
    assert_unchanged(model, before)


def test_unsupported_target_type():
    model = tiny_llama()
    before = snapshot(model)
    with raises(ValueError, "input_layernorm", "LlamaRMSNorm", "Linear"):
        fast.get_peft_model(model, fast.LoraConfig(r=2, target_modules=["q_proj", "input_layernorm"]))
    assert_unchanged(model, before)


def test_unmatched_modules_to_save_rolls_back_the_injected_layers():
    model = tiny_llama()
    before = snapshot(model)
    with raises(ValueError, "no_such_head"):
        fast.get_peft_model(
            model, fast.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["no_such_head"])
        )
    assert_unchanged(model, before)


def test_get_peft_model_twice_on_the_same_model():
    pm = llama_peft()
    base = pm.get_base_model()
    before = snapshot(pm)
    with raises(ValueError, "already", "add_adapter"):
        fast.get_peft_model(base, fast.LoraConfig(r=2, target_modules=["k_proj"]))
    assert_unchanged(pm, before)


# ------------------------------------------------------------------------------------------------------
# invalid configuration values (refused when the config is built)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("r", 0, r"\br\b.*positive"),
        ("r", -3, r"\br\b.*positive"),
        ("r", 2.5, r"\br\b.*integer"),
        ("r", "8", r"\br\b"),
        ("r", True, r"\br\b"),
        ("r", None, r"\br\b"),
        ("lora_alpha", -8, "lora_alpha"),
        ("lora_alpha", math.nan, "lora_alpha"),
        ("lora_alpha", math.inf, "lora_alpha"),
        ("lora_alpha", "16", "lora_alpha"),
        ("lora_alpha", None, "lora_alpha"),
        ("lora_dropout", -0.1, r"lora_dropout.*\[0, 1\)"),
        ("lora_dropout", 1.0, r"lora_dropout.*\[0, 1\)"),
        ("lora_dropout", 1.5, "lora_dropout"),
        ("lora_dropout", math.nan, "lora_dropout"),
        ("lora_dropout", "0.1", "lora_dropout"),
        ("bias", "some", r"bias.*'none'.*'all'.*'lora_only'"),
        ("bias", "lora", "bias"),
        ("bias", None, "bias"),
        ("init_lora_weights", "loftq", r"init_lora_weights.*LoftQ.*supported: True, False, 'gaussian'"),
        ("rank_pattern", {"q_proj": 0}, "rank_pattern"),
        ("alpha_pattern", {"q_proj": math.nan}, "alpha_pattern"),
        ("task_type", "TRANSLATION", r"task_type.*CAUSAL_LM"),
        ("target_modules", 5, r"target_modules.*list.*regex.*int"),
    ],
)
def test_invalid_config_values(field, value, pattern):
    """The message names the field and the allowed values, and shows the value that was given."""
    shown = next(iter(value.values())) if isinstance(value, dict) else value
    with raises(ValueError, pattern, re.escape(repr(shown)) if field != "target_modules" else ""):
        fast.LoraConfig(**{"target_modules": ["q_proj"], field: value})


def test_invalid_config_is_refused_before_touching_the_model():
    model = tiny_llama()
    before = snapshot(model)
    config = fast.LoraConfig(r=2, target_modules=["q_proj"])
    config.r = 0  # made invalid after construction
    with pytest.raises(ValueError, match=r"\br\b"):
        fast.get_peft_model(model, config)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------------
# adapter management on a PeftModel
# ------------------------------------------------------------------------------------------------------
def _with_second_adapter() -> fast.PeftModel:
    pm = llama_peft()
    pm.add_adapter("other", fast.LoraConfig(r=3, target_modules=["q_proj", "k_proj"], task_type="CAUSAL_LM"))
    return pm


def test_duplicate_adapter_name():
    pm = _with_second_adapter()
    before = snapshot(pm)
    with raises(ValueError, "'other'", "already exists", "default"):
        pm.add_adapter("other", fast.LoraConfig(r=5, target_modules=["o_proj"], task_type="CAUSAL_LM"))
    assert_unchanged(pm, before)


@pytest.mark.parametrize(
    "bad",
    [
        {"target_modules": ["nope"]},
        {"target_modules": ["k_proj", "o_proj"], "modules_to_save": ["no_such_head"]},
        {"target_modules": ["k_proj"], "bias": "all"},
    ],
)
def test_failed_add_adapter_leaves_model_unchanged(bad):
    pm = llama_peft(bias="lora_only") if bad.get("bias") else _with_second_adapter()
    before = snapshot(pm)
    with pytest.raises(ValueError) as info:
        pm.add_adapter("third", fast.LoraConfig(r=2, task_type="CAUSAL_LM", **bad))
    message = str(info.value)
    assert any(word in message for word in ("nope", "no_such_head", "bias")), message
    assert_unchanged(pm, before)
    assert "third" not in pm.peft_config


@pytest.mark.parametrize("name", ["a.b", "x/y", "", 3])
def test_invalid_adapter_name(name):
    pm = llama_peft()
    before = snapshot(pm)
    with pytest.raises(ValueError, match="adapter name"):
        pm.add_adapter(name, fast.LoraConfig(r=2, target_modules=["k_proj"], task_type="CAUSAL_LM"))
    assert_unchanged(pm, before)


@pytest.mark.parametrize("op", ["set", "set_list", "delete"])
def test_unknown_adapter(op):
    pm = _with_second_adapter()
    before = snapshot(pm)
    with raises(ValueError, "nope", "default", "other"):
        if op == "set":
            pm.set_adapter("nope")
        elif op == "set_list":
            pm.base_model.set_adapter(["default", "nope"])
        else:
            pm.delete_adapter("nope")
    assert_unchanged(pm, before)


def test_unknown_adapter_in_adapter_names():
    pm = _with_second_adapter().eval()
    before = snapshot(pm)
    x = {k: v for k, v in causal_inputs(batch=2).items() if k != "labels"}
    with raises(ValueError, "nope"):
        pm(**x, adapter_names=["default", "nope"])
    with raises(ValueError, "one adapter name per sample"):
        pm(**x, adapter_names=["default", "other", "default"])
    pm.train()
    with raises(ValueError, "training mode"):
        pm(**x, adapter_names=["default", "other"])
    pm.eval()
    assert_unchanged(pm, before)


# ------------------------------------------------------------------------------------------------------
# merging
# ------------------------------------------------------------------------------------------------------
def test_merge_twice():
    # As PEFT: merging an adapter that is merged already warns and changes nothing (it used to raise).
    pm = llama_peft()
    pm.merge_adapter()
    before = snapshot(pm)
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        pm.merge_adapter()
    assert_unchanged(pm, before)


def test_merge_unknown_adapter():
    pm = llama_peft()
    before = snapshot(pm)
    with raises(ValueError, "nope", "default"):
        pm.merge_adapter(adapter_names=["nope"])
    with raises(ValueError, "nope"):
        pm.merge_and_unload(adapter_names=["nope"])
    assert_unchanged(pm, before)


def _poison(pm, which: str, value: float) -> None:
    layers = [m for m in pm.modules() if isinstance(m, fast.tuners.lora.LoraLayer)]
    layer = layers[0] if which == "first" else layers[-1]
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = value


@pytest.mark.parametrize(
    "which",
    [
        "first",
        pytest.param(
            "last",
        ),
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_refuses_non_finite(which, value, how):
    pm = llama_peft()
    _poison(pm, which, value)
    before = snapshot(pm)
    with raises(ValueError, "(?i)nan|inf|finite"):
        if how == "merge_adapter":
            pm.merge_adapter(safe_merge=True)
        else:
            pm.merge_and_unload(safe_merge=True)
    assert_unchanged(pm, before)
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj, fast.tuners.lora.LoraLayer)


def test_delete_merged_adapter():
    pm = _with_second_adapter()
    pm.merge_adapter()
    before = snapshot(pm)
    with raises(ValueError, "default", "merged"):
        pm.delete_adapter("default")
    assert_unchanged(pm, before)


@pytest.mark.parametrize("config", [fast.LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"),
                                    fast.LoHaConfig(target_modules=["q_proj"], task_type="CAUSAL_LM")])
def test_forward_after_deleting_the_only_adapter_says_what_to_do(config):
    # PEFT raises a bare KeyError('default') there; a KeyError still, which names the way out
    pm = fast.get_peft_model(tiny_llama(), copy.deepcopy(config))
    pm.delete_adapter("default")
    assert pm.active_adapters == []
    with raises(KeyError, "no active adapter", "add_adapter", "set_adapter"):
        pm(**causal_inputs())
    pm.add_adapter("again", copy.deepcopy(config))
    pm.set_adapter("again")
    assert pm(**causal_inputs()).logits.isfinite().all()
