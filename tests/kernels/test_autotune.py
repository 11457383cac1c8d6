"""The measured dispatch (kernels/autotune.py) with injected timings, and its use by lora_linear_fused.

Nothing is timed on CPU or in Triton's interpreter: the selection logic runs here with a timer that
returns set times (and calls the candidate once, so the candidates themselves run), and the op's
wiring is tested by letting the interpreter's CPU tensors count as measurable for one test.
"""
import json
import math
import warnings

import pytest
import torch
from peftfast.kernels import autotune as AT
from peftfast.kernels import lora as L
from peftfast.kernels import lora_fused as LF

from tests.kernels.test_lora_fused import F16, F32, errors, make_inputs, masks_for, run_op

DEV = "Test GPU 80GB"


class FakeTimer:
    """Times by candidate name (the candidates are looked up by identity); records every call."""

    def __init__(self, times, run=False):
        self.times, self.run, self.calls, self.names = times, run, [], {}

    def __call__(self, fn, warmup, repeats):
        name = self.names.get(fn, getattr(fn, "__name__", "?"))
        self.calls.append((name, warmup, repeats))
        if self.run:
            fn()
        value = self.times[name]
        if isinstance(value, BaseException):
            raise value
        return value


def candidates(*names):
    out = {}
    for name in names:
        def fn():
            return None
        fn.__name__ = name
        out[name] = fn
    return out


def tuner(tmp_path, times, **kw):
    timer = FakeTimer(times)
    return AT.Tuner(timer=timer, directory=tmp_path, version="9.9.9", **kw), timer


KEY = ("lora_linear_fused", 1024, 4096, 4096, 16, 1, "bf16", "fp32", "fwd+bwd+dropout")


def test_picks_the_faster_and_records_every_time(tmp_path):
    t, timer = tuner(tmp_path, {"fused": 1.30, "unfused": 1.10})
    d = t.choose(DEV, KEY, candidates("fused", "unfused"), default="fused")
    assert (d.choice, d.source) == ("unfused", "measured") and d.ms == {"fused": 1.30, "unfused": 1.10}
    assert timer.calls == [("fused", AT.WARMUP, AT.REPEATS), ("unfused", AT.WARMUP, AT.REPEATS)]
    t2, _ = tuner(tmp_path / "b", {"fused": 0.9, "unfused": 1.1})
    assert t2.choose(DEV, KEY, candidates("fused", "unfused"), default="fused").choice == "fused"


@pytest.mark.parametrize("unfused,expected", [(0.99, "fused"), (1.0, "fused"), (1.01, "fused"), (0.95, "unfused")])
def test_the_default_keeps_its_place_within_the_margin(tmp_path, unfused, expected):
    t, _ = tuner(tmp_path, {"fused": 1.0, "unfused": unfused})
    assert t.choose(DEV, KEY, candidates("fused", "unfused"), default="fused").choice == expected


def test_decision_is_cached_in_memory(tmp_path):
    t, timer = tuner(tmp_path, {"fused": 2.0, "unfused": 1.0})
    first = t.choose(DEV, KEY, candidates("fused", "unfused"), default="fused")
    again = t.choose(DEV, KEY, candidates("fused", "unfused"), default="fused")
    assert again is first and t.lookup(DEV, KEY) is first and len(timer.calls) == 2
    # another key, another device: measured on their own
    t.choose(DEV, KEY[:1] + (2048,) + KEY[2:], candidates("fused", "unfused"), default="fused")
    t.choose("Other GPU", KEY, candidates("fused", "unfused"), default="fused")
    assert len(timer.calls) == 6
    assert [(dev, key[1]) for dev, key, _ in t.decisions()] == [(DEV, 1024), (DEV, 2048), ("Other GPU", 1024)]


def test_persisted_per_gpu_and_version_and_reloaded(tmp_path):
    t, _ = tuner(tmp_path, {"fused": 2.0, "unfused": 1.0})
    t.choose(DEV, KEY, candidates("fused", "unfused"), default="fused")
    path = t.path(DEV)
    assert path.parent == tmp_path and "Test_GPU_80GB" in path.name and "9.9.9" in path.name
    data = json.loads(path.read_text())
    assert data["device"] == DEV and data["peftfast"] == "9.9.9" and data["torch"] == torch.__version__
    assert list(data["entries"].values()) == [{"choice": "unfused", "ms": {"fused": 2.0, "unfused": 1.0}}]
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed over the target
    # a new process (a fresh Tuner) reads it back and measures nothing
    fresh, timer = tuner(tmp_path, {"fused": AssertionError("measured again"), "unfused": 1.0})
    d = fresh.choose(DEV, KEY, candidates("fused", "unfused"), default="fused")
    assert (d.choice, d.source, dict(d.ms)) == ("unfused", "cache file", {"fused": 2.0, "unfused": 1.0})
    assert timer.calls == []
    # another package version or GPU name: another file, measured again
    other, timer = tuner(tmp_path, {"fused": 1.0, "unfused": 3.0})
    other._version = "10.0"
    assert other.choose(DEV, KEY, candidates("fused", "unfused"), default="fused").choice == "fused"
    assert len(timer.calls) == 2 and other.path(DEV) != path and path.exists()


def test_new_decisions_merge_into_the_file(tmp_path):
    a, _ = tuner(tmp_path, {"fused": 2.0, "unfused": 1.0})
    b, _ = tuner(tmp_path, {"fused": 1.0, "unfused": 2.0})
    key2 = KEY[:1] + (8,) + KEY[2:]
    a.choose(DEV, KEY, candidates("fused", "unfused"), default="fused")
    b.choose(DEV, key2, candidates("fused", "unfused"), default="fused")  # another process, another key
    c, timer = tuner(tmp_path, {})
    assert c.lookup(DEV, KEY).choice == "unfused" and c.lookup(DEV, key2).choice == "fused" and not timer.calls


@pytest.mark.parametrize("content", [
    b"{not json", b"\x00\xff\xfe binary", b"[1, 2, 3]", b'"a string"', b"",
    json.dumps({"kind": "peftfast-dispatch", "format": 1, "device": "Other GPU", "peftfast": "9.9.9",
                "entries": {}}).encode(),
], ids=["truncated", "binary", "list", "string", "empty", "foreign-gpu"])
def test_corrupt_or_foreign_file_is_ignored_and_replaced(tmp_path, content):
    t, timer = tuner(tmp_path, {"fused": 2.0, "unfused": 1.0})
    t.path(DEV).write_bytes(content)
    assert t.choose(DEV, KEY, candidates("fused", "unfused"), default="fused").choice == "unfused"
    assert len(timer.calls) == 2
    assert json.loads(t.path(DEV).read_text())["device"] == DEV  # rewritten as a valid file


def test_file_of_other_torch_version_is_ignored(tmp_path):
    t, _ = tuner(tmp_path, {"fused": 2.0, "unfused": 1.0})
    t.choose(DEV, KEY, candidates("fused", "unfused"), default="fused")
    data = json.loads(t.path(DEV).read_text())
    t.path(DEV).write_text(json.dumps({**data, "torch": "0.0.1"}))
    fresh, timer = tuner(tmp_path, {"fused": 1.0, "unfused": 2.0})
    assert fresh.choose(DEV, KEY, candidates("fused", "unfused"), default="fused").choice == "fused"
    assert len(timer.calls) == 2


def test_malformed_entries_are_skipped_one_by_one(tmp_path):
    t, _ = tuner(tmp_path, {"fused": 2.0, "unfused": 1.0})
    t.choose(DEV, KEY, candidates("fused", "unfused"), default="fused")
    data = json.loads(t.path(DEV).read_text())
    good = next(iter(data["entries"]))
    data["entries"].update({"a": "not a dict", "b": {"choice": 3, "ms": {}}, "c": {"choice": "x", "ms": [1]},
                            "d": {"choice": "gone", "ms": {"fused": 1.0}}})
    t.path(DEV).write_text(json.dumps(data))
    fresh, _ = tuner(tmp_path, {})
    fresh.lookup(DEV, KEY)
    assert set(fresh._files[DEV]) == {good}


def test_a_stored_choice_that_is_no_candidate_is_measured_again(tmp_path):
    t, _ = tuner(tmp_path, {"fused": 2.0, "retired": 1.0})
    t.choose(DEV, KEY, candidates("fused", "retired"), default="fused")
    fresh, timer = tuner(tmp_path, {"fused": 2.0, "unfused": 1.0})
    assert fresh.choose(DEV, KEY, candidates("fused", "unfused"), default="fused").choice == "unfused"
    assert len(timer.calls) == 2


def test_failing_candidates_are_never_chosen(tmp_path):
    t, _ = tuner(tmp_path, {"fused": 2.0, "unfused": RuntimeError("out of memory")})
    d = t.choose(DEV, KEY, candidates("fused", "unfused"), default="fused")
    assert d.choice == "fused" and d.ms["unfused"] == math.inf
    assert json.loads(t.path(DEV).read_text())["entries"].popitem()[1]["ms"]["unfused"] is None
    t2, timer = tuner(tmp_path / "b", {"fused": RuntimeError("no"), "unfused": float("nan")})
    assert t2.choose(DEV, KEY, candidates("fused", "unfused"), default="fused").choice == "fused"
    assert t2.lookup(DEV, KEY).ms == {"fused": math.inf, "unfused": math.inf} and len(timer.calls) == 2
    assert not t2.path(DEV).exists()  # every candidate failed (perhaps out of memory for now): not kept on disk
    t3, _ = tuner(tmp_path / "c", {"fused": RuntimeError("no"), "unfused": 5.0})
    assert t3.choose(DEV, KEY, candidates("fused", "unfused"), default="fused").choice == "unfused"
    with pytest.raises(ValueError, match="not one of the candidates"):
        t.choose(DEV, KEY, candidates("a", "b"), default="fused")


def test_unwritable_cache_folder_keeps_decisions_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    t, timer = tuner(blocker / "sub", {"fused": 2.0, "unfused": 1.0})  # a folder under a file: never writable
    with pytest.warns(RuntimeWarning, match="could not write its dispatch cache"):
        assert t.choose(DEV, KEY, candidates("fused", "unfused"), default="fused").choice == "unfused"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        t.choose(DEV, KEY[:1] + (1,) + KEY[2:], candidates("fused", "unfused"), default="fused")
    assert t.lookup(DEV, KEY).choice == "unfused" and len(timer.calls) == 4


def test_cache_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTFAST_CACHE_DIR", str(tmp_path / "c"))
    assert AT.cache_dir() == tmp_path / "c"
    assert AT.Tuner(version="1").path("A100-SXM4 / 40GB").parent == tmp_path / "c"
    monkeypatch.delenv("PEFTFAST_CACHE_DIR")
    assert AT.cache_dir().parts[-2:] == (".cache", "peftfast")


def test_autotune_switch(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for value, on in (("1", True), ("", True), (" 0 ", False), ("0", False)):
        monkeypatch.setenv("PEFTFAST_AUTOTUNE", value)
        assert AT.autotune_enabled() is on and AT.tunable(cuda) is on and not AT.tunable(cpu)
    monkeypatch.delenv("PEFTFAST_AUTOTUNE")
    assert AT.autotune_enabled()
    monkeypatch.setenv("PEFTFAST_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="use 1 .* or 0"):
        AT.autotune_enabled()


def test_never_measured_on_cpu_or_in_the_interpreter():
    assert not AT.may_measure(torch.device("cpu"))
    if AT.interpreting():
        assert not AT.may_measure(torch.device("cuda", 0))


def test_bucket_and_key():
    assert [AT.bucket(n) for n in (0, 1, 2, 3, 1000, 1024, 1025)] == [0, 1, 2, 4, 1024, 1024, 2048]
    w = torch.empty(97, 203)
    a16, a7 = torch.empty(16, 203), torch.empty(7, 203)

    def key(x, ad=(a16,), need_x=True, grads=True, dropout=False):
        return LF.dispatch_key(x, w, list(ad), need_x, grads, dropout)

    k = key(torch.empty(1000, 203))
    assert k == ("lora_linear_fused", 1024, 97, 203, 16, 1, "fp32", "fp32", "fwd+bwd")
    assert key(torch.empty(2, 500, 203)) == key(torch.empty(1024, 203)) == k  # tokens bucketed, leading dims flat
    assert key(torch.empty(1025, 203)) != k
    assert key(torch.empty(1000, 203, dtype=F16))[6:8] == ("fp16", "fp32")
    assert key(torch.empty(1000, 203), ad=(a16, a7))[4:6] == (23, 2)
    assert key(torch.empty(1000, 203), need_x=False)[-1] == "fwd+bwd-dx"
    assert key(torch.empty(1000, 203), need_x=False, grads=False)[-1] == "fwd"
    assert key(torch.empty(1000, 203), dropout=True)[-1] == "fwd+bwd+dropout"


@pytest.fixture
def measurable(monkeypatch, tmp_path):
    """The interpreter's CPU tensors count as measurable; a fresh tuner with injected times (unfused
    faster) that runs each candidate once."""
    timer = FakeTimer({"fused": 2.0, "unfused": 1.0}, run=True)
    t = AT.Tuner(timer=timer, directory=tmp_path, version="test")
    monkeypatch.setattr(AT, "TUNER", t)
    monkeypatch.setattr(AT, "tunable", lambda device: AT.autotune_enabled())
    monkeypatch.setattr(AT, "may_measure", lambda device: True)
    return t, timer


@pytest.mark.parametrize("dtypes,ps", [((F32, F32), [0.2, 0.0]), ((F16, F32), [0.0, 0.0])], ids=["f32-drop", "f16"])
def test_measured_unfused_choice_runs_and_matches_float64(triton_kernels, measurable, monkeypatch, dtypes, ps):
    t, timer = measurable  # the candidates are functions named "fused" and "unfused"
    calls = []
    real = L.lora_linear
    monkeypatch.setattr(L, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = make_inputs((3, 37), 45, 52, [5, 3], *dtypes)
    y, grads, seed = run_op(inputs, ps)
    assert [name for name, *_ in timer.calls] == ["fused", "unfused"]
    (dev, key, decision), = t.decisions()
    assert dev == "cpu" and decision.choice == "unfused" and key[1:6] == (128, 52, 45, 8, 2)
    assert len(calls) == 2  # once timed (the candidate), once for the call itself
    for name, err, allowed in errors(y, grads, inputs, masks_for(seed, ps, inputs[0]), ps):
        assert err <= allowed, f"{name}: error {err:.3e} vs float64 > allowed {allowed:.3e}"
    # the second call of the key: no measurement, the same path
    run_op(inputs, ps)
    assert len(timer.calls) == 2 and len(calls) == 3


def test_measuring_leaves_the_callers_state_alone(triton_kernels, measurable):
    _, timer = measurable
    x, w, b, As, Bs, scalings, _ = make_inputs((29,), 40, 24, [4], F32, F32)
    x, b = x.requires_grad_(), b.requires_grad_()
    for p in (*As, *Bs):
        p.requires_grad_()
    before = [t.detach().clone() for t in (x, w, b, *As, *Bs)]
    rng = torch.get_rng_state()
    plan = LF.make_plan([4], scalings, [0.3])
    assert LF.dispatch(x, w, b, As, Bs, scalings, [0.3], plan) == "unfused"
    assert len(timer.calls) == 2 and torch.equal(torch.get_rng_state(), rng)
    assert all(t.grad is None for t in (x, b, *As, *Bs))
    assert all(torch.equal(t, u) for t, u in zip((x, w, b, *As, *Bs), before))


def test_switched_off_means_fused_and_nothing_measured(triton_kernels, measurable, monkeypatch):
    t, timer = measurable
    monkeypatch.setenv("PEFTFAST_AUTOTUNE", "0")
    inputs = make_inputs((13,), 45, 52, [5], F32, F32)
    y, grads, seed = run_op(inputs, [0.1])
    assert timer.calls == [] and t.decisions() == [] and not list(t.path("cpu").parent.glob("*.json"))
    for name, err, allowed in errors(y, grads, inputs, masks_for(seed, [0.1], inputs[0]), [0.1]):
        assert err <= allowed, name


def test_default_setup_measures_nothing_in_the_interpreter(triton_kernels, monkeypatch, tmp_path):
    timer = FakeTimer({"fused": AssertionError("timed"), "unfused": AssertionError("timed")})
    t = AT.Tuner(timer=timer, directory=tmp_path, version="test")
    monkeypatch.setattr(AT, "TUNER", t)
    run_op(make_inputs((13,), 45, 52, [5], F32, F32), [0.0])
    assert timer.calls == [] and t.decisions() == []


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_layer_follows_the_measured_choice(triton_kernels, measurable, monkeypatch, use_dora):
    """A LoRA (and DoRA) layer over nn.Linear on the unfused path it was measured to prefer: the same output
    and gradients as PEFT (the oracle) on the same weights."""
    import copy

    import peft
    import peftfast
    from torch import nn

    _, timer = measurable
    torch.manual_seed(3)
    base = nn.Sequential(nn.Linear(45, 52), nn.Tanh(), nn.Linear(52, 30))
    kw = dict(r=5, lora_alpha=10, target_modules=["0", "2"], init_lora_weights=False, use_dora=use_dora)
    ours = peftfast.get_peft_model(copy.deepcopy(base), peftfast.LoraConfig(**kw)).eval()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw)).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 45)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [m(v) for m, v in zip((ours, ref), xs)]
    dy = torch.randn_like(outs[0])
    for out in outs:
        out.backward(dy)
    assert [c[0] for c in timer.calls] == ["fused", "unfused"] * 2  # two layers, two keys
    assert all(d.choice == "unfused" for _, _, d in AT.TUNER.decisions())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-5, atol=1e-5, msg=name)
