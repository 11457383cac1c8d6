"""Hostile inputs: every case either works end to end or fails with a documented error naming the rule, leaves the
model bit-identical and the checkpoint folder byte-identical, and stays within the documented bounds on memory and
work (README, "Bounds on inputs").

1. Adapter names: names torch cannot store (attributes of nn.Module / ModuleDict / ParameterDict) and malformed
   names are refused on every entry point; names that are also module names of the model ('model', 'layers', '0',
   'q_proj', 'h', ...) work: add, forward, save, load, and the other adapters' files keep all their tensors.
2. Checkpoint dtypes: float8 / half / double weights load (cast to the adapter's dtype, NaN/inf still refused);
   integer, bool and complex weights are refused with a message; nothing raises NotImplementedError.
3. Oversized inputs: a 1 GiB adapter_config.json is refused without being read, deep nesting is a ConfigError,
   r=10**9 is refused from the safetensors header before any allocation, 10^6 target names are matched with set
   lookups, a catastrophic regex is stopped by the match budget, messages are capped.
4. API misuse: set_adapter(None / [] / 3), from_pretrained on a PeftModel, save after merge_and_unload, loading
   into a merged adapter, merging into tied weights, add_adapter with a dict.
"""
from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import peftfast
from peftfast import zoo
from peftfast.config import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, ConfigError, read_config_json
from peftfast.tuners.tuners_utils import AdapterError, find_minimal_target_modules, validate_adapter_name
from peftfast.utils.errors import MAX_MESSAGE_CHARS, cap_message, short_repr
from peftfast.utils.save_and_load import AdapterLoadError
from tests._ckpt_models import (assert_same_fingerprint, fingerprint, inputs, logits, randomize_adapters,
                                tiny_gpt2, tiny_llama, tree_files)

LORA = dict(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def llama_peft(**kw) -> peftfast.PeftModel:
    pm = peftfast.get_peft_model(tiny_llama(), peftfast.LoraConfig(**dict(LORA, **kw)))
    randomize_adapters(pm, seed=5)
    return pm.eval()


def folder_digest(root) -> dict[str, str]:
    """Every file under ``root`` and a hash of its bytes."""
    out = {}
    for rel in sorted(tree_files(root)):
        with open(os.path.join(root, rel), "rb") as f:
            out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def saved(tmp_path):
    """A folder with one saved adapter ('default') and the outputs of the model that wrote it."""
    pm = llama_peft()
    folder = str(tmp_path / "ckpt")
    pm.save_pretrained(folder)
    return folder, logits(pm, inputs())


def edit_config(folder, **changes) -> None:
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


# ---------------------------------------------------------------------------------------------------------------
# 1. Adapter names
# ---------------------------------------------------------------------------------------------------------------
TORCH_ATTRIBUTES = ["training", "forward", "to", "state_dict", "__class__", "keys", "items", "update", "cuda",
                    "_modules", "__init__", "parameters", "register_buffer", "pop"]
MALFORMED = ["", "   ", "a.b", "a/b", "../x", "..", "a\\b", "x:y", "\x00", " pad", "tab\t", "~home", "a" * 201,
             "\ud800"]
NOT_STR = [None, 1, b"bytes", ["a"], ("a",), 1.5]


def _entry_points(pm, name, folder):
    """Every way a user can hand an adapter name to peftfast."""
    cfg = peftfast.LoraConfig(**dict(LORA, target_modules=["k_proj"]))
    return {
        "add_adapter": lambda: pm.add_adapter(name, cfg),
        "load_adapter": lambda: pm.load_adapter(folder, name),
        "get_peft_model": lambda: peftfast.get_peft_model(tiny_llama(), cfg, adapter_name=name),
        "from_pretrained": lambda: peftfast.PeftModel.from_pretrained(tiny_llama(), folder, adapter_name=name),
        "inject_adapter_in_model": lambda: peftfast.inject_adapter_in_model(cfg, tiny_llama(), adapter_name=name),
        "LoraModel": lambda: peftfast.LoraModel(tiny_llama(), cfg, name),
    }


@pytest.mark.parametrize("names", [TORCH_ATTRIBUTES, MALFORMED + NOT_STR], ids=["torch-attributes", "malformed"])
def test_bad_names_are_refused_on_every_entry_point(names, saved):
    folder, _ = saved
    pm = llama_peft()
    before, files = fingerprint(pm), folder_digest(folder)
    for name in names:
        for entry, call in _entry_points(pm, name, folder).items():
            with pytest.raises(AdapterError) as info:
                call()
            message = str(info.value)
            if name in TORCH_ATTRIBUTES:
                assert "attribute of torch's nn.Module" in message, (entry, message)
            assert len(message) <= MAX_MESSAGE_CHARS
    assert_same_fingerprint(before, fingerprint(pm))
    assert folder_digest(folder) == files


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(set(dir(nn.ModuleDict())) | set(dir(nn.ParameterDict())))))
def test_every_container_attribute_is_refused(name):
    with pytest.raises(AdapterError, match="attribute of torch"):
        validate_adapter_name(name)


@settings(max_examples=60, deadline=None)
@given(name=st.text(max_size=30))
def test_any_text_name_is_refused_or_storable(name):
    """The rule is complete: a name that passes validation can be stored in every per-adapter container."""
    try:
        validate_adapter_name(name)
    except AdapterError:
        return
    for container in (nn.ModuleDict(), nn.ParameterDict()):
        container[name] = nn.Linear(1, 1) if isinstance(container, nn.ModuleDict) else nn.Parameter(torch.ones(1))
        assert name in container and len(container) == 1


# Names that are also module names (path pieces) of GPT-2 or Llama: they work, and the other adapters' files keep
# every tensor. GPT-2 with bias='all' on 'default' saves every bias of the model, so an adapter named like a path
# piece ('h', 'transformer', '0', 'attn') is where a name-based filter would drop keys.
PATH_NAMES = ["transformer", "h", "0", "c_attn"]


@pytest.mark.parametrize("name", PATH_NAMES)
def test_names_that_are_module_names_work_end_to_end(name, tmp_path):
    def build():
        pm = peftfast.get_peft_model(tiny_gpt2(), peftfast.LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn"],
                                                                      bias="all", task_type="CAUSAL_LM"))
        pm.add_adapter(name, peftfast.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn"],
                                                 task_type="CAUSAL_LM"))
        return pm

    pm = build()
    randomize_adapters(pm, seed=7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if n.endswith(".bias"):
                p.add_(0.1)  # trained biases differ from the base model's
    batch = inputs()
    pm.eval()
    outs = {}
    for adapter in ("default", name):
        pm.set_adapter(adapter)
        outs[adapter] = logits(pm, batch)
    assert not torch.equal(outs["default"], outs[name])
    pm.save_pretrained(str(tmp_path / "a"))

    default_keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    expected = {k for k in pm.state_dict() if "lora_" in k and ".default." in k and "c_attn" in k}
    n_biases = sum(1 for k in pm.get_base_model().state_dict() if k.endswith(".bias") and "lora_" not in k)
    assert len(default_keys) == len(expected) + n_biases, sorted(default_keys)
    assert len(load_file(str(tmp_path / "a" / name / "adapter_model.safetensors"))) == \
        sum(1 for n, _ in pm.named_parameters() if f"lora_A.{name}." in n or f"lora_B.{name}." in n)

    loaded = peftfast.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "a"))
    loaded.load_adapter(str(tmp_path / "a" / name), name)
    for adapter in ("default", name):
        loaded.set_adapter(adapter)
        assert torch.equal(logits(loaded, batch), outs[adapter]), adapter


def test_path_name_adapter_loads_in_peft(tmp_path):
    """The file of an adapter named like a module carries no name: real PEFT loads it with the same outputs."""
    import peft

    pm = llama_peft()
    pm.add_adapter("layers", peftfast.LoraConfig(**dict(LORA, target_modules=["o_proj"])))
    randomize_adapters(pm, seed=9)
    pm.set_adapter("layers")
    expected = logits(pm, inputs())
    pm.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "layers"))
    torch.testing.assert_close(logits(theirs, inputs()), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# 2. Checkpoint dtypes
# ---------------------------------------------------------------------------------------------------------------
def _rewrite_weights(folder, fn) -> dict[str, torch.Tensor]:
    path = os.path.join(folder, "adapter_model.safetensors")
    state = {k: fn(v) for k, v in load_file(path).items()}
    save_file(state, path, metadata={"format": "pt"})
    return state


FLOAT_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_float_checkpoints_load_cast_to_the_adapter_dtype(dtype, saved):
    folder, _ = saved
    written = _rewrite_weights(folder, lambda t: t.to(dtype))
    loaded = peftfast.PeftModel.from_pretrained(tiny_llama(), folder)
    sd = loaded.state_dict()
    for key, tensor in written.items():
        model_key = key.replace(".weight", ".default.weight")
        assert sd[model_key].dtype == torch.float32
        assert torch.equal(sd[model_key], tensor.to(torch.float32)), key
    # The outputs are those of a model holding exactly the rounded weights.
    ref = llama_peft()
    with torch.no_grad():
        for key, tensor in written.items():
            ref.state_dict()[key.replace(".weight", ".default.weight")].copy_(tensor.to(torch.float32))
    assert torch.equal(logits(loaded, inputs()), logits(ref, inputs()))


@pytest.mark.parametrize("dtype,bad", [(torch.float8_e4m3fn, float("nan")), (torch.float8_e5m2, float("inf")),
                                       (torch.float8_e5m2, float("nan")), (torch.float16, float("-inf"))], ids=str)
def test_non_finite_low_precision_weights_are_refused(dtype, bad, saved):
    folder, _ = saved

    def poison(t):
        t = t.to(dtype).clone()
        t.view(-1)[1] = bad
        return t

    _rewrite_weights(folder, poison)
    pm = llama_peft()
    before, files = fingerprint(pm), folder_digest(folder)
    with pytest.raises(AdapterLoadError, match="NaN or inf"):
        pm.load_adapter(folder, "default")
    assert_same_fingerprint(before, fingerprint(pm))
    assert folder_digest(folder) == files


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64, torch.uint16], ids=str)
@pytest.mark.parametrize("via", ["from_pretrained", "load_adapter"])
def test_non_float_weights_are_refused(dtype, via, saved):
    folder, _ = saved
    _rewrite_weights(folder, lambda t: (t * 10).to(dtype) if dtype != torch.complex64 else torch.complex(t, t))
    pm = llama_peft()
    base = tiny_llama()
    before, before_base, files = fingerprint(pm), fingerprint(base), folder_digest(folder)
    with pytest.raises(AdapterLoadError, match=rf"dtype {dtype}, the model expects a floating-point tensor"):
        if via == "from_pretrained":
            peftfast.PeftModel.from_pretrained(base, folder)
        else:
            pm.load_adapter(folder, "default")
    assert_same_fingerprint(before, fingerprint(pm))
    assert_same_fingerprint(before_base, fingerprint(base))
    assert folder_digest(folder) == files


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtypes=st.lists(st.sampled_from(FLOAT_DTYPES + [torch.int8, torch.bool, torch.complex64]), min_size=8,
                       max_size=8))
def test_mixed_dtype_checkpoints_load_or_fail_cleanly(dtypes, tmp_path_factory):
    """Each tensor of the file in its own dtype: the load succeeds exactly when every dtype is floating point."""
    folder = str(tmp_path_factory.mktemp("mixed"))
    pm = llama_peft()
    pm.save_pretrained(folder)
    path = os.path.join(folder, "adapter_model.safetensors")
    state = load_file(path)
    state = {k: (torch.complex(v, v) if d == torch.complex64 else v.to(d)) for (k, v), d in
             zip(sorted(state.items()), dtypes)}
    save_file(state, path)
    target = llama_peft()
    before = fingerprint(target)
    if all(d.is_floating_point for d in dtypes):
        target.load_adapter(folder, "default")
        for k, v in state.items():
            assert torch.equal(target.state_dict()[k.replace(".weight", ".default.weight")], v.to(torch.float32))
    else:
        with pytest.raises(AdapterLoadError, match="floating-point"):
            target.load_adapter(folder, "default")
        assert_same_fingerprint(before, fingerprint(target))


# ---------------------------------------------------------------------------------------------------------------
# 3. Oversized inputs
# ---------------------------------------------------------------------------------------------------------------
def test_huge_config_file_is_refused_unread(saved):
    folder, _ = saved
    path = os.path.join(folder, "adapter_config.json")
    with open(path, "r+b") as f:
        f.truncate(2**30)  # a sparse 1 GiB file: reading it whole would allocate 1 GiB
    base = tiny_llama()
    before = fingerprint(base)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=rf"more than {MAX_CONFIG_BYTES} bytes"):
            peftfast.PeftModel.from_pretrained(base, folder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak} bytes allocated while refusing the file"
    assert_same_fingerprint(before, fingerprint(base))


def test_config_just_over_the_cap_is_refused(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text('{"r": 8, "pad": "' + "x" * MAX_CONFIG_BYTES + '"}')
    with pytest.raises(ConfigError, match="more than"):
        read_config_json(str(path))


@pytest.mark.parametrize("depth", [MAX_CONFIG_DEPTH + 1, 5000, 100_000])
def test_deeply_nested_config_is_a_config_error(depth, saved):
    folder, _ = saved
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        data = json.load(f)
    text = json.dumps(data)[:-1] + ', "layer_replication": ' + "[" * depth + "]" * depth + "}"
    with open(path, "w") as f:
        f.write(text)
    base = tiny_llama()
    before = fingerprint(base)
    with pytest.raises(ConfigError, match=rf"more than {MAX_CONFIG_DEPTH} levels deep"):
        peftfast.PeftModel.from_pretrained(base, folder)
    assert_same_fingerprint(before, fingerprint(base))


@settings(max_examples=50, deadline=None)
@given(value=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                          lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids,
                                                                                      max_size=3),
                          max_leaves=60))
def test_any_json_config_reads_or_raises_config_error(value, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "target_modules": value}))
    try:
        config = peftfast.PeftConfig.from_pretrained(str(path.parent))
    except ConfigError as e:
        assert len(str(e)) <= MAX_MESSAGE_CHARS
    else:
        assert isinstance(config, peftfast.LoraConfig)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("field,value", [("r", 10**9), ("r", 10**5), ("rank_pattern", {"q_proj": 10**9})])
def test_huge_rank_is_refused_before_allocating(fmt, field, value, tmp_path):
    pm = llama_peft()
    folder = str(tmp_path / "ckpt")
    pm.save_pretrained(folder, safe_serialization=fmt == "safetensors")
    edit_config(folder, **{field: value})
    base = tiny_llama()
    before, files = fingerprint(base), folder_digest(folder)
    tracemalloc.start()
    try:
        with pytest.raises(AdapterLoadError, match=r"no tensor in the weights file has a dimension that large"):
            peftfast.PeftModel.from_pretrained(base, folder)
        with pytest.raises(AdapterLoadError, match=r"asks for rank"):
            pm.load_adapter(folder, "second")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak} bytes allocated while refusing r={value}"
    assert_same_fingerprint(before, fingerprint(base))
    assert folder_digest(folder) == files


# The quadratic condensing compared each target with every suffix chosen before it: N^2/2 = 2 * 10^10 steps here.
N_NAMES = 2 * 10**5


def test_many_target_names_are_matched_with_set_lookups():
    names = [f"block{i}.proj{i}" for i in range(N_NAMES)]
    # Condensing: every target against 10^4 other names (the quadratic version compared each pair).
    others = [f"other{i}.x" for i in range(10**4)] + ["a.q_proj"]
    chosen = find_minimal_target_modules(names[:5000] + ["b.q_proj"], others)
    assert "b.q_proj" in chosen and f"proj{4999}" in chosen and len(chosen) == 5001
    # 10^6 entries that match nothing: refused, naming a few of them in a capped message.
    base = tiny_llama()
    before = fingerprint(base)
    with pytest.raises(ValueError, match=rf"\(and {N_NAMES - 10} more\) matched no module") as info:
        peftfast.get_peft_model(base, peftfast.LoraConfig(**dict(LORA, target_modules=names)))
    assert len(str(info.value)) <= MAX_MESSAGE_CHARS
    assert_same_fingerprint(before, fingerprint(base))


def test_long_list_that_matches_works():
    """A long list naming real modules by their full paths, each many times: adapted exactly as the short list."""
    base = tiny_llama()
    keys = [k for k, _ in base.named_modules() if k.endswith(("q_proj", "v_proj"))]
    targets = keys * (N_NAMES // len(keys))
    pm = peftfast.get_peft_model(base, peftfast.LoraConfig(**dict(LORA, target_modules=targets)))
    ref = peftfast.get_peft_model(tiny_llama(), peftfast.LoraConfig(**LORA))
    assert sorted(pm.targeted_module_names) == sorted(ref.targeted_module_names)


CATASTROPHIC = r"(.*?[a-z]){1,40}[0-9]"  # backtracks for hours in Python's re on 'model.layers.0.self_attn.q_proj'


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_catastrophic_regex_is_stopped_by_the_budget(field):
    base = tiny_llama()
    before = fingerprint(base)
    kwargs = dict(LORA, **{field: CATASTROPHIC})
    with pytest.raises(ConfigError, match=rf"{field} regex .* took more than"):
        peftfast.get_peft_model(base, peftfast.LoraConfig(**kwargs))
    assert_same_fingerprint(before, fingerprint(base))


@pytest.mark.parametrize("make", [
    lambda: peftfast.LoraConfig(**dict(LORA, rank_pattern={CATASTROPHIC: 4})),
    lambda: peftfast.LoraConfig(**dict(LORA, alpha_pattern={CATASTROPHIC: 4})),
    lambda: peftfast.LoHaConfig(target_modules=["q_proj", "v_proj"], rank_pattern={CATASTROPHIC: 4}),
    lambda: peftfast.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=CATASTROPHIC),
], ids=["lora-rank_pattern", "lora-alpha_pattern", "loha-rank_pattern", "ia3-feedforward_modules"])
def test_catastrophic_regex_in_other_fields_is_stopped_by_the_budget(make):
    base = tiny_llama()
    before = fingerprint(base)
    with pytest.raises(ConfigError, match="took more than"):
        peftfast.get_peft_model(base, make())
    assert_same_fingerprint(before, fingerprint(base))


def test_catastrophic_regex_in_a_checkpoint_is_refused(saved):
    folder, _ = saved
    edit_config(folder, target_modules=CATASTROPHIC)
    base = tiny_llama()
    before, files = fingerprint(base), folder_digest(folder)
    with pytest.raises(ConfigError, match="took more than"):
        peftfast.PeftModel.from_pretrained(base, folder)
    assert_same_fingerprint(before, fingerprint(base))
    assert folder_digest(folder) == files


def test_ordinary_regexes_still_match_as_in_peft():
    for pattern in [r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.self_attn\.[qv]_proj", r".*(?<!k)_proj"]:
        pm = peftfast.get_peft_model(tiny_llama(), peftfast.LoraConfig(**dict(LORA, target_modules=pattern)))
        import re

        expected = sorted(k for k, _ in tiny_llama().named_modules() if re.fullmatch(pattern, k))
        assert sorted(pm.targeted_module_names) == expected, pattern


@pytest.mark.parametrize("build", [
    lambda big: peftfast.LoraConfig(**dict(LORA, target_modules=[big])),
    lambda big: peftfast.LoraConfig(**dict(LORA, target_modules=big)),
    lambda big: peftfast.LoraConfig(**dict(LORA, r=big)),
], ids=["list-entry", "regex", "r"])
def test_messages_echoing_input_are_capped(build):
    big = "q" * 10**7 + "x"
    base = tiny_llama()
    with pytest.raises((ValueError, ConfigError)) as info:
        peftfast.get_peft_model(base, build(big))
    assert len(str(info.value)) <= MAX_MESSAGE_CHARS


def test_message_helpers_are_bounded():
    assert cap_message("x" * 10) == "x" * 10
    capped = cap_message("a" * 10**6 + "END")
    assert len(capped) <= MAX_MESSAGE_CHARS and capped.endswith("END") and "characters cut" in capped
    assert len(short_repr(["y" * 10**6] * 10**5)) <= 300
    assert len(short_repr({"k" * 10**6: "v"})) <= 300
    assert len(str(AdapterError("z" * 10**6))) <= MAX_MESSAGE_CHARS


# ---------------------------------------------------------------------------------------------------------------
# 4. API misuse
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arg,pattern", [(None, "must be a str or a list of str"), (3, "must be a str or a list"),
                                         ([None], "must be a str or a list"), ({"default"}, "must be a str or a list"),
                                         ([], "at least one adapter name"), ("nope", "does not exist|not found")],
                         ids=repr)
def test_set_adapter_with_wrong_arguments(arg, pattern):
    pm = llama_peft()
    before = fingerprint(pm)
    with pytest.raises(AdapterError, match=pattern):
        pm.set_adapter(arg)
    assert_same_fingerprint(before, fingerprint(pm))


def test_from_pretrained_on_a_peft_model_is_refused(saved):
    folder, _ = saved
    pm = llama_peft()
    before = fingerprint(pm)
    for model in (pm, pm.get_base_model()):
        with pytest.raises(AdapterError, match="already has adapters.*load_adapter"):
            peftfast.PeftModel.from_pretrained(model, folder)
        assert_same_fingerprint(before, fingerprint(pm))


def test_save_after_merge_and_unload_keeps_the_checkpoint(saved):
    folder, expected = saved
    pm = peftfast.PeftModel.from_pretrained(tiny_llama(), folder)
    files = folder_digest(folder)
    pm.merge_and_unload()
    with pytest.raises(AdapterError, match="no weights in this model any more"):
        pm.save_pretrained(folder)
    assert folder_digest(folder) == files
    assert torch.equal(logits(peftfast.PeftModel.from_pretrained(tiny_llama(), folder), inputs()), expected)


def test_load_into_a_merged_adapter_is_refused_and_unmerge_restores_the_base(saved):
    folder, _ = saved
    pm = llama_peft()
    randomize_adapters(pm, seed=31)  # other weights than the saved ones
    base = {k: v.clone() for k, v in pm.get_base_model().state_dict().items() if "base_layer" in k}
    pm.merge_adapter()
    before = fingerprint(pm)
    with pytest.raises(AdapterError, match="merged into the base weights.*unmerge_adapter"):
        pm.load_adapter(folder, "default")
    assert_same_fingerprint(before, fingerprint(pm))
    pm.unmerge_adapter()
    after = pm.get_base_model().state_dict()
    for k, v in base.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-6)
    pm.load_adapter(folder, "default")  # unmerged: loads
    # A new adapter next to a merged one is fine: unmerging takes back exactly the merged one.
    pm.merge_adapter()
    pm.load_adapter(folder, "fresh")
    pm.unmerge_adapter()
    for k, v in base.items():
        torch.testing.assert_close(pm.get_base_model().state_dict()[k], v, rtol=0, atol=1e-6)


def tied_llama() -> nn.Module:
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    return model


@pytest.mark.parametrize("targets", [["embed_tokens", "lm_head", "q_proj"], ["embed_tokens"], ["lm_head"]])
@pytest.mark.parametrize("how", ["merge_and_unload", "safe_merge"])
def test_merging_into_tied_weights_is_refused(targets, how):
    pm = peftfast.get_peft_model(tied_llama(), peftfast.LoraConfig(**dict(LORA, target_modules=targets)))
    randomize_adapters(pm, seed=4)
    expected = logits(pm, inputs())
    before = fingerprint(pm)
    with pytest.raises(AdapterError, match="tied to .*Untie the weights first"):
        if how == "merge_and_unload":
            pm.merge_and_unload()
        else:
            pm.merge_adapter(safe_merge=how == "safe_merge")
    assert_same_fingerprint(before, fingerprint(pm))
    assert torch.equal(logits(pm, inputs()), expected)
    assert pm.get_base_model().lm_head.weight is not None


def test_merging_untied_embeddings_keeps_outputs():
    """Control: the same adapters on untied embeddings merge, and the merged model gives the adapted outputs."""
    pm = peftfast.get_peft_model(tiny_llama(), peftfast.LoraConfig(**dict(LORA, target_modules=["embed_tokens",
                                                                                                 "lm_head"])))
    randomize_adapters(pm, seed=4)
    expected = logits(pm, inputs())
    merged = pm.merge_and_unload()
    torch.testing.assert_close(logits(merged, inputs()), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", [{"r": 4, "target_modules": ["q_proj"], "peft_type": "LORA"}, "LORA", None, 4],
                         ids=repr)
def test_add_adapter_with_a_non_config(config):
    pm = llama_peft()
    before = fingerprint(pm)
    with pytest.raises(AdapterError, match="must be a PeftConfig"):
        pm.add_adapter("other", config)
    assert_same_fingerprint(before, fingerprint(pm))


def test_tuner_refuses_a_dict_config():
    base = tiny_llama()
    before = fingerprint(base)
    with pytest.raises(AdapterError, match="must be a PeftConfig"):
        peftfast.LoraModel(base, {"default": {"r": 4, "target_modules": ["q_proj"]}}, "default")
    assert_same_fingerprint(before, fingerprint(base))
