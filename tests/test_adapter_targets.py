"""A second adapter never targets the first adapter's own modules, however its targets are named.

The modules inside an adapter layer (``base_layer``, ``lora_A.<name>``, ``lora_B.<name>``,
``lora_dropout``, ``ia3_l``, ...) belong to that adapter. Adding another adapter with a list, a
regex, 'all-linear', ``layers_to_transform`` or ``exclude_modules`` must land on the same model
modules as PEFT does (the adapter layers themselves, which then hold both adapters) and leave
``peft_config[...].target_modules`` as PEFT leaves it. A pattern that names only an adapter's
own modules matches nothing, as in PEFT.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import peftfast as fast
from tests._models import tiny_gpt2, tiny_llama

FIRST = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def holders(model: nn.Module, attr: str, adapter: str) -> list[str]:
    """Names of the modules holding an ``attr`` container (``lora_A``, ``ia3_l``) with ``adapter`` in it."""
    out = []
    for name, module in model.named_modules():
        container = getattr(module, attr, None)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)) and adapter in container:
            out.append(name)
    return sorted(out)


def assert_no_nested_adapter_layers(model: nn.Module) -> None:
    layers = [n for n, m in model.named_modules() if isinstance(m, fast.tuners.BaseTunerLayer)]
    nested = [n for n in layers if any(n.startswith(o + ".") for o in layers)]
    assert not nested, f"adapter layers inside adapter layers: {nested}"


def normalised(targets):
    return targets if isinstance(targets, str) else sorted(targets)


def both(build, first_cls, first_kwargs, layers: int = 2):
    base = build(layers=layers)
    ours = fast.get_peft_model(copy.deepcopy(base), getattr(fast, first_cls)(**first_kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, first_cls)(**first_kwargs))
    return ours, theirs


def add_second(ours, theirs, cls: str, kwargs: dict):
    """Add adapter 'second' to both models; return (our error, their error) types, None when it worked."""
    errors = []
    for lib, model in ((fast, ours), (peft, theirs)):
        try:
            model.add_adapter("second", getattr(lib, cls)(**copy.deepcopy(kwargs)))
            errors.append(None)
        except (ValueError, KeyError) as e:
            errors.append(e)
    return errors


LORA_CASES = {
    "list": {"target_modules": ["q_proj", "v_proj"]},
    "list_naming_adapter_modules": {"target_modules": ["q_proj", "lora_A", "lora_B", "base_layer", "default"]},
    "list_naming_adapter_paths": {"target_modules": ["o_proj", "q_proj.lora_A.default", "v_proj.base_layer"]},
    "regex": {"target_modules": r".*\.(q_proj|k_proj|lora_A\.default|lora_B\.default|base_layer)"},
    "regex_everything_under_attention": {"target_modules": r".*self_attn\..*"},
    "all_linear": {"target_modules": "all-linear"},
    "all_linear_upper": {"target_modules": "ALL-LINEAR"},
    "layers_to_transform": {"target_modules": ["q_proj", "v_proj", "lora_A", "base_layer"],
                            "layers_to_transform": [1], "layers_pattern": "layers"},
    "layers_to_transform_no_pattern": {"target_modules": ["q_proj", "lora_B.default"], "layers_to_transform": 0},
    "exclude_modules": {"target_modules": "all-linear", "exclude_modules": ["k_proj", "lora_A.default"]},
    "exclude_modules_regex": {"target_modules": ["q_proj", "v_proj", "o_proj", "lora_A", "base_layer"],
                              "exclude_modules": r".*layers\.0\..*"},
}


@pytest.mark.parametrize("layers", [2, 3], ids=["2_layers", "3_layers_condensed"])
@pytest.mark.parametrize("case", list(LORA_CASES))
def test_second_lora_adapter_targets_what_peft_targets(case, layers):
    first = {**FIRST, "target_modules": ["q_proj", "v_proj", "o_proj"]}
    if case.startswith("all_linear") or case.startswith("exclude_modules"):
        first = {**FIRST, "target_modules": "all-linear"}
    ours, theirs = both(tiny_llama, "LoraConfig", first, layers=layers)
    second = {**FIRST, **LORA_CASES[case]}
    mine, peft_error = add_second(ours, theirs, "LoraConfig", second)
    assert (mine is None) == (peft_error is None), f"peftfast raised {mine!r}, PEFT raised {peft_error!r}"
    if mine is not None:
        return
    assert holders(ours, "lora_A", "second") == holders(theirs, "lora_A", "second")
    assert holders(ours, "lora_A", "second"), "nothing was targeted"
    assert not any(n for n in holders(ours, "lora_A", "second") if ".lora_" in n or "base_layer" in n)
    assert normalised(ours.peft_config["second"].target_modules) == \
        normalised(theirs.peft_config["second"].target_modules)
    assert holders(ours, "lora_A", "default") == holders(theirs, "lora_A", "default")
    assert_no_nested_adapter_layers(ours)


def test_all_linear_second_adapter_lands_on_the_projections():
    """The reported case: a tiny Llama with a LoRA adapter gets a second 'all-linear' one."""
    ours, theirs = both(tiny_llama, "LoraConfig", {**FIRST, "target_modules": ["q_proj", "v_proj"]})
    add_second(ours, theirs, "LoraConfig", {**FIRST, "target_modules": "all-linear"})
    projections = {f"model.layers.{i}.{kind}.{p}" for i in range(2)
                   for kind, names in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                   for p in ([f"{c}_proj" for c in names])}
    assert len(projections) == 14
    assert set(ours.peft_config["second"].target_modules) == projections
    assert set(theirs.peft_config["second"].target_modules) == projections
    assert {n.removeprefix("base_model.model.") for n in holders(ours, "lora_A", "second")} == projections
    # both adapters still compute what PEFT computes (same adapter weights, set by name)
    for model in (ours, theirs):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n) + p.numel())))
    ids = torch.randint(3, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    for name in ("default", "second"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


ONLY_ADAPTER_MODULES = {
    "list": {"target_modules": ["lora_A", "lora_B"]},
    "list_paths": {"target_modules": ["q_proj.base_layer", "q_proj.lora_A.default"]},
    "regex": {"target_modules": r".*\.lora_(A|B)\.default"},
    "regex_base_layer": {"target_modules": r".*\.base_layer"},
}


@pytest.mark.parametrize("case", list(ONLY_ADAPTER_MODULES))
def test_a_pattern_naming_only_adapter_modules_matches_nothing(case):
    ours, theirs = both(tiny_llama, "LoraConfig", {**FIRST, "target_modules": ["q_proj", "v_proj"]})
    before = sorted(n for n, _ in ours.named_modules())
    mine, peft_error = add_second(ours, theirs, "LoraConfig", {**FIRST, **ONLY_ADAPTER_MODULES[case]})
    assert peft_error is not None, "PEFT accepted it: the premise of this test changed"
    assert isinstance(mine, ValueError), "peftfast accepted a target naming only the first adapter's modules"
    assert sorted(n for n, _ in ours.named_modules()) == before
    assert "second" not in ours.peft_config


# IA3Config has no layers_to_transform; a module shared by two IA3 adapters must be feed-forward for both.
IA3_CASES = {
    "list": {"target_modules": ["c_attn", "c_fc", "ia3_l", "base_layer"], "feedforward_modules": ["c_fc"]},
    "regex": {"target_modules": r".*\.(c_attn|c_proj|ia3_l|base_layer)", "feedforward_modules": []},
    "all_linear": {"target_modules": "all-linear", "feedforward_modules": ["c_fc"]},
    "exclude_modules": {"target_modules": "all-linear", "feedforward_modules": ["c_fc"],
                        "exclude_modules": ["attn.c_proj", "base_layer"]},
    "exclude_modules_regex": {"target_modules": ["c_attn", "c_fc", "ia3_l"], "feedforward_modules": ["c_fc"],
                              "exclude_modules": r".*h\.1\..*"},
}


@pytest.mark.parametrize("case", list(IA3_CASES))
def test_second_ia3_adapter_targets_what_peft_targets(case):
    first = {"target_modules": ["c_attn", "c_fc"], "feedforward_modules": ["c_fc"]}
    ours, theirs = both(tiny_gpt2, "IA3Config", first)
    mine, peft_error = add_second(ours, theirs, "IA3Config", IA3_CASES[case])
    assert (mine is None) == (peft_error is None), f"peftfast raised {mine!r}, PEFT raised {peft_error!r}"
    if mine is not None:
        return
    assert holders(ours, "ia3_l", "second") == holders(theirs, "ia3_l", "second")
    assert holders(ours, "ia3_l", "second")
    assert normalised(ours.peft_config["second"].target_modules) == \
        normalised(theirs.peft_config["second"].target_modules)
    assert holders(ours, "ia3_l", "default") == holders(theirs, "ia3_l", "default")
    assert_no_nested_adapter_layers(ours)


def test_modules_to_save_copies_are_never_targets():
    """The original and the trained copy inside a modules_to_save wrapper are the first adapter's: a later
    'all-linear' or regex adapter never wraps them (PEFT only guards its own config's modules_to_save)."""
    base = tiny_llama()
    ours = fast.get_peft_model(base, fast.LoraConfig(**FIRST, target_modules=["q_proj"],
                                                     modules_to_save=["lm_head"]))
    ours.add_adapter("second", fast.LoraConfig(**FIRST, target_modules=r".*(lm_head\..*|v_proj)"))
    ours.add_adapter("third", fast.LoraConfig(**FIRST, target_modules="all-linear"))
    for adapter in ("second", "third"):
        names = holders(ours, "lora_A", adapter)
        assert names and not any("lm_head" in n for n in names), names
    assert_no_nested_adapter_layers(ours)
