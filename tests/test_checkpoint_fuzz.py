"""Property test: a damaged checkpoint either loads with the right outputs or fails cleanly.

Hypothesis draws one to three corruptions of a saved adapter (tiny Llama: LoRA on q_proj, v_proj
and the embedding, plus a modules_to_save norm) and loads the result through
``PeftModel.from_pretrained`` or ``PeftModel.load_adapter``. Each corruption carries its expected
effect:

- ``error``: the load must raise one of the documented types (FileNotFoundError, ConfigError,
  AdapterLoadError, AdapterError) with a message, and the model must be exactly as before: module
  tree and types, every tensor, requires_grad and training flags, hooks, peft_config, active adapter;
- ``same``: it must load and give exactly the original outputs (e.g. unknown fields that are off, a
  .bin instead of .safetensors, an equivalent target regex, a dropped optional embedding weight);
- ``changed``: it must load (e.g. fp16 weights, rescaled values, another lora_alpha); the outputs
  must equal the real PEFT's on the same files;
- ``maybe`` (random byte flips): either of the above; if it loads, the outputs must equal PEFT's.

After any successful load every adapter tensor must hold the value in the file. The number of cases
per entry point is FUZZ_EXAMPLES (default 200); runs are derandomised so CI sees the same cases.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import re
import tempfile
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import peftfast
from peftfast.config import ConfigError
from peftfast.tuners.tuners_utils import AdapterError
from peftfast.utils.save_and_load import AdapterLoadError
from tests._ckpt_models import assert_same_fingerprint, fingerprint, inputs, logits, randomize_adapters, tiny_llama

peft = pytest.importorskip("peft")

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
LOAD_ERRORS = (FileNotFoundError, ConfigError, AdapterLoadError, AdapterError)
CONFIG = dict(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["model.norm"],
              task_type="CAUSAL_LM")
HOST = dict(r=2, lora_alpha=4, target_modules=["o_proj"], task_type="CAUSAL_LM")  # load_adapter's target model
EMBED_BASE = "base_model.model.model.embed_tokens.base_layer.weight"
RANK = {"error": 3, "maybe": 2, "changed": 1, "same": 0}
SEEN: collections.Counter = collections.Counter()


@functools.lru_cache(maxsize=None)
def pristine():
    """(config dict, tensors, outputs with the adapter active) of the adapter every case starts from."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peftfast.get_peft_model(tiny_llama(), peftfast.LoraConfig(**CONFIG))
        randomize_adapters(model)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            with open(os.path.join(d, "adapter_config.json")) as f:
                config = json.load(f)
            tensors = dict(load_file(os.path.join(d, "adapter_model.safetensors")))
    assert EMBED_BASE in tensors
    return config, tensors, logits(model, inputs())


class Case:
    """The files being built for one example, and the strongest expected effect so far."""

    def __init__(self, data):
        config, tensors, _ = pristine()
        self.data = data
        self.config = json.loads(json.dumps(config))
        self.tensors = {k: v.clone() for k, v in tensors.items()}
        self.touched: set[str] = set()
        self.config_bytes = None  # raw replacement of adapter_config.json (None: json of self.config)
        self.drop_config = False
        self.weights_format = "safetensors"
        self.bin_object = None  # what torch.save writes instead of the tensors
        self.raw_weights = []  # byte-level edits applied to the written weights file
        self.expect = "same"
        self.log: list[str] = []

    def effect(self, kind: str, what: str) -> None:
        self.log.append(f"{what} -> {kind}")
        if RANK[kind] > RANK[self.expect]:
            self.expect = kind

    def untouched(self, items):
        return [i for i in items if i not in self.touched]

    def draw(self, strategy):
        return self.data.draw(strategy)


# ---------------------------------------------------------------------------------------------------------
# corruptions of adapter_config.json
# ---------------------------------------------------------------------------------------------------------
def unknown_off(case):
    value = case.draw(st.sampled_from([None, False, "", [], {}]))
    case.config[f"future_off_{len(case.log)}"] = value
    case.effect("same", f"unknown field off ({value!r})")


def unknown_on(case):
    value = case.draw(st.sampled_from([True, 1, 2.5, "on", [0], {"k": 1}]))
    case.config[f"future_on_{len(case.log)}"] = value
    case.effect("error", f"unknown field on ({value!r})")


UNSUPPORTED = [("use_qalora", True), ("layer_replication", [[0, 1]]),
               ("loftq_config", {"loftq_bits": 4}), ("eva_config", {"rho": 2}), ("corda_config", {"x": 1}),
               ("alora_invocation_tokens", [4]), ("megatron_config", {"a": 1}),
               ("init_lora_weights", "loftq"), ("init_lora_weights", "eva"), ("init_lora_weights", "corda")]

WRONG = [("r", "7"), ("r", 3.5), ("r", 0), ("r", -2), ("r", True), ("r", None), ("lora_alpha", "high"),
         ("lora_alpha", -1), ("lora_alpha", None), ("lora_dropout", 1.0), ("lora_dropout", "0.1"),
         ("target_modules", 5), ("target_modules", [1, 2]), ("target_modules", {"q": 1}), ("fan_in_fan_out", "no"),
         ("bias", "most"), ("modules_to_save", "model.norm"), ("rank_pattern", []), ("rank_pattern", {"q_proj": 0}),
         ("alpha_pattern", {"q_proj": "x"}), ("task_type", "SUMMARIZE"), ("peft_type", "MAGIC"), ("peft_type", 5),
         ("peft_type", "BOFT"), ("peft_type", None), ("layers_to_transform", "0"), ("use_rslora", "yes"),
         ("target_modules", "(unclosed"), ("init_lora_weights", 2),
         ("layers_to_transform", [0, 1])]  # a valid value, but the embedding has no layer index: keys left over

NEUTRAL = [("inference_mode", False), ("base_model_name_or_path", "some/other-model"), ("revision", "v9"),
           ("peft_version", "9.9.9"), ("lora_dropout", 0.25), ("auto_mapping", {"base_model_class": "X"}),
           ("target_modules", r".*\.(q_proj|v_proj)|.*embed_tokens")]


def set_field(case, table, kind, label):
    field, value = case.draw(st.sampled_from(table))
    if field in case.touched:
        return
    case.touched.add(field)
    case.config[field] = value
    case.effect(kind, f"{label}({field}={value!r})")


def unsupported(case):
    set_field(case, UNSUPPORTED, "error", "unsupported feature")


def wrong_value(case):
    set_field(case, WRONG, "error", "invalid value")


def neutral_change(case):
    set_field(case, NEUTRAL, "same", "neutral change")


def alpha_change(case):
    if "lora_alpha" in case.touched:
        return
    case.touched.add("lora_alpha")
    case.config["lora_alpha"] = case.draw(st.floats(0.25, 40.0).filter(lambda a: a != CONFIG["lora_alpha"]))
    case.effect("changed", "lora_alpha changed")


REMOVED = {"peft_type": "error", "r": "error", "target_modules": "error", "modules_to_save": "error",
           "lora_alpha": "changed", "task_type": "same", "lora_dropout": "same", "fan_in_fan_out": "same",
           "bias": "same", "use_rslora": "same", "init_lora_weights": "same", "use_dora": "same",
           "rank_pattern": "same", "base_model_name_or_path": "same", "peft_version": "same"}


def remove_field(case):
    field = case.draw(st.sampled_from(sorted(REMOVED)))
    if field in case.touched:
        return
    case.touched.add(field)
    case.config.pop(field, None)
    case.effect(REMOVED[field], f"field removed({field})")


def change_targets(case):
    if "target_modules" in case.touched:
        return
    case.touched.add("target_modules")
    choice = case.draw(st.sampled_from(["add k_proj", "drop v_proj", "unknown module", "r differs"]))
    if choice == "add k_proj":
        case.config["target_modules"] = case.config["target_modules"] + ["k_proj"]
    elif choice == "drop v_proj":
        case.config["target_modules"] = [t for t in case.config["target_modules"] if t != "v_proj"]
    elif choice == "unknown module":  # only names the model lacks (one unknown entry beside known ones warns)
        case.config["target_modules"] = ["qkv_proj"]
    else:
        if "r" in case.touched:
            return
        case.touched.add("r")
        case.config["r"] = case.draw(st.sampled_from([1, 2, 4, 8]))
    case.effect("error", f"targets/rank mismatch({choice})")


def raw_config(case):
    if case.config_bytes is not None or case.drop_config:
        return
    text = json.dumps(case.config).encode()
    choice = case.draw(st.sampled_from(["truncate", "junk", "not an object", "delete", "byte-order mark"]))
    if choice == "truncate":
        case.config_bytes = text[: case.draw(st.integers(0, len(text) - 1))]
    elif choice == "junk":
        case.config_bytes = case.draw(st.binary(min_size=0, max_size=120))
        if _is_json_object(case.config_bytes):
            return
    elif choice == "not an object":
        case.config_bytes = case.draw(st.sampled_from([b"[]", b"[1, 2]", b"3", b'"LORA"', b"null", b"true"]))
    elif choice == "delete":
        case.drop_config = True
    else:
        case.config_bytes = b"\xef\xbb\xbf" + text  # resolved against the final config when written
        case.effect("same", "config with byte-order mark")
        return
    case.effect("error", f"config file {choice}")


def _is_json_object(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data.decode("utf-8-sig")), dict)
    except (UnicodeDecodeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------
# corruptions of the weights
# ---------------------------------------------------------------------------------------------------------
def _pick_key(case, required: bool = True):
    keys = case.untouched(sorted(k for k in case.tensors if (k != EMBED_BASE) == required))
    if not keys:
        return None
    key = case.draw(st.sampled_from(keys))
    case.touched.add(key)
    return key


def drop_key(case):
    optional = case.draw(st.booleans())
    key = _pick_key(case, required=not optional)
    if key is not None:
        del case.tensors[key]
        case.effect("same" if optional else "error", f"key dropped ({'optional' if optional else 'adapter'})")


def rename_key(case):
    key = _pick_key(case)
    if key is None:
        return
    how = case.draw(st.sampled_from(["suffix", "adapter name", "A<->B", "case"]))
    with_name = key.replace(".weight", ".default.weight") if key.endswith(".weight") else key + ".default"
    new = {"suffix": key + "x", "adapter name": with_name, "case": key.upper(),
           "A<->B": key.replace("lora_A", "lora_Q").replace("lora_B", "lora_A")}[how]
    if new == key or new in case.tensors:
        return
    case.tensors[new] = case.tensors.pop(key)
    case.effect("error", f"key renamed({how})")


def add_key(case):
    name = case.draw(st.sampled_from(["base_model.model.model.layers.0.mlp.up_proj.weight",
                                      "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",
                                      "junk", "base_model.model.lm_head.lora_B.weight"]))
    if name in case.tensors:
        return
    case.tensors[name] = torch.randn(3, 24)
    case.effect("error", "extra key")


def reshape(case):
    key = _pick_key(case)
    if key is None:
        return
    t = case.tensors[key]
    how = case.draw(st.sampled_from(["grow", "shrink", "flatten", "unsqueeze", "transpose"]))
    if t.dim() == 1 and how in ("flatten", "transpose", "shrink"):
        how = "grow"
    if how == "grow":
        t = torch.cat([t, t[:1]], dim=0)
    elif how == "shrink":
        t = t[:, :-1]
    elif how == "flatten":
        t = t.reshape(-1)
    elif how == "unsqueeze":
        t = t.unsqueeze(0)
    elif t.shape[0] != t.shape[1]:
        t = t.t()
    else:
        return
    case.tensors[key] = t.contiguous()
    case.effect("error", f"shape changed({how})")


def change_dtype(case):
    key = _pick_key(case, required=case.draw(st.booleans()))
    if key is None:
        return
    dtype = case.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64,
                                       torch.int8, torch.uint8, torch.bool, torch.complex64]))
    case.tensors[key] = case.tensors[key].to(dtype)
    case.effect("changed" if dtype.is_floating_point else "error", f"dtype({dtype})")


def bad_values(case):
    key = _pick_key(case, required=case.draw(st.booleans()))
    if key is None:
        return
    t = case.tensors[key].clone()
    t.view(-1)[case.draw(st.integers(0, t.numel() - 1))] = case.draw(st.sampled_from([float("nan"), float("inf"),
                                                                                      -float("inf")]))
    case.tensors[key] = t
    case.effect("error", "NaN/inf value")


def new_values(case):
    key = _pick_key(case, required=case.draw(st.booleans()))
    if key is None:
        return
    factor = case.draw(st.sampled_from([0.0, -1.0, 0.5, 3.0]))
    case.tensors[key] = case.tensors[key] * factor
    case.effect("changed", "values rescaled")


def weights_format(case):
    if case.weights_format != "safetensors":
        return
    choice = case.draw(st.sampled_from(["bin", "bin non-tensor", "bin list", "bin payload", "bin beside"]))
    case.weights_format = "bin" if choice != "bin beside" else "both"
    if choice == "bin non-tensor":
        case.bin_object = lambda t: {**t, sorted(t)[0]: [1.0, 2.0]}
    elif choice == "bin list":
        case.bin_object = lambda t: list(t.values())
    elif choice == "bin payload":
        case.bin_object = lambda t: {**t, "x": collections.Counter(a=1)}  # a class weights_only refuses
    case.effect("same" if choice in ("bin", "bin beside") else "error", f"weights as {choice}")


def raw_weights(case):
    choice = case.draw(st.sampled_from(["truncate", "flip", "junk", "empty", "delete", "append"]))
    if choice == "flip":
        positions = case.draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=3))
        values = case.draw(st.lists(st.integers(1, 255), min_size=len(positions), max_size=len(positions)))
        case.raw_weights.append(("flip", list(zip(positions, values))))
        case.effect("maybe", "bytes flipped")
        return
    if choice == "append":
        case.raw_weights.append(("append", case.draw(st.binary(min_size=1, max_size=16))))
        case.effect("maybe", "bytes appended")
        return
    if choice == "truncate":
        case.raw_weights.append(("truncate", case.draw(st.floats(0.0, 0.999))))
    elif choice == "junk":
        case.raw_weights.append(("junk", case.draw(st.binary(min_size=1, max_size=200))))
    else:
        case.raw_weights.append((choice, None))
    case.effect("error", f"weights file {choice}")


MUTATIONS = [unknown_off, unknown_on, unsupported, wrong_value, neutral_change, alpha_change, remove_field,
             change_targets, raw_config, drop_key, rename_key, add_key, reshape, change_dtype, bad_values,
             new_values, weights_format, raw_weights]


def write(case, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    config_path = os.path.join(folder, "adapter_config.json")
    if not case.drop_config:
        data = case.config_bytes
        if data is None or data.startswith(b"\xef\xbb\xbf"):
            data = (b"\xef\xbb\xbf" if data is not None else b"") + json.dumps(case.config).encode()
        with open(config_path, "wb") as f:
            f.write(data)
    st_path = os.path.join(folder, "adapter_model.safetensors")
    bin_path = os.path.join(folder, "adapter_model.bin")
    if case.weights_format in ("safetensors", "both"):
        save_file(case.tensors, st_path)
    if case.weights_format == "both":
        torch.save({"junk": torch.zeros(1)}, bin_path)  # never read: .safetensors takes precedence
    if case.weights_format == "bin":
        torch.save(case.bin_object(case.tensors) if case.bin_object else case.tensors, bin_path)
    target = bin_path if case.weights_format == "bin" else st_path
    for op, arg in case.raw_weights:
        if not os.path.exists(target):
            continue
        with open(target, "rb") as f:
            data = bytearray(f.read())
        if op == "flip":
            for pos, value in arg:
                data[pos % len(data)] ^= value
        elif op == "append":
            data += arg
        elif op == "truncate":
            data = data[: int(len(data) * arg)]
        elif op == "junk":
            data = bytearray(arg)
        elif op == "empty":
            data = bytearray()
        if op == "delete":
            os.remove(target)
            continue
        with open(target, "wb") as f:
            f.write(bytes(data))


# ---------------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------------
def model_key(file_key: str, name: str) -> str:
    """The in-memory key of a checkpoint key (independent of peftfast's mapping)."""
    if ".modules_to_save." not in file_key and file_key.endswith("model.norm.weight"):
        return file_key.replace("model.norm.weight", f"model.norm.modules_to_save.{name}.weight")
    key = re.sub(r"\.(lora_[AB])\.weight$", rf".\1.{name}.weight", file_key)
    return re.sub(r"\.(lora_embedding_[AB])$", rf".\1.{name}", key)


def file_tensors(folder: str) -> dict[str, torch.Tensor]:
    path = os.path.join(folder, "adapter_model.safetensors")
    if os.path.exists(path):
        return dict(load_file(path))
    return torch.load(os.path.join(folder, "adapter_model.bin"), weights_only=True)


def peft_outputs(case, folder: str) -> torch.Tensor:
    """The real PEFT on the same files (unknown fields, which it may not know either, removed)."""
    known = set(peftfast.LoraConfig.__dataclass_fields__)
    clean = os.path.join(folder, "peft")
    os.makedirs(clean)
    with open(os.path.join(clean, "adapter_config.json"), "w") as f:
        json.dump({k: v for k, v in case.config.items() if k in known}, f)
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if os.path.exists(os.path.join(folder, name)):
            with open(os.path.join(folder, name), "rb") as f, open(os.path.join(clean, name), "wb") as g:
                g.write(f.read())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(tiny_llama(), clean)
    return logits(model, inputs())


@pytest.mark.parametrize("via", ["from_pretrained", "load_adapter"])
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_corrupted_checkpoint_loads_correctly_or_fails_cleanly(via, data):
    case = Case(data)
    for mutation in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3), label="mutations"):
        SEEN[f"mutation: {mutation.__name__}"] += 1
        mutation(case)
    with tempfile.TemporaryDirectory() as folder:
        write(case, folder)
        if via == "from_pretrained":
            model, name = tiny_llama(), "default"
            load = lambda: peftfast.PeftModel.from_pretrained(model, folder)  # noqa: E731
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, name = peftfast.get_peft_model(tiny_llama(), peftfast.LoraConfig(**HOST)), "fuzzed"
            randomize_adapters(model, seed=7)
            load = lambda: model.load_adapter(folder, adapter_name="fuzzed")  # noqa: E731
        before = fingerprint(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = load()
        except LOAD_ERRORS as e:
            SEEN[f"outcome: {type(e).__name__}"] += 1
            assert case.expect in ("error", "maybe"), f"{case.log}: unexpected {type(e).__name__}: {e}"
            assert str(e).strip(), "an error without a message"
            assert_same_fingerprint(before, fingerprint(model))
            return
        SEEN["outcome: loaded"] += 1
        assert case.expect != "error", f"{case.log}: loaded although it should have failed"
        peft_model = loaded if via == "from_pretrained" else model
        if via == "load_adapter":  # the host's own adapter is untouched and still the active one
            assert peft_model.active_adapters == ["default"]
            host_state = peft_model.state_dict()
            for key, value in before["state"].items():
                head, _, leaf = key.rpartition(".")
                # layers the new adapter wraps keep their weights under base_layer / original_module
                now = next(k for k in (key, f"{head}.base_layer.{leaf}", f"{head}.original_module.{leaf}")
                           if k in host_state)
                if now != EMBED_BASE:  # the file carries the embedding weights, checked below
                    assert torch.equal(host_state[now], value), key
            peft_model.set_adapter(name)
        params = peft_model.state_dict()
        for key, value in file_tensors(folder).items():
            target = params[model_key(key, name)]
            assert torch.equal(target, value.to(target.dtype)), key
        got = logits(peft_model, inputs())
        if case.expect == "same":
            torch.testing.assert_close(got, pristine()[2], atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(got, peft_outputs(case, folder), atol=1e-5, rtol=0)


def test_every_corruption_and_outcome_was_exercised():
    """Runs after the property test (file order): the generated cases covered every corruption and outcome."""
    if not SEEN:
        pytest.skip("run together with the property test")
    print("\nfuzz cases:", ", ".join(f"{k}={v}" for k, v in sorted(SEEN.items())))
    assert sum(v for k, v in SEEN.items() if k.startswith("outcome:")) >= 2 * EXAMPLES * 0.9
    for outcome in ("loaded", "ConfigError", "AdapterLoadError", "FileNotFoundError"):
        assert SEEN[f"outcome: {outcome}"] > 0, (outcome, dict(SEEN))
    for mutation in MUTATIONS:
        assert SEEN[f"mutation: {mutation.__name__}"] > 0, (mutation.__name__, dict(SEEN))
