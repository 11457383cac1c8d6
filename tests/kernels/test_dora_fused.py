"""dora_linear_fused (DoRA's per-column scale inside the fused LoRA GEMMs) against float64.

y = y_pre + (mns - 1) * y_pre + bias, mns = m / norm (norm a constant), y_pre = x @ W^T + s * x @ A^T @ B^T;
gradients of x, bias, A, B and m (dL/dm = sum_tokens dY * y_pre / norm). Tolerances as in
test_lora_fused.py: at most K_TOL times the error of plain PyTorch (F.linear, PEFT's adapter math, then
PEFT's ``y + (mns - 1) * (y - bias)``) in the same dtypes, plus one ulp of the largest reference value.
Both backends: the Triton kernels (interpreter) and the PyTorch path.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from peftfast.kernels import lora_fused as LF

from tests._autograd import record_saved
from tests.numerics import allowed_error, max_err

K_TOL = 4.0
F16, F32 = torch.float16, torch.float32


def make(t, d_in, d_out, r, xdt, wdt, bias=True, zero_cols=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d_in, generator=g).to(xdt)
    w = (torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)).to(xdt)
    b = torch.randn(d_out, generator=g).to(xdt) if bias else None
    a = (torch.randn(r, d_in, generator=g) / math.sqrt(d_in)).to(wdt)
    bb = (torch.randn(d_out, r, generator=g) / math.sqrt(r)).to(wdt)
    norm = 0.5 + torch.rand(d_out, generator=g)
    m = norm * (1 + 0.3 * torch.randn(d_out, generator=g))  # mns = m / norm around 1
    m[list(zero_cols)] = 0.0
    dy = torch.randn(t, d_out, generator=g).to(xdt)
    return x, w, b, a, bb, 1.75, (m, norm), dy


def leaf(t, dtype=None):
    return None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True)


def run(fn, inputs, dtype=None):
    """(y, [dx, (dbias), dA, dB, dm]) of ``fn(x, w, bias, a, b, s, (m, norm))``, leaves cast to ``dtype``."""
    x, w, bias, a, b, s, (m, norm), dy = inputs
    xs, bs, as_, bbs, ms = leaf(x, dtype), leaf(bias, dtype), leaf(a, dtype), leaf(b, dtype), leaf(m, dtype)
    y = fn(xs, w.to(dtype or w.dtype), bs, as_, bbs, s, (ms, norm.to(dtype or norm.dtype)))
    y.backward(dy.to(y.dtype))
    grads = [xs.grad] + ([] if bs is None else [bs.grad]) + [as_.grad, bbs.grad, ms.grad]
    return y.detach(), grads


def plain(x, w, bias, a, b, s, m_norm):
    """F.linear, PEFT's adapter term (x cast to the adapter dtype), then PEFT's DoRA scale."""
    mns = m_norm[0] / m_norm[1]
    y = (F.linear(x, w, bias) + ((x.to(a.dtype) @ a.t()) @ b.t()) * s).to(x.dtype)
    out = y * mns if bias is None else y + (mns - 1) * (y - bias)
    return out.to(x.dtype)


def op(x, w, bias, a, b, s, m_norm):
    return LF.dora_linear_fused(x, w, bias, [a], [b], [s], *m_norm)


def assert_matches_float64(inputs):
    y, grads = run(op, inputs)
    y64, g64 = run(plain, inputs, torch.float64)
    y_pt, g_pt = run(plain, inputs)
    names = ["y", "dx"] + (["dbias"] if inputs[2] is not None else []) + ["dA", "dB", "dm"]
    assert y.dtype == inputs[0].dtype and grads[-1].dtype == torch.float32
    for name, got, pt, ref in zip(names, [y] + grads, [y_pt] + g_pt, [y64] + g64):
        assert got.shape == ref.shape, name
        assert ref.abs().max() > 0, name
        err, allowed = max_err(got, ref), allowed_error(pt, ref, K_TOL, got.dtype)
        assert err <= allowed, f"{name}: error {err:.3e} vs float64 > allowed {allowed:.3e}"


CASES = [  # (tokens, d_in, d_out, rank, (x dtype, adapter dtype), bias, columns with mns == 0)
    (5, 203, 97, 7, (F32, F32), True, ()),          # decode-sized
    (3, 77, 130, 1, (F16, F32), False, ()),
    (113, 203, 97, 16, (F16, F16), True, ()),
    (300, 96, 97, 7, (F16, F32), True, (0, 40, 96)),  # several row blocks and splits of the dY pass
    (300, 203, 67, 5, (F32, F32), False, (3,)),
    (129, 65, 300, 20, (F16, F16), False, (299,)),    # two N blocks of the dY pass, a rank above 16
]


@pytest.mark.parametrize("t,d_in,d_out,r,dtypes,bias,zero_cols", CASES)
def test_forward_and_every_gradient_match_float64(backend, t, d_in, d_out, r, dtypes, bias, zero_cols):
    assert_matches_float64(make(t, d_in, d_out, r, *dtypes, bias=bias, zero_cols=zero_cols))


@pytest.mark.parametrize("dtypes", [(F32, F32), (F16, F32), (F16, F16)], ids=["f32", "f16-f32", "f16"])
@pytest.mark.parametrize("t", [3, 150])
def test_mns_one_is_the_lora_output_bit_for_bit(backend, dtypes, t):
    """A fresh adapter (m == norm, so mns == 1 exactly) returns lora_linear_fused's output bit for bit."""
    x, w, bias, a, b, s, (_, norm), _ = make(t, 203, 97, 7, *dtypes)
    y = LF.dora_linear_fused(x, w, bias, [a], [b], [s], norm.clone(), norm)
    assert torch.equal(y, LF.lora_linear_fused(x, w, bias, [a], [b], [s], [0.0], False))


def test_zero_columns_give_the_exact_gradient(backend):
    """m == 0: y is the bias there and y_pre cannot be recovered from it; dL/dm of those columns is
    recomputed (finite, equal to sum dY * y_pre / norm), not 0/0."""
    inputs = make(70, 96, 40, 4, F32, F32, zero_cols=(1, 2, 39))
    _, grads = run(op, inputs)
    _, g64 = run(plain, inputs, torch.float64)
    dm, dm64 = grads[-1], g64[-1]
    assert torch.isfinite(dm).all()
    cols = [1, 2, 39]
    assert dm64[cols].abs().min() > 1e-2
    assert max_err(dm[cols], dm64[cols]) <= 1e-4 * dm64.abs().max().item()


def test_saves_x_t_and_y_only(triton_kernels):
    """Beyond x, the output y (which the next layer holds anyway), t [T, R], m and the norm: no y_pre, no
    dY * mns."""
    x, w, bias, a, b, s, (m, norm), dy = make(113, 203, 97, 7, F16, F32)
    xs, bs, as_, bbs, ms = leaf(x), leaf(bias), leaf(a), leaf(b), leaf(m)
    params = {t.data_ptr() for t in (w, as_, bbs, bs)}
    y, saved = record_saved(lambda: LF.dora_linear_fused(xs, w, bs, [as_], [bbs], [s], ms, norm))
    y.backward(dy)
    activations = [t for t in saved if t.data_ptr() not in params]
    big = [t for t in activations if t.numel() >= 113 * 97]
    assert {t.data_ptr() for t in big} == {xs.data_ptr(), y.data_ptr()}
    small = sum(t.numel() * t.element_size() for t in activations if t.numel() < 113 * 97)
    assert small == 113 * 7 * 4 + 2 * 97 * 4, "t [T, R] in the adapter dtype, m and norm [N] fp32"


@pytest.mark.parametrize("needs", ["m", "x", "b", "a-b"])
def test_partial_gradient_sets(backend, needs):
    """Each gradient alone (the paths that do not run the fused dY pass) matches the full backward's."""
    inputs = make(37, 48, 33, 5, F32, F32)
    y_full, g_full = run(op, inputs)
    x, w, bias, a, b, s, (m, norm), dy = inputs
    want = {"m": "m", "x": "x", "b": "b", "a-b": "ab"}[needs]
    xs = x.detach().requires_grad_("x" in want)
    as_ = a.detach().requires_grad_("a" in want)
    bbs = b.detach().requires_grad_("b" in want)
    ms = m.detach().requires_grad_("m" in want)
    LF.dora_linear_fused(xs, w, bias, [as_], [bbs], [s], ms, norm).backward(dy)
    full = dict(zip(["x", "bias", "a", "b", "m"], g_full))
    for name, t in (("x", xs), ("a", as_), ("b", bbs), ("m", ms)):
        if t.requires_grad:
            assert max_err(t.grad, full[name]) <= 1e-5 * full[name].abs().max().item(), name


def test_errors(backend):
    x, w, bias, a, b, s, (m, norm), _ = make(11, 20, 13, 3, F32, F32)
    with pytest.raises(ValueError, match="magnitude must be"):
        LF.dora_linear_fused(x, w, bias, [a], [b], [s], m[:5], norm)
    with pytest.raises(ValueError, match="norm must be"):
        LF.dora_linear_fused(x, w, bias, [a], [b], [s], m, norm[:5])
    with pytest.raises(ValueError, match="frozen base weight"):
        LF.dora_linear_fused(x, w.clone().requires_grad_(True), bias, [a], [b], [s], m, norm)


def test_opcheck(backend):
    """Schema, fake impl, registered autograd and AOT dispatch of peftfast::dora_linear_fused."""
    x, w, bias, a, b, s, (m, norm), _ = make(9, 24, 17, 3, F32, F32)
    args = (x.requires_grad_(True), w, bias.requires_grad_(True), [leaf(a)], [leaf(b)], [s], leaf(m), norm)
    torch.library.opcheck(torch.ops.peftfast.dora_linear_fused.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("n,k,r,dtypes", [(97, 203, 7, (F32, F32)), (130, 77, 20, (F16, F32)),
                                         (33, 300, 1, (F16, F16))])
def test_row_norm_kernel_matches_float64(triton_kernels, n, k, r, dtypes):
    """||W + s B A||_row from one kernel against the materialised float64 sum, to ~fp32 accuracy."""
    _, w, _, a, b, s, _, _ = make(3, k, n, r, *dtypes)
    got = LF.dora_row_norm_fused(w, [a], [b], [s])
    ref = (w.double() + s * b.double() @ a.double()).norm(dim=1)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert max_err(got, ref) <= 8 * torch.finfo(torch.float32).eps * ref.max().item()
    assert LF.dora_row_norm_fused(w, [], [], []) is None


def test_row_norm_is_left_to_torch_off_triton(torch_backend):
    _, w, _, a, b, s, _, _ = make(3, 20, 13, 3, F32, F32)
    assert LF.dora_row_norm_fused(w, [a], [b], [s]) is None
