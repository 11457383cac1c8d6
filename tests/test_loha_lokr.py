"""LoHa and LoKr against the real PEFT 0.21 (outputs, every gradient, seeded dropout, files, merge, several
adapters) and the one-GEMM linear (``delta_linear``) against float64."""
from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftfast
from peftfast.config import ConfigError
from peftfast.tuners.lokr import factorization
from peftfast.tuners.lycoris_utils import DeltaTerm, cp_rebuild, delta_linear
from peftfast.utils.save_and_load import AdapterLoadError
from peftfast.zoo import causal_inputs
from tests._models import tiny_llama


class Net(nn.Module):
    """Linear, Conv2d (3x3 and 1x1) and Conv1d targets; odd sizes."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 20)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.k1 = nn.Conv2d(6, 6, 1)
        self.c1 = nn.Conv1d(6, 8, 3)
        self.head = nn.Linear(8, 3)

    def forward(self, x, img):
        h = self.k1(self.c2(img))
        h = self.c1(h.mean(2))
        return self.head(h.mean(2)) + self.lin(x)[:, :3]


def build_net():
    torch.manual_seed(0)
    return Net()


NET_TARGETS = ["lin", "c2", "k1", "c1"]
CASES = [
    ("LoHaConfig", dict(r=2, alpha=3)),
    ("LoHaConfig", dict(r=2, alpha=4, init_weights=False, rank_dropout=0.3, module_dropout=0.2)),
    ("LoHaConfig", dict(r=3, alpha=5, use_effective_conv2d=True)),
    ("LoKrConfig", dict(r=2, alpha=3, rank_dropout=0.3, module_dropout=0.2)),
    ("LoKrConfig", dict(r=3, alpha=5, use_effective_conv2d=True)),
    ("LoKrConfig", dict(r=1, decompose_both=True, decompose_factor=2, init_weights=False)),
    ("LoKrConfig", dict(r=4, init_weights="lycoris", rank_dropout_scale=True, rank_dropout=0.5)),
]


def _pair(build, name, kw):
    torch.manual_seed(1)
    ref = peft.get_peft_model(build(), getattr(peft, name)(**kw))
    torch.manual_seed(1)
    ours = peftfast.get_peft_model(build(), getattr(peftfast, name)(**kw))
    return ref, ours


def _randomise(ref, ours, seed=2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (n, p), (m, q) in zip(ref.named_parameters(), ours.named_parameters()):
            assert n == m
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
                q.copy_(p)


@pytest.mark.parametrize("name, kw", CASES, ids=[f"{n[:4]}-{i}" for i, (n, _) in enumerate(CASES)])
def test_net_matches_peft(name, kw):
    kw = dict(kw, target_modules=NET_TARGETS)
    ref, ours = _pair(build_net, name, kw)
    # same module tree, same initial values from the same seed, same counts
    assert list(ref.state_dict()) == list(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), ours.state_dict().values()))
    assert ref.get_nb_trainable_parameters() == ours.get_nb_trainable_parameters()
    _randomise(ref, ours)
    x, img = torch.randn(5, 12), torch.randn(5, 4, 7, 9)
    torch.manual_seed(3)  # dropout draws: PEFT's order and generator
    y_ref = ref(x, img)
    torch.manual_seed(3)
    y_ours = ours(x, img)
    torch.testing.assert_close(y_ours, y_ref, rtol=2e-5, atol=2e-5)
    y_ref.square().sum().backward()
    y_ours.square().sum().backward()
    cp_loha = name == "LoHaConfig" and kw.get("use_effective_conv2d")
    for (n, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        if not p.requires_grad:
            continue
        if cp_loha and (".c2." in n or ".c1." in n):
            continue  # PEFT's CP-form LoHa backward is not the gradient of its forward: checked below in float64
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
    # merge / unmerge / unload give the same outputs as PEFT's (eval: no dropout)
    ref.eval()
    ours.eval()
    with torch.no_grad():
        expected = ref(x, img)
        ours.base_model.merge_adapter()
        torch.testing.assert_close(ours(x, img), expected, rtol=1e-4, atol=1e-4)
        ours.base_model.unmerge_adapter()
        torch.testing.assert_close(ours(x, img), expected, rtol=1e-4, atol=1e-4)
        with ours.disable_adapter():
            torch.testing.assert_close(ours(x, img), build_net()(x, img))
        merged = ours.merge_and_unload()
        assert type(merged.c2) is nn.Conv2d and type(merged.lin) is nn.Linear
        torch.testing.assert_close(merged(x, img), expected, rtol=1e-4, atol=1e-4)


def test_loha_cp_gradients_against_float64():
    """The CP-form LoHa delta's gradients are autograd's of the forward (PEFT 0.21's hand-written backward for
    this form is not: torch.autograd.gradcheck fails on it), checked against float64."""
    ours = peftfast.get_peft_model(build_net(), peftfast.LoHaConfig(r=2, alpha=3, use_effective_conv2d=True,
                                                                     target_modules=["c2"]))
    layer = ours.base_model.model.c2
    names = ("hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b")
    with torch.no_grad():
        for n in names:
            getattr(layer, n)["default"].normal_()
    img = torch.randn(2, 4, 5, 6)
    y = layer(img)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [getattr(layer, n)["default"] for n in names], gy)
    f64 = [getattr(layer, n)["default"].detach().double().requires_grad_() for n in names]
    delta = (cp_rebuild(*f64[:3]) * cp_rebuild(*f64[3:]) * 1.5).reshape(6, 4, 3, 3)
    base = layer.get_base_layer()
    y64 = torch.nn.functional.conv2d(img.double(), base.weight.double() + delta, base.bias.double(), padding=1)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-4)
    g64 = torch.autograd.grad(y64, f64, gy.double())
    for n, g, e in zip(names, grads, g64):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4, msg=n)


@pytest.mark.parametrize("block", [None, 3, 4])
def test_delta_linear_against_float64(block):
    """One GEMM per block of output rows with the delta generated from the factors: forward and every gradient
    (x, bias, all factors) against float64 on odd shapes, with several blocks, LoKr's row alignment and a
    rank-dropout row mask."""
    torch.manual_seed(0)
    out_f, in_f, r = 12, 10, 3
    x = torch.randn(2, 5, in_f, requires_grad=True)
    w = torch.randn(out_f, in_f)
    b = torch.randn(out_f, requires_grad=True)
    h = [torch.randn(out_f, r, requires_grad=True), torch.randn(r, in_f, requires_grad=True),
         torch.randn(out_f, r, requires_grad=True), torch.randn(r, in_f, requires_grad=True)]
    k = [torch.randn(3, 2, requires_grad=True), torch.randn(4, 5, requires_grad=True)]  # kron: [12, 10]
    mask = (torch.rand(out_f) > 0.3).float() * 1.7

    def loha_rows(fs, r0, r1):
        return (fs[0][r0:r1] @ fs[1]) * (fs[2][r0:r1] @ fs[3]) * 0.7

    def lokr_rows(fs, r0, r1):
        return torch.kron(fs[0][r0 // 4:r1 // 4], fs[1]) * 1.3

    terms = [DeltaTerm(loha_rows, tuple(h), 1, mask), DeltaTerm(lokr_rows, tuple(k), 4, None)]
    y = delta_linear(x, w, b, terms, block_rows=block)
    leaves = [x, b, *h, *k]
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)

    d = [t.detach().double().requires_grad_() for t in leaves]
    xd, bd, hd, kd = d[0], d[1], d[2:6], d[6:]
    delta = (hd[0] @ hd[1]) * (hd[2] @ hd[3]) * 0.7 * mask.double()[:, None] + torch.kron(kd[0], kd[1]) * 1.3
    y64 = torch.nn.functional.linear(xd, w.double() + delta, bd)
    g64 = torch.autograd.grad(y64, d, dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-4)
    for i, (g, e) in enumerate(zip(grads, g64)):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-4, msg=str(i))


def test_fused_linear_saves_no_full_size_tensor():
    """Over a plain nn.Linear the forward keeps nothing of size [out, in] for backward but the frozen base weight."""
    model = nn.Sequential(nn.Linear(48, 40))
    for name, cfg in (("loha", peftfast.LoHaConfig(r=2, target_modules=["0"], init_weights=False)),
                      ("lokr", peftfast.LoKrConfig(r=2, target_modules=["0"], init_weights=False))):
        torch.manual_seed(0)
        pm = peftfast.get_peft_model(nn.Sequential(nn.Linear(48, 40)), cfg)
        base_w = pm.base_model.model[0].get_base_layer().weight
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = pm(torch.randn(7, 48))
        big = [t.shape for t in saved if t.numel() >= 48 * 40 and t.data_ptr() != base_w.data_ptr()]
        assert not big, (name, big)
        y.sum().backward()
        assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)
    del model


@pytest.mark.parametrize("name, kw", [("LoHaConfig", dict(r=2, alpha=3, rank_dropout=0.2, module_dropout=0.1)),
                                      ("LoKrConfig", dict(r=2, alpha=4, decompose_both=True))], ids=["loha", "lokr"])
def test_llama_parity_files_and_adapters(name, kw, tmp_path):
    kw = dict(kw, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)
    ref, ours = _pair(tiny_llama, name, kw)
    _randomise(ref, ours)
    batch = causal_inputs()
    for model in (ref, ours):
        model.train()
    torch.manual_seed(7)
    out_ref = ref(**batch)
    torch.manual_seed(7)
    out_ours = ours(**batch)
    torch.testing.assert_close(out_ours.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    out_ref.loss.backward()
    out_ours.loss.backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)

    # files: byte-identical for the same weights; load both ways
    ref.save_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ref" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "ours" / "adapter_model.safetensors").read_bytes()
    ref.eval()
    batch.pop("labels")
    with torch.no_grad():
        expected = ref(**batch).logits
        loaded = peftfast.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ref"))
        back = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(**batch).logits, expected, rtol=1e-5, atol=1e-5)

        # several adapters: a second one from PEFT's folder, switching, deleting
        loaded.load_adapter(str(tmp_path / "ref"), adapter_name="second")
        loaded.set_adapter("second")
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        loaded.base_model.set_adapter(["default", "second"])
        both = loaded(**batch).logits
        ref.load_adapter(str(tmp_path / "ref"), adapter_name="second")
        ref.base_model.set_adapter(["default", "second"])
        torch.testing.assert_close(both, ref(**batch).logits, rtol=1e-5, atol=1e-5)
        loaded.delete_adapter("second")
        assert list(loaded.peft_config) == ["default"]
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, field, value", [
    ("LoHaConfig", "r", 0), ("LoHaConfig", "alpha", float("nan")), ("LoHaConfig", "rank_dropout", 1.5),
    ("LoHaConfig", "init_weights", "gaussian"), ("LoKrConfig", "decompose_factor", 0),
    ("LoKrConfig", "module_dropout", -0.1), ("LoKrConfig", "rank_pattern", {"q_proj": 0}),
    ("LoKrConfig", "init_weights", "pissa"),
])
def test_bad_config_values_are_refused(name, field, value):
    with pytest.raises(ConfigError, match=field):
        getattr(peftfast, name)(target_modules=["q_proj"], **{field: value})


@pytest.mark.parametrize("name", ["LoHaConfig", "LoKrConfig"])
def test_mismatched_weights_leave_the_model_unchanged(name, tmp_path):
    ref, ours = _pair(tiny_llama, name, dict(r=2, target_modules=["q_proj"], init_weights=False))
    ref.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    weights = load_file(path)
    key = sorted(weights)[0]
    weights[key] = torch.randn(*[s + 1 for s in weights[key].shape])
    save_file(weights, path)
    model = tiny_llama()
    with pytest.raises(AdapterLoadError, match="shape"):
        peftfast.PeftModel.from_pretrained(model, str(tmp_path / "a"))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="shape"):
        ours.load_adapter(str(tmp_path / "a"), adapter_name="default")
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in state.items())
    assert list(ours.peft_config) == ["default"]


def test_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in (1, 2, 7, 12, 48, 127, 128, 256, 360, 4096, 11008):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 5):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("method", ["LoHaConfig", "LoKrConfig"])
def test_unsupported_target_names_the_methods_layers(method):
    """Targeting a layer type the method does not adapt: the message lists that method's layers (it listed LoRA's,
    Embedding among them), and the error is a TypeError as PEFT raises it (and a ValueError as before)."""
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    with pytest.raises(TypeError, match=r"supported layers: Conv1d/Conv2d/Linear$") as info:
        peftfast.get_peft_model(model, getattr(peftfast, method)(target_modules=["0"]))
    assert isinstance(info.value, ValueError)
    assert [type(m) for m in model.modules()] == [nn.Sequential, nn.Embedding, nn.Linear]
