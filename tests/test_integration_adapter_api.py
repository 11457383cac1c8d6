"""transformers' adapter API (``model.add_adapter(peftfast.LoraConfig(...))`` and the rest of PeftAdapterMixin)
backed by peftfast: the same outputs and state-dict keys as PEFT's layers injected the way transformers does it,
files PEFT loads, and the same
behaviour in an interpreter without ``peft`` (run by tests/_integration.py's ``adapter_api`` scenario)."""
from __future__ import annotations


import pytest
import torch

import peftfast
from peftfast import zoo
from tests._integration import TARGETS, scenario_adapter_api, scenario_from_pretrained, without_peft_results

peft = pytest.importorskip("peft")


def close(a, b, what):
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return scenario_adapter_api(str(tmp_path_factory.mktemp("adapter-api")))


@pytest.fixture(scope="module")
def theirs():
    """What transformers' methods do with PEFT's classes, done by hand: transformers needs peft >= 0.22 for them
    and the oracle is 0.21.2. Injection into the model itself, per-layer set_adapter / enable_adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    x = zoo.causal_inputs(batch=2, seq=6, seed=9)
    model = zoo.llama(0)
    configs = {"default": peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False),
               "b": peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)}
    for name, config in configs.items():
        peft.inject_adapter_in_model(config, model, name)
    model.peft_config = configs
    mine = zoo.llama(0)
    torch.manual_seed(21)
    mine.add_adapter(peftfast.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    torch.manual_seed(22)
    mine.add_adapter(peftfast.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), adapter_name="b")
    missing, unexpected = model.load_state_dict(mine.state_dict())  # same weights: the names agree
    assert not missing and not unexpected
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    def set_active(name):
        for layer in layers:
            layer.set_adapter(name)

    result = {}
    with torch.no_grad():
        set_active("b")
        result["b"] = model(**x).logits.flatten().tolist()
        set_active("default")
        result["default"] = model(**x).logits.flatten().tolist()
        for layer in layers:
            layer.enable_adapters(False)
        result["disabled"] = model(**x).logits.flatten().tolist()
    result["state_keys"] = sorted(peft.get_peft_model_state_dict(model, adapter_name="default"))
    return result


def test_matches_transformers_with_peft(ours, theirs):
    assert ours["after_add"] == ["b"] and ours["active"] == ["default"]  # add_adapter activates the new one
    assert ours["state_keys"] == theirs["state_keys"]
    assert ours["files"] == ["adapter_config.json", "adapter_model.safetensors", "generation_config.json"]
    for key in ("b", "default", "disabled"):
        close(ours[key], theirs[key], key)
    with torch.no_grad():
        base = zoo.llama(0)(**zoo.causal_inputs(batch=2, seq=6, seed=9)).logits.flatten().tolist()
    close(ours["disabled"], base, "disabled = base model")
    close(ours["enabled"], ours["default"], "enabled again")
    assert not torch.allclose(torch.tensor(ours["default"]), torch.tensor(base), atol=1e-4)
    assert not torch.allclose(torch.tensor(ours["b"]), torch.tensor(ours["default"]), atol=1e-5)


def test_saved_files_load_in_peft_and_back(ours, tmp_path_factory):
    folder = next(tmp_path_factory.getbasetemp().glob("adapter-api[0-9]*")) / "saved"
    x = zoo.causal_inputs(batch=2, seq=6, seed=9)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(zoo.llama(0), str(folder))(**x).logits.flatten().tolist()
    close(theirs, ours["default"], "PEFT loading the saved adapter")
    close(ours["loaded"], ours["default"], "load_adapter into a fresh model")
    assert ours["loaded_active"] == ["loaded"] and ours["after_delete"] == ["default"]


def test_trainer_on_add_adapter_model_saves_adapters(ours):
    assert ours["trained_files"] == ["adapter_config.json", "adapter_model.safetensors", "generation_config.json",
                                     "training_args.bin"]
    assert len(ours["trained_losses"]) == 2


def test_peft_configs_still_take_transformers_path():
    model = zoo.llama(0)
    with pytest.raises(ValueError, match="version of PEFT"):  # transformers' own check: peft 0.21.2 < 0.22
        model.add_adapter(peft.LoraConfig(r=4, target_modules=TARGETS))
    model._hf_peft_config_loaded = True  # as if it held PEFT's adapters
    model.peft_config = {"default": peft.LoraConfig(r=4, target_modules=TARGETS)}
    with pytest.raises(ValueError, match="one library only"):
        model.add_adapter(peftfast.LoraConfig(r=4, target_modules=TARGETS), adapter_name="x")
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_without_peft_installed(ours, tmp_path_factory):
    hidden = without_peft_results(tmp_path_factory)["adapter_api"]
    for key in ("after_add", "active", "state_keys", "files", "loaded_active", "after_delete", "trained_files"):
        assert hidden[key] == ours[key], key
    for key in ("b", "default", "disabled", "enabled", "loaded", "trained_losses"):
        close(hidden[key], ours[key], key)


@pytest.fixture(scope="module")
def from_folder(tmp_path_factory):
    return scenario_from_pretrained(str(tmp_path_factory.mktemp("from-pretrained")))


def check_from_pretrained(result, what):
    for name in ("auto", "llama"):
        assert result[f"{name}_class"] == "LlamaForCausalLM", what
        assert result[f"{name}_active"] == ["default"], what
        assert result[f"{name}_lora_layers"] == 4, what  # q_proj and v_proj of both layers
        close(result[name], result["trained"], f"{what}: {name} from_pretrained(<adapter folder>)")
    # the adapter (random B) changes the logits: loading it is not a no-op
    assert max(abs(a - b) for a, b in zip(result["base"], result["trained"])) > 1e-2, what


def test_from_pretrained_adapter_folder(from_folder):
    check_from_pretrained(from_folder, "with peft installed")


def test_from_pretrained_adapter_folder_without_peft(from_folder, tmp_path_factory):
    hidden = without_peft_results(tmp_path_factory)["from_pretrained"]
    check_from_pretrained(hidden, "without peft")
    close(hidden["auto"], from_folder["auto"], "without peft vs with peft")
