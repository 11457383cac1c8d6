"""PEFT 0.21 API details that PEFT's own test suite relies on, checked against the installed ``peft``
(the test-only oracle): disable_adapter's restore, merging merged adapters, dtype autocasting, error
wording, status helpers, per-adapter bookkeeping after deletion, default target tables, FSDP prefixes."""
from __future__ import annotations

from dataclasses import asdict

import peft
import pytest
import torch
from torch import nn

import peftfast as fast


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin1(self.relu(self.lin0(x))))


def mlp(dtype: torch.dtype = torch.float32) -> MLP:
    torch.manual_seed(0)
    return MLP().to(dtype)


def both(config_kwargs: dict, dtype: torch.dtype = torch.float32, **kw):
    """The same model and config wrapped by peftfast and by peft, with identical non-zero adapter weights."""
    config_kwargs = {"target_modules": ["lin0", "lin1"], "init_lora_weights": False, **config_kwargs}
    torch.manual_seed(1)
    ours = fast.get_peft_model(mlp(dtype), fast.LoraConfig(**config_kwargs), **kw)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(mlp(dtype), peft.LoraConfig(**config_kwargs), **kw)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def layer_states(pm) -> list[bool]:
    return [m.disable_adapters for m in pm.modules() if hasattr(m, "merged_adapters")]


X = torch.randn(4, 10, generator=torch.Generator().manual_seed(3))


# -- 1. disable_adapter restores what was there --------------------------------------------------------------
def test_disable_adapter_keeps_layers_that_were_disabled():
    for pm in both({}):
        pm.base_model.disable_adapter_layers()
        with pm.disable_adapter():
            pass
        assert layer_states(pm) == [True, True]


def test_disable_adapter_nested_restores_outer_state():
    ours, theirs = both({})
    for pm in (ours, theirs):
        with pm.disable_adapter():
            with pm.disable_adapter():
                pass
            assert layer_states(pm) == [True, True]  # the outer block is still disabled
        assert layer_states(pm) == [False, False]
    assert torch.equal(ours(X), theirs(X))


def test_disable_adapter_restores_all_disabled_state_and_grads():
    ours, theirs = both({})
    for pm in (ours, theirs):
        pm.base_model.disable_adapter_layers()
    grads = {n: p.requires_grad for n, p in ours.named_parameters()}
    with ours.disable_adapter():
        assert layer_states(ours) == [True, True]
    assert layer_states(ours) == [True, True]  # all disabled before: all disabled after, as in PEFT
    with theirs.disable_adapter():
        pass
    assert layer_states(theirs) == [True, True]
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == grads


def test_disable_adapter_with_mixed_states_warns_and_enables_all_like_peft():
    ours, theirs = both({})
    for pm in (ours, theirs):
        pm.base_model.model.lin1.enable_adapters(False)
        with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
            with pm.disable_adapter():
                assert layer_states(pm) == [True, True]
        assert layer_states(pm) == [False, False]
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == \
        {n: p.requires_grad for n, p in theirs.named_parameters()}
    assert ours.has_active_enabled_adapter


# -- 2. merging merged adapters warns and skips ---------------------------------------------------------------
def test_merge_already_merged_warns_like_peft():
    ours, theirs = both({})
    for pm in (ours, theirs):
        pm.merge_adapter()
        with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
            pm.merge_adapter()
    assert torch.allclose(ours(X), theirs(X), atol=1e-6)


def test_merge_merges_only_the_rest():
    ours, theirs = both({})
    for pm in (ours, theirs):
        pm.add_adapter("other", type(pm.peft_config["default"])(target_modules=["lin0", "lin1"],
                                                                init_lora_weights=False))
    theirs.load_state_dict(ours.state_dict())
    for pm in (ours, theirs):
        pm.merge_adapter(["default"])
        with pytest.warns(UserWarning, match="Already following adapters were merged default. "
                                             "You are now additionally merging other."):
            pm.merge_adapter(["default", "other"])
        lin0 = pm.base_model.model.lin0
        assert lin0.merged_adapters == ["default", "other"]
    assert torch.allclose(ours.base_model.model.lin0.base_layer.weight,
                          theirs.base_model.model.lin0.base_layer.weight, atol=1e-6)
    with pytest.raises(TypeError, match="adapter_names should be a list of strings"):
        ours.base_model.model.lin0.merge(adapter_names="default")


# -- 3. autocast_adapter_dtype is honoured wherever an adapter is created -------------------------------------
def adapter_dtypes(pm, name: str) -> set[torch.dtype]:
    return {p.dtype for n, p in pm.named_parameters() if f".{name}." in n and "lora_" in n}


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_on_load(tmp_path, autocast):
    ours, _ = both({}, dtype=torch.float16)
    ours.save_pretrained(tmp_path)
    expected = {torch.float32} if autocast else {torch.float16}
    for lib in (fast, peft):
        loaded = lib.PeftModel.from_pretrained(mlp(torch.float16), tmp_path, autocast_adapter_dtype=autocast)
        assert adapter_dtypes(loaded, "default") == expected, lib.__name__
        loaded.load_adapter(tmp_path, adapter_name="other", autocast_adapter_dtype=autocast)
        assert adapter_dtypes(loaded, "other") == expected, lib.__name__
        pm = lib.get_peft_model(mlp(torch.float16), lib.LoraConfig(target_modules=["lin0"]),
                                autocast_adapter_dtype=autocast)
        pm.add_adapter("more", lib.LoraConfig(target_modules=["lin0"]), autocast_adapter_dtype=autocast)
        assert adapter_dtypes(pm, "default") == adapter_dtypes(pm, "more") == expected, lib.__name__


# -- 4. error texts contain PEFT's phrase ---------------------------------------------------------------------
def peft_error(lib_call) -> str:
    with pytest.raises(ValueError) as info:
        lib_call()
    return str(info.value)


ERROR_CASES = {
    "set_adapter": lambda pm: pm.set_adapter("unknown-adapter"),
    "delete_adapter": lambda pm: pm.delete_adapter("unknown-adapter"),
    "tuner_delete_adapter": lambda pm: pm.base_model.delete_adapter("unknown-adapter"),
    "add_existing": lambda pm: pm.add_adapter("default", type(pm.peft_config["default"])(target_modules=["lin0"])),
    "save_selected": lambda pm: pm.save_pretrained("/nonexistent-dir-for-test", selected_adapters=["nope"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_messages_contain_peft_text(case):
    ours, theirs = both({})
    expected = peft_error(lambda: ERROR_CASES[case](theirs))
    got = peft_error(lambda: ERROR_CASES[case](ours))
    assert expected.rstrip(".") in got, (expected, got)


def test_combine_types_and_delete_merged_errors():
    ours, theirs = both({})
    for pm, lib in ((ours, fast), (theirs, peft)):
        pm.merge_adapter()
    msgs = [peft_error(lambda pm=pm: pm.delete_adapter("default")) for pm in (ours, theirs)]
    assert msgs[1] in msgs[0]
    msgs = [peft_error(lambda pm=pm, lib=lib: pm.add_adapter("x", lib.IA3Config(target_modules=["lin0"],
                                                                                  feedforward_modules=[])))
            for pm, lib in ((ours, fast), (theirs, peft))]
    assert msgs[1] in msgs[0]


# -- 5. API that PEFT's tests use ----------------------------------------------------------------------------
def test_model_and_layer_status_match_peft():
    ours, theirs = both({"modules_to_save": ["head"]})
    for pm, lib in ((ours, fast), (theirs, peft)):
        pm.add_adapter("other", lib.LoraConfig(target_modules=["lin0"]))
        pm.base_model.model.lin0.merge(adapter_names=["other"])
    assert asdict(ours.get_model_status()) == asdict(theirs.get_model_status())
    assert asdict(fast.get_model_status(ours)) == asdict(peft.get_model_status(theirs))
    assert [asdict(s) for s in ours.get_layer_status()] == [asdict(s) for s in theirs.get_layer_status()]
    with ours.disable_adapter(), theirs.disable_adapter():
        assert asdict(ours.get_model_status()) == asdict(theirs.get_model_status())
    with pytest.raises(ValueError, match="No adapter layers found in the model"):
        fast.get_layer_status(mlp())


def test_small_api_names():
    ours, theirs = both({})
    assert ours.base_model.active_peft_config is ours.peft_config["default"]
    for pm in (ours, theirs):
        pm.add_adapter("b", type(pm.peft_config["default"])(target_modules=["lin0"]))
    assert ours.base_model.model.lin0._all_available_adapter_names() == \
        theirs.base_model.model.lin0._all_available_adapter_names() == ["b", "default"]
    assert ours.base_model.model.lin1._get_available_adapters() == {"default"}
    for name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        assert name in ours.base_model.model.lin0.adapter_layer_names
    assert fast.get_base_model_state_dict(ours).keys() == peft.get_base_model_state_dict(theirs).keys() \
        == mlp().state_dict().keys()
    from peftfast.utils.other import EMBEDDING_LAYER_NAMES
    from peft.utils.other import EMBEDDING_LAYER_NAMES as PEFT_EMBEDDING_LAYER_NAMES

    assert EMBEDDING_LAYER_NAMES == PEFT_EMBEDDING_LAYER_NAMES
    import inspect

    assert inspect.signature(fast.PeftModel.push_to_hub) == inspect.signature(peft.PeftModel.push_to_hub)


def test_buffer_dict_like_peft():
    from peft.tuners._buffer_dict import BufferDict as PeftBufferDict

    from peftfast.tuners._buffer_dict import BufferDict

    data = {"b": torch.ones(2), "a": torch.zeros(3)}
    for persistent in (True, False):
        ours, theirs = BufferDict(data, persistent=persistent), PeftBufferDict(data, persistent=persistent)
        assert list(ours.keys()) == list(theirs.keys()) == ["a", "b"]
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert repr(ours) == repr(theirs).replace("PeftBufferDict", "BufferDict")
        assert torch.equal(ours.pop("a"), theirs.pop("a")) and len(ours) == len(theirs) == 1


def test_helpers(tmp_path):
    from peftfast.helpers import check_if_peft_model, disable_input_dtype_casting, rescale_adapter_scale

    ours, theirs = both({})
    ours.save_pretrained(tmp_path)
    assert check_if_peft_model(str(tmp_path)) and not check_if_peft_model(str(tmp_path / "nope"))
    with rescale_adapter_scale(ours, 0.5), peft.helpers.rescale_adapter_scale(theirs, 0.5):
        assert torch.allclose(ours(X), theirs(X), atol=1e-6)
        assert ours.base_model.model.lin0.scaling["default"] == 0.5 * 8 / 8
    assert torch.allclose(ours(X), theirs(X), atol=1e-6)
    with pytest.raises(ValueError, match="scaling is only supported"), rescale_adapter_scale(mlp(), 2.0):
        pass
    with disable_input_dtype_casting(ours):
        assert not ours.base_model.model.lin0.cast_input_dtype_enabled
    assert ours.base_model.model.lin0.cast_input_dtype_enabled


# -- 6. delete_adapter leaves no trace --------------------------------------------------------------------------
def per_adapter_entries(pm) -> int:
    """Entries in every dict-like attribute of every adapter layer and wrapper (whatever their names)."""
    total = 0
    for module in pm.modules():
        if not hasattr(module, "merged_adapters"):
            continue
        for value in list(vars(module).values()) + list(module._modules.values()):
            if isinstance(value, (dict, nn.ModuleDict, nn.ParameterDict)) and value is not module._modules:
                total += len(value)
    return total


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_add_delete_cycles_leave_no_entries(method):
    def config():
        if method == "lora":
            return fast.LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"], use_rslora=True)
        return fast.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"],
                              modules_to_save=["head"])

    pm = fast.get_peft_model(mlp(), config())
    before = per_adapter_entries(pm)
    state = pm.base_model.model.lin0.__dict__.keys()
    for i in range(200):
        pm.add_adapter(f"a{i}", config())
        assert per_adapter_entries(pm) > before
        pm.delete_adapter(f"a{i}")
    assert per_adapter_entries(pm) == before
    assert pm.base_model.model.lin0.__dict__.keys() == state
    assert list(pm.peft_config) == ["default"]


def test_lora_per_adapter_dicts_match_peft():
    ours, theirs = both({"use_rslora": True})
    for name in theirs.base_model.model.lin0.adapter_layer_names + theirs.base_model.model.lin0.other_param_names:
        if name in ("lora_variant",):
            continue
        assert set(getattr(ours.base_model.model.lin0, name).keys()) == \
            set(getattr(theirs.base_model.model.lin0, name).keys()), name
    assert ours.base_model.model.lin0.use_rslora == theirs.base_model.model.lin0.use_rslora


# -- 7. default tables are PEFT's ---------------------------------------------------------------------------
@pytest.mark.parametrize("table", ["TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
                                   "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
                                   "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING"])
def test_default_tables_are_peft_s(table):
    from peft.utils import constants as peft_constants

    from peftfast.utils import constants

    assert getattr(constants, table) == getattr(peft_constants, table)


def test_ia3_defaults_for_opt_follow_peft():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
               word_embed_proj_dim=16, max_position_embeddings=32)
    got = []
    for lib in (fast, peft):
        torch.manual_seed(0)
        pm = lib.get_peft_model(OPTForCausalLM(OPTConfig(**cfg)), lib.IA3Config(task_type="CAUSAL_LM"))
        got.append(sorted(n for n, _ in pm.named_parameters() if "ia3_l" in n))
    assert got[0] == got[1] and any("k_proj" in n for n in got[0])


# -- 8. own modules in target lists; modules_to_save overlapping targets ---------------------------------------
TARGET_CASES = {
    "names_own_dropout": dict(target_modules=["lin0", "lora_dropout"], lora_dropout=0.1),
    "names_own_weights": dict(target_modules=["lin1", "lora_A", "lora_B"]),
    "saved_target_skipped": dict(target_modules=["lin0", "head"], modules_to_save=["head"]),
    "only_saved_targets": dict(target_modules=["lin0"], modules_to_save=["lin0"]),
    "regex_only_saved": dict(target_modules=r"lin0", modules_to_save=["lin0"]),
    "nothing_found": dict(target_modules=r"nope.*"),
}


@pytest.mark.parametrize("case", sorted(TARGET_CASES))
def test_targets_follow_peft(case):
    results = []
    for lib in (fast, peft):
        try:
            pm = lib.get_peft_model(mlp(), lib.LoraConfig(**TARGET_CASES[case]))
            results.append(sorted(n for n, p in pm.named_parameters() if p.requires_grad))
        except ValueError as e:
            results.append(e)
    ours, theirs = results
    if isinstance(theirs, Exception):
        assert isinstance(ours, Exception), f"peft raised {theirs!r}, peftfast did not"
        assert str(theirs) in str(ours)
    else:
        assert ours == theirs


# -- 9. state dicts of FSDP-wrapped models -----------------------------------------------------------------------
@pytest.fixture
def process_group():
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kwargs", [{}, {"bias": "lora_only"}, {"bias": "all"}, {"modules_to_save": ["head"]},
                                    {"ia3": True}], ids=["plain", "lora_only", "bias_all", "saved", "ia3"])
def test_fsdp_wrapped_state_dict_roundtrip(process_group, kwargs):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    kwargs = dict(kwargs)

    def config(lib, init: bool):
        if kwargs.get("ia3"):
            return lib.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"],
                                 init_ia3_weights=init)
        return lib.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=init, **kwargs)

    state_dicts = []
    for lib in (fast, peft):
        torch.manual_seed(0)
        pm = lib.get_peft_model(mlp(), config(lib, init=False)).eval()
        with torch.no_grad():
            for name, module in pm.named_modules():
                only_layers = kwargs.get("bias") == "lora_only"
                if getattr(module, "bias", None) is not None and kwargs.get("bias") and \
                        (not only_layers or hasattr(module, "merged_adapters")):
                    module.bias.fill_(1.23)
        wrapped = FSDP(pm, use_orig_params=True, device_id="cpu")
        with torch.no_grad():
            before = wrapped(X)
        sd = lib.get_peft_model_state_dict(wrapped)
        state_dicts.append(sd)
        torch.manual_seed(0)
        fresh = lib.get_peft_model(mlp(), config(lib, init=True)).eval()
        lib.set_peft_model_state_dict(fresh, sd)
        with torch.no_grad():
            assert torch.allclose(fresh(X), before), lib.__name__
    assert sorted(state_dicts[0]) == sorted(state_dicts[1])


def test_helpers_loaded_with_the_package():
    import subprocess
    import sys
    import tempfile

    code = "import peftfast, sys; assert 'peftfast.helpers' in sys.modules; peftfast.helpers.rescale_adapter_scale"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tempfile.gettempdir())  # not the repo root


# -- low_cpu_mem_usage: adapters created on the meta device, the checkpoint's tensors assigned ------------------
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_low_cpu_mem_usage_loads_like_a_normal_load(method, tmp_path):
    if method == "lora":
        kw = {"target_modules": ["lin0", "lin1"], "init_lora_weights": False, "modules_to_save": ["head"]}
        config_fast, config_peft = fast.LoraConfig(**kw), peft.LoraConfig(**kw)
    else:
        kw = {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"], "init_ia3_weights": False}
        config_fast, config_peft = fast.IA3Config(**kw), peft.IA3Config(**kw)
    injected = fast.inject_adapter_in_model(config_fast, mlp(), low_cpu_mem_usage=True)
    assert "meta" in {p.device.type for p in injected.parameters()}
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(2)
    theirs = peft.get_peft_model(mlp(), config_peft)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "a")
    expected = theirs(x)
    ours = fast.PeftModel.from_pretrained(mlp(), str(tmp_path / "a"), low_cpu_mem_usage=True)
    assert {p.device.type for p in ours.parameters()} == {"cpu"}
    assert torch.equal(ours(x), expected)
    ours.load_adapter(str(tmp_path / "a"), adapter_name="other", low_cpu_mem_usage=True)
    assert {p.device.type for p in ours.parameters()} == {"cpu"}
    ours.set_adapter("other")
    assert torch.equal(ours(x), expected)
    trainable = fast.PeftModel.from_pretrained(mlp(), str(tmp_path / "a"), low_cpu_mem_usage=True,
                                               is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
    trainable(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in trainable.parameters() if p.requires_grad)


def test_low_cpu_mem_usage_incomplete_checkpoint_fails_cleanly(tmp_path):
    from safetensors.torch import load_file, save_file

    ours = fast.get_peft_model(mlp(), fast.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    ours.save_pretrained(tmp_path / "a")
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "lin1" not in k}, tmp_path / "a" / "adapter_model.safetensors")
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="lin1"):
        fast.PeftModel.from_pretrained(model, str(tmp_path / "a"), low_cpu_mem_usage=True)
    assert type(model.lin1) is nn.Linear and set(model.state_dict()) == set(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
