"""VeLoRA (``LoraConfig(velora_config=VeloraConfig(...))``) against the real PEFT 0.21.

VeLoRA's lora_A gradient is an approximation by design (from a rank-1-per-group compression of lora_A's
input); peftfast must reproduce PEFT's approximation, not the exact LoRA gradient. A small model holds the
layer types VeLoRA supports (nn.Linear with and without bias, GPT-2's Conv1D) with odd feature counts, so
groups are padded, and some group counts leave whole groups empty. PEFT's model gets random adapter weights,
peftfast's loads them by state-dict key; both train for a few steps on fresh random inputs (the
batch-average projections are updated by each step) and every output, gradient and projection vector is
compared: in float64 tightly, in float32 against a float64 copy of PEFT's model (a few times PEFT's own
error, floor of an ulp).
"""
from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import velora as peft_velora
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftfast
from peftfast.tuners.lora import velora as fast_velora
from tests.numerics import assert_matches_float64, max_err

K_ERR = 4
TARGETS = ["lin", "lin_nb", "c1d"]
INIT_TYPES = ["random", "batch_average", "batch_average_once"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(13, 11)
        self.lin_nb = nn.Linear(11, 9, bias=False)
        self.c1d = Conv1D(7, 9)  # GPT-2's layer: weight [in=9, out=7]
        self.head = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.c1d(torch.tanh(self.lin_nb(torch.tanh(self.lin(x)))))))


def _configs(velora_kwargs: dict, **kwargs) -> tuple[peft.LoraConfig, peftfast.LoraConfig]:
    kwargs = {"target_modules": TARGETS, "r": 3, "lora_alpha": 5, **kwargs}
    return (peft.LoraConfig(velora_config=peft.VeloraConfig(**velora_kwargs), **kwargs),
            peftfast.LoraConfig(velora_config=peftfast.VeloraConfig(**velora_kwargs), **kwargs))


def _pair(velora_kwargs: dict, dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs):
    """(PEFT model, peftfast model) on the same base, with the same random (non-zero) adapter weights and
    projection vectors."""
    torch.manual_seed(seed)
    base = Net()
    pcfg, fcfg = _configs(velora_kwargs, **kwargs)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg).to(dtype)
    fm = peftfast.get_peft_model(copy.deepcopy(base), fcfg).to(dtype)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.4)
    fm.load_state_dict(pm.state_dict())
    return pm, fm


def _layers(model) -> dict[str, nn.Module]:
    return {n: getattr(model.base_model.model, n) for n in TARGETS}


def _step(model, x: torch.Tensor, g: torch.Tensor, seed: int):
    model.zero_grad()
    xi = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout masks in both libraries
    out = model(xi)
    out.backward(g)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    embeds = {k: v.clone() for k, v in model.state_dict().items() if "velora_embed" in k}
    return out.detach(), xi.grad, grads, embeds


def _train_and_compare(pm, fm, check, steps: int = 3, shape=(3, 5), dtype: torch.dtype = torch.float64) -> None:
    pm.train()
    fm.train()
    for step in range(steps):
        x = (torch.randn(*shape, 13, dtype=torch.float64) * (1 + step)).to(dtype)  # fresh, shifted statistics
        g = torch.randn(*shape, 5, dtype=dtype)
        got, want = _step(fm, x, g, 100 + step), _step(pm, x, g, 100 + step)
        check("output", got[0], want[0])
        check("input grad", got[1], want[1])
        assert got[2].keys() == want[2].keys() and len(want[2]) >= 2 * len(TARGETS)
        for name in want[2]:
            check(name, got[2][name], want[2][name])
        assert got[3].keys() == want[3].keys() and len(want[3]) == len(TARGETS)
        for name in want[3]:
            check(name, got[3][name], want[3][name])


def _tight(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, name
    tol = 1e-12 * max(1.0, want.abs().max().item())
    assert max_err(got, want) <= tol, f"{name}: {max_err(got, want):.3e} > {tol:.3e}"


@pytest.mark.parametrize("init_type", INIT_TYPES)
@pytest.mark.parametrize("num_groups", [4, 7, 1, 20])
def test_float64_training_matches_peft(init_type, num_groups):
    """Every output, gradient and projection vector equals PEFT's in float64, over several training steps; the
    group counts give padded groups (4, 7), one group, and more groups than features (20: empty groups)."""
    pm, fm = _pair({"num_groups": num_groups, "init_type": init_type, "scale": 0.7}, torch.float64, seed=num_groups)
    _train_and_compare(pm, fm, _tight)


@pytest.mark.parametrize("init_type", INIT_TYPES)
def test_float64_dropout_lora_bias_rslora(init_type):
    """Dropout (the same masks as PEFT's nn.Dropout under one seed), a lora_B bias and rsLoRA scaling."""
    pm, fm = _pair({"num_groups": 3, "init_type": init_type, "scale": 1.3}, torch.float64, seed=5,
                   lora_dropout=0.3, lora_bias=True, use_rslora=True)
    _train_and_compare(pm, fm, _tight, shape=(2, 3, 4))


@pytest.mark.parametrize("init_type", INIT_TYPES)
def test_float32_training_as_close_to_float64_as_peft(init_type):
    """float32: peftfast within a few times PEFT's own error of a float64 copy of PEFT's model."""
    pm, fm = _pair({"num_groups": 5, "init_type": init_type, "scale": 0.9}, torch.float32, seed=11)
    ref = copy.deepcopy(pm).to(torch.float64)
    pm.train(), fm.train(), ref.train()
    for step in range(3):
        x = torch.randn(4, 3, 13, dtype=torch.float64) * (1 + step)
        g = torch.randn(4, 3, 5, dtype=torch.float64)
        got, plain, want = _step(fm, x.float(), g.float(), step), _step(pm, x.float(), g.float(), step), \
            _step(ref, x, g, step)
        assert_matches_float64("output", got[0], plain[0], want[0], K_ERR)
        assert_matches_float64("input grad", got[1], plain[1], want[1], K_ERR)
        assert want[2].keys() == got[2].keys() == plain[2].keys()
        for name in want[2]:
            assert_matches_float64(name, got[2][name], plain[2][name], want[2][name], K_ERR)
        for name in want[3]:
            assert_matches_float64(name, got[3][name], plain[3][name], want[3][name], K_ERR, check_dtype=False)


def test_gradient_is_velora_approximation_not_exact():
    """The lora_A gradient is VeLoRA's (equal to the formula from the compressed input) and differs from
    plain LoRA's exact gradient; lora_B's and the input's are exact."""
    torch.manual_seed(3)
    base = nn.Linear(10, 6, bias=False).double()
    cfg = peftfast.LoraConfig(target_modules=["lin"], r=2, lora_alpha=3, init_lora_weights=False,
                              velora_config=peftfast.VeloraConfig(num_groups=3, init_type="random", scale=0.5))
    wrap = nn.Sequential()
    wrap.add_module("lin", base)
    fm = peftfast.get_peft_model(wrap, cfg).train()
    layer = fm.base_model.model.lin
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    e = layer.lora_velora_embed["default"]
    s = layer.scaling["default"]
    x = torch.randn(7, 10, dtype=torch.float64)
    g = torch.randn(7, 6, dtype=torch.float64)
    fm(x).backward(g)
    d = 4  # ceil(10 / 3), the input padded to 12
    xp = F.pad(x, (0, 2)).view(7, 3, d)
    c = xp @ e                                              # [7, 3]
    x_hat = (c.unsqueeze(-1) * e).reshape(7, 12)[:, :10] * 0.5
    ga = (g * s) @ b
    torch.testing.assert_close(a.grad, ga.T @ x_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, (g * s).T @ (x @ a.T), rtol=1e-12, atol=1e-12)
    assert max_err(a.grad, ga.T @ x) > 1e-3  # not the exact gradient


@pytest.mark.parametrize("shape, num_groups", [((2, 3, 5), 2), ((4, 16), 7), ((1, 1, 1, 9), 9), ((3, 6), 8)])
def test_projection_function_matches_peft(shape, num_groups):
    """``VeloraProjection`` against PEFT's ``VeloraFunction``: output, input and weight gradients, odd shapes."""
    torch.manual_seed(7)
    x = torch.randn(*shape, dtype=torch.float64)
    w = torch.randn(4, shape[-1], dtype=torch.float64)
    d = fast_velora.group_dim(shape[-1], num_groups)
    e = fast_velora.unit_projection(torch.randn(d)).double()
    g = torch.randn(*shape[:-1], 4, dtype=torch.float64)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    out1 = fast_velora.VeloraProjection.apply(x1, w1, e, num_groups, 0.8)
    out2 = peft_velora.VeloraFunction.apply(x2, w2, None, e, num_groups, 0.8)
    out1.backward(g)
    out2.backward(g)
    for name, got, want in (("out", out1, out2), ("dx", x1.grad, x2.grad), ("dw", w1.grad, w2.grad)):
        _tight(name, got, want)
    _tight("compressed", fast_velora.compress(x.reshape(-1, shape[-1]), e, num_groups),
           peft_velora._compress_activations(x, e, num_groups))


def test_several_adapters_velora_and_plain_lora_trained_together():
    """A VeLoRA adapter and a plain one active together (the plain one on peftfast's LoRA op): PEFT's outputs
    and gradients."""
    torch.manual_seed(2)
    base = Net().double()
    pv, fv = _configs({"num_groups": 3, "init_type": "batch_average"}, init_lora_weights=False)
    pp, fp = (lib.LoraConfig(target_modules=["lin", "c1d"], r=2, lora_alpha=4, init_lora_weights=False)
              for lib in (peft, peftfast))
    pm = peft.get_peft_model(copy.deepcopy(base), pv, adapter_name="v")
    pm.add_adapter("p", pp)
    fm = peftfast.get_peft_model(copy.deepcopy(base), fv, adapter_name="v")
    fm.add_adapter("p", fp)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.4)
    fm.load_state_dict(pm.state_dict())
    for model in (pm, fm):
        model.base_model.set_adapter(["v", "p"])
        model.train()
    for step in range(2):
        x = torch.randn(3, 4, 13, dtype=torch.float64)
        g = torch.randn(3, 4, 5, dtype=torch.float64)
        got, want = _step(fm, x, g, step), _step(pm, x, g, step)
        _tight("output", got[0], want[0])
        _tight("input grad", got[1], want[1])
        assert got[2].keys() == want[2].keys() and any(".p." in n for n in want[2])
        for name in want[2]:
            _tight(name, got[2][name], want[2][name])
        for name in want[3]:
            _tight(name, got[3][name], want[3][name])


@pytest.mark.parametrize("init_type", INIT_TYPES)
def test_eval_and_no_grad_are_plain_lora_and_leave_the_projection(init_type):
    """Without a gradient (eval, or torch.no_grad in training) VeLoRA is plain LoRA and the projection vector
    is not touched; merging gives the same outputs."""
    pm, fm = _pair({"num_groups": 4, "init_type": init_type}, torch.float64, seed=9)
    before = {k: v.clone() for k, v in fm.state_dict().items() if "velora_embed" in k}
    x = torch.randn(5, 13, dtype=torch.float64)
    fm.eval(), pm.eval()
    _tight("eval", fm(x), pm(x))
    fm.train(), pm.train()
    with torch.no_grad():
        _tight("no_grad", fm(x), pm(x))
    for k, v in fm.state_dict().items():
        if "velora_embed" in k:
            assert torch.equal(v, before[k]), k
    fm.eval()
    unmerged = fm(x)
    merged = fm.merge_and_unload()
    _tight("merged", merged(x), unmerged)


@pytest.mark.parametrize("init_type", INIT_TYPES)
def test_save_load_both_ways(tmp_path, init_type):
    """peftfast's files load into PEFT and PEFT's into peftfast: weights, projection vectors, config and
    training outputs/gradients agree afterwards."""
    pm, fm = _pair({"num_groups": 6, "init_type": init_type, "scale": 0.6}, torch.float32, seed=13)
    pm.train(), fm.train()
    x = torch.randn(3, 13)
    pm(x), fm(x)  # sets the batch-average projections
    fm.save_pretrained(tmp_path / "fast")
    pm.save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    base = Net()
    into_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fast", is_trainable=True)
    into_fast = peftfast.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    for cfg in (into_peft.peft_config["default"], into_fast.peft_config["default"]):
        assert cfg.velora_config.num_groups == 6 and cfg.velora_config.init_type == init_type
        assert cfg.velora_config.scale == 0.6
    assert isinstance(into_fast.peft_config["default"].velora_config, peftfast.VeloraConfig)
    for model, source in ((into_peft, fm), (into_fast, pm)):
        want = {k: v for k, v in source.state_dict().items() if "lora_" in k}
        assert any("velora_embed" in k for k in want)
        state = model.state_dict()
        for k, v in want.items():
            assert torch.equal(state[k], v), k
    # a loaded adapter does not know whether its projection was set from a batch yet: as PEFT, the first
    # training step sets it again (batch_average_once included)
    _train_and_compare(into_peft, into_fast, _close32, steps=2, dtype=torch.float32)


def _close32(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """float32 models with the same weights: equal up to float32 rounding of a few operations."""
    assert got.dtype == want.dtype, name
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def _saved(fn) -> list[tuple[tuple[int, ...], int]]:
    """(shape, bytes) of each tensor autograd saves for backward while ``fn`` runs (each storage once)."""
    seen: dict = {}

    def pack(t: torch.Tensor):
        seen.setdefault((t.untyped_storage().data_ptr(), t.dtype), (tuple(t.shape), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(seen.values())


@pytest.mark.parametrize("x_grad", [False, True])
def test_saved_activation_memory_smaller_than_plain_lora(x_grad):
    """Measured with saved_tensors_hooks on one layer (N=512 tokens, in=1024, out=512, r=8, 32 groups), fp32.
    Activations (saved tensors with N rows, less the [N, out] output the loss keeps in both): plain LoRA keeps
    lora_A's input [N, in] and [N, r]; VeLoRA keeps [N, 32] and [N, r]: 26x less. In all, no more than PEFT's
    VeLoRA saves."""
    n, k, o, r, groups = 512, 1024, 512, 8, 32

    def model(lib, velora):
        kw = {"velora_config": lib.VeloraConfig(num_groups=groups, init_type="random")} if velora else {}
        seq = nn.Sequential()
        seq.add_module("lin", nn.Linear(k, o))
        torch.manual_seed(1)
        return lib.get_peft_model(seq, lib.LoraConfig(target_modules=["lin"], r=r, init_lora_weights=False,
                                                      **kw)).train()

    torch.manual_seed(0)
    x = torch.randn(n, k, requires_grad=x_grad)

    def measure(lib, velora):
        m = model(lib, velora)
        saved = _saved(lambda: m(x).square().mean())
        acts = sum(b for shape, b in saved if shape[0] == n and shape != (n, o))
        return acts, sum(b for _, b in saved), saved

    plain_act, plain_total, _ = measure(peftfast, False)
    vel_act, vel_total, saved = measure(peftfast, True)
    _, peft_total, _ = measure(peft, True)
    assert (n, k) not in [shape for shape, _ in saved]  # the input itself is not kept
    assert plain_act == 4 * n * (k + r)
    assert vel_act == 4 * n * (groups + r)
    assert vel_total < plain_total and vel_total <= peft_total
    print(f"\nsaved for backward (x requires grad: {x_grad}): activations plain LoRA {plain_act} B, VeLoRA "
          f"{vel_act} B; everything saved: plain LoRA {plain_total} B, VeLoRA {vel_total} B, PEFT's VeLoRA "
          f"{peft_total} B")


def test_refusals_leave_the_model_unchanged():
    """VeLoRA on an embedding or a convolution, or with DoRA / BD-LoRA / MiCA, is refused (as PEFT refuses
    these combinations); a refused add_adapter leaves the model as it was."""
    with pytest.raises(ValueError, match="velora_config cannot be combined with use_dora"):
        peftfast.LoraConfig(use_dora=True, velora_config=peftfast.VeloraConfig())
    with pytest.raises(ValueError, match="use_bdlora"):
        peftfast.LoraConfig(use_bdlora=peftfast.BdLoraConfig(target_modules_bd_a=["x"]),
                            velora_config=peftfast.VeloraConfig())
    with pytest.raises(ValueError, match="`num_groups` should be positive, got 0."):
        peftfast.VeloraConfig(num_groups=0)
    with pytest.raises(ValueError, match="Unsupported `init_type`"):
        peftfast.VeloraConfig(init_type="mean")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)  # first: it gets its VeLoRA state before the refusal, which must undo it
            self.emb = nn.Embedding(10, 6)
            self.conv = nn.Conv1d(6, 4, 3)

        def forward(self, ids):
            return self.conv(self.lin(self.emb(ids)).transpose(1, 2))  # not called

    model = peftfast.get_peft_model(M(), peftfast.LoraConfig(target_modules=["lin"], r=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    repr_before = repr(model)
    for target, msg in (("emb", "VeLoRA does not support adapting a Embedding"),
                        ("conv", "VeLoRA does not support adapting conv layers")):
        with pytest.raises(ValueError, match=msg):
            model.add_adapter("v", peftfast.LoraConfig(target_modules=["lin", target], r=2,
                                                        velora_config=peftfast.VeloraConfig(num_groups=2)))
        assert repr(model) == repr_before and list(model.peft_config) == ["default"]
        assert model.state_dict().keys() == before.keys()
        lin = model.base_model.model.lin
        assert lin.velora_adapters() == {} and "v" not in lin.lora_A and not hasattr(lin, "lora_velora_embed")


def test_delete_adapter_and_readd_as_plain_lora():
    pm, fm = _pair({"num_groups": 3, "init_type": "random"})
    layer = fm.base_model.model.lin
    assert "default" in layer.lora_velora_embed and layer.lora_velora_num_groups["default"] == 3
    fm.add_adapter("other", peftfast.LoraConfig(target_modules=TARGETS, r=2))
    fm.delete_adapter("default")
    for name in ("lora_velora_embed", "lora_velora_initialized", "lora_velora_num_groups", "lora_velora_init_type",
                 "lora_velora_scale"):
        assert "default" not in getattr(layer, name), name
    assert layer.velora_training(["other"]) == []


@pytest.mark.parametrize("init_type", ["random", "batch_average"])
def test_bfloat16_autocast_as_close_to_float64_as_peft(init_type):
    """Under torch.autocast (CPU, bfloat16) with float32 weights: output and input gradient as PEFT's; the
    lora_A gradient (summed in float32 here) at most a few times PEFT's error of a float64 model without
    autocast."""
    pm, fm = _pair({"num_groups": 4, "init_type": init_type}, torch.float32, seed=17)
    ref = copy.deepcopy(pm).to(torch.float64)
    x = torch.randn(6, 4, 13, dtype=torch.float64)
    g = torch.randn(6, 4, 5, dtype=torch.float64)
    results = []
    for model, cast in ((fm, True), (pm, True), (ref, False)):
        model.train()
        xi = (x if not cast else x.float()).clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            out = model(xi)
        out.backward(g.to(out.dtype))
        results.append((out, xi.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (got, plain, want) = results
    assert got[0].dtype == plain[0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], plain[1], rtol=0, atol=0)
    for name in want[2]:
        assert got[2][name].dtype == torch.float32, name
        assert_matches_float64(name, got[2][name], plain[2][name], want[2][name], K_ERR)


def test_mixed_batch_training_each_sample_its_adapter():
    """Training on one batch mixing two VeLoRA adapters and the base (peftfast's train_mixed_batches; PEFT refuses
    training with adapter_names): each adapter's gradients and projection vector are those of a step on its own
    samples alone; per-token adapter names are refused in training."""
    torch.manual_seed(21)
    base = Net().double()
    cfg = {"target_modules": TARGETS, "r": 2, "lora_alpha": 3, "init_lora_weights": False}
    fm = peftfast.get_peft_model(copy.deepcopy(base), peftfast.LoraConfig(
        velora_config=peftfast.VeloraConfig(num_groups=3, init_type="batch_average"), **cfg), adapter_name="a")
    fm.add_adapter("b", peftfast.LoraConfig(velora_config=peftfast.VeloraConfig(num_groups=5, init_type="random"),
                                            **cfg))
    fm.base_model.train_mixed_batches = True
    fm.train()
    x = torch.randn(5, 3, 13, dtype=torch.float64)
    names = ["a", "b", "__base__", "a", "b"]
    fm.base_model.set_adapter(["a", "b"])
    out = fm(x, adapter_names=names)
    out.square().sum().backward()
    mixed = {n: p.grad.clone() for n, p in fm.named_parameters() if p.grad is not None}
    embeds = {k: v.clone() for k, v in fm.state_dict().items() if "velora_embed" in k}
    for adapter in ("a", "b"):
        rows = [i for i, n in enumerate(names) if n == adapter]
        alone = copy.deepcopy(fm)
        alone.zero_grad()
        alone.base_model.set_adapter(adapter)
        alone(x[rows]).square().sum().backward()
        _tight(f"{adapter} rows", out[rows].detach(), alone(x[rows]).detach())
        for n, p in alone.named_parameters():
            if f".{adapter}." in n and p.grad is not None:
                _tight(n, mixed[n], p.grad)
        for k, v in alone.state_dict().items():
            if "velora_embed" in k and k.endswith(f".{adapter}"):
                _tight(k, embeds[k], v)
    with pytest.raises(ValueError, match="per token is not supported"):
        fm(x, adapter_names=[["a", "b", "a"]] * 5)


def test_velora_next_to_a_dora_adapter():
    """A VeLoRA adapter active together with a DoRA adapter on the same layers: PEFT's outputs, gradients and
    projection vectors (the VeLoRA adapter keeps its approximate gradient on the DoRA path)."""
    torch.manual_seed(23)
    base = Net().double()
    pv, fv = _configs({"num_groups": 3, "init_type": "batch_average"}, init_lora_weights=False)
    pd, fd = (lib.LoraConfig(target_modules=TARGETS, r=2, lora_alpha=4, use_dora=True, init_lora_weights=False)
              for lib in (peft, peftfast))
    pm = peft.get_peft_model(copy.deepcopy(base), pd, adapter_name="d")
    pm.add_adapter("v", pv)
    fm = peftfast.get_peft_model(copy.deepcopy(base), fd, adapter_name="d")
    fm.add_adapter("v", fv)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                p.copy_(torch.randn_like(p) * 0.4)
    fm.load_state_dict(pm.state_dict())
    for model in (pm, fm):
        model.base_model.set_adapter(["d", "v"])
        model.train()
    for step in range(2):
        x = torch.randn(3, 4, 13, dtype=torch.float64)
        g = torch.randn(3, 4, 5, dtype=torch.float64)
        got, want = _step(fm, x, g, step), _step(pm, x, g, step)
        _tight("output", got[0], want[0])
        _tight("input grad", got[1], want[1])
        assert got[2].keys() == want[2].keys() and any(".v." in n for n in want[2])
        for name in want[2]:
            _tight(name, got[2][name], want[2][name])
        assert want[3]
        for name in want[3]:
            _tight(name, got[3][name], want[3][name])
