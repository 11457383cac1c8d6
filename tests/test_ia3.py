"""(IA)^3 against the real PEFT: same config + same ia3_l vectors -> same model tree, outputs, gradients,
parameter counts, merges and files, on tiny Llama, GPT-2 (Conv1D) and BERT models.

Tolerances are derived, never guessed: an fp32 result of peftfast must be as close to a float64 run of the
PEFT model as PEFT's own fp32 result is (within a factor ``K``), plus one rounding of the reference.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import peftfast
from peftfast import zoo
from peftfast.kernels.backend import use_triton
from peftfast.tuners.ia3 import IA3Layer
from peftfast.tuners.ia3 import layer as ia3_layer_module

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 61
K = 3.0  # peftfast's error vs float64 may be at most K times PEFT's own fp32 error (plus one rounding)


# ------------------------------------------------------------------------------------------------------
# tiny models and inputs
# ------------------------------------------------------------------------------------------------------
def tiny_llama(hidden: int = 24):
    return zoo.random_biases(zoo.llama(0, hidden, 2, VOCAB, intermediate=2 * hidden - 3, attention_bias=True))


def tiny_gpt2(hidden: int = 24):
    return zoo.random_biases(zoo.gpt2(0, hidden, 2, VOCAB, pad=None))


def tiny_bert(hidden: int = 24):
    return zoo.random_biases(zoo.bert_seq_cls(0, hidden, 2, VOCAB, intermediate=2 * hidden - 3,
                                              classifier_dropout=None))


def lm_inputs(batch: int = 2, seq: int = 9) -> dict:
    ids = zoo.token_ids(batch, seq, 1, VOCAB)
    return {"input_ids": ids, "labels": ids.clone()}


def cls_inputs(batch: int = 3, seq: int = 9) -> dict:
    ids = zoo.token_ids(batch, seq, 1, VOCAB)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(batch) % 3}


# name -> (builder, inputs, IA3Config kwargs). Defaults (target_modules=None) exercise PEFT's tables, incl.
# GPT-2's fan_in_fan_out correction and BERT's "output.dense" matching both attention.output and output.
CASES = {
    "llama-default": (tiny_llama, lm_inputs, dict(task_type="CAUSAL_LM")),
    "llama-regex": (tiny_llama, lm_inputs, dict(target_modules=r".*\.(q_proj|o_proj|up_proj|down_proj)",
                                                feedforward_modules=r".*\.(up_proj|down_proj)")),
    "gpt2-default": (tiny_gpt2, lm_inputs, dict(task_type="CAUSAL_LM")),
    "gpt2-list": (tiny_gpt2, lm_inputs, dict(target_modules=["c_attn", "c_fc", "c_proj"],
                                             feedforward_modules=["c_fc"], fan_in_fan_out=True)),
    "bert-default": (tiny_bert, cls_inputs, dict(task_type="SEQ_CLS")),
}


@contextmanager
def quiet():
    """PEFT warns about things the tests do on purpose (fan_in_fan_out correction, inexact unmerge)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def build_pair(case: str):
    """(base model, PEFT model, peftfast model, inputs) with identical, randomised ia3_l vectors."""
    builder, inputs, kwargs = CASES[case]
    base = builder()
    with quiet():
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs))
        ours = peftfast.get_peft_model(copy.deepcopy(base), peftfast.IA3Config(**kwargs))
    randomise_ia3(theirs)
    copy_ia3(theirs, ours)
    return base, theirs, ours, inputs()


def randomise_ia3(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                mag = torch.rand(p.shape, generator=g) + 0.5  # |l| in [0.5, 1.5): away from 0 and from 1
                sign = torch.where(torch.rand(p.shape, generator=g) < 0.2, -1.0, 1.0)
                p.copy_(mag * sign)


def copy_ia3(src: nn.Module, dst: nn.Module) -> None:
    vecs = {k: v for k, v in src.state_dict().items() if "ia3_l" in k}
    assert vecs
    result = dst.load_state_dict(vecs, strict=False)
    assert not result.unexpected_keys


def run(model: nn.Module, inputs: dict, grads: bool = False):
    """(logits, loss, {name: grad}) for the parameters that train."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    if not grads:
        return out.logits.detach(), out.loss.detach(), {}
    out.loss.backward()
    g = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), g


def assert_as_accurate(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """ours may be off the float64 ``ref`` by at most K x PEFT's own fp32 error, plus one rounding of ``ref``.

    Errors are Frobenius norms: the vectors here have a few dozen entries, and the max entry of two equally
    accurate summation orders differs by up to ~4x between runs, while their norms stay within ~2x.
    """
    ref = ref.double()
    err_ours = (ours.double() - ref).norm().item()
    err_theirs = (theirs.double() - ref).norm().item()
    floor = torch.finfo(ours.dtype).eps * ref.norm().item()
    assert err_ours <= K * err_theirs + floor, f"{what}: error {err_ours:.3g} vs PEFT's {err_theirs:.3g}"


def float64_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double()


def ia3_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "ia3_l") and hasattr(m, "base_layer")}


# ------------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {},
    dict(target_modules=["k", "v", "wo"], feedforward_modules=["wo"], fan_in_fan_out=True,
         init_ia3_weights=False, modules_to_save=["head"], exclude_modules=["x"], task_type="SEQ_2_SEQ_LM",
         inference_mode=True),
    dict(target_modules=r".*\.(k|v)$", feedforward_modules=r".*\.v$"),
])
def test_config_fields_and_json_match_peft(kwargs, tmp_path):
    ours, theirs = peftfast.IA3Config(**kwargs), peft.IA3Config(**kwargs)
    assert ours.to_json_dict() == json.loads(json.dumps(theirs.to_dict(), default=lambda s: sorted(s)))
    ours.save_pretrained(str(tmp_path / "ours"))
    loaded = peft.PeftConfig.from_pretrained(str(tmp_path / "ours"))
    assert isinstance(loaded, peft.IA3Config) and loaded.to_dict() == theirs.to_dict()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = peftfast.PeftConfig.from_pretrained(str(tmp_path / "theirs"))
    assert isinstance(back, peftfast.IA3Config) and back.to_json_dict() == ours.to_json_dict()


def test_config_feedforward_must_be_subset_of_targets():
    with pytest.raises(ValueError) as ours:
        peftfast.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj", "v_proj"])
    msg = str(ours.value)
    assert "feedforward_modules must be a subset of target_modules" in msg
    assert "'down_proj' is not in target_modules" in msg  # only the offending name is reported as missing
    with pytest.raises(ValueError):  # PEFT refuses the same config
        peft.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj", "v_proj"])
    for bad in (dict(target_modules=7), dict(feedforward_modules=[1]), dict(init_ia3_weights="yes")):
        with pytest.raises(ValueError, match="must (be|hold)"):
            peftfast.IA3Config(**bad)
    # with default targets the check runs once they are known (Llama: k_proj, v_proj, down_proj)
    base = tiny_llama()
    with pytest.raises(ValueError, match="'up_proj' is not in target_modules"):
        peftfast.get_peft_model(base, peftfast.IA3Config(feedforward_modules=["up_proj"]))
    assert not ia3_modules(base)


# ------------------------------------------------------------------------------------------------------
# parity with PEFT
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_tree_counts_outputs_and_gradients_match_peft(case):
    _, theirs, ours, inputs = build_pair(case)
    # same module tree: keys, shapes, which modules are feed-forward, fan_in_fan_out
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert list(sd_o) == list(sd_t)
    assert {k: tuple(v.shape) for k, v in sd_o.items()} == {k: tuple(v.shape) for k, v in sd_t.items()}
    mods_t, mods_o = ia3_modules(theirs), ia3_modules(ours)
    assert list(mods_o) == list(mods_t)
    for name, m in mods_o.items():
        assert isinstance(m, IA3Layer)
        peer = mods_t[name]
        assert (m.is_feedforward, m.fan_in_fan_out) == (peer.is_feedforward, peer.fan_in_fan_out)
        assert type(m.get_base_layer()) is type(peer.get_base_layer())
    assert {m.is_feedforward for m in mods_o.values()} == {True, False}
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in theirs.named_parameters() if p.requires_grad]
    targets = theirs.peft_config["default"].target_modules
    assert ours.peft_config["default"].target_modules == targets

    logits_t, loss_t, grads_t = run(theirs, inputs, grads=True)
    logits_o, loss_o, grads_o = run(ours, inputs, grads=True)
    logits_r, loss_r, grads_r = run(float64_copy(theirs), inputs, grads=True)
    assert_as_accurate(logits_o, logits_t, logits_r, "logits")
    assert_as_accurate(loss_o, loss_t, loss_r, "loss")
    assert set(grads_o) == set(grads_t) and any("ia3_l" in n for n in grads_o)
    for name in grads_o:
        assert_as_accurate(grads_o[name], grads_t[name], grads_r[name], f"grad of {name}")


def test_randomised_vectors_change_the_output():
    """The parity above is not vacuous: the copied vectors move the logits far from the base model's."""
    base, _, ours, inputs = build_pair("gpt2-default")
    with torch.no_grad():
        adapted, plain = ours(**inputs).logits, base(**inputs).logits
    assert (adapted - plain).abs().max() > 100 * torch.finfo(torch.float32).eps * plain.abs().max()


@pytest.mark.parametrize("case", ["llama-default", "gpt2-default", "bert-default"])
def test_merge_unmerge_match_peft(case):
    base, theirs, ours, inputs = build_pair(case)
    before = run(ours, inputs)[0]
    originals = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    with quiet():
        theirs.merge_adapter()
    ours.merge_adapter()
    # merging is one multiply per weight: both libraries round it the same way
    sd_t = theirs.state_dict()
    for name, p in ours.named_parameters():
        if "base_layer" in name:
            assert torch.equal(p, sd_t[name]), name
    changed = [n for n in originals if not torch.equal(originals[n], dict(ours.named_parameters())[n])]
    assert any(n.endswith("weight") for n in changed) and any(n.endswith("bias") for n in changed)
    merged_t, merged_r = run(theirs, inputs)[0], run(float64_copy(theirs), inputs)[0]
    merged_o = run(ours, inputs)[0]
    assert_as_accurate(merged_o, merged_t, merged_r, "merged logits")
    assert_as_accurate(merged_o, before, merged_r, "merged vs unmerged logits")

    ours.unmerge_adapter()
    for name, p in ours.named_parameters():
        if name in originals:  # w * l / l: two roundings of the original value
            bound = 2 * torch.finfo(p.dtype).eps * originals[name].abs()
            assert ((p - originals[name]).abs() <= bound).all(), name
    assert all(not m.merged for m in ia3_modules(ours).values())


def test_disable_adapter_runs_the_base_model_even_when_merged():
    base, _, ours, inputs = build_pair("gpt2-default")
    plain, adapted = run(base, inputs)[0], run(ours, inputs)[0]
    with ours.disable_adapter():
        assert torch.equal(run(ours, inputs)[0], plain)
    assert torch.equal(run(ours, inputs)[0], adapted)
    ours.merge_adapter()
    with ours.disable_adapter():  # merged weights are divided back out first, as in PEFT
        disabled = run(ours, inputs)[0]
    assert not any(m.merged for m in ia3_modules(ours).values())
    assert_as_accurate(disabled, plain, run(float64_copy(base), inputs)[0], "disabled after merge")


@pytest.mark.parametrize("case", ["llama-default", "gpt2-default", "bert-default"])
def test_merge_and_unload_and_unload_match_peft(case):
    base, theirs, ours, inputs = build_pair(case)
    adapted_o = run(ours, inputs)[0]
    with quiet():
        plain_t = theirs.merge_and_unload()
    plain_o = ours.merge_and_unload()
    assert not ia3_modules(plain_o)
    assert [(n, type(m).__name__) for n, m in plain_o.named_modules()] == \
        [(n, type(m).__name__) for n, m in plain_t.named_modules()]
    sd_t = plain_t.state_dict()
    assert list(plain_o.state_dict()) == list(sd_t)
    for k, v in plain_o.state_dict().items():
        assert torch.equal(v, sd_t[k]), k
    ref = run(float64_copy(plain_t), inputs)[0]
    assert_as_accurate(run(plain_o, inputs)[0], run(plain_t, inputs)[0], ref, "merge_and_unload logits")
    assert_as_accurate(run(plain_o, inputs)[0], adapted_o, ref, "merge_and_unload vs adapter logits")

    base, theirs, ours, inputs = build_pair(case)
    with quiet():
        bare_t = theirs.unload()
    bare_o = ours.unload()
    assert not ia3_modules(bare_o)
    sd_t = bare_t.state_dict()
    assert list(bare_o.state_dict()) == list(sd_t)
    for k, v in bare_o.state_dict().items():
        assert torch.equal(v, sd_t[k]), k
    assert torch.equal(run(bare_o, inputs)[0], run(base, inputs)[0])


@pytest.mark.parametrize("case", ["llama-regex", "gpt2-default", "bert-default"])
def test_checkpoints_load_across_libraries(case, tmp_path):
    builder = CASES[case][0]
    _, theirs, ours, inputs = build_pair(case)
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    from safetensors.torch import load_file

    files_o = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    files_t = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert sorted(files_o) == sorted(files_t)
    for k in files_t:
        assert torch.equal(files_o[k], files_t[k]), k
    with open(tmp_path / "ours" / "adapter_config.json") as f:
        cfg_o = json.load(f)
    with open(tmp_path / "theirs" / "adapter_config.json") as f:
        cfg_t = json.load(f)
    for key in ("peft_type", "task_type", "fan_in_fan_out", "init_ia3_weights", "inference_mode",
                "modules_to_save", "exclude_modules"):
        assert cfg_o[key] == cfg_t[key], key
    for key in ("target_modules", "feedforward_modules"):
        norm = (lambda v: v if isinstance(v, str) else sorted(v))
        assert norm(cfg_o[key]) == norm(cfg_t[key]), key

    expected = run(ours, inputs)[0]
    with quiet():
        in_peft = peft.PeftModel.from_pretrained(builder(), str(tmp_path / "ours"))
    torch.testing.assert_close(run(in_peft, inputs)[0], expected, rtol=0, atol=1e-5)
    in_ours = peftfast.PeftModel.from_pretrained(builder(), str(tmp_path / "theirs"))
    assert isinstance(in_ours.base_model, peftfast.IA3Model)
    torch.testing.assert_close(run(in_ours, inputs)[0], expected, rtol=0, atol=1e-5)
    assert not any(p.requires_grad for p in in_ours.parameters())


# ------------------------------------------------------------------------------------------------------
# several adapters, initialisation, dtypes, the fused path
# ------------------------------------------------------------------------------------------------------
def test_two_active_adapters_and_weighted_adapter_match_peft():
    base, theirs, ours, inputs = build_pair("llama-default")
    second = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    with quiet():
        theirs.add_adapter("other", peft.IA3Config(**second))
    ours.add_adapter("other", peftfast.IA3Config(**second))
    randomise_ia3(theirs, seed=11)
    copy_ia3(theirs, ours)
    for model in (theirs, ours):
        model.base_model.set_adapter(["default", "other"])
    logits_t, _, grads_t = run(theirs, inputs, grads=True)
    logits_o, _, grads_o = run(ours, inputs, grads=True)
    ref = float64_copy(theirs)
    logits_r, _, grads_r = run(ref, inputs, grads=True)
    assert_as_accurate(logits_o, logits_t, logits_r, "two adapters")
    assert set(grads_o) == set(grads_t) and any(".other" in n for n in grads_o)
    for name in grads_o:
        assert_as_accurate(grads_o[name], grads_t[name], grads_r[name], f"grad of {name}")

    for model in (theirs, ours):
        model.base_model.add_weighted_adapter(["default", "other"], [0.7, -0.4], "mix")
        model.base_model.set_adapter("mix")
    sd_t = theirs.state_dict()
    mix = {k: v for k, v in ours.state_dict().items() if ".mix" in k}
    assert mix and all(torch.equal(v, sd_t[k]) for k, v in mix.items())
    ref = run(float64_copy(theirs), inputs)[0]
    assert_as_accurate(run(ours, inputs)[0], run(theirs, inputs)[0], ref, "weighted adapter")


def test_init_ia3_weights():
    base = tiny_llama()
    cfg = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    ours = peftfast.get_peft_model(copy.deepcopy(base), peftfast.IA3Config(**cfg))
    vecs = [p for n, p in ours.named_parameters() if "ia3_l" in n]
    assert vecs and all(torch.equal(v, torch.ones_like(v)) for v in vecs)
    inputs = lm_inputs()
    assert torch.equal(run(ours, inputs)[0], run(base, inputs)[0])  # the identity at initialisation
    # init_ia3_weights=False draws the same normal vectors as PEFT from the same seed
    torch.manual_seed(5)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(init_ia3_weights=False, **cfg))
    torch.manual_seed(5)
    ours = peftfast.get_peft_model(copy.deepcopy(base), peftfast.IA3Config(init_ia3_weights=False, **cfg))
    sd_t = theirs.state_dict()
    vecs = {k: v for k, v in ours.state_dict().items() if "ia3_l" in k}
    assert all(torch.equal(v, sd_t[k]) for k, v in vecs.items())
    assert not any(torch.equal(v, torch.ones_like(v)) for v in vecs.values())


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(37, 53)
        self.down = nn.Linear(53, 29)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dtype_behaviour_matches_peft(dtype, backend):
    """A half-precision base keeps fp32 vectors (autocast_adapter_dtype); outputs keep the input dtype."""
    torch.manual_seed(0)
    base = TwoLinears().to(dtype)
    cfg = dict(target_modules=["up", "down"], feedforward_modules=["down"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**cfg))
    ours = peftfast.get_peft_model(copy.deepcopy(base), peftfast.IA3Config(**cfg))
    randomise_ia3(theirs)
    copy_ia3(theirs, ours)
    assert {p.dtype for n, p in ours.named_parameters() if "ia3_l" in n} == {torch.float32}
    x = torch.randn(5, 7, 37).to(dtype)
    out_t, out_o = theirs(x), ours(x)
    assert out_o.dtype == out_t.dtype == dtype
    ref_model = float64_copy(theirs)
    out_r = ref_model(x.double())
    assert_as_accurate(out_o.detach(), out_t.detach(), out_r.detach(), "output")
    out_t.float().square().sum().backward()
    out_o.float().square().sum().backward()
    out_r.square().sum().backward()
    grads_r = {n: p.grad for n, p in ref_model.named_parameters() if p.requires_grad}
    grads_t = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert_as_accurate(p.grad, grads_t[n], grads_r[n], f"grad of {n}")


def test_plain_bases_use_the_fused_op_and_hooked_bases_the_elementwise_ops(monkeypatch):
    calls = {"linear": 0, "input": 0, "output": 0}

    def counting(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    for key, name in (("linear", "ia3_linear"), ("input", "ia3_scale_input"), ("output", "ia3_scale_output")):
        monkeypatch.setattr(ia3_layer_module, name, counting(key, getattr(ia3_layer_module, name)))
    _, theirs, ours, inputs = build_pair("gpt2-default")
    n_layers = len(ia3_modules(ours))
    expected = run(theirs, inputs)[0]
    assert_as_accurate(run(ours, inputs)[0], expected, run(float64_copy(theirs), inputs)[0], "fused")
    assert calls == {"linear": n_layers, "input": 0, "output": 0}

    seen = []
    for m in ia3_modules(ours).values():  # a hook on the base layer must still run: no direct op call
        m.base_layer.register_forward_hook(lambda mod, args, out: seen.append(1))
    calls.update(linear=0)
    got = run(ours, inputs)[0]
    assert len(seen) == n_layers and calls["linear"] == 0 and calls["input"] + calls["output"] == n_layers
    assert calls["input"] > 0 and calls["output"] > 0
    assert_as_accurate(got, expected, run(float64_copy(theirs), inputs)[0], "hooked")


@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "elementwise"])
def test_triton_backend_matches_peft(triton_backend, hooked):
    """The Triton kernels (interpreted on CPU) inside a GPT-2 with Conv1D bases, input- and output-side: the
    fused matmul, and the elementwise kernels used when the base layer has a hook."""
    assert use_triton(torch.empty(1))
    _, theirs, ours, inputs = build_pair("gpt2-list")
    if hooked:
        for m in ia3_modules(ours).values():
            m.base_layer.register_forward_pre_hook(lambda mod, args: None)
    logits_t, loss_t, grads_t = run(theirs, inputs, grads=True)
    logits_o, loss_o, grads_o = run(ours, inputs, grads=True)
    logits_r, loss_r, grads_r = run(float64_copy(theirs), inputs, grads=True)
    assert_as_accurate(logits_o, logits_t, logits_r, "logits")
    assert_as_accurate(loss_o, loss_t, loss_r, "loss")
    assert any("ia3_l" in n for n in grads_o)
    for name in grads_o:
        assert_as_accurate(grads_o[name], grads_t[name], grads_r[name], f"grad of {name}")


@pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("triton", marks=pytest.mark.xfail(
        strict=True, reason="the Triton path derives the output-side scale gradient as sum(dy * y) / s, "
        "which is 0 where s == 0 (PEFT: sum(dy * (W x + b)))"))], indirect=True)
def test_zero_output_scale_entry_still_gets_peft_gradient(backend):
    torch.manual_seed(0)
    base = TwoLinears()
    cfg = dict(target_modules=["up"], feedforward_modules=[])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**cfg))
    ours = peftfast.get_peft_model(copy.deepcopy(base), peftfast.IA3Config(**cfg))
    for model in (theirs, ours):
        with torch.no_grad():
            model.base_model.model.up.ia3_l["default"][::3] = 0.0
    ref = float64_copy(theirs)
    x = torch.randn(4, 5, 37)
    for model, inp in ((theirs, x), (ours, x), (ref, x.double())):
        model(inp).square().sum().backward()
    g_t, g_o, g_r = (m.base_model.model.up.ia3_l["default"].grad for m in (theirs, ours, ref))
    assert g_r[::3].abs().min() > 0
    assert_as_accurate(g_o, g_t, g_r, "grad of a vector with zero entries")


def test_fullgraph_compile_traces_the_ia3_layers():
    torch.manual_seed(0)
    cfg = peftfast.IA3Config(target_modules=["up", "down"], feedforward_modules=["down"],
                             init_ia3_weights=False)
    model = peftfast.get_peft_model(TwoLinears(), cfg)
    x = torch.randn(3, 5, 37)
    eager = model(x)
    eager.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)  # the same ops in the same order
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------
def test_unknown_target_is_refused_and_names_candidates():
    base = tiny_llama()
    with pytest.raises(ValueError) as err:
        peftfast.get_peft_model(base, peftfast.IA3Config(target_modules=["k_prj", "dwn_proj"],
                                                         feedforward_modules=["dwn_proj"]))
    msg = str(err.value)
    assert "'k_prj'" in msg and "k_proj" in msg and "down_proj" in msg
    assert not ia3_modules(base) and not hasattr(base, "peft_config")  # nothing was injected
    # next to entries that match, an unknown entry is a warning (as in PEFT), naming it and the candidates
    with pytest.warns(UserWarning) as record:
        peftfast.get_peft_model(tiny_llama(), peftfast.IA3Config(target_modules=["k_prj", "down_proj"],
                                                                 feedforward_modules=["down_proj"]))
    msg = " ".join(str(w.message) for w in record)
    assert "'k_prj'" in msg and "k_proj" in msg


def test_missing_feedforward_for_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="feedforward_modules is not set"):
        peftfast.get_peft_model(TwoLinears(), peftfast.IA3Config(target_modules=["up"]))
    cfg = peftfast.IA3Config(target_modules=["up"], feedforward_modules=[])
    model = peftfast.get_peft_model(TwoLinears(), cfg)
    assert not model.base_model.model.up.is_feedforward


def test_unmerge_with_a_zero_scale_is_refused_and_leaves_weights_merged():
    _, _, ours, inputs = build_pair("llama-default")
    layer = next(iter(ia3_modules(ours).values()))
    with torch.no_grad():
        layer.ia3_l["default"][0, 0] = 0.0
    ours.merge_adapter()
    merged = {n: p.detach().clone() for n, p in ours.named_parameters()}
    with pytest.raises(ValueError, match="zero entr.*cannot be divided back"):
        ours.unmerge_adapter()
    assert all(torch.equal(p, merged[n]) for n, p in ours.named_parameters())
    assert all(m.merged for m in ia3_modules(ours).values())


def test_safe_merge_refuses_non_finite_and_leaves_weights_untouched():
    _, _, ours, inputs = build_pair("gpt2-default")
    layer = list(ia3_modules(ours).values())[-1]
    with torch.no_grad():
        layer.ia3_l["default"][0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    with pytest.raises(ValueError, match="NaNs detected"):
        ours.merge_adapter(safe_merge=True)
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())
    assert not any(m.merged for m in ia3_modules(ours).values())


def test_second_adapter_disagreeing_on_feedforward_is_refused():
    _, _, ours, _ = build_pair("llama-default")
    keys = sorted(ours.state_dict())
    with pytest.raises(ValueError, match="must agree on feedforward_modules"):
        ours.add_adapter("flip", peftfast.IA3Config(target_modules=["k_proj", "down_proj"],
                                                    feedforward_modules=[]))
    assert sorted(ours.state_dict()) == keys and "flip" not in ours.peft_config


def test_per_sample_adapter_names_of_one_adapter_equal_set_adapter():
    _, _, ours, inputs = build_pair("llama-default")
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs, adapter_names=["default"] * inputs["input_ids"].shape[0]).logits,
                                   ours(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_saved_files_have_no_adapter_name(tmp_path):
    _, _, ours, _ = build_pair("gpt2-default")
    ours.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file

    keys = list(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys and all(k.endswith(".ia3_l") and "default" not in k for k in keys)
