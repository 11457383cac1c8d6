"""LoRA features beyond the plain adapter, against the real PEFT 0.21.2: ``lora_bias``, the initialisations
that read the base weight (PiSSA, OLoRA, orthogonal, MiCA) and BD-LoRA.

One small network holds a Linear with bias, a Linear without, transformers' Conv1D (``fan_in_fan_out``), a Conv2d
with bias and an Embedding, at odd sizes. Same config and same adapter values (fresh random, B and the lora_B bias
never zero) must give PEFT's module tree, state-dict keys, outputs, every adapter gradient, merges and files, in
both directions. Tolerances: peftfast's fp32 error against a float64 run of PEFT's model is at most ``K`` times
PEFT's own fp32 error (tests/numerics.py).
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
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

K = 3.0


class Net(nn.Module):
    """ids [N, L] -> Embedding(13, 7) -> lin0 (bias) -> c1d (Conv1D 9->12) -> lin1 (no bias) -> image -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 7)
        self.lin0 = nn.Linear(7, 9)
        self.c1d = Conv1D(12, 9)  # nf=12 outputs, nx=9 inputs; weight [9, 12]
        self.lin1 = nn.Linear(12, 10, bias=False)
        self.conv = nn.Conv2d(2, 5, 3, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin0(self.emb(ids)))
        h = self.lin1(torch.tanh(self.c1d(h)))  # [N, L, 10]
        n, length, _ = h.shape
        img = h.reshape(n, length, 2, 5).permute(0, 2, 1, 3)  # [N, 2, L, 5]
        return self.conv(torch.tanh(img)).flatten(1)


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def ids(seed: int = 1, batch: int = 3) -> torch.Tensor:
    return torch.randint(0, 13, (batch, 5), generator=torch.Generator().manual_seed(seed))


def randomize(model: nn.Module, seed: int = 2, std: float = 0.4) -> None:
    """Fresh random values for every adapter tensor (the same values for the same tree)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make(lib, adapters: dict[str, dict], seed: int = 3) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        (first, kw), *rest = adapters.items()
        pm = lib.get_peft_model(net(), lib.LoraConfig(**kw), adapter_name=first)
        for name, kw in rest:
            pm.add_adapter(name, lib.LoraConfig(**kw))
    return pm.eval()


def pair(adapters: dict[str, dict]):
    """(peftfast model, PEFT model) with the same base, adapters and (random) adapter values."""
    models = []
    for lib in (peftfast, peft):
        pm = make(lib, adapters)
        randomize(pm)
        models.append(pm)
    return models[0], models[1]


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    assert_matches_float64(what, ours, theirs, ref, K, check_dtype=False)


BIAS_TARGETS = ["lin0", "c1d", "conv"]  # every layer type with a base bias that takes lora_bias


def bias_kw(**extra) -> dict:
    kw = dict(target_modules=BIAS_TARGETS, r=3, lora_alpha=5, lora_bias=True, rank_pattern={"c1d": 2})
    kw.update(extra)
    return kw


# ------------------------------------------------------------------------------------------------------
# lora_bias
# ------------------------------------------------------------------------------------------------------
def test_lora_bias_tree_keys_seeded_init_and_trainable_params_match_peft():
    ours, theirs = (make(lib, {"default": bias_kw()}) for lib in (peftfast, peft))
    so, sp = ours.state_dict(), theirs.state_dict()
    assert list(so) == list(sp)
    for k in so:
        assert so[k].shape == sp[k].shape, k
        if "lora_" in k:
            assert torch.equal(so[k], sp[k]), k  # same seed, same draws; B and its bias zero
    assert all(not so[f"base_model.model.{t}.lora_B.default.bias"].any() for t in BIAS_TARGETS)
    assert list(trainable(ours)) == list(trainable(theirs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.base_model.model.lin0.lora_bias == {"default": True}


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_lora_bias_forward_and_gradients_match_peft(backend):
    """Two active adapters, one with a lora_B bias and one without; the fused op's PyTorch reference and its
    Triton kernels (interpreter) both."""
    dropout = 0.0
    adapters = {"one": bias_kw(lora_dropout=dropout), "two": dict(target_modules=["lin0", "lin1", "conv"], r=2,
                                                                  lora_alpha=3, lora_dropout=dropout)}
    ours, theirs = pair(adapters)
    ref = copy.deepcopy(theirs).double()
    for m in (ours, theirs, ref):
        m.base_model.set_adapter(["one", "two"])
        m.train(dropout > 0)
    x = ids()
    outs = []
    for model in (ours, theirs, ref):
        torch.manual_seed(7)
        y = model(x)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(y.dtype)
        (y * w).sum().backward()
        outs.append((y.detach(), {n: p.grad for n, p in trainable(model).items()}))
    assert_close(outs[0][0], outs[1][0], outs[2][0], "output")
    assert list(outs[0][1]) == list(outs[1][1])
    assert sum("lora_B.one.bias" in n for n in outs[0][1]) == 3
    for name, grad in outs[0][1].items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert_close(grad, outs[1][1][name], outs[2][1][name], name)


@pytest.mark.parametrize("train", [False, True])
def test_lora_bias_adds_scaling_times_bias_outside_dropout(train):
    """PEFT: lora_B(lora_A(dropout(x))) * s, so the bias is scaled but never dropped: with the same dropout mask
    (same seed), zeroing the bias changes the output by exactly s * b."""
    ours, _ = pair({"default": bias_kw(target_modules=["lin0", "c1d"], lora_dropout=0.5)})
    ours.train(train)
    for name, h in (("lin0", torch.randn(4, 7)), ("c1d", torch.randn(2, 3, 9))):
        layer = getattr(ours.base_model.model, name)
        with torch.no_grad():
            torch.manual_seed(4)
            y = layer(h)
            b = layer.lora_B["default"].bias.clone()
            layer.lora_B["default"].bias.zero_()
            torch.manual_seed(4)
            y0 = layer(h)
        assert b.abs().min() > 0
        torch.testing.assert_close(y - y0, (layer.scaling["default"] * b).expand_as(y))


def test_lora_bias_merge_unmerge_safe_merge_and_unload_match_peft():
    ours, theirs = pair({"default": bias_kw()})
    x = ids()
    with torch.no_grad():
        y = ours(x)
        torch.testing.assert_close(y, theirs(x))
        before = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
        ours.merge_adapter()
        theirs.merge_adapter()
        for (n, p), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters()):
            assert n == n2
            torch.testing.assert_close(p, p2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x), y, rtol=1e-4, atol=1e-5)
        ours.unmerge_adapter()
        for n, p in ours.named_parameters():
            if "base_layer" in n:
                torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
        ours.merge_adapter(safe_merge=True)
        torch.testing.assert_close(ours(x), y, rtol=1e-4, atol=1e-5)
        ours.unmerge_adapter()
        merged = ours.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(x), y, rtol=1e-4, atol=1e-5)


def test_lora_bias_safe_merge_refuses_a_non_finite_bias_and_leaves_the_model_unchanged():
    ours, _ = pair({"default": bias_kw()})
    with torch.no_grad():
        ours.base_model.model.conv.lora_B["default"].bias[1] = float("inf")
    before = {n: p.clone() for n, p in ours.named_parameters()}
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        ours.merge_adapter(safe_merge=True)
    for n, p in ours.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not any(getattr(m, "merged", False) for m in ours.modules() if isinstance(m, lora_layer.LoraLayer))


def test_lora_bias_on_a_base_without_bias_warns_and_merge_refuses_without_changing_anything():
    with pytest.warns(peftfast.PeftWarning, match="has no bias"):
        ours = peftfast.get_peft_model(net(), peftfast.LoraConfig(target_modules=["lin0", "lin1"], lora_bias=True))
    randomize(ours)
    before = {n: p.clone() for n, p in ours.named_parameters()}
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True` because the base layer"):
        ours.merge_adapter()
    for n, p in ours.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not ours.base_model.model.lin0.merged  # lin0 has a bias but was not merged alone


def test_lora_bias_refusals_match_peft():
    with pytest.raises(ValueError, match="lora_bias=True is not supported for Embedding"):
        peftfast.get_peft_model(net(), peftfast.LoraConfig(target_modules=["emb"], lora_bias=True))
    with pytest.raises(ValueError, match="not supported for DoRA"):
        peftfast.LoraConfig(lora_bias=True, use_dora=True)
    with pytest.raises(ValueError, match="only supported with init_lora_weights=True or False"):
        peftfast.LoraConfig(lora_bias=True, init_lora_weights="gaussian")


def test_lora_bias_mixed_batch_matches_peft():
    ours, theirs = pair({"one": bias_kw(), "two": bias_kw(lora_bias=False, r=4)})
    x = ids(batch=4)
    names = ["two", "one", "__base__", "one"]
    with torch.no_grad():
        torch.testing.assert_close(ours(x, adapter_names=names), theirs(x, adapter_names=names))


def test_lora_bias_per_token_names_equal_per_sample_names():
    """Per-token adapter_names (a peftfast extension) with every token of a sample on that sample's adapter give
    the per-sample outputs, PEFT's, lora_B biases included."""
    ours, theirs = pair({"one": bias_kw(), "two": bias_kw(r=4)})
    x = ids(batch=3)
    names = ["two", "__base__", "one"]
    lin = ours.base_model.model.lin0
    with torch.no_grad():
        h = torch.randn(3, 5, lin.in_features)
        per_sample = lin(h, adapter_names=names)
        per_token = lin(h, adapter_names=[[n] * 5 for n in names])
        torch.testing.assert_close(per_token, per_sample)
        torch.testing.assert_close(ours(x, adapter_names=names), theirs(x, adapter_names=names))


def test_lora_bias_save_in_peftfast_load_in_peft_and_the_reverse(tmp_path):
    ours, theirs = pair({"default": bias_kw()})
    x = ids()
    with torch.no_grad():
        ours.save_pretrained(tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "peft")
        files = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft")]
        assert sorted(files[0]) == sorted(files[1])
        assert "base_model.model.lin0.lora_B.bias" in files[0]
        for k in files[0]:
            assert torch.equal(files[0][k], files[1][k]), k
        loaded_peft = peft.PeftModel.from_pretrained(net(), tmp_path / "ours")
        torch.testing.assert_close(loaded_peft(x), ours(x))
        loaded_ours = peftfast.PeftModel.from_pretrained(net(), tmp_path / "peft")
        assert loaded_ours.peft_config["default"].lora_bias is True
        torch.testing.assert_close(loaded_ours(x), theirs(x))


# ------------------------------------------------------------------------------------------------------
# PiSSA, OLoRA, orthogonal
# ------------------------------------------------------------------------------------------------------
INIT_TARGETS = {"pissa": ["lin0", "c1d", "lin1"], "pissa_niter_2": ["lin0", "c1d", "lin1"],
                "olora": ["lin0", "lin1"], "orthogonal": ["lin0", "c1d", "lin1"]}


@pytest.mark.parametrize("init", list(INIT_TARGETS))
def test_init_matches_peft_seeded(init):
    """Same seed: PEFT's adapter factors and (PiSSA/OLoRA) residual base weights, with rank/alpha patterns and
    rsLoRA scaling in the mix; then outputs and gradients with the initialised values."""
    kw = dict(target_modules=INIT_TARGETS[init], r=4, lora_alpha=6, init_lora_weights=init,
              rank_pattern={"lin1": 2}, alpha_pattern={"lin0": 3}, use_rslora=init != "olora")
    ours, theirs = (make(peft_lib, {"default": kw}, seed=11) for peft_lib in (peftfast, peft))
    so, sp = ours.state_dict(), theirs.state_dict()
    assert list(so) == list(sp)
    for k in so:
        torch.testing.assert_close(so[k], sp[k], rtol=1e-5, atol=1e-6, msg=k)
    for t in INIT_TARGETS[init]:
        assert so[f"base_model.model.{t}.lora_B.default.weight"].abs().sum() > 0, t
    x = ids()
    ref = copy.deepcopy(theirs).double()
    outs = []
    for model in (ours, theirs, ref):
        y = model(x)
        y.square().sum().backward()
        outs.append((y.detach(), {n: p.grad for n, p in trainable(model).items()}))
    assert_close(outs[0][0], outs[1][0], outs[2][0], "output")
    for name, grad in outs[0][1].items():
        assert_close(grad, outs[1][1][name], outs[2][1][name], name)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_keeps_the_model_function_and_moves_the_top_part_into_the_adapter(init):
    """W = (W - s B A) + s B A: the initialised model computes the base model's function (to rounding); PiSSA's
    adapter holds the best rank-r approximation of W (Eckart-Young), OLoRA's s Q_r R_r of W = Q R."""
    base = net()
    x = ids()
    with torch.no_grad():
        y0 = base(x)
        pm = peftfast.get_peft_model(net(), peftfast.LoraConfig(target_modules=["lin0", "c1d", "lin1"] if init ==
                                                                "pissa" else ["lin0", "lin1"], r=3, lora_alpha=7,
                                                                init_lora_weights=init))
        torch.testing.assert_close(pm(x), y0, rtol=1e-4, atol=1e-5)
        layer = pm.base_model.model.c1d if init == "pissa" else pm.base_model.model.lin0
        w = base.c1d.weight.T if init == "pissa" else base.lin0.weight
        delta = layer.get_delta_weight("default")
        delta = delta.T if init == "pissa" else delta
        if init == "pissa":
            u, s, vh = torch.linalg.svd(w.double())
            best = (u[:, :3] * s[:3]) @ vh[:3]
            torch.testing.assert_close(delta.double(), best, rtol=1e-4, atol=1e-5)
        else:
            q, r = torch.linalg.qr(w.double())
            # OLoRA does not rescale: the delta is s * Q_r R_r (PEFT's math)
            torch.testing.assert_close(delta.double(), layer.scaling["default"] * q[:, :3] @ r[:3], rtol=1e-4,
                                       atol=1e-5)
        merged = pm.merge_and_unload()
        torch.testing.assert_close(merged.lin0.weight, base.lin0.weight, rtol=1e-5, atol=1e-5)


def test_failed_residual_init_puts_the_base_weights_back():
    """PiSSA on lin0 (rank 5 fits) then lin1 (rank 12 > 10 features): refused, and lin0's base weight is back."""
    model = net()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="r <= min"):
        peftfast.get_peft_model(model, peftfast.LoraConfig(target_modules=["lin0", "lin1"], r=5,
                                                           rank_pattern={"lin1": 12}, init_lora_weights="pissa"))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert type(model.lin0) is nn.Linear


def test_init_refusals_are_precise():
    with pytest.raises(ValueError, match="even"):
        peftfast.get_peft_model(net(), peftfast.LoraConfig(target_modules=["lin0"], r=3,
                                                           init_lora_weights="orthogonal"))
    with pytest.raises(ValueError, match="Unknown initialization.*Conv2d"):
        peftfast.get_peft_model(net(), peftfast.LoraConfig(target_modules=["conv"], init_lora_weights="pissa"))
    for name, what in (("loftq", "LoftQ"), ("eva", "EVA"), ("corda", "CorDA"), ("lora_ga", "LoRA-GA")):
        with pytest.raises(ValueError, match=f"init_lora_weights='{name}' asks for {what}"):
            peftfast.LoraConfig(init_lora_weights=name)
    for bad in ("pissa_niter_", "pissa_niter_x", "Gaussian", "svd"):
        with pytest.raises(ValueError, match="supported: True, False"):
            peftfast.LoraConfig(init_lora_weights=bad)
    # an embedding takes its own initialisation whatever is asked, as in PEFT
    pm = peftfast.get_peft_model(net(), peftfast.LoraConfig(target_modules=["emb"], init_lora_weights="olora"))
    assert not pm.base_model.model.emb.lora_embedding_A["default"].any()


# ------------------------------------------------------------------------------------------------------
# BD-LoRA (block-diagonal lora_A or lora_B)
# ------------------------------------------------------------------------------------------------------
def bd_kw(lib, **extra) -> dict:
    """lin0: block-diagonal B (3 blocks of [3, 2]); lin1: block-diagonal A (3 blocks of [2, 4]); c1d: plain LoRA
    (match_strict=False; PEFT 0.21 fails on a block-diagonal factor of a Conv1D)."""
    bd = dict(target_modules_bd_a=["lin1"], target_modules_bd_b=["lin0"], nblocks=3, match_strict=False)
    bd.update(extra)
    return dict(target_modules=["lin0", "c1d", "lin1"], r=6, lora_alpha=4, use_bdlora=lib.BdLoraConfig(**bd))


def test_bdlora_tree_shapes_and_seeded_init_match_peft():
    ours, theirs = (make(lib, {"default": bd_kw(lib)}) for lib in (peftfast, peft))
    so, sp = ours.state_dict(), theirs.state_dict()
    assert list(so) == list(sp)
    for k in so:
        assert so[k].shape == sp[k].shape and torch.equal(so[k], sp[k]), k
    assert so["base_model.model.lin0.lora_B.default.weight"].shape == (9, 2)
    assert so["base_model.model.lin1.lora_A.default.weight"].shape == (6, 4)
    assert type(ours.base_model.model.lin1.lora_A["default"]).__name__ == "BlockDiagonalLinear"
    assert list(trainable(ours)) == list(trainable(theirs))


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_bdlora_forward_gradients_merge_and_dense_equivalence_match_peft(backend):
    ours, theirs = (make(lib, {"default": bd_kw(lib)}) for lib in (peftfast, peft))
    randomize(ours)
    randomize(theirs)
    ref = copy.deepcopy(theirs).double()
    x = ids()
    outs = []
    for model in (ours, theirs, ref):
        y = model(x)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(y.dtype)
        (y * w).sum().backward()
        outs.append((y.detach(), {n: p.grad for n, p in trainable(model).items()}))
    assert_close(outs[0][0], outs[1][0], outs[2][0], "output")
    for name, grad in outs[0][1].items():
        assert grad.abs().sum() > 0, name
        assert_close(grad, outs[1][1][name], outs[2][1][name], name)
    layer = ours.base_model.model.lin0
    b = layer.lora_B["default"]
    dense = b.dense_weight()
    assert dense.shape == (9, 6) and not dense[:3, 2:].any() and not dense[3:6, :2].any()  # zeros off the blocks
    h = torch.randn(2, 6)
    torch.testing.assert_close(b(h), h @ dense.T)
    with torch.no_grad():
        y = ours(x)
        ours.merge_adapter()
        theirs.merge_adapter()
        for (n, p), (_, p2) in zip(ours.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(p, p2, rtol=1e-5, atol=1e-6, msg=n)
        torch.testing.assert_close(ours(x), y, rtol=1e-4, atol=1e-5)


def test_bdlora_save_in_peftfast_load_in_peft_and_the_reverse(tmp_path):
    ours = make(peftfast, {"default": bd_kw(peftfast)})
    theirs = make(peft, {"default": bd_kw(peft)})
    randomize(ours)
    randomize(theirs)
    x = ids()
    with torch.no_grad():
        ours.save_pretrained(tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "peft")
        files = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft")]
        assert sorted(files[0]) == sorted(files[1])
        for k in files[0]:
            assert torch.equal(files[0][k], files[1][k]), k
        loaded_peft = peft.PeftModel.from_pretrained(net(), tmp_path / "ours")
        assert loaded_peft.peft_config["default"].use_bdlora.nblocks == 3
        torch.testing.assert_close(loaded_peft(x), ours(x))
        loaded_ours = peftfast.PeftModel.from_pretrained(net(), tmp_path / "peft")
        assert loaded_ours.peft_config["default"].use_bdlora == peftfast.BdLoraConfig(**{
            k: v for k, v in vars(theirs.peft_config["default"].use_bdlora).items()})
        torch.testing.assert_close(loaded_ours(x), theirs(x))


def test_bdlora_refusals_are_precise_and_leave_the_model_unchanged():
    model = net()
    before = {n: p.clone() for n, p in model.named_parameters()}
    cases = [
        (dict(target_modules_bd_a=["lin0"], target_modules_bd_b=None), "divisible by nblocks=3"),  # 7 inputs
        (dict(target_modules_bd_b=["lin0", "conv"]), "nn.Linear and Conv1D layers only"),
        (dict(match_strict=True), "matches neither A nor B"),
        (dict(target_modules_bd_a=["lin"], target_modules_bd_b=["0"]), "matches both A and B"),
    ]
    for extra, match in cases:
        kw = bd_kw(peftfast, **extra)
        if "conv" in (extra.get("target_modules_bd_b") or []):
            kw["target_modules"] = ["lin0", "conv"]
        with pytest.raises(ValueError, match=match):
            peftfast.get_peft_model(model, peftfast.LoraConfig(**kw))
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n
        assert type(model.lin0) is nn.Linear
    with pytest.raises(ValueError, match="overlapping"):
        peftfast.BdLoraConfig(target_modules_bd_a=["q"], target_modules_bd_b=["q"])
    with pytest.raises(ValueError, match="use_dora"):
        peftfast.LoraConfig(use_dora=True, use_bdlora=peftfast.BdLoraConfig(target_modules_bd_a=["q"]))


# ------------------------------------------------------------------------------------------------------
# MiCA (B from the minor singular vectors, frozen; A zero)
# ------------------------------------------------------------------------------------------------------
def test_mica_init_frozen_b_and_training_match_peft():
    kw = dict(target_modules=["emb", "lin0", "c1d", "lin1"], r=3, lora_alpha=5, init_lora_weights="mica")
    other = dict(target_modules=["lin0"], r=2)
    ours, theirs = (make(lib, {"default": kw, "other": other}) for lib in (peftfast, peft))
    so, sp = ours.state_dict(), theirs.state_dict()
    assert list(so) == list(sp)
    for k in so:
        torch.testing.assert_close(so[k], sp[k], rtol=1e-5, atol=1e-6, msg=k)
    layer = ours.base_model.model.lin0
    assert not layer.lora_A["default"].weight.any()
    w = net().lin0.weight.double()
    u, s, _ = torch.linalg.svd(w)
    b = layer.lora_B["default"].weight.double()
    torch.testing.assert_close(b.T @ w @ w.T @ b, torch.diag(s[-3:] ** 2), rtol=1e-4, atol=1e-5)  # minor part
    for model in (ours, theirs):  # switching adapters and gradients on does not unfreeze B
        model.set_adapter("other")
        model.set_adapter("default")
        model.base_model.set_requires_grad("default", True)
    frozen = sorted(n for n, p in ours.named_parameters() if "default" in n and "lora_" in n and not p.requires_grad)
    assert frozen == sorted(n for n, p in theirs.named_parameters()
                            if "default" in n and "lora_" in n and not p.requires_grad)
    assert len(frozen) == 4 and all("_B" in n for n in frozen)
    randomize(ours)
    randomize(theirs)
    for model in (ours, theirs):  # randomize() wrote B too: keep the frozen B of the init for the step below
        for name, p in model.named_parameters():
            if name in frozen:
                with torch.no_grad():
                    p.copy_(so[name])
    ref = copy.deepcopy(theirs).double()
    x = ids()
    outs = []
    for model in (ours, theirs, ref):
        y = model(x)
        y.square().sum().backward()
        outs.append((y.detach(), {n: p.grad for n, p in trainable(model).items()}))
    assert_close(outs[0][0], outs[1][0], outs[2][0], "output")
    assert list(outs[0][1]) == list(outs[1][1])
    for name, grad in outs[0][1].items():
        assert_close(grad, outs[1][1][name], outs[2][1][name], name)
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.clone() for n, p in ours.named_parameters()}
    opt.step()
    for n, p in ours.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen or "lora_" not in n or "other" in n), n


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_olora_saved_as_lora_of_the_original_base_as_in_peft(tmp_path, init, rslora):
    """save_pretrained(path_initial_model_for_weight_conversion=...) writes a rank-2r LoRA adapter of the unmodified
    base: loaded in PEFT onto the original base it gives the trained PiSSA/OLoRA model's output; PEFT's conversion
    of the same model writes the same tensors and config."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(23, 17), nn.Tanh(), nn.Linear(17, 11))
    x = torch.randn(6, 23)
    outputs, files = {}, {}
    for lib in (peftfast, peft):
        torch.manual_seed(1)
        config = lib.LoraConfig(target_modules=["0", "2"], r=4, lora_alpha=6, init_lora_weights=init, use_rslora=rslora)
        model = lib.get_peft_model(copy.deepcopy(base), config)
        model.save_pretrained(tmp_path / lib.__name__ / "init")
        with torch.no_grad():  # "training": the same change in both libraries
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        outputs[lib.__name__] = model(x)
        model.save_pretrained(tmp_path / lib.__name__ / "lora",
                              path_initial_model_for_weight_conversion=str(tmp_path / lib.__name__ / "init"))
        files[lib.__name__] = load_file(tmp_path / lib.__name__ / "lora" / "adapter_model.safetensors")
        assert model.peft_config["default"].r == 4  # the model's own config is unchanged
    assert files["peftfast"].keys() == files["peft"].keys()
    for key, value in files["peftfast"].items():
        torch.testing.assert_close(value, files["peft"][key], rtol=1e-5, atol=1e-6)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peftfast" / "lora")
    assert loaded.peft_config["default"].r == 8
    torch.testing.assert_close(loaded(x), outputs["peftfast"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs["peftfast"], outputs["peft"], rtol=1e-4, atol=1e-5)


def test_conversion_refused_for_rslora_with_patterns_before_writing(tmp_path):
    model = peftfast.get_peft_model(nn.Sequential(nn.Linear(9, 7)), peftfast.LoraConfig(
        target_modules=["0"], r=4, init_lora_weights="pissa", use_rslora=True, rank_pattern={"0": 2}))
    model.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="use_rslora=True"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
