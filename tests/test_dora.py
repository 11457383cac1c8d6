"""DoRA (``LoraConfig(use_dora=True)``) against the real PEFT 0.21 and a float64 reference.

One small model holds every layer type DoRA supports here (nn.Linear with and without bias, GPT-2's
Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d). PEFT's model gets random adapter weights (B and the
magnitude too, so every term matters) and peftfast's model loads them by state-dict key. Outputs and
every gradient (A, B, magnitude, input) must match PEFT's fp32 model, and be as close to a float64 copy
of PEFT's model as PEFT is (``K_ERR`` times PEFT's error, floor of a few fp32 ulps).
"""
from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftfast
from peftfast.tuners.lora import dora as dora_mod
from peftfast.tuners.lora import layer as lora_layer
from tests.numerics import max_err

K_ERR = 4
TARGETS = ["lin", "lin_nb", "c1d", "emb", "conv1", "conv2"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(19, 13)
        self.lin = nn.Linear(13, 11)
        self.lin_nb = nn.Linear(11, 9, bias=False)
        self.c1d = Conv1D(7, 9)  # GPT-2's layer: weight [in=9, out=7]
        self.conv1 = nn.Conv1d(7, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, (3, 2), stride=(1, 2))

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + x                        # [N, L, 13]
        h = self.c1d(torch.tanh(self.lin_nb(torch.tanh(self.lin(h)))))  # [N, L, 7]
        h = self.conv1(h.transpose(1, 2))            # [N, 6, L]
        return self.conv2(h.unsqueeze(-1).expand(-1, -1, -1, 4))


class Wrap(nn.Module):
    """One layer under test, called as ``step`` calls a model (ids unused)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids, x):
        return self.inner(x)


def inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 19, (3, 8), generator=g), torch.randn(3, 8, 13, generator=g)


def make_pair(adapters=("default",), dora=(True,), dropout: float = 0.0, r: int = 4, targets=TARGETS):
    """(PEFT model, peftfast model) with the same random adapter weights (B and magnitudes randomised)."""
    torch.manual_seed(0)
    base = Net()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    models = []
    for lib in (peft, peftfast):
        m = None
        for name, use in zip(adapters, dora):
            cfg = lib.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets,
                                 use_dora=use)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if m is None:
                    m = lib.get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
                else:
                    m.add_adapter(name, cfg)
        models.append(m)
    theirs, ours = models
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.mul_(1 + 0.3 * torch.randn_like(p)) if "magnitude" in n else p.copy_(0.3 * torch.randn_like(p))
    sd = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    ours.load_state_dict(sd, strict=False)
    assert sd.keys() == {k for k in ours.state_dict() if "lora_" in k}
    theirs.base_model.set_adapter(list(adapters))
    ours.base_model.set_adapter(list(adapters))
    return theirs, ours


def step(model, ids, x, train: bool = True, seed: int = 11):
    """Output and float64 gradients of every trainable parameter and of x."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    x = x.clone().to(dtype).requires_grad_(True)
    torch.manual_seed(seed)
    out = model(ids, x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)).sum().backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}
    grads["x"] = x.grad.double()
    return out.detach().double(), grads


def assert_close_to_exact(what, ours, theirs, exact, k: float = K_ERR) -> None:
    err_ours, err_theirs = max_err(ours, exact), max_err(theirs, exact)
    floor = 4 * torch.finfo(torch.float32).eps * exact.abs().max().item()
    assert err_ours <= k * max(err_theirs, floor), f"{what}: error {err_ours:.3e} vs PEFT's {err_theirs:.3e}"


def compare(theirs, ours, ids, x, train=True, exact=True):
    exact_model = copy.deepcopy(theirs).double() if exact else None
    out_t, g_t = step(theirs, ids, x, train)
    out_o, g_o = step(ours, ids, x, train)
    assert g_o.keys() == g_t.keys()
    assert any("magnitude" in n for n in g_o)
    if exact_model is None:
        assert max_err(out_o, out_t) <= 1e-5 * out_t.abs().max().item()
        for n in g_t:
            assert max_err(g_o[n], g_t[n]) <= 1e-5 * g_t[n].abs().max().item() + 1e-7, n
        return
    out_e, g_e = step(exact_model, ids, x, train)
    assert_close_to_exact("output", out_o, out_t, out_e)
    for n in g_e:
        assert g_e[n].abs().max() > 0, f"{n}: exact gradient is 0"
        assert_close_to_exact(f"grad {n}", g_o[n], g_t[n], g_e[n])


# ------------------------------------------------------------------------------------------------ tests


def test_module_tree_keys_and_magnitude_init_match_peft():
    theirs, ours = make_pair()
    keys_t = {k: v.shape for k, v in theirs.state_dict().items()}
    keys_o = {k: v.shape for k, v in ours.state_dict().items()}
    assert keys_t == keys_o
    assert peft.get_peft_model_state_dict(theirs).keys() == peftfast.get_peft_model_state_dict(ours).keys()
    counts = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (theirs, ours)]
    assert counts[0] == counts[1]
    # the initial magnitude ||W + s B A||_row, computed again from the (random) A and B: PEFT's own init
    # function on its layer against ours on the same weights
    for name in TARGETS:
        lt = theirs.base_model.model.get_submodule(name)
        lo = ours.base_model.model.get_submodule(name)
        lt.lora_magnitude_vector["default"] = copy.deepcopy(lt.lora_magnitude_vector["default"])
        from peft.tuners.lora import variants
        variant = {"emb": variants.DoraEmbeddingVariant, "conv1": variants.DoraConv1dVariant,
                   "conv2": variants.DoraConv2dVariant}.get(name, variants.DoraLinearVariant)
        variant.init(lt, "default", config=None)
        lo.dora_init("default")
        mt, mo = lt.lora_magnitude_vector["default"].weight, lo.lora_magnitude_vector["default"].weight
        assert mt.shape == mo.shape and mt.dtype == mo.dtype
        assert max_err(mo, mt) <= 1e-6 * mt.abs().max().item(), name
        assert repr(lo.lora_magnitude_vector).count("lora.dora.") == 1


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_forward_and_gradients_match_peft_and_float64(train):
    theirs, ours = make_pair(dropout=0.2 if not train else 0.0)
    compare(theirs, ours, *inputs(), train=train)


def test_single_dora_on_frozen_linear_uses_the_fused_op(monkeypatch):
    calls = []
    real = lora_layer.dora_linear_fused
    monkeypatch.setattr(lora_layer, "dora_linear_fused",
                        lambda x, w, bias, *a, **k: calls.append(bias) or real(x, w, bias, *a, **k))
    theirs, ours = make_pair(targets=["lin", "lin_nb"])
    compare(theirs, ours, *inputs(), train=True)
    assert len(calls) >= 2  # one fused call per layer and step; the bias and mns go in with the GEMM


@pytest.mark.parametrize("bias", [True, False])
def test_fresh_dora_adapter_leaves_the_base_output_bit_for_bit(bias):
    # B = 0 and m = ||W||: mns is exactly 1, and the output is the base output itself (PEFT's form adds
    # (mns - 1) * base; the bias must not be re-added in another order)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(257, 131, bias=bias), nn.ReLU(), nn.Linear(131, 67, bias=bias))
    x = torch.rand(9, 257) - 0.5
    expected = base(x)
    model = peftfast.get_peft_model(base, peftfast.LoraConfig(target_modules=["0", "2"], use_dora=True)).eval()
    assert torch.equal(model(x), expected)


@pytest.mark.interpreter
def test_fused_dora_on_triton_backend(triton_backend):
    theirs, ours = make_pair(targets=["lin"])
    compare(theirs, ours, *inputs(), train=True)


def test_several_adapters_in_peft_order():
    # DoRA, plain LoRA, DoRA: each DoRA adapter rescales what the previous ones produced (PEFT's loop)
    theirs, ours = make_pair(adapters=("a", "b", "c"), dora=(True, False, True))
    compare(theirs, ours, *inputs(), train=True)


def test_dropout_in_training_matches_peft_with_the_same_seed():
    # PEFT keeps the undropped base output and rescales the dropped one; with the same generator state both
    # libraries draw the same masks (one dropout call per adapter and layer, in the same order)
    theirs, ours = make_pair(dropout=0.3)
    compare(theirs, ours, *inputs(), train=True, exact=False)


def test_merge_unmerge_and_unload_match_peft():
    theirs, ours = make_pair(adapters=("a", "b", "c"), dora=(True, False, True))
    ids, x = inputs()
    for m in (theirs, ours):
        m.eval()
    before = ours(ids, x).detach()
    base_before = {k: v.clone() for k, v in ours.get_base_model().state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        theirs.merge_adapter(["a", "b"])
        ours.merge_adapter(["a", "b"])
        theirs.merge_adapter(["c"])   # the third merged on top: its norm must use the unmerged weight
        ours.merge_adapter(["c"])
        merged_t, merged_o = theirs(ids, x), ours(ids, x)
    tol = 2e-5 * before.abs().max().item()
    assert max_err(merged_o, before) <= tol and max_err(merged_o, merged_t) <= tol
    for name in ("lin", "c1d", "emb", "conv2"):
        wt = theirs.base_model.model.get_submodule(name).get_base_layer().weight
        wo = ours.base_model.model.get_submodule(name).get_base_layer().weight
        assert max_err(wo, wt) <= 2e-6 * wt.abs().max().item(), name
    ours.unmerge_adapter()
    after = {k: v for k, v in ours.get_base_model().state_dict().items() if "lora_" not in k}
    for k, v in base_before.items():
        assert max_err(after[k], v) <= 1e-5 * max(v.abs().max().item(), 1e-3), k
    assert max_err(ours(ids, x).detach(), before) <= tol
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unloaded_t = theirs.merge_and_unload(safe_merge=True)
        unloaded_o = ours.merge_and_unload(safe_merge=True)
    assert not any("lora" in n for n, _ in unloaded_o.named_modules())
    assert max_err(unloaded_o(ids, x), unloaded_t(ids, x)) <= tol
    assert max_err(unloaded_o(ids, x), before) <= tol


def test_safe_merge_refuses_non_finite_and_leaves_model_unchanged():
    _, ours = make_pair()
    layer = ours.base_model.model.lin
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight[0] = float("inf")
    w = layer.get_base_layer().weight.clone()
    with pytest.raises(ValueError, match="NaNs detected"):
        ours.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, w) and not layer.merged


def test_save_and_load_both_ways(tmp_path):
    theirs, ours = make_pair()
    ids, x = inputs()
    want = theirs.eval()(ids, x).detach()
    theirs.save_pretrained(tmp_path / "from_peft")
    ours.save_pretrained(tmp_path / "from_fast")
    torch.manual_seed(0)
    base_fast = copy.deepcopy(ours.get_base_model())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_o = peftfast.PeftModel.from_pretrained(ours.unload(), tmp_path / "from_peft")
        loaded_t = peft.PeftModel.from_pretrained(theirs.unload(), tmp_path / "from_fast")
    assert loaded_o.peft_config["default"].use_dora and loaded_t.peft_config["default"].use_dora
    tol = 1e-5 * want.abs().max().item()
    assert max_err(loaded_o(ids, x), want) <= tol
    assert max_err(loaded_t(ids, x), want) <= tol
    del base_fast


def test_norm_expansion_against_float64():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(37, 53, generator=g)
    a, b = torch.randn(6, 53, generator=g) * 0.2, torch.randn(37, 6, generator=g) * 0.2
    s = 1.7
    exact = (w.double() + s * b.double() @ a.double()).norm(dim=1)
    plain = (w + s * b @ a).norm(dim=1)  # PEFT's way in fp32
    got = dora_mod.dora_row_norm(w, a, b, s)
    assert got.dtype == torch.float32
    assert max_err(got, exact) <= K_ERR * max(max_err(plain, exact), torch.finfo(torch.float32).eps * 2)
    # bf16 weight, fp32 adapters: summed in fp32, so at least as accurate as PEFT's bf16 sum
    wb = w.bfloat16()
    exact_b = (wb.double() + s * b.double() @ a.double()).norm(dim=1)
    plain_b = (wb + (s * b @ a).bfloat16()).float().norm(dim=1)
    assert max_err(dora_mod.dora_row_norm(wb, a, b, s), exact_b) <= max_err(plain_b, exact_b)
    # a row that almost cancels (W_o = -s (B A)_o + tiny): the expansion alone would lose every digit there;
    # the row is recomputed from the materialised sum
    w2 = w.clone()
    w2[3] = -s * (b[3] @ a) + 1e-4 * torch.randn(53, generator=g)
    exact2 = (w2.double() + s * b.double() @ a.double()).norm(dim=1)
    got2 = dora_mod.dora_row_norm(w2, a, b, s)
    assert abs(got2[3].item() - exact2[3].item()) <= 1e-2 * exact2[3].item()
    w64 = dora_mod.dora_row_norm(w.double(), a.double(), b.double(), s)
    assert w64.dtype == torch.float64 and max_err(w64, exact) <= 1e-12 * exact.max().item()


def test_cached_base_norm_follows_changes_of_the_base_weight():
    theirs, ours = make_pair(targets=["lin"])
    ids, x = inputs()
    for m in (theirs, ours):
        m.eval()
    ours(ids, x)  # fills the cache
    with torch.no_grad():
        for m in (theirs, ours):
            m.base_model.model.lin.get_base_layer().weight.mul_(1.5)  # in place: the version counter moves
    assert max_err(ours(ids, x), theirs(ids, x)) <= 1e-5
    new = torch.randn_like(ours.base_model.model.lin.get_base_layer().weight)
    for m in (theirs, ours):
        m.base_model.model.lin.get_base_layer().weight.data = new.clone()  # replaced: another storage
    assert max_err(ours(ids, x), theirs(ids, x)) <= 1e-5


def test_refusals_leave_the_model_unchanged():
    _, ours = make_pair(targets=["lin"])
    ids, x = inputs()
    ours.eval()
    with pytest.raises(ValueError, match="DoRA"):
        ours(ids, x, adapter_names=["default"] * 3)
    with pytest.raises(ValueError, match="DoRA"):  # and the model is left as it was
        ours(ids, x, adapter_names=["default"] * 3)
    assert not ours.base_model.model.lin.merged


def test_grouped_conv_matches_peft():
    # PEFT's norm for groups > 1 adds B.view(-1, r) @ A.view(r, -1) reshaped to the weight (materialised here too)
    torch.manual_seed(0)
    base = Wrap(nn.Conv2d(4, 6, 3, groups=2, padding=1))
    models = [lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=4, target_modules=["inner"], use_dora=True,
                                                                     init_lora_weights=False))
              for lib in (peft, peftfast)]
    theirs, ours = models
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if "lora_" in k}, strict=False)
    ours.base_model.model.inner.dora_init("default")  # from PEFT's A and B: PEFT's initial magnitude
    mt = theirs.base_model.model.inner.lora_magnitude_vector["default"].weight
    mo = ours.base_model.model.inner.lora_magnitude_vector["default"].weight
    assert mt.shape == mo.shape and max_err(mo, mt) <= 1e-6 * mt.abs().max().item()
    with torch.no_grad():
        mt.mul_(1 + 0.3 * torch.randn_like(mt))
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if "lora_" in k}, strict=False)
    x = torch.randn(2, 4, 5, 6)
    out_t, g_t = step(theirs, None, x)
    out_o, g_o = step(ours, None, x)
    assert max_err(out_o, out_t) <= 1e-5 * out_t.abs().max().item()
    for n in g_t:
        assert max_err(g_o[n], g_t[n]) <= 1e-5 * g_t[n].abs().max().item(), n


def test_ephemeral_gpu_offload_is_accepted_and_not_saved(tmp_path):
    cfg = peftfast.LoraConfig(r=2, target_modules=["lin"], use_dora=True,
                              runtime_config=peftfast.tuners.lora.config.LoraRuntimeConfig(ephemeral_gpu_offload=True))
    model = peftfast.get_peft_model(Net(), cfg)
    assert model.base_model.model.lin.ephemeral_gpu_offload
    model.save_pretrained(tmp_path)
    assert "runtime_config" not in (tmp_path / "adapter_config.json").read_text()


@pytest.mark.parametrize("case", ["nf4", "int8"])
def test_quantized_bases_match_peft(case):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    if case == "nf4":
        q = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")._quantize("cpu")
    else:
        q = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False,
                                     has_fp16_weights=False)._quantize("cpu")
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)

    class Q(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.q = layer

        def forward(self, ids, x):
            return self.q(x)

    models = []
    for lib in (peft, peftfast):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models.append(lib.get_peft_model(Q(copy.deepcopy(q)),
                                             lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q"], use_dora=True)))
    theirs, ours = models
    mt = theirs.base_model.model.q.lora_magnitude_vector["default"].weight
    mo = ours.base_model.model.q.lora_magnitude_vector["default"].weight
    assert max_err(mo, mt) <= 1e-5 * mt.abs().max().item()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.mul_(1 + 0.3 * torch.randn_like(p)) if "magnitude" in n else p.copy_(0.3 * torch.randn_like(p))
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if "lora_" in k}, strict=False)
    x = torch.randn(2, 5, 64)
    out_t, g_t = step(theirs, None, x, train=True)
    out_o, g_o = step(ours, None, x, train=True)
    assert max_err(out_o, out_t) <= 1e-5 * out_t.abs().max().item()
    for n in g_t:
        assert max_err(g_o[n], g_t[n]) <= 1e-5 * g_t[n].abs().max().item(), n


def test_bf16_base_with_fp32_adapters_is_as_accurate_as_peft():
    # bf16 base (adapters and magnitudes autocast to fp32, as PEFT): errors against a float64 copy of PEFT's model
    # within K_ERR x PEFT's own, floor one bf16 ulp of the result
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 20)).bfloat16()
    models = [lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=4, target_modules=["0", "2"], use_dora=True))
              for lib in (peft, peftfast)]
    theirs, ours = models
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if "lora_" in k}, strict=False)
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "lora_" in n)
    exact = copy.deepcopy(theirs).double()
    x = torch.randn(8, 40).bfloat16()
    outs = [m.train()(x if m is not exact else x.double()) for m in (theirs, ours, exact)]
    assert outs[1].dtype == torch.bfloat16
    for out in outs:
        out.double().sum().backward()
    bf16 = torch.finfo(torch.bfloat16).eps

    def check(what, got, ref, want):
        err, err_ref = max_err(got, want), max_err(ref, want)
        assert err <= K_ERR * max(err_ref, bf16 * want.abs().max().item()), f"{what}: {err:.3e} vs PEFT {err_ref:.3e}"

    check("output", outs[1], outs[0], outs[2])
    params = [dict(m.named_parameters()) for m in (theirs, ours, exact)]
    for n, p in params[2].items():
        if p.requires_grad:
            check(n, params[1][n].grad, params[0][n].grad, p.grad)


# ------------------------------------------------------------------------------------------------ caching


def dora_caches(model) -> list:
    return [m._dora_cache for m in model.modules() if hasattr(m, "_dora_cache")]


def count_norms(monkeypatch) -> list:
    """A list that grows by one per norm computed (not taken from the cache)."""
    calls = []
    real = lora_layer.LoraLayer.computed_dora_norm
    monkeypatch.setattr(lora_layer.LoraLayer, "computed_dora_norm",
                        lambda self, adapter: calls.append(adapter) or real(self, adapter))
    return calls


def test_dora_caching_follows_peft_and_reuses_the_norm(monkeypatch):
    theirs, ours = make_pair()
    ids, x = inputs()
    for m in (theirs, ours):
        m.eval()
    plain = ours(ids, x)
    caches = dora_caches(ours)
    assert len(caches) == len(TARGETS) and not any(caches)
    computed = count_norms(monkeypatch)
    with peft.helpers.DoraCaching(), peftfast.helpers.DoraCaching():
        first_t, first = theirs(ids, x), ours(ids, x)
        assert all(caches) and len(computed) == len(TARGETS)
        second = ours(ids, x)
        assert len(computed) == len(TARGETS)  # every norm came from the cache
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert max_err(first, first_t) <= 1e-5 * first_t.abs().max().item()
    assert dora_mod.ENABLE_DORA_CACHING is False  # the previous setting, restored
    ours(ids, x)  # a forward with caching off empties the caches, as in PEFT
    assert not any(caches)


def test_dora_cache_is_not_used_in_train_mode_and_cleared_by_it(monkeypatch):
    _, ours = make_pair()
    ids, x = inputs()
    caches = dora_caches(ours)
    computed = count_norms(monkeypatch)
    try:
        peftfast.helpers.DoraCaching()(enabled=True)
        ours.eval()
        ours(ids, x)
        assert all(caches)
        ours.train()
        assert not any(caches)
        out_t, grads = step(ours, ids, x, train=True)
        step(ours, ids, x, train=True)
        assert not any(caches) and len(computed) == 3 * len(TARGETS)
        assert grads["base_model.model.lin.lora_magnitude_vector.default.weight"].abs().max() > 0
    finally:
        peftfast.helpers.DoraCaching()(enabled=False)


def test_dora_cache_is_recomputed_when_weights_or_scale_change():
    # PEFT's cache would keep the old norm here (its documented limit); ours is keyed on the tensors' versions
    _, ours = make_pair(targets=["lin", "conv2", "emb"])
    ids, x = inputs()
    ours.eval()
    layers = [ours.base_model.model.get_submodule(n) for n in ("lin", "conv2", "emb")]
    edits = [
        lambda: [layer.lora_B["default"].weight.mul_(-0.5) for layer in layers[:2]],
        lambda: layers[2].lora_embedding_A["default"].add_(0.1),
        lambda: [layer.get_base_layer().weight.mul_(1.3) for layer in layers],
    ]
    with peftfast.helpers.DoraCaching():
        ours(ids, x)
        for edit in edits:
            with torch.no_grad():
                edit()
            cached = ours(ids, x)
            with peftfast.helpers.DoraCaching(enabled=False):
                fresh = ours(ids, x)
            assert torch.equal(cached, fresh)
            ours(ids, x)  # fills the cache again
        with peftfast.helpers.rescale_adapter_scale(ours, 0.5):
            cached = ours(ids, x)
            with peftfast.helpers.DoraCaching(enabled=False):
                assert torch.equal(cached, ours(ids, x))


@pytest.mark.interpreter
def test_dora_caching_skips_the_norm_kernel_on_triton_backend(triton_backend, monkeypatch):
    _, ours = make_pair(targets=["lin"])
    ids, x = inputs()
    ours.eval()
    launches = []
    real = lora_layer.dora_row_norm_fused
    monkeypatch.setattr(lora_layer, "dora_row_norm_fused", lambda *a: launches.append(real(*a)) or launches[-1])
    plain = ours(ids, x)
    with peftfast.helpers.DoraCaching():
        first, second = ours(ids, x), ours(ids, x)
    # the plain forward and the first cached one ran the kernel; the second read the cache
    assert len(launches) == 2 and all(norm is not None for norm in launches)
    assert torch.equal(first, plain) and torch.equal(second, plain)
