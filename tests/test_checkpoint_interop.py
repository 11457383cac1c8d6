"""Checkpoints move between peftfast and the real PEFT (the oracle) in both directions.

For LoRA on Linear (Llama, BERT), Conv1D with fan_in_fan_out (GPT-2) and Embedding (embed_tokens, wte),
with modules_to_save (explicit, and the SEQ_CLS classifier head), several adapters (subfolders),
rank/alpha patterns and rsLoRA:

- the same weights saved by both libraries give the same files: same names, byte-identical
  safetensors, adapter_config.json with the same keys and values, the same model-card metadata;
- peftfast saves -> PEFT loads -> the same outputs (1e-5), and PEFT saves -> peftfast loads -> the
  same outputs, for every adapter; adapters are randomised (B included) so a dropped or swapped
  tensor changes the outputs by orders of magnitude more than the tolerance.
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import peftfast
from tests._ckpt_models import BUILDERS, inputs, logits, outputs_per_adapter, randomize_adapters, tree_files

peft = pytest.importorskip("peft")

TOL = 1e-5  # the round-trip criterion: outputs of the two libraries on the same adapter files
MIN_EFFECT = 1e-2  # every adapter must move the logits by far more than TOL, or a round trip proves nothing

CASES = {
    "llama_linear_embedding": ("llama", "CAUSAL_LM", {
        "default": dict(r=7, lora_alpha=11, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        "other": dict(r=1, lora_alpha=3, target_modules=["k_proj", "down_proj"], use_rslora=True),
    }),
    "gpt2_conv1d": ("gpt2", None, {
        "default": dict(r=5, lora_alpha=8, target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True,
                        modules_to_save=["ln_f"]),
        "second": dict(r=3, lora_alpha=4, target_modules=["c_proj"], fan_in_fan_out=True,
                       rank_pattern={"h.1.attn.c_proj": 2}, alpha_pattern={"h.0.mlp.c_proj": 9}),
    }),
    "bert_seq_cls": ("bert", "SEQ_CLS", {
        "default": dict(r=4, lora_alpha=6, target_modules=["query", "value"]),
        "other": dict(r=2, lora_alpha=2, target_modules=["key", "dense"]),
    }),
}


def build(lib, case: str, seed: int = 2):
    """``lib``'s PeftModel for ``case`` with every adapter randomised, and its adapter names."""
    arch, task, adapters = CASES[case]
    names = list(adapters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(BUILDERS[arch](), lib.LoraConfig(task_type=task, **adapters[names[0]]))
        for name in names[1:]:
            model.add_adapter(name, lib.LoraConfig(task_type=task, **adapters[name]))
    randomize_adapters(model, seed=seed)
    return model, names


def load(lib, arch: str, folder: str, names: list[str], **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.PeftModel.from_pretrained(BUILDERS[arch](), folder, **kwargs)
        for name in names[1:]:
            model.load_adapter(os.path.join(folder, name), adapter_name=name, **kwargs)
    return model


def save(model, folder: str, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, **kwargs)


def same_weights_pair(case: str):
    """A PEFT model and a peftfast model holding identical adapter weights (module trees must match exactly)."""
    reference, names = build(peft, case)
    ours, _ = build(peftfast, case, seed=99)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours, names


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True)


def normalise_config(data: dict) -> dict:
    out = dict(data)
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(out.get(key), list):
            out[key] = sorted(out[key])
    return out


def card_metadata(path: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard.load(path).data.to_dict()


def assert_same_files(ref_dir: str, our_dir: str) -> None:
    files = tree_files(ref_dir)
    assert tree_files(our_dir) == files
    for rel in sorted(files):
        ref, ours = os.path.join(ref_dir, rel), os.path.join(our_dir, rel)
        if rel.endswith(".safetensors"):
            a, b = read_tensors(ref), read_tensors(ours)
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
            with open(ref, "rb") as f, open(ours, "rb") as g:
                assert f.read() == g.read(), f"{rel}: same tensors but different bytes"
        elif rel.endswith(".bin"):
            a, b = read_tensors(ref), read_tensors(ours)
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), key
        elif rel.endswith(".json"):
            with open(ref) as f, open(ours) as g:
                a, b = json.load(f), json.load(g)
            assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
            assert a["peft_version"] == b["peft_version"] == "0.21.2"
            assert normalise_config(a) == normalise_config(b)
        elif rel == "README.md":
            a, b = card_metadata(ref), card_metadata(ours)
            assert a["library_name"] == b["library_name"] == "peft"
            assert a.get("pipeline_tag") == b.get("pipeline_tag")
            # from-config models have an empty name: PEFT writes base_model '' and the tag 'base_model:adapter:',
            # peftfast leaves both out (an empty name is no Hub id)
            assert (a.get("base_model") or None) == b.get("base_model")
            assert set(a["tags"]) - {"base_model:adapter:"} <= set(b["tags"]), (a["tags"], b["tags"])


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("case", list(CASES))
def test_same_files_as_peft(case, safe, tmp_path):
    reference, ours, names = same_weights_pair(case)
    for model in (reference, ours):  # a real base-model name, so the card and config carry it
        model.get_base_model().name_or_path = model.get_base_model().config._name_or_path = "org/tiny-base"
    save(reference, tmp_path / "peft", safe_serialization=safe)
    save(ours, tmp_path / "peftfast", safe_serialization=safe)
    expected = {"README.md"} | {os.path.join(*([] if n == "default" else [n]), f)
                                for n in names for f in ("adapter_config.json", "adapter_model."
                                                         + ("safetensors" if safe else "bin"))}
    assert tree_files(tmp_path / "peftfast") == expected
    assert_same_files(tmp_path / "peft", tmp_path / "peftfast")


@pytest.mark.parametrize("case", list(CASES))
def test_peftfast_saves_peft_loads(case, tmp_path):
    arch = CASES[case][0]
    ours, names = build(peftfast, case)
    batch = inputs()
    expected = outputs_per_adapter(ours, names, batch)
    base = logits(BUILDERS[arch](), batch)
    save(ours, tmp_path)
    loaded = load(peft, arch, str(tmp_path), names)
    # load_adapter adds without activating: the first adapter still decides the outputs
    torch.testing.assert_close(logits(loaded, batch), expected[names[0]], atol=TOL, rtol=0)
    got = outputs_per_adapter(loaded, names, batch)
    for name in names:
        assert (expected[name] - base).abs().max() > MIN_EFFECT, f"adapter {name} has no effect"
        torch.testing.assert_close(got[name], expected[name], atol=TOL, rtol=0)
    assert (expected[names[0]] - expected[names[1]]).abs().max() > MIN_EFFECT


@pytest.mark.parametrize("case", list(CASES))
def test_peft_saves_peftfast_loads(case, tmp_path):
    arch = CASES[case][0]
    reference, names = build(peft, case)
    batch = inputs()
    expected = outputs_per_adapter(reference, names, batch)
    save(reference, tmp_path)
    loaded = load(peftfast, arch, str(tmp_path), names)
    assert loaded.active_adapters == [names[0]]
    torch.testing.assert_close(logits(loaded, batch), expected[names[0]], atol=TOL, rtol=0)
    got = outputs_per_adapter(loaded, names, batch)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], atol=TOL, rtol=0)
    assert (expected[names[0]] - expected[names[1]]).abs().max() > MIN_EFFECT
    assert sorted(loaded.peft_config) == sorted(names)


EMBEDDING_CASES = {
    # (arch, target_modules, save_embedding_layers): which embedding weights go into the file, and their keys
    "llama_targeted_auto": ("llama", ["q_proj", "embed_tokens"], "auto"),
    "llama_targeted_false": ("llama", ["q_proj", "embed_tokens"], False),
    "llama_untargeted_true": ("llama", ["q_proj"], True),
    "llama_regex_targets_embedding": ("llama", r".*\.(q_proj|embed_tokens)", "auto"),
    "llama_lm_head_targeted": ("llama", ["v_proj", "lm_head"], "auto"),
    "gpt2_wte_tied_true": ("gpt2", ["c_attn", "wte"], True),
}


@pytest.mark.parametrize("case", list(EMBEDDING_CASES))
def test_embedding_layers(case, tmp_path):
    arch, targets, mode = EMBEDDING_CASES[case]
    models = {}
    for lib in (peft, peftfast):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = lib.LoraConfig(r=3, lora_alpha=5, target_modules=targets)
            models[lib] = lib.get_peft_model(BUILDERS[arch](), config)
        randomize_adapters(models[lib])
    models[peftfast].load_state_dict(models[peft].state_dict(), strict=True)
    save(models[peftfast], tmp_path / "probe", save_embedding_layers=mode)
    written = read_tensors(str(tmp_path / "probe" / "adapter_model.safetensors"))
    embedding_keys = {k for k in written if "lora_" not in k}
    assert bool(embedding_keys) == (mode is not False), embedding_keys
    for model in models.values():  # "fine-tune" exactly the saved embedding weights, so loading them matters
        params = dict(model.named_parameters(remove_duplicate=False))
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for key in sorted(embedding_keys):
                params[key].add_(torch.randn(params[key].shape, generator=g) * 0.1)
    for lib, model in models.items():
        save(model, tmp_path / lib.__name__, save_embedding_layers=mode)
    assert_same_files(tmp_path / "peft", tmp_path / "peftfast")
    batch = inputs()
    expected = logits(models[peft], batch)
    for src, dst in ((peft, peftfast), (peftfast, peft)):
        got = logits(load(dst, arch, str(tmp_path / src.__name__), ["default"]), batch)
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes(bias, tmp_path):
    """bias='all' writes every bias (with PEFT's extra spellings for the classifier copy) and must load both ways."""
    models = {}
    for lib in (peft, peftfast):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[lib] = lib.get_peft_model(tiny_bert_base(), lib.LoraConfig(
                r=3, lora_alpha=4, target_modules=["query", "value"], bias=bias, task_type="SEQ_CLS"))
        randomize_adapters(models[lib])
    with torch.no_grad():  # trained biases: all of them, or those of the adapted layers
        for name, p in models[peft].named_parameters():
            if name.endswith("bias") and (bias == "all" or "base_layer" in name):
                p.add_(torch.randn(p.shape) * 0.2)
    models[peftfast].load_state_dict(models[peft].state_dict(), strict=True)
    for lib, model in models.items():
        save(model, tmp_path / lib.__name__)
    assert_same_files(tmp_path / "peft", tmp_path / "peftfast")
    batch = inputs()
    expected = logits(models[peft], batch)
    for src, dst in ((peft, peftfast), (peftfast, peft)):
        loaded = load(dst, "bert", str(tmp_path / src.__name__), ["default"])
        torch.testing.assert_close(logits(loaded, batch), expected, atol=TOL, rtol=0)


def tiny_bert_base():
    return BUILDERS["bert"]()


def test_selected_adapters_like_peft(tmp_path):
    reference, ours, names = same_weights_pair("llama_linear_embedding")
    save(reference, tmp_path / "peft", selected_adapters=["other"])
    save(ours, tmp_path / "peftfast", selected_adapters=["other"])
    assert tree_files(tmp_path / "peftfast") == {"README.md", "other/adapter_config.json",
                                                 "other/adapter_model.safetensors"}
    assert_same_files(tmp_path / "peft", tmp_path / "peftfast")


def test_injected_model_uses_peft_state_dicts(tmp_path):
    """inject_adapter_in_model (no PeftModel wrapper, so no 'base_model.model.' prefix) reads and writes the same
    state dicts as PEFT's functions of the same name."""
    config = dict(r=3, lora_alpha=6, target_modules=["q_proj", "o_proj"])
    reference, _ = build(peft, "llama_linear_embedding")
    save(reference, tmp_path)
    saved = read_tensors(str(tmp_path / "adapter_model.safetensors"))

    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), BUILDERS["llama"]())
    ours = peftfast.inject_adapter_in_model(peftfast.LoraConfig(**config), BUILDERS["llama"]())
    randomize_adapters(theirs)
    ref_sd = peft.get_peft_model_state_dict(theirs)
    result = peftfast.set_peft_model_state_dict(ours, ref_sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    our_sd = peftfast.get_peft_model_state_dict(ours)
    assert our_sd.keys() == ref_sd.keys()
    for key in ref_sd:
        assert torch.equal(our_sd[key], ref_sd[key])
    torch.testing.assert_close(logits(ours, inputs()), logits(theirs, inputs()), atol=TOL, rtol=0)
    # a PeftModel's file (keys with the prefix) loads into the injected model too
    full = peftfast.inject_adapter_in_model(peftfast.LoraConfig(
        r=7, lora_alpha=11, target_modules=["q_proj", "v_proj", "embed_tokens"]), BUILDERS["llama"]())
    peftfast.set_peft_model_state_dict(full, saved, strict=True)
    reference.set_adapter("default")
    torch.testing.assert_close(logits(full, inputs()), logits(reference, inputs()), atol=TOL, rtol=0)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_requires_grad_and_mode_after_loading_match_peft(is_trainable, tmp_path):
    reference, names = build(peft, "bert_seq_cls")
    save(reference, tmp_path)
    flags, modes = {}, {}
    for lib in (peft, peftfast):
        loaded = load(lib, "bert", str(tmp_path), names, is_trainable=is_trainable)
        flags[lib] = {n for n, p in loaded.named_parameters() if p.requires_grad}
        modes[lib] = loaded.training
    assert flags[peftfast] == flags[peft]
    assert modes[peftfast] == modes[peft]
    if is_trainable:
        assert flags[peftfast] and all("lora_" in n or "modules_to_save" in n for n in flags[peftfast])
    else:
        assert not flags[peftfast]
