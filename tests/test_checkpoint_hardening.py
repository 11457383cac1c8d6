"""Saving and loading cannot corrupt a model or a checkpoint folder.

- An interrupted save (an exception or Ctrl-C while writing any file of any adapter) leaves the
  previous files byte-identical and no temporary files behind; files get the usual permissions.
- Adapter names that could escape the save folder or be misread inside parameter names are refused
  before anything is written.
- Every bad input in ``BAD_INPUTS`` fails with a documented exception type and a message naming the
  problem, through both ``PeftModel.from_pretrained`` and ``PeftModel.load_adapter``, and leaves the
  model exactly as it was (module tree, tensors, requires_grad, hooks, configs, active adapter).
- Forward compatibility: unknown config fields that are off load with one warning naming them all;
  unknown fields that are on, and known features peftfast lacks, are refused with a clear message.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_save

import peftfast
from peftfast.config import ConfigError
from peftfast.tuners.tuners_utils import AdapterError
from peftfast.utils.save_and_load import AdapterLoadError
from tests._ckpt_models import (assert_same_fingerprint, fingerprint, inputs, logits, randomize_adapters,
                                tiny_llama, tree_files)

DEFAULT = dict(r=7, lora_alpha=11, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["model.norm"],
               task_type="CAUSAL_LM")
OTHER = dict(r=2, lora_alpha=3, target_modules=["o_proj"], task_type="CAUSAL_LM")
LOAD_ERRORS = (FileNotFoundError, ConfigError, AdapterLoadError, AdapterError)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def trained_model(seed: int = 2):
    model = quiet(peftfast.get_peft_model, tiny_llama(), peftfast.LoraConfig(**DEFAULT))
    quiet(model.add_adapter, "other", peftfast.LoraConfig(**OTHER))
    model.set_adapter("default")
    randomize_adapters(model, seed=seed)
    return model


@pytest.fixture
def saved(tmp_path):
    """A folder holding adapters 'default' (top level) and 'other' (subfolder), and the model's outputs."""
    model = trained_model()
    folder = tmp_path / "adapter"
    quiet(model.save_pretrained, folder)
    return folder, logits(model, inputs())


def snapshot_bytes(folder) -> dict[str, bytes]:
    out = {}
    for rel in tree_files(folder):
        with open(os.path.join(folder, rel), "rb") as f:
            out[rel] = f.read()
    return out


# ---------------------------------------------------------------------------------------------------------
# atomic saves
# ---------------------------------------------------------------------------------------------------------
class Crash(Exception):
    pass


def _failing_serialiser(exc: BaseException, fail_on_call: int):
    """safetensors' serialiser (``safetensors.torch.save``, whose bytes the save writes to its staged file) that, on
    call number ``fail_on_call``, raises ``exc`` (the staged file is then never written)."""
    real = safetensors_save
    calls = {"n": 0}

    def fake(tensors, metadata=None):
        calls["n"] += 1
        data = real(tensors, metadata=metadata)
        if calls["n"] == fail_on_call:
            raise exc
        return data

    return fake


@pytest.mark.parametrize("exc", [Crash("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
@pytest.mark.parametrize("fail_on_call", [1, 2], ids=["first-adapter", "second-adapter"])
def test_interrupted_save_keeps_previous_adapter(saved, monkeypatch, exc, fail_on_call):
    folder, expected = saved
    before = snapshot_bytes(folder)
    newer = trained_model(seed=3)  # different weights: a completed save would change the files
    monkeypatch.setattr("safetensors.torch.save", _failing_serialiser(exc, fail_on_call))
    with pytest.raises(type(exc)):
        quiet(newer.save_pretrained, folder)
    monkeypatch.undo()
    assert snapshot_bytes(folder) == before  # every file of every adapter, byte for byte, and no temp files
    reloaded = quiet(peftfast.PeftModel.from_pretrained, tiny_llama(), str(folder))
    torch.testing.assert_close(logits(reloaded, inputs()), expected, atol=0, rtol=0)


def test_failure_while_renaming_leaves_no_temp_files(saved, monkeypatch):
    folder, _ = saved
    before = snapshot_bytes(folder)
    real_replace = os.replace

    def failing_replace(src, dst):
        raise Crash("rename refused")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(Crash):
        quiet(trained_model(seed=3).save_pretrained, folder)
    monkeypatch.setattr(os, "replace", real_replace)
    assert snapshot_bytes(folder) == before


def test_interrupted_bin_save_keeps_previous_adapter(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    quiet(trained_model().save_pretrained, folder, safe_serialization=False)
    before = snapshot_bytes(folder)
    real = torch.save

    def broken(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        raise Crash("killed")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(Crash):
        quiet(trained_model(seed=3).save_pretrained, folder, safe_serialization=False)
    monkeypatch.undo()
    assert snapshot_bytes(folder) == before


def test_saved_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        quiet(trained_model().save_pretrained, tmp_path / "perm")
    finally:
        os.umask(old)
    for rel in tree_files(tmp_path / "perm"):
        assert stat.S_IMODE(os.stat(tmp_path / "perm" / rel).st_mode) == 0o644, rel


def test_switching_format_removes_the_stale_weights_file(tmp_path):
    model = trained_model()
    quiet(model.save_pretrained, tmp_path)
    quiet(model.save_pretrained, tmp_path, safe_serialization=False)
    assert "adapter_model.safetensors" not in os.listdir(tmp_path)
    assert "adapter_model.bin" in os.listdir(tmp_path / "other")
    reloaded = quiet(peftfast.PeftModel.from_pretrained, tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(reloaded, inputs()), logits(model, inputs()), atol=0, rtol=0)


def test_nothing_written_when_not_main_process_or_bad_option(tmp_path):
    model = trained_model()
    quiet(model.save_pretrained, tmp_path / "a", is_main_process=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="save_embedding_layers must be 'auto', True or False"):
        model.save_pretrained(tmp_path / "b", save_embedding_layers="yes")
    assert not (tmp_path / "b").exists()
    with pytest.raises(AdapterError, match=r"selected_adapters \['nope'\] not found; available: default, other"):
        model.save_pretrained(tmp_path / "c", selected_adapters=["nope"])
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------------------
# adapter names
# ---------------------------------------------------------------------------------------------------------
BAD_NAMES = ["../evil", "..", ".", "a/b", "a\\b", "/abs", "~home", "x\x00y", "tab\tname", " padded", "",
             "   ", "v1.0", "c:d", "weight", "base_layer", "__base__", "n" * 201, 7, None]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:12] for n in BAD_NAMES])
def test_bad_adapter_names_are_refused_everywhere(name, saved, tmp_path):
    folder, _ = saved
    model = trained_model()
    before = fingerprint(model)
    with pytest.raises(AdapterError, match="adapter name"):
        model.add_adapter(name, peftfast.LoraConfig(**OTHER))
    with pytest.raises(AdapterError, match="adapter name"):
        model.load_adapter(str(folder / "other"), adapter_name=name)
    assert_same_fingerprint(before, fingerprint(model))
    with pytest.raises(AdapterError, match="adapter name"):
        peftfast.get_peft_model(tiny_llama(), peftfast.LoraConfig(**OTHER), adapter_name=name)
    with pytest.raises(AdapterError, match="adapter name"):
        peftfast.PeftModel.from_pretrained(tiny_llama(), str(folder), adapter_name=name)
    # a name smuggled into peft_config directly is still refused by save_pretrained, before anything is written
    if isinstance(name, str) and name:
        model.peft_config[name] = model.peft_config["other"]
        out = tmp_path / "out" / "inner"
        with pytest.raises(AdapterError, match="adapter name"):
            model.save_pretrained(out)
        assert not (tmp_path / "out").exists()
        del model.peft_config[name]


# ---------------------------------------------------------------------------------------------------------
# bad inputs: type, message, and an untouched model
# ---------------------------------------------------------------------------------------------------------
def edit_config(folder, fn):
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        data = json.load(f)
    fn(data)
    with open(path, "w") as f:
        json.dump(data, f)


def write_bytes(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)


def edit_weights(folder, fn):
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = dict(load_file(path))
    fn(tensors)
    save_file(tensors, path)


def truncate(path, keep: float):
    with open(path, "rb") as f:
        data = f.read()
    write_bytes(path, data[: int(len(data) * keep)])


def to_bin(folder, fn=None):
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = dict(load_file(path))
    os.remove(path)
    obj = fn(tensors) if fn else tensors
    torch.save(obj, os.path.join(folder, "adapter_model.bin"))


class Payload:
    """Unpickling this runs a command: a .bin carrying it must be refused without running it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _key(folder, part: str) -> str:
    return next(k for k in sorted(load_file(os.path.join(folder, "adapter_model.safetensors"))) if part in k)


A_KEY = "layers.0.self_attn.q_proj.lora_A.weight"

# name -> (mutation of the saved folder, exception type, regex the message must match)
BAD_INPUTS = {
    "missing folder": (lambda d: os.rename(d, str(d) + "_gone"), FileNotFoundError, r"no folder .*adapter"),
    "missing config": (lambda d: os.remove(d / "adapter_config.json"), FileNotFoundError,
                       r"adapter_config\.json not found in .* \(it holds: README\.md, adapter_model\.safetensors"),
    "missing weights": (lambda d: os.remove(d / "adapter_model.safetensors"), FileNotFoundError,
                        r"no adapter weights \(adapter_model\.safetensors or adapter_model\.bin\) found"),
    "config not JSON": (lambda d: write_bytes(d / "adapter_config.json", b'{"r": 7, "peft_type": "LO'),
                        ConfigError, r"adapter_config\.json is not valid JSON \(.*: line 1, column \d+\)"),
    "config is a list": (lambda d: write_bytes(d / "adapter_config.json", b"[1, 2]"), ConfigError,
                         r"must hold a JSON object, found list"),
    "config not UTF-8": (lambda d: write_bytes(d / "adapter_config.json", b'{"r": "\xff\xfe"}'), ConfigError,
                         r"is not UTF-8 text"),
    "unknown peft_type": (lambda d: edit_config(d, lambda c: c.update(peft_type="MAGIC")), ConfigError,
                          r"peft_type 'MAGIC' in .* is not supported by peftfast; supported: LORA"),
    "unsupported PEFT method": (lambda d: edit_config(d, lambda c: c.update(peft_type="BOFT")), ConfigError,
                                r"peft_type 'BOFT' .*a PEFT method peftfast does not implement\); supported"),
    "no peft_type": (lambda d: edit_config(d, lambda c: c.pop("peft_type")), ConfigError, r"has no 'peft_type'"),
    "wrong field type": (lambda d: edit_config(d, lambda c: c.update(fan_in_fan_out="yes")), ConfigError,
                         r"field fan_in_fan_out='yes' has the wrong type; expected true/false"),
    "bad value": (lambda d: edit_config(d, lambda c: c.update(lora_dropout=1.5)), ConfigError,
                  r"lora_dropout must be a number in \[0, 1\), got 1\.5"),
    "unknown field switched on": (lambda d: edit_config(d, lambda c: c.update(use_hyper_lora=True, rank_warmup=4)),
                                  ConfigError, r"unknown fields rank_warmup=4, use_hyper_lora=True .*only accepted "
                                               r"when they are off"),
    "DoRA switched on without magnitudes": (lambda d: edit_config(d, lambda c: c.update(use_dora=True)),
                                            AdapterLoadError, r"lora_magnitude_vector"),
    "LoftQ init": (lambda d: edit_config(d, lambda c: c.update(init_lora_weights="loftq")), ConfigError,
                   r"init_lora_weights='loftq' asks for LoftQ .*; supported: True, False, 'gaussian'"),
    "target the model lacks": (lambda d: edit_config(d, lambda c: c.update(target_modules=["qkv"])),
                               AdapterLoadError, r"does not fit this model: .*'qkv' matched no module"),
    "truncated safetensors": (lambda d: truncate(d / "adapter_model.safetensors", 0.6), AdapterLoadError,
                              r"adapter_model\.safetensors is not a readable safetensors file \(truncated or damaged"),
    "empty safetensors": (lambda d: write_bytes(d / "adapter_model.safetensors", b""), AdapterLoadError,
                          r"not a readable safetensors file"),
    "junk safetensors": (lambda d: write_bytes(d / "adapter_model.safetensors", os.urandom(300)), AdapterLoadError,
                         r"not a readable safetensors file"),
    "shape mismatch (r differs)": (lambda d: edit_config(d, lambda c: c.update(r=3)), AdapterLoadError,
                                   r"shape mismatch .*base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A"
                                   r"\.weight: checkpoint has shape \(7, 24\), the model expects \(3, 24\)"),
    "missing key": (lambda d: edit_weights(d, lambda t: t.pop(_key(d, "layers.1.self_attn.v_proj.lora_B"))),
                    AdapterLoadError, r"missing keys \(1 of the adapter's \d+ weights are not in the checkpoint\): "
                                      r"base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight"),
    "unexpected key": (lambda d: edit_weights(d, lambda t: t.update(
        {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.randn(7, 24)})), AdapterLoadError,
                       r"unexpected keys \(not part of adapter '\w+' of this model\): "
                       r"base_model\.model\.model\.layers\.0\.mlp\.up_proj\.lora_A\.weight"),
    "renamed key": (lambda d: edit_weights(d, lambda t: t.update(
        {_key(d, A_KEY).replace("lora_A", "lora_a"): t.pop(_key(d, A_KEY))})), AdapterLoadError,
                    r"unexpected keys .*q_proj\.lora_a\.weight.*missing keys .*q_proj\.lora_A\.weight"),
    "integer dtype": (lambda d: edit_weights(d, lambda t: t.update({_key(d, A_KEY): t[_key(d, A_KEY)].int()})),
                      AdapterLoadError, r"q_proj\.lora_A\.weight: dtype torch\.int32, the model expects a "
                                        r"floating-point tensor"),
    "NaN values": (lambda d: edit_weights(d, lambda t: t[_key(d, "embedding_B")].__setitem__((0, 0), float("nan"))),
                   AdapterLoadError, r"lora_embedding_B: holds NaN or inf values"),
    "malicious .bin": (lambda d: to_bin(d, lambda t: {**t, "x": Payload(str(d / "PWNED"))}), AdapterLoadError,
                       r"could not be read as a PyTorch weights file .*weights_only loading refuses"),
    ".bin holding a list": (lambda d: to_bin(d, lambda t: list(t.values())), AdapterLoadError,
                            r"adapter_model\.bin must hold a dict of name -> tensor, found list"),
    ".bin with a non-tensor": (lambda d: to_bin(d, lambda t: {**t, next(k for k in t if A_KEY in k): [1.0, 2.0]}),
                               AdapterLoadError,
                               r"q_proj\.lora_A\.weight: not a tensor but a list"),
    "truncated .bin": (lambda d: (to_bin(d), truncate(d / "adapter_model.bin", 0.5)), AdapterLoadError,
                       r"could not be read as a PyTorch weights file"),
}


@pytest.mark.parametrize("via", ["from_pretrained", "load_adapter"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(case, via, saved):
    folder, _ = saved
    mutate, exc_type, pattern = BAD_INPUTS[case]
    mutate(folder)
    if via == "from_pretrained":
        model = tiny_llama()
        load = lambda: peftfast.PeftModel.from_pretrained(model, str(folder))  # noqa: E731
    else:
        model = quiet(peftfast.get_peft_model, tiny_llama(), peftfast.LoraConfig(**OTHER))
        randomize_adapters(model)
        load = lambda: model.load_adapter(str(folder), adapter_name="new")  # noqa: E731
    before = fingerprint(model)
    with pytest.raises(LOAD_ERRORS) as info:
        quiet(load)
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    assert re.search(pattern, str(info.value)), str(info.value)
    assert_same_fingerprint(before, fingerprint(model))
    assert not (folder / "PWNED").exists() and not os.path.exists(str(folder) + "/PWNED")


def test_peft_itself_leaves_a_half_added_adapter(saved):
    """What "do better" means: PEFT's load_adapter leaves the new adapter behind when its weights do not fit."""
    peft = pytest.importorskip("peft")
    folder, _ = saved
    edit_config(folder, lambda c: c.update(r=3))
    theirs = quiet(peft.get_peft_model, tiny_llama(), peft.LoraConfig(**OTHER))
    with pytest.raises(Exception):
        quiet(theirs.load_adapter, str(folder), adapter_name="new")
    assert "new" in theirs.peft_config
    ours = quiet(peftfast.get_peft_model, tiny_llama(), peftfast.LoraConfig(**OTHER))
    with pytest.raises(AdapterLoadError):
        quiet(ours.load_adapter, str(folder), adapter_name="new")
    assert "new" not in ours.peft_config


def test_peft_raises_bare_keyerror_for_unknown_peft_type(saved):
    peft = pytest.importorskip("peft")
    folder, _ = saved
    edit_config(folder, lambda c: c.update(peft_type="MAGIC"))
    with pytest.raises(KeyError):
        quiet(peft.PeftModel.from_pretrained, tiny_llama(), str(folder))
    with pytest.raises(ConfigError, match="peft_type 'MAGIC'"):
        peftfast.PeftModel.from_pretrained(tiny_llama(), str(folder))


# ---------------------------------------------------------------------------------------------------------
# forward compatibility
# ---------------------------------------------------------------------------------------------------------
def test_unknown_fields_that_are_off_load_with_one_warning(saved):
    folder, expected = saved
    edit_config(folder, lambda c: c.update(peft_version="0.30.0", use_magic=False, magic_config=None,
                                           magic_modules=[], magic_pattern={}, magic_name=""))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peftfast.PeftModel.from_pretrained(tiny_llama(), str(folder))
    about = [w for w in caught if "does not know" in str(w.message)]
    assert len(about) == 1, [str(w.message) for w in caught]
    for name in ("use_magic", "magic_config", "magic_modules", "magic_pattern", "magic_name"):
        assert name in str(about[0].message)
    torch.testing.assert_close(logits(model, inputs()), expected, atol=0, rtol=0)


@pytest.mark.parametrize("value", [True, 1, 0.5, "on", [1], {"a": 1}])
def test_unknown_field_that_is_on_is_refused(saved, value):
    folder, _ = saved
    edit_config(folder, lambda c: c.update(use_magic=value))
    with pytest.raises(ConfigError, match=re.escape(f"unknown field use_magic={value!r}")):
        peftfast.PeftConfig.from_pretrained(str(folder))


@pytest.mark.parametrize("field,value,feature", [
    ("use_qalora", True, "QA-LoRA"),
    ("layer_replication", [[0, 1]], "layer replication"), ("alora_invocation_tokens", [5], "activated LoRA"),
    ("loftq_config", {"loftq_bits": 4}, "LoftQ"), ("eva_config", {"rho": 2.0}, "EVA"),
])
def test_known_features_peftfast_lacks_are_refused(saved, field, value, feature):
    folder, _ = saved
    edit_config(folder, lambda c: c.update({field: value}))
    with pytest.raises(ConfigError, match=re.escape(f"{field}={value!r} asks for {feature}")):
        peftfast.PeftConfig.from_pretrained(str(folder))


@pytest.mark.parametrize("init", ["loftq", "eva", "corda", "lora_ga"])
def test_init_methods_peftfast_lacks_are_refused(saved, init):
    folder, _ = saved
    edit_config(folder, lambda c: c.update(init_lora_weights=init))
    with pytest.raises(ConfigError, match=re.escape(f"init_lora_weights={init!r} asks for ")):
        peftfast.PeftConfig.from_pretrained(str(folder))


def test_config_class_must_match_peft_type(saved):
    folder, _ = saved
    config = peftfast.LoraConfig.from_pretrained(str(folder))
    assert config.r == 7 and config.peft_type == peftfast.PeftType.LORA
    edit_config(folder, lambda c: c.update(peft_type="IA3"))
    with pytest.raises(ConfigError, match="holds a 'IA3' adapter, not 'LORA'"):
        peftfast.LoraConfig.from_pretrained(str(folder))


def test_byte_order_mark_is_tolerated(saved):
    folder, expected = saved
    path = folder / "adapter_config.json"
    write_bytes(path, b"\xef\xbb\xbf" + path.read_bytes())
    model = quiet(peftfast.PeftModel.from_pretrained, tiny_llama(), str(folder))
    torch.testing.assert_close(logits(model, inputs()), expected, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# loading behaviour
# ---------------------------------------------------------------------------------------------------------
def test_loaded_adapters_are_frozen_unless_trainable(saved):
    folder, _ = saved
    model = peftfast.PeftModel.from_pretrained(tiny_llama(), str(folder))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    model.load_adapter(str(folder / "other"), adapter_name="other")
    assert not any(p.requires_grad for p in model.parameters())
    model.load_adapter(str(folder / "other"), adapter_name="other2", is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other2." in n for n in trainable)
    trained = peftfast.PeftModel.from_pretrained(tiny_llama(), str(folder), is_trainable=True)
    names = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert names and all(("lora_" in n or "modules_to_save" in n) and (".default." in n or n.endswith(".default"))
                         for n in names)


def test_loading_into_an_existing_adapter_replaces_its_weights(saved):
    folder, expected = saved
    model = quiet(peftfast.get_peft_model, tiny_llama(), peftfast.LoraConfig(**DEFAULT))
    model.load_adapter(str(folder), adapter_name="default")
    torch.testing.assert_close(logits(model, inputs()), expected, atol=0, rtol=0)
    with pytest.warns(UserWarning, match="config differs in r, lora_alpha, target_modules"):
        with pytest.raises(AdapterLoadError, match="unexpected keys"):
            model.load_adapter(str(folder / "other"), adapter_name="default")
    torch.testing.assert_close(logits(model, inputs()), expected, atol=0, rtol=0)


def test_embedding_weights_in_the_pre_base_layer_spelling_load(saved):
    """Files from before PEFT wrapped targeted embeddings name the weight 'embed_tokens.weight'."""
    folder, _ = saved
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    g = torch.Generator().manual_seed(4)

    def respell(t):
        old = t.pop(key)
        t[key.replace(".base_layer", "")] = old + torch.randn(old.shape, generator=g)

    edit_weights(folder, respell)
    weight = load_file(folder / "adapter_model.safetensors")[key.replace(".base_layer", "")]
    model = quiet(peftfast.PeftModel.from_pretrained, tiny_llama(), str(folder))
    assert torch.equal(model.get_input_embeddings().base_layer.weight, weight)


def test_subfolder_keyword(saved):
    folder, _ = saved
    model = quiet(peftfast.PeftModel.from_pretrained, tiny_llama(), str(folder), subfolder="other")
    assert model.peft_config["default"].r == 2


# ---------------------------------------------------------------------------------------------------------
# the Hub path (no network: HF_HUB_OFFLINE and a local Hub cache)
# ---------------------------------------------------------------------------------------------------------
def _fake_hub_cache(cache, repo: str, revisions: dict[str, str]) -> None:
    """Lay out ``cache`` as huggingface_hub does: refs/<revision> -> commit, snapshots/<commit>/<files>."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for revision, source in revisions.items():
        commit = hashlib.sha1(revision.encode()).hexdigest()
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / revision).write_text(commit)
        snap = root / "snapshots" / commit
        snap.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (snap / name).write_bytes((source / name).read_bytes())


def test_hub_id_is_resolved_from_the_cache_at_the_requested_revision(saved, tmp_path, monkeypatch):
    folder, expected = saved
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_hub_cache(tmp_path / "cache", "org/tiny-adapter", {"main": folder, "v1": folder / "other"})
    cache = str(tmp_path / "cache")
    model = quiet(peftfast.PeftModel.from_pretrained, tiny_llama(), "org/tiny-adapter", cache_dir=cache)
    torch.testing.assert_close(logits(model, inputs()), expected, atol=0, rtol=0)
    config = peftfast.PeftConfig.from_pretrained("org/tiny-adapter", revision="v1", cache_dir=cache)
    assert config.r == 2
    with pytest.raises(FileNotFoundError, match=r"revision='v2'.*HF_HUB_OFFLINE is set"):
        peftfast.PeftConfig.from_pretrained("org/tiny-adapter", revision="v2", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"could not find adapter_config\.json for 'org/absent'"):
        peftfast.PeftModel.from_pretrained(tiny_llama(), "org/absent", cache_dir=cache)


# ---------------------------------------------------------------------------------------------------------
# model card
# ---------------------------------------------------------------------------------------------------------
def test_model_card_keeps_existing_text_and_metadata(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My adapter\n\nNotes.\n")
    model = trained_model()
    quiet(model.save_pretrained, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "# My adapter" in text and "Notes." in text and "license: mit" in text
    assert "library_name: peft" in text and "- mine" in text and "- lora" in text
    assert "pipeline_tag: text-generation" in text
    quiet(model.save_pretrained, tmp_path)  # idempotent
    assert (tmp_path / "README.md").read_text() == text


def test_model_card_with_broken_metadata_is_left_alone(tmp_path):
    broken = "---\ntags: [unclosed\n---\nbody\n"
    (tmp_path / "README.md").write_text(broken)
    with pytest.warns(UserWarning, match="not valid YAML; the model card was left unchanged"):
        trained_model().save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == broken
    assert (tmp_path / "adapter_model.safetensors").exists()
