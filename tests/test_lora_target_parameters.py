"""LoRA on nn.Parameter targets (``LoraConfig(target_parameters=[...])``) against the real PEFT (test-only oracle).

The model is a small mixture-of-experts stack: each block routes every token to one of E experts whose weights are
3-D parameters (``gate_up`` and ``down``, [E, out, in], or [E, in, out] with ``is_transposed``), next to a plain
``nn.Linear`` and a module whose 2-D weight is used as ``x @ W``. Sizes are odd (hidden 7, intermediate 5, 3
experts, rank 3). Both libraries wrap deep copies of one base model from the same config; the adapter weights are
drawn at random in the PEFT model (lora_B too) and loaded into peftfast through PEFT's state dict, so loading a
PEFT checkpoint is exercised by every case. Compared in float64 (one case in float32): outputs, the gradient of
every trainable parameter and of the input, merge / unmerge / unload, several adapters, save / load both ways.
"""
from __future__ import annotations

import copy
import warnings

import peft as ref
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftfast as fast
from peftfast.tuners.lora import ParamWrapper

H, I, E, T, B = 7, 5, 3, 5, 3


class Experts(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = transposed
        if transposed:
            self.gate_up = nn.Parameter(torch.randn(E, H, 2 * I) / 3)
            self.down = nn.Parameter(torch.randn(E, I, H) / 3)
        else:
            self.gate_up = nn.Parameter(torch.randn(E, 2 * I, H) / 3)
            self.down = nn.Parameter(torch.randn(E, H, I) / 3)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        spec = "nh,nhk->nk" if self.is_transposed else "nh,nkh->nk"
        g, u = torch.einsum(spec, x, self.gate_up[idx]).chunk(2, dim=-1)
        return torch.einsum(spec, F.silu(g) * u, self.down[idx])


class MatmulLayer(nn.Module):
    """A linear layer whose 2-D weight [in, out] is used as ``x @ W`` (PEFT reads any 2-D parameter as [out, in])."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / 3)
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Block(nn.Module):
    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.router = nn.Linear(H, E)
        self.experts = Experts(transposed)
        self.proj = nn.Linear(H, H)
        self.mix = MatmulLayer(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, H)
        logits = self.router(flat)
        idx = logits.argmax(-1)
        gate = logits.softmax(-1).gather(1, idx[:, None])
        y = self.experts(flat, idx) * gate
        return x + self.mix(self.proj(y.reshape(x.shape)))


class MoeModel(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(transposed) for _ in range(2)])
        self.head = nn.Linear(H, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


CASES = {
    "experts-nested": dict(target_parameters=["experts.gate_up", "experts.down"]),
    "experts-transposed": dict(target_parameters=["experts.gate_up", "experts.down"], transposed=True),
    "one-param-and-modules": dict(target_parameters=["blocks.1.experts.down"], target_modules=["proj", "router"]),
    "2d-param-rslora-patterns": dict(target_parameters=["mix.weight", "experts.gate_up"], use_rslora=True,
                                     rank_pattern={"blocks.0.experts.gate_up": 2}, alpha_pattern={"mix.weight": 11}),
}


def _config(lib, case: str, **extra):
    kwargs = {k: v for k, v in CASES[case].items() if k != "transposed"}
    kwargs.setdefault("target_modules", [])
    return lib.LoraConfig(r=3, lora_alpha=5, init_lora_weights=False, **kwargs, **extra)


def _pair(case: str, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    base = MoeModel(transposed=CASES[case].get("transposed", False)).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = ref.get_peft_model(copy.deepcopy(base), _config(ref, case))
        f = fast.get_peft_model(copy.deepcopy(base), _config(fast, case))
    _randomise(r)
    fast.set_peft_model_state_dict(f, ref.get_peft_model_state_dict(r))
    return base, r, f


def _randomise(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) / 2)


def _x(dtype=torch.float64) -> torch.Tensor:
    return torch.randn(B, T, H, dtype=dtype)


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case, dtype", [pytest.param(c, torch.float64, id=f"{c}-f64") for c in CASES]
                         + [pytest.param("experts-nested", torch.float32, id="experts-nested-f32")])
def test_forward_and_every_gradient_match_peft(case, dtype):
    _, r, f = _pair(case, dtype)
    assert set(f.state_dict()) == set(r.state_dict())
    assert set(fast.get_peft_model_state_dict(f)) == set(ref.get_peft_model_state_dict(r))
    pr, pf = _trainable(r), _trainable(f)
    assert set(pr) == set(pf) and pr
    assert sum(p.numel() for p in pr.values()) == sum(p.numel() for p in pf.values())
    x = _x(dtype)
    xr, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_r, out_f = r(xr), f(xf)
    torch.testing.assert_close(out_f, out_r, **_tol(dtype))
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_f.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad, **_tol(dtype))
    for name in pr:
        assert pf[name].grad is not None, name
        torch.testing.assert_close(pf[name].grad, pr[name].grad, **_tol(dtype), msg=name)
    # the adapters change the output, and the grads of lora_A / lora_B are not zero
    torch.testing.assert_close(f.get_base_model()(x), f(x))  # reading through the wrappers is the adapted model
    with f.disable_adapter():
        base_out = f(x)
    assert (base_out - out_f).abs().max() > 1e-3
    assert all(p.grad.abs().max() > 0 for p in pf.values())


def test_structure_and_keys_as_peft():
    _, r, f = _pair("experts-nested")
    outer = f.base_model.model.blocks[0].experts
    assert isinstance(outer, ParamWrapper) and isinstance(outer.base_layer, ParamWrapper)
    # PEFT's nesting: parameters in registration order, the later one outside
    assert (outer.parameter_name, outer.base_layer.parameter_name) == ("down", "gate_up")
    assert type(r.base_model.model.blocks[0].experts).__name__ == "ParamWrapper"
    assert r.base_model.model.blocks[0].experts.parameter_name == "down"
    assert f.targeted_parameter_names == r.targeted_parameter_names
    assert repr(outer).startswith("lora.ParamWrapper(\n  parameter_name='down',")
    inner = outer.base_layer
    assert (inner.in_features, inner.out_features, inner.num_experts) == (H, 2 * I, E)
    assert tuple(inner.lora_A["default"].weight.shape) == (3 * E, H)
    assert tuple(inner.lora_B["default"].weight.shape) == (2 * I, 3 * E)
    # the base model's state dict is the original one
    base = MoeModel()
    assert set(f.get_base_model_state_dict()) == set(base.state_dict())


@pytest.mark.parametrize("case", list(CASES))
def test_merge_unmerge_unload_match_peft(case):
    base, r, f = _pair(case)
    x = _x()
    with torch.no_grad():
        expected = r(x)
        before = {k: v.clone() for k, v in f.get_base_model_state_dict().items()}
        f.merge_adapter()
        r.merge_adapter()
        torch.testing.assert_close(f(x), expected, **_tol(torch.float64))
        merged_r = r.get_base_model_state_dict() if hasattr(r, "get_base_model_state_dict") else None
        merged_f = f.get_base_model_state_dict()
        if merged_r is not None:
            for k in merged_r:
                torch.testing.assert_close(merged_f[k], merged_r[k], **_tol(torch.float64), msg=k)
        assert any(not torch.equal(merged_f[k], before[k]) for k in before)
        f.unmerge_adapter()
        for k, v in f.get_base_model_state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=1e-12, msg=k)
        torch.testing.assert_close(f(x), expected, **_tol(torch.float64))
        # safe merge, then unload: a plain model with the adapted weights
        f.merge_adapter(safe_merge=True)
        unloaded = f.merge_and_unload()
        assert not any(isinstance(m, ParamWrapper) for m in unloaded.modules())
        assert type(unloaded.blocks[0].experts) is Experts
        torch.testing.assert_close(unloaded(x), expected, **_tol(torch.float64))
        plain = r.merge_and_unload()
        torch.testing.assert_close(unloaded.state_dict(), plain.state_dict(), **_tol(torch.float64))


def test_unload_without_merge_restores_base():
    base, _, f = _pair("experts-nested")
    x = _x()
    with torch.no_grad():
        out = f.unload()(x)
    torch.testing.assert_close(out, base(x), rtol=0, atol=0)


def test_safe_merge_refuses_non_finite_and_leaves_weights():
    _, _, f = _pair("experts-nested")
    layer = f.base_model.model.blocks[1].experts.base_layer
    before = {k: v.clone() for k, v in f.get_base_model_state_dict().items()}
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected"):
        f.merge_adapter(safe_merge=True)
    for k, v in f.get_base_model_state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(m.merged for m in f.modules() if isinstance(m, ParamWrapper))


def test_several_adapters_match_peft():
    base, r, f = _pair("experts-nested")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.add_adapter("other", _config(ref, "experts-nested"))
        f.add_adapter("other", _config(fast, "experts-nested"))
    _randomise(r)
    fast.set_peft_model_state_dict(f, ref.get_peft_model_state_dict(r, adapter_name="other"), adapter_name="other")
    fast.set_peft_model_state_dict(f, ref.get_peft_model_state_dict(r))
    x = _x()
    for active in (["other"], ["default"], ["default", "other"]):
        r.base_model.set_adapter(active)
        f.base_model.set_adapter(active)
        xr, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_r, out_f = r(xr), f(xf)
        torch.testing.assert_close(out_f, out_r, **_tol(torch.float64))
        g = torch.randn_like(out_r)
        out_r.backward(g)
        out_f.backward(g)
        torch.testing.assert_close(xf.grad, xr.grad, **_tol(torch.float64))
        pr, pf = _trainable(r), _trainable(f)
        assert set(pr) == set(pf)
        assert all(any(f".{a}." in n for a in active) for n in pf)
        for name in pr:
            torch.testing.assert_close(pf[name].grad, pr[name].grad, **_tol(torch.float64), msg=name)
            pr[name].grad = pf[name].grad = None
    # both merged, then unmerged
    with torch.no_grad():
        expected = f(x)
        f.merge_adapter(["default", "other"])
        torch.testing.assert_close(f(x), expected, **_tol(torch.float64))
        f.unmerge_adapter()
        f.delete_adapter("other")
        f.base_model.set_adapter("default")
        r.base_model.set_adapter("default")
        torch.testing.assert_close(f(x), r(x), **_tol(torch.float64))
    assert not any("other" in k for k in f.state_dict())


def test_different_target_parameters_for_second_adapter_refused():
    _, _, f = _pair("experts-nested")
    keys = set(f.state_dict())
    with pytest.raises(ValueError, match="all adapters must target the same set of parameters"):
        f.add_adapter("other", fast.LoraConfig(target_modules=[], target_parameters=["experts.down"]))
    assert "other" not in f.peft_config and set(f.state_dict()) == keys


@pytest.mark.parametrize("case", ["experts-nested", "one-param-and-modules", "2d-param-rslora-patterns"])
@pytest.mark.parametrize("direction", ["peftfast-to-peft", "peft-to-peftfast"])
def test_save_load_both_ways(case, direction, tmp_path):
    base, r, f = _pair(case)
    x = _x()
    with torch.no_grad():
        expected = r(x)
    src, dst_lib = (f, ref) if direction == "peftfast-to-peft" else (r, fast)
    src.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = dst_lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, **_tol(torch.float64))
    # the files hold the same keys and tensors whoever wrote them
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == set(ref.get_peft_model_state_dict(r))
    if direction == "peft-to-peftfast":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lazy = fast.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
        with torch.no_grad():
            torch.testing.assert_close(lazy(x), expected, **_tol(torch.float64))


def test_second_adapter_loaded_from_folder(tmp_path):
    base, r, f = _pair("experts-nested")
    f.save_pretrained(tmp_path)
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fast.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        m.load_adapter(tmp_path, adapter_name="other")
    m.base_model.set_adapter(["default", "other"])
    f.base_model.set_adapter("default")
    with torch.no_grad():
        # two copies of the same adapter: twice its delta
        single = f(x)
        both = m(x)
        with f.disable_adapter():
            plain = f(x)
    assert (both - single).abs().max() > 1e-4
    merged = copy.deepcopy(f)
    for module in merged.modules():
        if isinstance(module, ParamWrapper):
            module.scaling["default"] *= 2
    with torch.no_grad():
        torch.testing.assert_close(both, merged(x), **_tol(torch.float64))
    assert (single - plain).abs().max() > 1e-4


def test_matches_float64_formula_for_one_expert_param():
    """Independent of PEFT: the adapted parameter is W + s * B_e A_e per expert, with PEFT's factor layout."""
    torch.manual_seed(3)
    base = MoeModel().double()
    f = fast.get_peft_model(copy.deepcopy(base), fast.LoraConfig(r=3, lora_alpha=5, target_modules=[],
                                                                  target_parameters=["blocks.0.experts.gate_up"]))
    _randomise(f)
    layer = f.base_model.model.blocks[0].experts
    a = layer.lora_A["default"].weight.detach()  # [E * r, in]
    b = layer.lora_B["default"].weight.detach()  # [out, r * E]
    w = base.blocks[0].experts.gate_up.detach()
    expected = w.clone()
    for e in range(E):
        a_e = a[e * 3:(e + 1) * 3]
        b_e = b[:, [j * E + e for j in range(3)]]
        expected[e] += (5 / 3) * b_e @ a_e
    torch.testing.assert_close(layer.get_delta_weight("default") + w, expected, rtol=1e-12, atol=1e-12)
    x = _x()
    reference = copy.deepcopy(base)
    with torch.no_grad():
        reference.blocks[0].experts.gate_up.copy_(expected)
        torch.testing.assert_close(f(x), reference(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lora_dropout=0.1), "lora_dropout"),
    (dict(use_dora=True), "DoRA"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    (dict(velora_config="velora"), "velora_config"),
    (dict(kasa_config="kasa"), "kasa_config"),
])
def test_unsupported_options_refused_and_model_unchanged(kwargs, match):
    torch.manual_seed(0)
    model = MoeModel()
    keys = list(model.state_dict())
    made = {"velora": fast.tuners.lora.VeloraConfig, "kasa": fast.tuners.lora.KasaConfig}
    kwargs = {k: made[v]() if isinstance(v, str) and v in made else v for k, v in kwargs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            # with proj targeted, a Linear layer is made first and then undone (fan_in_fan_out: PEFT resets it to
            # False for the Linear, so only a parameter-only config keeps it)
            modules = [] if "fan_in_fan_out" in kwargs else ["proj"]
            fast.get_peft_model(model, fast.LoraConfig(r=3, target_modules=modules, target_parameters=["experts.down"],
                                                       **kwargs))
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, fast.tuners.tuners_utils.BaseTunerLayer) for m in model.modules())


def test_mixed_batch_and_weighted_adapter_refused():
    _, _, f = _pair("experts-nested")
    f.eval()
    with pytest.raises(ValueError, match="mixed adapter batches"):
        f(_x(), adapter_names=["default"] * B)
    with pytest.raises(ValueError, match="add_weighted_adapter does not support targeting nn.Parameter"):
        f.add_weighted_adapter(["default"], [1.0], "combo", combination_type="linear")
    assert "combo" not in f.peft_config


def test_parameter_of_adapted_module_and_top_level_refused():
    torch.manual_seed(0)
    model = MoeModel()
    with pytest.raises(ValueError, match="Trying to wrap an `nn.Parameter` of layer 'blocks.0.proj' of type Linear"):
        fast.get_peft_model(model, fast.LoraConfig(target_modules=["proj"], target_parameters=["proj.weight"]))
    assert not any(isinstance(m, fast.tuners.tuners_utils.BaseTunerLayer) for m in model.modules())

    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3))
            self.lin = nn.Linear(3, 3)

    with pytest.raises(ValueError, match="top-level module is not supported"):
        fast.get_peft_model(Top(), fast.LoraConfig(target_modules=["lin"], target_parameters=["w"]))


def test_four_dimensional_parameter_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Module()
            self.inner.w = nn.Parameter(torch.randn(2, 3, 4, 5))

    with pytest.raises(ValueError, match="only 2d and 3d are supported"):
        fast.get_peft_model(Odd(), fast.LoraConfig(target_modules=[], target_parameters=["inner.w"]))


def test_training_step_updates_only_adapters():
    _, _, f = _pair("experts-nested", dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in f.named_parameters()}
    opt = torch.optim.SGD([p for p in f.parameters() if p.requires_grad], lr=0.1)
    loss = f(_x(torch.float32)).pow(2).mean()
    loss.backward()
    opt.step()
    for n, p in f.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == ("lora_" in n), n
