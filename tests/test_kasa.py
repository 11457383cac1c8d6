"""KaSA (``LoraConfig(kasa_config=KasaConfig())``) against the real PEFT 0.21 and a float64 reference.

A small MLP of odd sizes (a linear layer with bias, one without) gets a KaSA adapter from both libraries,
each truncating its own copy of the same base weights. PEFT's adapter weights are randomised (B, the diagonal
and A: every term matters) and loaded into peftfast's model by state-dict key. Outputs and every gradient (A,
B, lora_diag, input) must match PEFT's and be as close to a float64 computation as PEFT's are; checkpoints
must load both ways, merged and unmerged outputs agree, the regularisation loss equals PEFT's.
"""
from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import peftfast
from tests.numerics import max_err

K_ERR = 4
R = 3


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(13, 11)
        self.lin1 = nn.Linear(11, 7, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.tanh(self.lin0(x)))


def base_model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def config(lib, **kw):
    kw.setdefault("r", R)
    kw.setdefault("lora_alpha", 5)
    kw.setdefault("target_modules", ["lin0", "lin1"])
    return lib.LoraConfig(kasa_config=lib.KasaConfig(beta=0.3, gamma=0.7), **kw)


def randomise(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def make_pair(seed: int = 0, **kw):
    """(base, PEFT model, peftfast model) with the same random adapter weights."""
    base = base_model(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(copy.deepcopy(base), config(peft, **kw))
        ours = peftfast.get_peft_model(copy.deepcopy(base), config(peftfast, **kw))
    randomise(ref, seed + 1)
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if "lora_" in k}, strict=False)
    return base, ref, ours


def inputs(seed: int = 5) -> torch.Tensor:
    return torch.randn(4, 3, 13, generator=torch.Generator().manual_seed(seed))


def float64_forward(base: MLP, model: nn.Module, x: torch.Tensor, scaling: float) -> torch.Tensor:
    """The KaSA model in float64 from the original base weights and ``model``'s adapter weights."""
    h = x.double()
    for name, act in (("lin0", torch.tanh), ("lin1", None)):
        layer = getattr(base, name)
        w = layer.weight.double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        keep = min(w.shape) - R
        w_t = (u[:, :keep] * s[:keep]) @ vh[:keep]
        lora = getattr(model.base_model.model, name)
        a = lora.lora_A["default"].weight.double()
        b = lora.lora_B["default"].weight.double()
        d = lora.lora_diag["default"].double()
        y = h @ w_t.T + scaling * (((h @ a.T) * d) @ b.T)
        if layer.bias is not None:
            y = y + layer.bias.double()
        h = act(y) if act is not None else y
    return h


def grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    model.zero_grad()
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    g["x"] = x.grad.clone()
    return out.detach(), g


def test_truncated_base_matches_peft():
    base, ref, ours = make_pair()
    for name in ("lin0", "lin1"):
        w_ref = getattr(ref.base_model.model, name).base_layer.weight
        w_ours = getattr(ours.base_model.model, name).base_layer.weight
        w0 = getattr(base, name).weight
        assert max_err(w_ours, w_ref) < 1e-5
        # rank min(in, out) - r, and changed from the original
        assert torch.linalg.matrix_rank(w_ours.double(), rtol=1e-5) == min(w0.shape) - R
        assert max_err(w_ours, w0) > 1e-3


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_forward_and_gradients_match_peft_and_float64(backend):
    base, ref, ours = make_pair()
    x = inputs()
    out_ref, g_ref = grads(ref, x)
    out_ours, g_ours = grads(ours, x)
    exact = float64_forward(base, ours, x, 5 / R)
    err, err_ref = max_err(out_ours, exact), max_err(out_ref, exact)
    assert err <= K_ERR * err_ref + 1e-6, (err, err_ref)
    assert set(g_ref) == set(g_ours)
    assert any("lora_diag" in k for k in g_ours)
    for key in g_ref:
        scale = g_ref[key].abs().max().item()
        assert max_err(g_ours[key], g_ref[key]) <= 1e-5 * max(scale, 1.0), key
    # gradients against float64 autograd
    x64 = x.double().clone().requires_grad_(True)
    params = {}
    for name in ("lin0", "lin1"):
        lora = getattr(ours.base_model.model, name)
        for part in ("lora_A", "lora_B"):
            params[f"{name}.{part}"] = getattr(lora, part)["default"].weight.detach().double().requires_grad_(True)
        params[f"{name}.lora_diag"] = lora.lora_diag["default"].detach().double().requires_grad_(True)
    h = x64
    for name, act in (("lin0", torch.tanh), ("lin1", None)):
        layer = getattr(base, name)
        u, s, vh = torch.linalg.svd(layer.weight.double(), full_matrices=False)
        keep = min(layer.weight.shape) - R
        y = h @ ((u[:, :keep] * s[:keep]) @ vh[:keep]).T + (5 / R) * (
            ((h @ params[f"{name}.lora_A"].T) * params[f"{name}.lora_diag"]) @ params[f"{name}.lora_B"].T)
        if layer.bias is not None:
            y = y + layer.bias.double()
        h = act(y) if act is not None else y
    (h * torch.linspace(-1, 1, h.shape[-1]).double()).sum().backward()
    for name in ("lin0", "lin1"):
        for part in ("lora_A", "lora_B", "lora_diag"):
            suffix = ".default.weight" if part != "lora_diag" else ".default"
            key = f"base_model.model.{name}.{part}{suffix}"
            exact_g = params[f"{name}.{part}"].grad
            e, e_ref = max_err(g_ours[key], exact_g), max_err(g_ref[key], exact_g)
            assert e <= K_ERR * e_ref + 1e-6 * exact_g.abs().max().item(), (key, e, e_ref)


def test_init_keeps_truncated_output():
    """Default init (B = 0): the adapter adds nothing, the model computes the truncated base (as PEFT's)."""
    base = base_model(1)
    x = inputs()
    ref = peft.get_peft_model(copy.deepcopy(base), config(peft))
    ours = peftfast.get_peft_model(copy.deepcopy(base), config(peftfast))
    with torch.no_grad():
        assert max_err(ours(x), ref(x)) < 1e-5
        with ours.disable_adapter():
            assert max_err(ours(x), ref(x)) < 1e-5
        assert max_err(ours(x), base(x)) > 1e-4


def test_merge_and_unload_match_unmerged():
    _, _, ours = make_pair()
    x = inputs()
    with torch.no_grad():
        out = ours(x)
        ours.merge_adapter()
        assert max_err(ours(x), out) < 1e-5
        ours.unmerge_adapter()
        assert max_err(ours(x), out) < 1e-5
        merged = ours.merge_and_unload()
        assert max_err(merged(x), out) < 1e-5


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_peft_checkpoint_loads_into_peftfast(tmp_path, low_cpu_mem_usage):
    base, ref, _ = make_pair(seed=2)
    x = inputs()
    ref.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = ref(x)
    loaded = peftfast.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert loaded.peft_config["default"].kasa_config.beta == 0.3
    with torch.no_grad():
        assert max_err(loaded(x), expected) < 1e-5
        assert max_err(loaded(x), expected) < 1e-5  # the base is truncated once


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_peftfast_checkpoint_loads_into_peft(tmp_path, low_cpu_mem_usage):
    base, _, ours = make_pair(seed=3)
    x = inputs()
    ours.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = ours(x)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert loaded.peft_config["default"].kasa_config.gamma == 0.7
    with torch.no_grad():
        assert max_err(loaded(x), expected) < 1e-5


def test_kasa_loss_matches_peft():
    _, ref, ours = make_pair(seed=4)
    loss_ref, loss_ours = ref._get_kasa_loss(), ours._get_kasa_loss()
    assert abs(loss_ours.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    loss_ours.backward()
    loss_ref.backward()
    for (n, p), (_, q) in zip(sorted(ours.named_parameters()), sorted(ref.named_parameters())):
        if q.grad is not None:
            assert max_err(p.grad, q.grad) < 1e-5, n


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_mixed_batch_of_two_kasa_adapters(backend):
    base = base_model(6)
    model = peftfast.get_peft_model(copy.deepcopy(base), config(peftfast), adapter_name="a")
    model.add_adapter("b", config(peftfast, lora_alpha=3))
    randomise(model, 7)
    model.eval()
    x = inputs()[:, 0]
    names = ["a", "b", "__base__", "b"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    one = model(x[i:i + 1])
            else:
                model.set_adapter(name)
                one = model(x[i:i + 1])
            assert max_err(mixed[i:i + 1], one) < 1e-5, name


def test_refusals_leave_model_unchanged():
    base = base_model(8)
    with pytest.raises(ValueError, match="KaSA requires `r`"):
        peftfast.get_peft_model(copy.deepcopy(base), config(peftfast, r=7))
    model = peftfast.get_peft_model(copy.deepcopy(base), peftfast.LoraConfig(r=2, target_modules=["lin0"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="KaSA cannot be combined"):
        model.add_adapter("k", config(peftfast))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(5, 6, 3)

    with pytest.raises(ValueError, match="does not support KaSA"):
        peftfast.get_peft_model(Conv(), config(peftfast, target_modules=["conv"]))
    with pytest.raises(ValueError, match="use_dora"):
        config(peftfast, use_dora=True)
    with pytest.raises(TypeError, match="KasaConfig"):
        peftfast.LoraConfig(kasa_config=3)
    with pytest.raises(ValueError, match="non-negative"):
        peftfast.KasaConfig(beta=-1.0)


def test_hotswap_between_kasa_adapters(tmp_path):
    """Two KaSA adapters of one rank (the same truncated base): a prepared model (ranks padded, the diagonal with
    them) swapped to the second one computes what a model that loaded it does."""
    from peftfast.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    base, _, first = make_pair(seed=9)
    _, _, second = make_pair(seed=10)
    first.save_pretrained(tmp_path / "a0")
    second.save_pretrained(tmp_path / "a1")
    x = inputs()
    model = peftfast.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a0")
    with torch.no_grad():
        out0 = model(x)
        prepare_model_for_compiled_hotswap(model, target_rank=R + 2)
        assert model.base_model.model.lin0.lora_diag["default"].shape == (R + 2,)
        assert max_err(model(x), out0) < 1e-5
        hotswap_adapter(model, tmp_path / "a1", adapter_name="default")
        expected = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a1")(x)
        assert max_err(model(x), expected) < 1e-5
        assert max_err(model(x), out0) > 1e-3
