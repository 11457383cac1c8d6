"""LoRA and (IA)^3 on nn.Conv1d / nn.Conv2d / nn.Conv3d against the real PEFT.

One small custom network holds every kind of convolution PEFT adapts: 1-, 2- and 3-D, kernel sizes 1 and
3, stride, padding, a dilated 1x1, groups, bias on and off, odd channel counts. Same config and same
adapter weights (fresh random values, never PEFT's zero B) must give the same module tree, state-dict keys,
parameter counts, outputs, every adapter gradient, merges and files, in both directions.

Tolerances are derived: peftfast's fp32 error against a float64 run of the PEFT model may be at most ``K``
times PEFT's own fp32 error, plus one rounding of the reference.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftfast
from peftfast.tuners.lora import layer as lora_layer
from tests.numerics import assert_matches_float64

peft = pytest.importorskip("peft")

K = 3.0
LORA_TARGETS = ["c1a", "c1b", "c2a", "c2k1", "c3a", "c3b"]  # every kind but the grouped conv (not mergeable)
IA3_TARGETS = ["c2a", "c2g", "c2k1", "c3a", "c3b"]  # PEFT has no (IA)^3 layer for nn.Conv1d


class ConvNet(nn.Module):
    """x: [N, 5, L] -> Conv1d x2 -> outer product [N, 9, L, L] -> Conv2d x3 -> stacked [N, 7, 3, H, W] -> Conv3d x2."""

    def __init__(self, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.c1a = nn.Conv1d(5, 7, 3, padding=1, padding_mode=padding_mode)
        self.c1b = nn.Conv1d(7, 9, 1, bias=False)
        self.c2a = nn.Conv2d(9, 12, 3, stride=2, padding=1)
        self.c2g = nn.Conv2d(12, 15, 3, padding=1, groups=3, bias=False)
        self.c2k1 = nn.Conv2d(15, 7, 1, dilation=2)
        self.c3a = nn.Conv3d(7, 5, 3, stride=(1, 2, 1), padding=1)
        self.c3b = nn.Conv3d(5, 3, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1b(torch.tanh(self.c1a(x))))
        h = h[:, :, :, None] * h[:, :, None, :]
        h = torch.tanh(self.c2k1(torch.tanh(self.c2g(torch.tanh(self.c2a(h))))))
        h = torch.stack([h, torch.tanh(h), h * h], dim=2)
        return self.c3b(torch.tanh(self.c3a(h))).flatten(1)


def conv_net(padding_mode: str = "zeros") -> ConvNet:
    torch.manual_seed(0)
    net = ConvNet(padding_mode)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    return net.eval()


def inputs(seed: int = 1, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 5, 9, generator=torch.Generator().manual_seed(seed))


def randomize(model: nn.Module, prefix: str, seed: int = 2, std: float = 0.3, mean: float = 0.0) -> None:
    """Fresh random values for every adapter tensor (the same values for the same tree)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if prefix in name:
                p.copy_(torch.randn(p.shape, generator=g) * std + mean)


def pair(config_kwargs: dict, method: str = "lora", padding_mode: str = "zeros", adapters=("default",)):
    """(peftfast model, PEFT model) with the same base weights, adapters and adapter values."""
    lib_cfg = {"lora": "LoraConfig", "ia3": "IA3Config"}[method]
    prefix = {"lora": "lora_", "ia3": "ia3_"}[method]
    models = []
    for lib in (peftfast, peft):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = getattr(lib, lib_cfg)
            pm = lib.get_peft_model(conv_net(padding_mode), cfg(**config_kwargs), adapter_name=adapters[0])
            for name in adapters[1:]:
                pm.add_adapter(name, cfg(**config_kwargs))
        randomize(pm, prefix, mean=1.0 if method == "ia3" else 0.0)
        models.append(pm.eval())
    return models[0], models[1]


def reference64(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double()


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """peftfast's error vs the float64 reference at most K times PEFT's own (PEFT is the plain PyTorch run of
    the same math), plus one rounding of it (tests/numerics.py)."""
    assert_matches_float64(what, ours, theirs, ref, K, check_dtype=False)


def lora_kwargs(**extra) -> dict:
    kw = dict(target_modules=LORA_TARGETS, r=3, lora_alpha=6, rank_pattern={"c2a": 5},
              alpha_pattern={"c3a": 7})
    kw.update(extra)
    return kw


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------------
def test_lora_module_tree_keys_and_counts_match_peft():
    ours, theirs = pair(lora_kwargs())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert list(trainable(ours)) == list(trainable(theirs))
    for name in LORA_TARGETS:
        a, b = getattr(ours.base_model.model, name), getattr(theirs.base_model.model, name)
        assert type(a).__name__ == type(b).__name__
        assert a.r == b.r and a.lora_alpha == b.lora_alpha and a.scaling == b.scaling
        for key in ("lora_A", "lora_B"):
            ma, mb = getattr(a, key)["default"], getattr(b, key)["default"]
            assert type(ma) is type(mb)
            for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
                assert getattr(ma, attr) == getattr(mb, attr), (name, key, attr)
    assert ours.base_model.model.c2a.r["default"] == 5 and ours.base_model.model.c3a.lora_alpha["default"] == 7


def test_lora_seeded_init_matches_peft():
    """Same seed -> same initial adapter weights (A drawn as PEFT draws it, B zero)."""
    states = []
    for lib in (peftfast, peft):
        torch.manual_seed(3)
        pm = lib.get_peft_model(conv_net(), lib.LoraConfig(**lora_kwargs()))
        states.append({k: v for k, v in pm.state_dict().items() if "lora_" in k})
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    assert all(not v.any() for k, v in states[0].items() if "lora_B" in k)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_forward_and_gradients_match_peft(use_rslora):
    ours, theirs = pair(lora_kwargs(use_rslora=use_rslora))
    ref = reference64(theirs)
    x = inputs()
    w = torch.randn(ours(x).shape, generator=torch.Generator().manual_seed(5))
    outs = {}
    for tag, model, xx in (("ours", ours, x), ("peft", theirs, x), ("ref", ref, x.double())):
        y = model(xx)
        (y * w.to(y.dtype)).sum().backward()
        outs[tag] = (y.detach(), {n: p.grad for n, p in trainable(model).items()})
    assert_close(outs["ours"][0], outs["peft"][0], outs["ref"][0], "output")
    assert list(outs["ours"][1]) == list(outs["peft"][1]) and len(outs["ours"][1]) == 2 * len(LORA_TARGETS)
    for name, grad in outs["ours"][1].items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert_close(grad, outs["peft"][1][name], outs["ref"][1][name], name)


def test_lora_dropout_training_forward_matches_peft_with_the_same_seed():
    ours, theirs = pair(lora_kwargs(lora_dropout=0.3))
    x = inputs()
    ys = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(11)
        ys.append(model(x))
    torch.testing.assert_close(ys[0], ys[1])


def test_lora_delta_weight_matches_peft_and_the_adapter_math():
    ours, theirs = pair(lora_kwargs())
    for name in LORA_TARGETS:
        ol, pl = getattr(ours.base_model.model, name), getattr(theirs.base_model.model, name)
        delta = ol.get_delta_weight("default")
        assert delta.shape == ol.get_base_layer().weight.shape
        a, b = ol.lora_A["default"].weight, ol.lora_B["default"].weight
        expect = torch.einsum("or,ri...->oi...", b.flatten(2)[..., 0].double(), a.double()) * ol.scaling["default"]
        torch.testing.assert_close(delta.double(), expect, rtol=1e-5, atol=1e-6)
        if name != "c3b":  # PEFT 0.21 takes its 2-D 1x1 shortcut for a 1x1x1 Conv3d kernel and fails there
            torch.testing.assert_close(delta, pl.get_delta_weight("default"), rtol=1e-5, atol=1e-6)


def test_lora_merge_unmerge_and_merge_and_unload():
    ours, theirs = pair(lora_kwargs())
    x = inputs()
    with torch.no_grad():
        base = ours.get_base_model()
        with ours.disable_adapter():
            y_base = ours(x)
        y = ours(x)
        y_peft = theirs(x)
        assert (y - y_base).abs().max() > 1e-2  # the adapters matter
        weights = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
        ours.merge_adapter()
        assert all(getattr(base, n).merged for n in LORA_TARGETS)
        torch.testing.assert_close(ours(x), y_peft, rtol=1e-4, atol=1e-5)
        ours.unmerge_adapter()
        for n, p in ours.named_parameters():
            if "base_layer" in n:
                torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-6)
        ours.merge_adapter(safe_merge=True)
        torch.testing.assert_close(ours(x), y_peft, rtol=1e-4, atol=1e-5)
        ours.unmerge_adapter()
        merged = ours.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        assert type(merged.c2a) is nn.Conv2d and type(merged.c3b) is nn.Conv3d
        torch.testing.assert_close(merged(x), y_peft, rtol=1e-4, atol=1e-5)


def test_lora_merge_matches_peft_merged_with_a_reflect_padded_base():
    """PEFT's lora_A pads with zeros whatever the base does, so merging a reflect-padded conv changes the output;
    peftfast reproduces PEFT's unmerged and merged outputs both."""
    ours, theirs = pair(lora_kwargs(target_modules=["c1a", "c2a"]), padding_mode="reflect")
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
        ours.merge_adapter()
        theirs.merge_adapter()
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_lora_safe_merge_refuses_nan_and_leaves_weights_unchanged():
    ours, _ = pair(lora_kwargs())
    layer = ours.base_model.model.c2a
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    before = {n: p.clone() for n, p in ours.named_parameters()}
    with pytest.raises(ValueError, match="NaN"):
        ours.merge_adapter(safe_merge=True)
    for n, p in ours.named_parameters():
        assert torch.equal(p, before[n]) or (p.isnan() == before[n].isnan()).all(), n
    assert not any(m.merged for m in ours.base_model.model.modules() if hasattr(m, "merged_adapters"))


def assert_each_and_both_adapters_agree(ours, theirs, x):
    """Adapters "one" and "two" active alone, then together: same outputs as PEFT's."""
    for name in ("one", "two"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(ours(x), theirs(x))
    ours.base_model.set_adapter(["one", "two"])
    theirs.base_model.set_adapter(["one", "two"])
    torch.testing.assert_close(ours(x), theirs(x))

def test_lora_several_adapters_set_adapter_disable_and_mixed_batch():
    ours, theirs = pair(lora_kwargs(), adapters=("one", "two"))
    x = inputs(batch=5)
    with torch.no_grad():
        assert_each_and_both_adapters_agree(ours, theirs, x)
        with ours.disable_adapter(), theirs.disable_adapter():
            torch.testing.assert_close(ours(x), theirs(x))
            torch.testing.assert_close(ours(x), conv_net()(x))
        ours.set_adapter("one")
        theirs.set_adapter("one")
        names = ["one", "__base__", "two", "one", "two"]
        mixed = ours(x, adapter_names=names)
        torch.testing.assert_close(mixed, theirs(x, adapter_names=names))
        for i, name in enumerate(names):
            if name == "__base__":
                with ours.disable_adapter():
                    expect = ours(x[i:i + 1])
            else:
                ours.set_adapter(name)
                expect = ours(x[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["stacked", "dropout", "grouped"])
def test_lora_two_active_adapters_forward_and_gradients_match_peft(case):
    """Two active adapters: one stacked pair of convolutions in eval/no-dropout, the per-adapter path when each
    adapter draws its own dropout mask (same seed -> PEFT's masks) or B is grouped."""
    kw = lora_kwargs(lora_dropout=0.2 if case == "dropout" else 0.0)
    if case == "grouped":
        kw = dict(target_modules=["c2g", "c1a"], r=3, rank_pattern={"c2g": 6}, lora_alpha=5)
    ours, theirs = pair(kw, adapters=("one", "two"))
    ref = reference64(theirs)
    for model in (ours, theirs, ref):
        model.base_model.set_adapter(["one", "two"])
        if case == "dropout":
            model.train()
    if case == "stacked":
        layer = ours.base_model.model.c2a
        assert layer._stacks(["one", "two"])
    x = inputs()
    outs = []
    for model, xx in ((ours, x), (theirs, x), (ref, x.double())):
        torch.manual_seed(7)
        y = model(xx)
        y.square().sum().backward()
        outs.append((y.detach(), {n: p.grad for n, p in trainable(model).items()}))
    assert_close(outs[0][0], outs[1][0], outs[2][0], "output")
    assert list(outs[0][1]) == list(outs[1][1])
    for name, grad in outs[0][1].items():
        assert grad.abs().sum() > 0, name
        assert_close(grad, outs[1][1][name], outs[2][1][name], name)


def test_lora_save_in_peftfast_load_in_peft_and_the_reverse(tmp_path):
    ours, theirs = pair(lora_kwargs())
    x = inputs()
    with torch.no_grad():
        y = ours(x)
        ours.save_pretrained(tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "peft")
        files = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft")]
        assert sorted(files[0]) == sorted(files[1])
        for k in files[0]:
            assert torch.equal(files[0][k], files[1][k]), k
        loaded_peft = peft.PeftModel.from_pretrained(conv_net(), tmp_path / "ours")
        torch.testing.assert_close(loaded_peft(x), y)
        loaded_ours = peftfast.PeftModel.from_pretrained(conv_net(), tmp_path / "peft")
        torch.testing.assert_close(loaded_ours(x), theirs(x))
        assert isinstance(loaded_ours.base_model.model.c3a, lora_layer.Conv3d)


def test_lora_grouped_conv_forward_gradients_and_merge_refused():
    kw = dict(target_modules=["c2g", "c2a"], r=3, rank_pattern={"c2g": 6}, lora_alpha=5)
    ours, theirs = pair(kw)
    layer = ours.base_model.model.c2g
    assert layer.lora_B["default"].groups == 3 and layer.lora_A["default"].groups == 1
    x = inputs()
    ref = reference64(theirs)
    ys = [m(xx) for m, xx in ((ours, x), (theirs, x), (ref, x.double()))]
    assert_close(ys[0].detach(), ys[1].detach(), ys[2].detach(), "grouped output")
    for y in ys:
        y.square().sum().backward()
    for (n, p), (_, q), (_, r) in zip(trainable(ours).items(), trainable(theirs).items(), trainable(ref).items()):
        assert_close(p.grad, q.grad, r.grad, n)
    before = {n: p.clone() for n, p in ours.named_parameters()}
    for safe in (False, True):
        with pytest.raises(NotImplementedError, match="groups=3"):
            ours.merge_adapter(safe_merge=safe)
        for n, p in ours.named_parameters():
            assert torch.equal(p, before[n]), n
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_lora_conv_refusals():
    with pytest.raises(ValueError, match="rank divisible by 3"):
        peftfast.get_peft_model(conv_net(), peftfast.LoraConfig(target_modules=["c2g"], r=4))
    net = conv_net()
    net.c2a = nn.Conv2d(9, 12, 3, stride=2, padding=2, dilation=2)
    with pytest.raises(ValueError, match="dilation"):
        peftfast.get_peft_model(net, peftfast.LoraConfig(target_modules=["c2a"]))
    # a refused injection leaves the model as it was
    net = conv_net()
    with pytest.raises(ValueError):
        peftfast.get_peft_model(net, peftfast.LoraConfig(target_modules=["c2a", "c2g"], r=4))
    assert type(net.c2a) is nn.Conv2d and type(net.c2g) is nn.Conv2d


def test_lora_conv_and_linear_in_one_model_and_fan_in_fan_out_ignored():
    net = conv_net()
    net.head = nn.Linear(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fan_in_fan_out warning for a conv
        pm = peftfast.get_peft_model(net, peftfast.LoraConfig(target_modules=["c2a"], fan_in_fan_out=True))
    assert isinstance(pm.base_model.model.c2a, lora_layer.Conv2d)


# ------------------------------------------------------------------------------------------------------
# (IA)^3
# ------------------------------------------------------------------------------------------------------
IA3_FEEDFORWARD = {"none": [], "some": ["c2g", "c3a"], "all": IA3_TARGETS}


@pytest.mark.parametrize("ff", sorted(IA3_FEEDFORWARD))
def test_ia3_tree_forward_gradients_match_peft(ff):
    kw = dict(target_modules=IA3_TARGETS, feedforward_modules=IA3_FEEDFORWARD[ff])
    ours, theirs = pair(kw, method="ia3")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for name in IA3_TARGETS:
        a, b = getattr(ours.base_model.model, name), getattr(theirs.base_model.model, name)
        assert type(a).__name__ == type(b).__name__ and a.is_feedforward == b.is_feedforward
    x = inputs()
    ref = reference64(theirs)
    ys = [m(xx) for m, xx in ((ours, x), (theirs, x), (ref, x.double()))]
    assert_close(ys[0].detach(), ys[1].detach(), ys[2].detach(), "output")
    for y in ys:
        y.square().sum().backward()
    grads = [{n: p.grad for n, p in trainable(m).items()} for m in (ours, theirs, ref)]
    assert list(grads[0]) == list(grads[1]) and len(grads[0]) == len(IA3_TARGETS)
    for n, g in grads[0].items():
        assert g.abs().sum() > 0, n
        assert_close(g, grads[1][n], grads[2][n], n)


@pytest.mark.parametrize("ff", sorted(IA3_FEEDFORWARD))
def test_ia3_merge_unmerge_safe_merge_and_unload(ff):
    kw = dict(target_modules=IA3_TARGETS, feedforward_modules=IA3_FEEDFORWARD[ff])
    ours, theirs = pair(kw, method="ia3")
    x = inputs()
    with torch.no_grad():
        y = ours(x)
        weights = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
        ours.merge_adapter()
        theirs.merge_adapter()
        torch.testing.assert_close(ours(x), y, rtol=1e-4, atol=1e-5)
        for (n, p), (m, q) in zip(ours.named_parameters(), theirs.named_parameters()):
            assert n == m
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        ours.unmerge_adapter()
        for n, p in ours.named_parameters():
            if "base_layer" in n:
                torch.testing.assert_close(p, weights[n], rtol=1e-5, atol=1e-6)
        ours.merge_adapter(safe_merge=True)
        torch.testing.assert_close(ours(x), y, rtol=1e-4, atol=1e-5)
        ours.unmerge_adapter()
        merged = ours.merge_and_unload()
        assert type(merged.c2g) is nn.Conv2d and type(merged.c3b) is nn.Conv3d
        torch.testing.assert_close(merged(x), y, rtol=1e-4, atol=1e-5)


def test_ia3_safe_merge_refuses_nan():
    ours, _ = pair(dict(target_modules=IA3_TARGETS, feedforward_modules=["c2g"]), method="ia3")
    with torch.no_grad():
        ours.base_model.model.c2g.ia3_l["default"][0, 1] = float("inf")
    before = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
    with pytest.raises(ValueError, match="NaN"):
        ours.merge_adapter(safe_merge=True)
    for n, p in ours.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, before[n]), n


def test_ia3_several_adapters_disable_and_files_both_ways(tmp_path):
    kw = dict(target_modules=IA3_TARGETS, feedforward_modules=["c2a", "c3b"])
    ours, theirs = pair(kw, method="ia3", adapters=("one", "two"))
    x = inputs()
    with torch.no_grad():
        assert_each_and_both_adapters_agree(ours, theirs, x)
        with ours.disable_adapter():
            torch.testing.assert_close(ours(x), conv_net()(x))
        ours.set_adapter("two")
        theirs.set_adapter("two")
        ours.save_pretrained(tmp_path / "ours", selected_adapters=["two"])
        theirs.save_pretrained(tmp_path / "peft", selected_adapters=["two"])
        files = [load_file(tmp_path / d / "two" / "adapter_model.safetensors") for d in ("ours", "peft")]
        assert sorted(files[0]) == sorted(files[1])
        for k in files[0]:
            assert torch.equal(files[0][k], files[1][k]), k
        loaded_peft = peft.PeftModel.from_pretrained(conv_net(), tmp_path / "ours" / "two")
        torch.testing.assert_close(loaded_peft(x), ours(x))
        loaded_ours = peftfast.PeftModel.from_pretrained(conv_net(), tmp_path / "peft" / "two")
        torch.testing.assert_close(loaded_ours(x), theirs(x))


def test_ia3_conv1d_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="nn.Conv1d"):
        peftfast.get_peft_model(conv_net(), peftfast.IA3Config(target_modules=["c1a"], feedforward_modules=[]))


# ------------------------------------------------------------------------------------------------------
# half precision, string padding
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_bf16_base_keeps_fp32_adapters_and_matches_peft(method):
    """autocast_adapter_dtype: adapters of a bf16 base are fp32; the output comes back in bf16, as PEFT's."""
    kw = lora_kwargs() if method == "lora" else dict(target_modules=IA3_TARGETS, feedforward_modules=["c2a"])
    models = []
    for lib in (peftfast, peft):
        cfg = lib.LoraConfig(**kw) if method == "lora" else lib.IA3Config(**kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = lib.get_peft_model(conv_net().to(torch.bfloat16), cfg)
        randomize(pm, method + "_", mean=1.0 if method == "ia3" else 0.0)
        models.append(pm.eval())
    ours, theirs = models
    assert {p.dtype for n, p in trainable(ours).items()} == {torch.float32}
    x = inputs().to(torch.bfloat16)
    with torch.no_grad():
        y, y_peft = ours(x), theirs(x)
        assert y.dtype == y_peft.dtype == torch.bfloat16
        torch.testing.assert_close(y, y_peft)
        if method == "lora":
            layer = ours.base_model.model.c2a
            assert layer.get_delta_weight("default").dtype == torch.float32
            torch.testing.assert_close(layer.get_delta_weight("default"),
                                       theirs.base_model.model.c2a.get_delta_weight("default"))


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_lora_string_padding_matches_peft_and_merges(padding):
    """lora_A takes the base's padding as given, 'same' with an even kernel (asymmetric padding) included."""
    outs = []
    for lib in (peftfast, peft):
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("c1", nn.Conv1d(5, 7, kernel_size=4, padding=padding))
        pm = lib.get_peft_model(model, lib.LoraConfig(target_modules=["c1"], r=2))
        randomize(pm, "lora_")
        x = inputs()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch: 'same' with an even kernel pads a copy of the input
            y = pm(x)
            pm.merge_adapter()
            outs.append((y, pm(x)))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[0][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_a_few_training_steps_follow_peft_and_leave_the_base_untouched(method):
    kw = lora_kwargs(lora_dropout=0.1) if method == "lora" else dict(target_modules=IA3_TARGETS,
                                                                    feedforward_modules=["c2g", "c3b"])
    ours, theirs = pair(kw, method=method)
    base = {n: p.clone() for n, p in ours.named_parameters() if not p.requires_grad}
    x, target = inputs(batch=6), torch.randn(6, ours(inputs(batch=6)).shape[1])
    losses = []
    for model in (ours, theirs):
        model.train()
        opt = torch.optim.SGD(trainable(model).values(), lr=0.05)
        curve = []
        for step in range(4):
            torch.manual_seed(100 + step)
            loss = (model(x) - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses.append(curve)
    assert losses[0][-1] < losses[0][0]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6)
    for n, p in ours.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
