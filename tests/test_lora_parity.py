"""LoRA parity against the real PEFT (test-only oracle), table-driven over Llama, GPT-2, BERT and T5.

Each case builds one tiny base model, wraps two deep copies of it (one with ``peft``, one with
``peftfast``) from the same LoraConfig arguments, randomises the adapter weights in the PEFT model
(lora_B too, so the adapter changes the output) and copies them into the peftfast model by state-dict
key. Then outputs, losses, every adapter gradient, parameter counts, state-dict keys, merge / unmerge /
unload results and adapter switching must agree.

fp32 comparisons allow an error of 1e-5 of the largest reference value (both libraries do the same
fp32 math, possibly in another order); gradients additionally get an absolute floor of 1e-6: the losses
are O(1), and a gradient entry that is a cancelling sum of O(1) terms (e.g. a QA head's bias, whose exact
gradient is 0) carries fp32 rounding noise of a few ulp of 1, i.e. ~1e-7.

Half-precision comparisons are derived: peftfast's error against an fp32 evaluation of the same
(rounded) weights may be at most twice PEFT's error plus one unit in the last place of the half type at
the scale of the result (so that a single rounding-boundary difference passes when PEFT is exact).
"""

from __future__ import annotations

import copy
import warnings

import peft as ref
import pytest
import torch
from torch import nn

import peftfast as fast
from tests._models import FAMILIES, MAIN_FAMILIES, PARITY_FAMILIES, model_output

RTOL = 1e-5
# Every case that runs the LoRA op runs twice for these families: with the default backend (the PyTorch
# reference on CPU) and with PEFTFAST_BACKEND=triton (the Triton kernels in the interpreter). The
# interpreter is slow, so only Llama and GPT-2 (the nn.Linear and Conv1D paths) at hidden 16, seq 7.
TRITON_FAMILIES = ["llama", "gpt2"]


def with_triton(families) -> list:
    """(family, backend) cases: every family on the default backend, the Triton families also on Triton."""
    return [pytest.param(f, "default", id=f) for f in families] + [
        pytest.param(f, "triton", id=f"{f}-triton", marks=pytest.mark.interpreter)
        for f in families
        if f in TRITON_FAMILIES
    ]


def with_triton_and(families, values, triton_values, marks=None) -> list:
    """(family, backend, value) cases; Triton runs take only ``triton_values`` (the interpreter is slow)."""
    marks = marks or {}
    out = []
    for f in families:
        for b, vals in (("default", values), ("triton", triton_values if f in TRITON_FAMILIES else [])):
            for v in vals:
                m = list(marks.get((f, v), [])) + ([pytest.mark.interpreter] if b == "triton" else [])
                out.append(pytest.param(f, b, v, id=f"{f}{'-triton' if b == 'triton' else ''}-{v}", marks=m))
    return out


BACKEND_CASES = with_triton(PARITY_FAMILIES)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def backend(request, monkeypatch):
    """Select the op backend (indirect parameter); on Triton, check that the LoRA op really took that path."""
    name = getattr(request, "param", "default")
    if name != "triton":
        yield name
        return
    request.getfixturevalue("triton_backend")
    import peftfast.kernels.lora as lora_op
    import peftfast.kernels.lora_fused as fused_op

    choices = []
    for module in (lora_op, fused_op):  # the fused base+LoRA op serves plain nn.Linear bases
        real = module.use_triton
        monkeypatch.setattr(module, "use_triton", lambda *t, real=real: choices.append(real(*t)) or choices[-1])
    yield name
    assert choices and all(choices), "PEFTFAST_BACKEND=triton but the LoRA op did not run its Triton kernels"


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def lora_kwargs(fam, **overrides) -> dict:
    kw = {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": list(fam.targets),
        "task_type": fam.task_type,
        "fan_in_fan_out": fam.fan_in_fan_out,
    }
    kw.update(overrides)
    return kw


def build_pair(fam, seed: int = 0, dtype=None, adapter_name: str = "default", **kw):
    """(untouched base, PEFT model, peftfast model) from one base and the same LoraConfig arguments."""
    base = fam.build(seed=seed)
    if dtype is not None:
        base = base.to(dtype)
    ref_model = ref.get_peft_model(
        copy.deepcopy(base), ref.LoraConfig(**copy.deepcopy(kw)), adapter_name=adapter_name
    )
    fast_model = fast.get_peft_model(
        copy.deepcopy(base), fast.LoraConfig(**copy.deepcopy(kw)), adapter_name=adapter_name
    )
    return base, ref_model, fast_model


def randomise(model: nn.Module, seed: int = 1, adapter: str | None = None) -> None:
    """Random adapter weights (A and B) and perturbed modules_to_save copies, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if adapter is not None and f".{adapter}." not in name + ".":
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "lora_" in name:
                p.copy_((0.2 * noise).to(p.dtype))
            elif "modules_to_save" in name:
                p.add_((0.1 * noise).to(p.dtype))


def sync(ref_model: nn.Module, fast_model: nn.Module) -> None:
    """Copy every tensor of the PEFT model into the peftfast model by (identical) state-dict key."""
    rsd, fsd = ref_model.state_dict(), fast_model.state_dict()
    assert set(rsd) == set(fsd), (
        f"state-dict keys differ: only PEFT {sorted(set(rsd) - set(fsd))[:8]}, "
        f"only peftfast {sorted(set(fsd) - set(rsd))[:8]}"
    )
    fast_model.load_state_dict(rsd)


GRAD_ATOL = 1e-6


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, what: str = "", rtol: float = RTOL, atol: float = 0.0
) -> None:
    assert actual is not None, f"{what}: missing"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    tol = rtol * max(scale, 1e-12) + atol
    assert err <= tol, f"{what}: max abs error {err:.3e} > {rtol:.0e} * {scale:.3e} + {atol:.0e}"


def assert_grad_close(actual, expected, what: str = "") -> None:
    assert_close(actual, expected, what, atol=GRAD_ATOL)


def lora_layer_names(model: nn.Module) -> list[str]:
    return sorted(
        n
        for n, m in model.named_modules()
        if isinstance(m, (ref.tuners.lora.LoraLayer, fast.tuners.lora.LoraLayer))
    )


def module_types(model: nn.Module) -> dict[str, str]:
    """Class name per module path, without empty containers (PEFT's unused DoRA ``lora_magnitude_vector``)."""
    return {
        n: type(m).__name__
        for n, m in model.named_modules()
        if not (isinstance(m, (nn.ModuleDict, nn.ParameterDict)) and len(m) == 0)
    }


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def run(model: nn.Module, inputs: dict, train: bool = False):
    model.train(train)
    if train:
        return model(**inputs)
    with torch.no_grad():
        return model(**inputs)


def outputs_equal(ref_model, fast_model, inputs, what="output"):
    r, f = model_output(run(ref_model, inputs)), model_output(run(fast_model, inputs))
    assert_close(f, r, what)
    return r


# ----------------------------------------------------------------------------------------------------------
# structure and counts
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_structure_keys_and_counts(family):
    fam = FAMILIES[family]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam))
    assert type(fm).__name__ == type(rm).__name__
    assert lora_layer_names(fm) == lora_layer_names(rm) != []
    assert module_types(fm) == module_types(rm)
    assert fm.get_nb_trainable_parameters() == rm.get_nb_trainable_parameters()
    assert trainable(fm) == trainable(rm)
    assert list(fm.state_dict()) == list(rm.state_dict())
    assert set(fm.peft_config["default"].target_modules) == set(rm.peft_config["default"].target_modules)
    assert fm.peft_config["default"].modules_to_save == rm.peft_config["default"].modules_to_save
    randomise(rm)
    sync(rm, fm)
    rsd, fsd = ref.get_peft_model_state_dict(rm), fast.get_peft_model_state_dict(fm)
    assert list(fsd) == list(rsd)
    for k in rsd:
        assert torch.equal(fsd[k], rsd[k]), k


@pytest.mark.parametrize("family", MAIN_FAMILIES)
def test_default_target_modules(family):
    fam = FAMILIES[family]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam, target_modules=None))
    assert lora_layer_names(fm) == lora_layer_names(rm) != []
    assert set(fm.peft_config["default"].target_modules) == set(fam.default_targets)


# ----------------------------------------------------------------------------------------------------------
# forward, loss, gradients
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,backend", BACKEND_CASES, indirect=["backend"])
def test_forward_loss_and_gradients(family, backend):
    fam = FAMILIES[family]
    base, rm, fm = build_pair(fam, **lora_kwargs(fam))
    x = fam.inputs()
    base_out = model_output(run(base, x))
    # freshly initialised (B = 0): both equal the base model
    assert_close(model_output(run(fm, x)), base_out, "output at init")
    randomise(rm)
    sync(rm, fm)
    r_out, f_out = run(rm, x, train=True), run(fm, x, train=True)
    assert_close(model_output(f_out), model_output(r_out), "logits")
    assert (model_output(r_out) - base_out).abs().max() > 1e-3, "the adapter must change the output"
    assert_close(f_out.loss, r_out.loss, "loss")
    r_out.loss.backward()
    f_out.loss.backward()
    r_grads = {n: p.grad for n, p in rm.named_parameters() if p.requires_grad}
    f_grads = {n: p.grad for n, p in fm.named_parameters() if p.requires_grad}
    assert set(f_grads) == set(r_grads)
    for n, g in r_grads.items():
        assert f_grads[n] is not None, f"no gradient for {n}"
        assert_grad_close(f_grads[n], g, f"grad {n}")
    assert all(p.grad is None for p in fm.parameters() if not p.requires_grad)
    assert fm.get_nb_trainable_parameters() == rm.get_nb_trainable_parameters()


# ----------------------------------------------------------------------------------------------------------
# merge, unmerge, unload
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,backend", with_triton(PARITY_FAMILIES), indirect=["backend"])
def test_merge_unmerge(family, backend):
    fam = FAMILIES[family]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam))
    randomise(rm)
    sync(rm, fm)
    x = fam.inputs()
    adapted = outputs_equal(rm, fm, x, "before merge")
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    rm.merge_adapter()
    fm.merge_adapter()
    for name in lora_layer_names(fm):
        rl, fl = rm.get_submodule(name), fm.get_submodule(name)
        assert fl.merged and fl.merged_adapters == rl.merged_adapters == ["default"]
        assert_close(fl.get_base_layer().weight, rl.get_base_layer().weight, f"merged weight {name}")
    merged_out = outputs_equal(rm, fm, x, "merged")
    assert_close(merged_out, adapted, "merged vs unmerged", rtol=1e-4)
    rm.unmerge_adapter()
    fm.unmerge_adapter()
    assert not any(fm.get_submodule(n).merged for n in lora_layer_names(fm))
    for k, v in fm.state_dict().items():
        assert_close(v, before[k], f"after unmerge {k}", rtol=1e-6)
    outputs_equal(rm, fm, x, "after unmerge")


@pytest.mark.parametrize(
    "family,backend,how",
    with_triton_and(
        MAIN_FAMILIES, ["merge_and_unload", "merge_and_unload_safe", "unload"], ["merge_and_unload"]
    ),
    indirect=["backend"],
)
def test_merge_and_unload_and_unload(family, backend, how):
    _merge_and_unload_case(family, how)


@pytest.mark.parametrize("family,how", [("bert_tok", "merge_and_unload"), ("bert_qa", "unload")])
def test_merge_and_unload_task_heads(family, how):
    _merge_and_unload_case(family, how)


def _merge_and_unload_case(family, how):
    fam = FAMILIES[family]
    base, rm, fm = build_pair(fam, **lora_kwargs(fam, modules_to_save=list(fam.modules_to_save) or None))
    randomise(rm)
    sync(rm, fm)
    x = fam.inputs()
    adapted = outputs_equal(rm, fm, x)
    if how == "unload":
        ru, fu = rm.unload(), fm.unload()
    else:
        safe = how.endswith("safe")
        ru = rm.merge_and_unload(safe_merge=safe)
        fu = fm.merge_and_unload(progressbar=True, safe_merge=safe)
    assert type(fu) is type(ru) is type(base)
    assert module_types(fu) == module_types(ru)
    assert not any(
        isinstance(m, (fast.tuners.tuners_utils.BaseTunerLayer, fast.utils.ModulesToSaveWrapper))
        for m in fu.modules()
    )
    rsd, fsd = ru.state_dict(), fu.state_dict()
    assert list(fsd) == list(rsd) == list(base.state_dict())
    for k in rsd:
        assert_close(fsd[k], rsd[k], f"unloaded {k}", rtol=1e-6)
    out = outputs_equal(ru, fu, x, "unloaded")
    if how == "unload":  # base weights; a modules_to_save copy replaces its original, as in PEFT
        if not fm.peft_config["default"].modules_to_save:
            assert_close(out, model_output(run(base, x)), "unload gives the base model")
    else:
        assert_close(out, adapted, "merged model equals adapted model", rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_unloaded_model_can_be_wrapped_again(family):
    """PEFT removes ``peft_config`` from the model it returns on unload
    (BaseTuner._unload_and_optionally_merge), so the unloaded model can be wrapped again."""
    fam = FAMILIES[family]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam))
    ru, fu = rm.merge_and_unload(), fm.merge_and_unload()
    assert hasattr(fu, "peft_config") == hasattr(ru, "peft_config")
    again = fast.get_peft_model(fu, fast.LoraConfig(**lora_kwargs(fam)))
    ref_again = ref.get_peft_model(ru, ref.LoraConfig(**lora_kwargs(fam)))
    assert lora_layer_names(again) == lora_layer_names(ref_again) != []


@pytest.mark.parametrize("family,backend", with_triton(MAIN_FAMILIES), indirect=["backend"])
def test_merge_selected_adapters(family, backend):
    fam = FAMILIES[family]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam))
    second = lora_kwargs(fam, r=3, lora_alpha=5, target_modules=list(fam.default_targets))
    rm.add_adapter("other", ref.LoraConfig(**copy.deepcopy(second)))
    fm.add_adapter("other", fast.LoraConfig(**copy.deepcopy(second)))
    randomise(rm)
    sync(rm, fm)
    x = fam.inputs()
    heads = fm.peft_config["default"].modules_to_save  # PEFT allows one active modules_to_save copy only
    if not heads:  # both adapters active at once (one fused call per layer in peftfast, a loop in PEFT)
        rm.base_model.set_adapter(["default", "other"])
        fm.base_model.set_adapter(["default", "other"])
        assert fm.active_adapters == rm.active_adapters == ["default", "other"]
    both = outputs_equal(rm, fm, x, "active adapters")
    ru = rm.merge_and_unload(adapter_names=["default", "other"])
    fu = fm.merge_and_unload(adapter_names=["default", "other"])
    for k, v in ru.state_dict().items():
        assert_close(fu.state_dict()[k], v, f"merged both {k}", rtol=1e-6)
    merged = outputs_equal(ru, fu, x, "both adapters merged")
    if not heads:
        assert_close(merged, both, "merged equals the two active adapters", rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# several adapters
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,backend", BACKEND_CASES, indirect=["backend"])
def test_add_set_delete_adapters(family, backend):
    fam = FAMILIES[family]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam))
    randomise(rm, seed=1)
    sync(rm, fm)
    x = fam.inputs()
    out_default = outputs_equal(rm, fm, x, "default")
    second = lora_kwargs(fam, r=3, lora_alpha=5, use_rslora=True, target_modules=list(fam.default_targets))
    rm.add_adapter("other", ref.LoraConfig(**copy.deepcopy(second)))
    fm.add_adapter("other", fast.LoraConfig(**copy.deepcopy(second)))
    randomise(rm, seed=2, adapter="other")
    sync(rm, fm)
    # adding does not activate
    assert fm.active_adapter == rm.active_adapter == "default"
    assert fm.active_adapters == rm.active_adapters == ["default"]
    assert trainable(fm) == trainable(rm)
    assert fm.get_nb_trainable_parameters() == rm.get_nb_trainable_parameters()
    assert_close(outputs_equal(rm, fm, x, "default after add"), out_default, "add changes nothing")
    # switching
    rm.set_adapter("other")
    fm.set_adapter("other")
    assert fm.active_adapter == rm.active_adapter == "other"
    assert trainable(fm) == trainable(rm)
    assert fm.get_nb_trainable_parameters() == rm.get_nb_trainable_parameters()
    out_other = outputs_equal(rm, fm, x, "other")
    assert (out_other - out_default).abs().max() > 1e-3
    # gradients flow to the active adapter only
    lr, lf = run(rm, x, train=True).loss, run(fm, x, train=True).loss
    lr.backward()
    lf.backward()
    for n, p in rm.named_parameters():
        q = fm.get_parameter(n)
        assert (q.grad is None) == (p.grad is None), n
        if p.grad is not None:
            assert ".other." in n or "modules_to_save" in n, n
            assert_grad_close(q.grad, p.grad, f"grad {n}")
    rm.zero_grad(set_to_none=True)
    fm.zero_grad(set_to_none=True)
    rm.set_adapter("default")
    fm.set_adapter("default")
    assert_close(outputs_equal(rm, fm, x, "back to default"), out_default, "switch back")
    # deleting the inactive adapter
    rm.delete_adapter("other")
    fm.delete_adapter("other")
    assert list(fm.peft_config) == list(rm.peft_config) == ["default"]
    assert list(fm.state_dict()) == list(rm.state_dict())
    assert trainable(fm) == trainable(rm)
    assert_close(outputs_equal(rm, fm, x, "after delete"), out_default, "delete the inactive adapter")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_add_adapter_on_other_modules_stays_inactive(family):
    fam = FAMILIES[family]
    first, second = fam.targets[:1], fam.targets[1:2]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam, target_modules=first))
    randomise(rm)
    sync(rm, fm)
    x = fam.inputs()
    before = outputs_equal(rm, fm, x)
    kw = lora_kwargs(fam, r=3, target_modules=second)
    rm.add_adapter("other", ref.LoraConfig(**copy.deepcopy(kw)))
    fm.add_adapter("other", fast.LoraConfig(**copy.deepcopy(kw)))
    randomise(rm, seed=7, adapter="other")
    sync(rm, fm)
    assert_close(outputs_equal(rm, fm, x, "after add"), before, "adding an adapter changes nothing")
    rm.set_adapter("other")
    fm.set_adapter("other")
    outputs_equal(rm, fm, x, "other active")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_set_adapter_while_merged_unmerges(family):
    fam = FAMILIES[family]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam))
    kw = lora_kwargs(fam, r=3, target_modules=list(fam.default_targets))
    rm.add_adapter("other", ref.LoraConfig(**copy.deepcopy(kw)))
    fm.add_adapter("other", fast.LoraConfig(**copy.deepcopy(kw)))
    randomise(rm)
    sync(rm, fm)
    x = fam.inputs()
    rm.merge_adapter()
    fm.merge_adapter()
    rm.set_adapter("other")
    fm.set_adapter("other")
    assert not any(fm.get_submodule(n).merged for n in lora_layer_names(fm))
    for k, v in rm.state_dict().items():
        assert_close(fm.state_dict()[k], v, f"after switching {k}", rtol=1e-6)
    outputs_equal(rm, fm, x, "switched after merge")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_delete_active_adapter_picks_same_successor(family):
    """Deleting the active adapter activates the alphabetically first remaining one in PEFT
    (BaseTunerLayer.delete_adapter -> _all_available_adapter_names is sorted)."""
    fam = FAMILIES[family]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam))
    for name, r in (("zeta", 2), ("alpha", 3)):
        kw = lora_kwargs(fam, r=r, target_modules=list(fam.default_targets))
        rm.add_adapter(name, ref.LoraConfig(**copy.deepcopy(kw)))
        fm.add_adapter(name, fast.LoraConfig(**copy.deepcopy(kw)))
    randomise(rm)
    sync(rm, fm)
    x = fam.inputs()
    rm.delete_adapter("default")
    fm.delete_adapter("default")
    assert fm.active_adapters == rm.active_adapters
    assert trainable(fm) == trainable(rm)
    outputs_equal(rm, fm, x, "after deleting the active adapter")


@pytest.mark.parametrize(
    "name",
    [
        "other",
        pytest.param(
            "a",
        ),
    ],
)
def test_add_inference_mode_adapter_keeps_active_trainable(name):
    """Adding a frozen (inference_mode) adapter must not change which existing parameters train; PEFT
    restores them (BaseTuner.inject_adapter, mapping_existing_parameter_requires_grad), whatever the name."""
    fam = FAMILIES["llama"]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam))
    kw = lora_kwargs(fam, r=2, target_modules=["q_proj"], inference_mode=True)
    rm.add_adapter(name, ref.LoraConfig(**copy.deepcopy(kw)))
    fm.add_adapter(name, fast.LoraConfig(**copy.deepcopy(kw)))
    assert trainable(fm) == trainable(rm)
    assert fm.get_nb_trainable_parameters() == rm.get_nb_trainable_parameters()


@pytest.mark.parametrize("family,backend", with_triton(PARITY_FAMILIES), indirect=["backend"])
def test_disable_adapter(family, backend):
    fam = FAMILIES[family]
    base, rm, fm = build_pair(fam, **lora_kwargs(fam))
    randomise(rm)
    sync(rm, fm)
    x = fam.inputs()
    adapted = outputs_equal(rm, fm, x)
    base_out = model_output(run(base, x))
    with rm.disable_adapter(), fm.disable_adapter():
        disabled = outputs_equal(rm, fm, x, "disabled")
        lora_trainable = {n for n in trainable(fm) if "lora_" in n}
        assert lora_trainable == {n for n in trainable(rm) if "lora_" in n} == set()
    assert_close(disabled, base_out, "disabled equals base")  # modules_to_save fall back to the originals
    assert_close(outputs_equal(rm, fm, x, "re-enabled"), adapted, "re-enabled")
    assert trainable(fm) == trainable(rm)


@pytest.mark.parametrize("family", ["llama", "bert_tok"])
def test_disable_adapter_freezes_modules_to_save(family):
    fam = FAMILIES[family]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam, modules_to_save=list(fam.modules_to_save) or None))
    with rm.disable_adapter(), fm.disable_adapter():
        assert trainable(fm) == trainable(rm)
        assert fm.get_nb_trainable_parameters() == rm.get_nb_trainable_parameters()
    assert trainable(fm) == trainable(rm)


# ----------------------------------------------------------------------------------------------------------
# configuration options
# ----------------------------------------------------------------------------------------------------------
def _parity_after_sync(fam, rm, fm, grads: bool = True):
    randomise(rm)
    sync(rm, fm)
    x = fam.inputs()
    outputs_equal(rm, fm, x)
    if grads:
        rl, fl = run(rm, x, train=True).loss, run(fm, x, train=True).loss
        assert_close(fl, rl, "loss")
        rl.backward()
        fl.backward()
        for n, p in rm.named_parameters():
            if p.requires_grad:
                assert_grad_close(fm.get_parameter(n).grad, p.grad, f"grad {n}")




@pytest.mark.parametrize(
    "family,backend,bias",
    with_triton_and(
        MAIN_FAMILIES, ["all", "lora_only"], ["lora_only"]
    ),
    indirect=["backend"],
)
def test_bias_modes(family, backend, bias):
    fam = FAMILIES[family]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam, bias=bias))
    assert trainable(fm) == trainable(rm)
    assert fm.get_nb_trainable_parameters() == rm.get_nb_trainable_parameters()
    if fam.bias_targets:
        assert any(n.endswith("bias") and "modules_to_save" not in n for n in trainable(fm))
    rsd, fsd = ref.get_peft_model_state_dict(rm), fast.get_peft_model_state_dict(fm)
    assert sorted(fsd) == sorted(rsd)
    _parity_after_sync(fam, rm, fm)


@pytest.mark.parametrize("family,backend", with_triton(MAIN_FAMILIES), indirect=["backend"])
def test_rank_and_alpha_pattern(family, backend):
    fam = FAMILIES[family]
    key = fam.rank_pattern_key
    _, rm, fm = build_pair(fam, **lora_kwargs(fam, rank_pattern={key: 7}, alpha_pattern={key: 11}))
    names = lora_layer_names(rm)
    assert lora_layer_names(fm) == names
    hit = 0
    for name in names:
        rl, fl = rm.get_submodule(name), fm.get_submodule(name)
        assert fl.r == rl.r and fl.lora_alpha == rl.lora_alpha, name
        assert fl.scaling == pytest.approx(rl.scaling), name
        assert fl.lora_A["default"].weight.shape == rl.lora_A["default"].weight.shape
        hit += rl.r["default"] == 7
    assert 0 < hit < len(names), "the pattern must select a proper subset"
    _parity_after_sync(fam, rm, fm)


@pytest.mark.parametrize("family,backend", with_triton(MAIN_FAMILIES), indirect=["backend"])
def test_use_rslora(family, backend):
    fam = FAMILIES[family]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam, r=9, lora_alpha=6, use_rslora=True))
    for name in lora_layer_names(rm):
        assert fm.get_submodule(name).scaling["default"] == pytest.approx(6 / 3)
        assert fm.get_submodule(name).scaling == pytest.approx(rm.get_submodule(name).scaling)
    _parity_after_sync(fam, rm, fm)


@pytest.mark.parametrize(
    "family,backend,layers", with_triton_and(MAIN_FAMILIES, [1, 0], [1]), indirect=["backend"]
)
def test_layers_to_transform_with_pattern(family, backend, layers):
    layers = [layers] if layers else layers  # 1 -> [1] (a list), 0 stays a plain int
    fam = FAMILIES[family]
    _, rm, fm = build_pair(
        fam, **lora_kwargs(fam, layers_to_transform=layers, layers_pattern=fam.layers_pattern)
    )
    assert lora_layer_names(fm) == lora_layer_names(rm) != []
    _parity_after_sync(fam, rm, fm, grads=False)


@pytest.mark.parametrize(
    "family",
    [
        "llama",
        "gpt2",
        "bert",
        pytest.param(
            "t5",
        ),
    ],
)
def test_layers_to_transform_without_pattern(family):
    """Without layers_pattern PEFT takes the first numbered path segment as the layer index (lazy regex in
    tuners_utils.check_target_module_exists); T5's 'encoder.block.1.layer.0.SelfAttention.q' is layer 1."""
    fam = FAMILIES[family]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam, layers_to_transform=[1]))
    assert lora_layer_names(fm) == lora_layer_names(rm) != []


@pytest.mark.parametrize(
    "family,backend,as_regex", with_triton_and(MAIN_FAMILIES, [False, True], [False]), indirect=["backend"]
)
def test_exclude_modules(family, backend, as_regex):
    fam = FAMILIES[family]
    exclude = list(fam.exclude)
    if as_regex:  # a string is a full-match regex, as for target_modules
        exclude = r"(.*\.)?(" + "|".join(e.replace(".", r"\.") for e in fam.exclude) + ")"
    _, rm, fm = build_pair(fam, **lora_kwargs(fam, exclude_modules=exclude))
    _, rm_all, _ = build_pair(fam, **lora_kwargs(fam))
    assert lora_layer_names(fm) == lora_layer_names(rm)
    assert 0 < len(lora_layer_names(fm)) < len(lora_layer_names(rm_all))
    _parity_after_sync(fam, rm, fm, grads=False)


@pytest.mark.parametrize("family,backend", with_triton(MAIN_FAMILIES), indirect=["backend"])
def test_all_linear(family, backend):
    fam = FAMILIES[family]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam, target_modules="all-linear"))
    assert lora_layer_names(fm) == lora_layer_names(rm) != []
    assert module_types(fm) == module_types(rm)
    _parity_after_sync(fam, rm, fm)


@pytest.mark.parametrize("family,backend", with_triton(MAIN_FAMILIES), indirect=["backend"])
def test_regex_target_modules(family, backend):
    fam = FAMILIES[family]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam, target_modules=fam.regex))
    assert lora_layer_names(fm) == lora_layer_names(rm) != []
    _parity_after_sync(fam, rm, fm, grads=False)


@pytest.mark.parametrize("family,backend", with_triton(PARITY_FAMILIES), indirect=["backend"])
def test_modules_to_save(family, backend):
    fam = FAMILIES[family]
    _, rm, fm = build_pair(fam, **lora_kwargs(fam, modules_to_save=list(fam.modules_to_save) or None))
    assert fm.peft_config["default"].modules_to_save == rm.peft_config["default"].modules_to_save
    wrappers = sorted(n for n, m in fm.named_modules() if isinstance(m, fast.utils.ModulesToSaveWrapper))
    ref_wrappers = sorted(n for n, m in rm.named_modules() if isinstance(m, ref.utils.ModulesToSaveWrapper))
    assert wrappers == ref_wrappers
    if fam.modules_to_save or fam.task_type in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):
        assert wrappers
    assert trainable(fm) == trainable(rm)
    assert fm.get_nb_trainable_parameters() == rm.get_nb_trainable_parameters()
    _parity_after_sync(fam, rm, fm)
    rsd, fsd = ref.get_peft_model_state_dict(rm), fast.get_peft_model_state_dict(fm)
    assert sorted(fsd) == sorted(rsd)
    for k in rsd:
        assert torch.equal(fsd[k], rsd[k]), k


def test_modules_to_save_are_not_targeted():
    fam = FAMILIES["bert"]
    _, rm, fm = build_pair(
        fam, **lora_kwargs(fam, target_modules=["query", "dense"], modules_to_save=["pooler"])
    )
    assert lora_layer_names(fm) == lora_layer_names(rm)
    assert list(fm.state_dict()) == list(rm.state_dict())


@pytest.mark.parametrize("family,backend", with_triton(["llama", "bert"]), indirect=["backend"])
def test_embedding_target(family, backend):
    fam = FAMILIES[family]
    targets = [fam.embedding] + list(fam.default_targets)
    _, rm, fm = build_pair(fam, **lora_kwargs(fam, target_modules=targets))
    emb = [n for n in lora_layer_names(fm) if n.endswith(fam.embedding)]
    assert len(emb) == 1 and type(fm.get_submodule(emb[0])).__name__ == "Embedding"
    assert module_types(fm) == module_types(rm)
    assert trainable(fm) == trainable(rm)
    _parity_after_sync(fam, rm, fm)
    rsd, fsd = ref.get_peft_model_state_dict(rm), fast.get_peft_model_state_dict(fm)
    assert sorted(fsd) == sorted(rsd)
    ru, fu = rm.merge_and_unload(), fm.merge_and_unload()
    outputs_equal(ru, fu, fam.inputs(), "merged embedding")


# ----------------------------------------------------------------------------------------------------------
# initialisation
# ----------------------------------------------------------------------------------------------------------
def _adapter_tensors(model, kind: str) -> list[torch.Tensor]:
    out = []
    for n, p in model.named_parameters():
        if f"lora_{kind}." in n:
            out.append(p.detach())
    return out


@pytest.mark.parametrize(
    "family,backend,init",
    with_triton_and(MAIN_FAMILIES, [True, False, "gaussian"], [False]),
    indirect=["backend"],
)
def test_init_lora_weights(family, backend, init):
    """Distribution properties, not bit equality: B = 0 for True/'gaussian' (output equals the base), A
    uniform in +-1/sqrt(in_features) for True and False (nn.Linear's default), A ~ N(0, 1/r) for 'gaussian',
    B non-zero for False. The same statistics hold for PEFT's layers."""
    fam = FAMILIES[family]
    r = 8
    base, rm, fm = build_pair(fam, **lora_kwargs(fam, r=r, init_lora_weights=init))
    x = fam.inputs()
    for model in (rm, fm):
        a_all = torch.cat([a.flatten() for a in _adapter_tensors(model, "A")])
        for name in lora_layer_names(model):
            layer = model.get_submodule(name)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if init is True or init is False:
                assert a.abs().max() <= 1 / a.shape[1] ** 0.5 + 1e-7, name
            if init is False:
                assert b.abs().max() <= 1 / r**0.5 + 1e-7 and b.abs().max() > 0, name
            else:
                assert torch.count_nonzero(b) == 0, name
        if init == "gaussian":  # std 1/r, estimated from >= 500 samples: 20% is > 4 standard errors
            assert abs(a_all.std().item() * r - 1) < 0.2, a_all.std().item()
            assert abs(a_all.mean().item()) < 4 / r / a_all.numel() ** 0.5
        else:  # uniform on +-1/sqrt(fan_in): every layer's A fills its range
            assert a_all.std() > 0
        out = model_output(run(model, x))
        if init is False:
            assert (out - model_output(run(base, x))).abs().max() > 1e-6
        else:
            assert_close(out, model_output(run(base, x)), "init output equals base")


# ----------------------------------------------------------------------------------------------------------
# half-precision base with fp32 adapters
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "family,backend,dtype",
    [
        pytest.param(f, b, d, id=f"{f}{'-triton' if b == 'triton' else ''}-{str(d)[6:]}")
        for f in MAIN_FAMILIES
        for b in ("default", "triton")
        for d in (torch.float16, torch.bfloat16)
        # Triton's interpreter does not emulate bf16 arithmetic: bf16 kernels are only compiled ahead of time
        if b == "default" or (f in TRITON_FAMILIES and d == torch.float16)
    ],
    indirect=["backend"],
)
def test_half_precision_base_fp32_adapters(family, backend, dtype):
    fam = FAMILIES[family]
    kw = lora_kwargs(fam)
    base, rm, fm = build_pair(fam, dtype=dtype, **kw)
    for model in (rm, fm):
        for n, p in model.named_parameters():
            if "lora_" in n:
                assert p.dtype == torch.float32, n
            elif "modules_to_save" not in n:
                assert p.dtype == dtype, n
    assert {n: p.dtype for n, p in fm.named_parameters()} == {n: p.dtype for n, p in rm.named_parameters()}
    randomise(rm)
    sync(rm, fm)
    # the truth: the same (rounded) weights evaluated in fp32
    truth_model = ref.get_peft_model(copy.deepcopy(base).float(), ref.LoraConfig(**copy.deepcopy(kw)))
    truth_model.load_state_dict({k: v.float() for k, v in rm.state_dict().items()})
    x = fam.inputs()
    outs = {}
    for key, model in (("ref", rm), ("fast", fm), ("truth", truth_model)):
        out = run(model, x, train=True)
        out.loss.backward()
        outs[key] = (
            model_output(out).detach().float(),
            out.loss.detach().float(),
            {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad},
        )
    eps = torch.finfo(dtype).eps

    def check(f, r, t, what):
        err_ref = (r - t).abs().max().item()
        err_fast = (f - t).abs().max().item()
        bound = 2 * err_ref + eps * t.abs().max().item()
        assert err_fast <= bound, (
            f"{what}: peftfast error {err_fast:.3e} > 2 * PEFT error {err_ref:.3e} + 1 ulp"
        )

    check(outs["fast"][0], outs["ref"][0], outs["truth"][0], "logits")
    check(outs["fast"][1], outs["ref"][1], outs["truth"][1], "loss")
    assert set(outs["fast"][2]) == set(outs["ref"][2])
    for n, g in outs["ref"][2].items():
        check(outs["fast"][2][n], g, outs["truth"][2][n], f"grad {n}")


@pytest.mark.parametrize("dora", [False, True])
def test_lora_on_a_scaled_embedding_as_peft(dora):
    """Gemma's embeddings multiply their output by ``embed_scale`` (sqrt(hidden)): PEFT scales the LoRA (and DoRA)
    rows by it too, so the unmerged output equals the merged one. Logits, every adapter gradient, the mixed batch
    (equal to PEFT's and to each sample alone) and the merged model against PEFT (before, the adapter rows were
    not scaled: 0.02 off on this model, and merging changed the output)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(vocab_size=67, hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=12, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = GemmaForCausalLM(cfg)
    assert float(base.model.embed_tokens.embed_scale) != 1.0
    ids = torch.randint(1, 67, (3, 5), generator=torch.Generator().manual_seed(1))
    names = ["b", "__base__", "a"]
    runs = {}
    for lib in (fast, ref):
        def config(r):
            return lib.LoraConfig(r=r, lora_alpha=5, target_modules=["embed_tokens", "q_proj"],
                                  init_lora_weights=False, use_dora=dora)

        torch.manual_seed(2)
        pm = lib.get_peft_model(copy.deepcopy(base), config(3), adapter_name="a")
        torch.manual_seed(3)
        pm.add_adapter("b", config(2))
        pm.train()
        out = pm(input_ids=ids).logits
        out.pow(2).mean().backward()
        grads = {k: p.grad.clone() for k, p in pm.named_parameters() if p.grad is not None}
        pm.eval()
        with torch.no_grad():
            mixed = pm(input_ids=ids, adapter_names=names).logits if not dora else None
            merged = pm.merge_and_unload()(input_ids=ids).logits
        runs[lib.__name__] = out.detach(), grads, mixed, merged
    (out, grads, mixed, merged), (r_out, r_grads, r_mixed, r_merged) = runs["peftfast"], runs["peft"]
    torch.testing.assert_close(out, r_out, rtol=1e-5, atol=1e-5)
    assert sorted(grads) == sorted(r_grads) and any("lora_embedding_A" in k for k in grads)
    for k in r_grads:
        torch.testing.assert_close(grads[k], r_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    torch.testing.assert_close(merged, r_merged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, out, rtol=1e-4, atol=1e-4)
    if not dora:
        torch.testing.assert_close(mixed, r_mixed, rtol=1e-5, atol=1e-5)


class _InitNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(32, 29)
        self.conv = nn.Conv2d(3, 7, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_seeded_init_on_other_dtypes_equals_peft(dtype, use_dora, init):
    """The same seed gives PEFT's adapter weights on a 16-bit or float64 model: they are made and initialised with
    torch's defaults (CPU float32), then moved to the base's dtype, as PEFT does (drawn in the base's dtype they
    were other numbers: bf16's uniform draws flip +bound to -bound, normal draws differ throughout). DoRA's
    magnitudes follow from them."""
    weights = {}
    for lib in (ref, fast):
        torch.manual_seed(0)
        model = _InitNet().to(dtype)
        torch.manual_seed(7)
        peft_model = lib.get_peft_model(model, lib.LoraConfig(target_modules=["emb", "lin", "conv"], r=4,
                                                              use_dora=use_dora, init_lora_weights=init))
        weights[lib.__name__] = {k: v.detach() for k, v in peft_model.state_dict().items() if "lora_" in k}
        weights[lib.__name__]["next draw"] = torch.rand(3)  # the RNG stream after the init: the same too
    theirs, ours = weights["peft"], weights["peftfast"]
    assert theirs.keys() == ours.keys() and len(theirs) >= 7
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        if "magnitude" in key:  # DoRA's ||W + s B A|| per row: computed, not drawn (a few roundings apart)
            torch.testing.assert_close(ours[key], value, rtol=4 * torch.finfo(dtype).eps, atol=0, msg=key)
        else:
            assert torch.equal(ours[key], value), key
