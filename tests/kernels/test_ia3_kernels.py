"""IA3 ops (Triton kernels under the interpreter, and the PyTorch reference) against float64.

Same tolerance rule as the LoRA tests: error vs a float64 evaluation of PEFT's IA3 math
<= K_TOL x the error of plain PyTorch running PEFT's math in the same dtypes + 1 ulp of the
largest reference value.
"""
import pytest
import torch
import torch.nn.functional as F
from peftfast.kernels import ia3 as I

from tests._autograd import record_saved
from tests.numerics import assert_matches_float64, max_err

K_TOL = 4.0
F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16


def peft_ia3_linear(x, w, b, s, feedforward):
    if feedforward:
        return F.linear((x.to(s.dtype) * s).to(x.dtype), w, b)
    z = F.linear(x, w, b)
    return (z * s).to(z.dtype)


def peft_scale_input(x, s):
    return (x.to(s.dtype) * s).to(x.dtype)


def peft_scale_output(y, s):
    return (y * s).to(y.dtype)


def run(fn, tensors, trainable, dy, dtype=None):
    """(out, grads of the trainable inputs) with fresh leaves, in float64 when dtype is given."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(tr)
              for t, tr in zip(tensors, trainable)]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    return out.detach(), [t.grad for t, tr in zip(leaves, trainable) if t is not None and tr]


def check(op, peft_fn, tensors, trainable, dy, names):
    out, grads = run(op, tensors, trainable, dy)
    out64, g64 = run(peft_fn, tensors, trainable, dy, torch.float64)
    out_pt, g_pt = run(peft_fn, tensors, trainable, dy)
    assert len(grads) == len(names)
    for name, got, plain, ref in zip(["y"] + names, [out] + grads, [out_pt] + g_pt, [out64] + g64):
        assert_matches_float64(name, got, plain, ref, K_TOL)


def make(lead, d_in, d_out, feedforward, dtype, sdtype=F32, seed=0, noncontig=False, transposed_w=False):
    g = torch.Generator().manual_seed(seed)
    if noncontig:
        x = torch.randn(*lead, 2 * d_in, generator=g)[..., 1::2].to(dtype)
    else:
        x = torch.randn(*lead, d_in, generator=g).to(dtype)
    w = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(dtype)
    if transposed_w:  # Conv1D stores [d_in, d_out]; the layer passes weight.t()
        w = w.t().contiguous().t()
        assert not w.is_contiguous()
    b = torch.randn(d_out, generator=g).to(dtype)
    s = (1.0 + 0.5 * torch.randn(d_in if feedforward else d_out, generator=g)).to(sdtype)
    dy = torch.randn(*lead, d_out, generator=g).to(dtype)
    return x, w, b, s, dy


# ----------------------------------------------------------------------------------------------
# ia3_linear
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "out"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias, train_w", [(True, False), (False, True), (True, True)],
                         ids=["bias-frozen", "nobias-trainW", "bias-trainW"])
def test_ia3_linear_matches_float64(backend, feedforward, dtype, bias, train_w):
    x, w, b, s, dy = make((113,), 203, 97, feedforward, dtype)
    b = b if bias else None
    names = ["dx"] + (["dW"] + (["db"] if bias else []) if train_w else []) + ["dscale"]
    check(lambda x_, w_, b_, s_: I.ia3_linear(x_, w_, b_, s_, feedforward),
          lambda x_, w_, b_, s_: peft_ia3_linear(x_, w_, b_, s_, feedforward),
          [x, w, b, s], [True, train_w, train_w, True], dy, names)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "out"])
@pytest.mark.parametrize("layout", ["3d", "strided-x", "conv1d-weight"])
def test_ia3_linear_shapes_and_layouts(backend, feedforward, layout):
    x, w, b, s, dy = make((3, 37) if layout == "3d" else (113,), 203, 97, feedforward, F32, seed=2,
                          noncontig=layout == "strided-x", transposed_w=layout == "conv1d-weight")
    check(lambda x_, w_, b_, s_: I.ia3_linear(x_, w_, b_, s_, feedforward),
          lambda x_, w_, b_, s_: peft_ia3_linear(x_, w_, b_, s_, feedforward),
          [x, w, b, s], [True, True, True, True], dy, ["dx", "dW", "db", "dscale"])


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "out"])
def test_ia3_linear_fp16_scale(backend, feedforward):
    """IA3 vectors kept in the model dtype (autocast_adapter_dtype=False)."""
    x, w, b, s, dy = make((113,), 203, 97, feedforward, F16, sdtype=F16, seed=3)
    check(lambda x_, w_, b_, s_: I.ia3_linear(x_, w_, b_, s_, feedforward),
          lambda x_, w_, b_, s_: peft_ia3_linear(x_, w_, b_, s_, feedforward),
          [x, w, b, s], [True, False, False, True], dy, ["dx", "dscale"])


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "out"])
def test_ia3_linear_bf16_reference(torch_backend, feedforward):
    """bf16 runs through the PyTorch reference only (no bf16 arithmetic in the interpreter)."""
    x, w, b, s, dy = make((113,), 203, 97, feedforward, BF16, seed=5)
    check(lambda x_, w_, b_, s_: I.ia3_linear(x_, w_, b_, s_, feedforward),
          lambda x_, w_, b_, s_: peft_ia3_linear(x_, w_, b_, s_, feedforward),
          [x, w, b, s], [True, True, True, True], dy, ["dx", "dW", "db", "dscale"])


def test_ia3_linear_scale_of_any_shape(backend):
    """PEFT's vectors are [1, d_in] / [d_out, 1]: any shape with the right count is accepted."""
    x, w, b, s, dy = make((20,), 32, 24, False, F32)
    s2 = s.view(24, 1).clone().requires_grad_(True)
    y = I.ia3_linear(x, w, b, s2, False)
    y.backward(dy)
    assert s2.grad.shape == (24, 1)
    assert torch.allclose(y, peft_ia3_linear(x, w, b, s, False), atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"x_dtype": F16}, "must share a dtype"),
    ({"scale_n": 7}, "scale must have 32 values"),
    ({"bias_n": 5}, "bias must be"),
    ({"x_features": 31}, "features but weight is"),
])
def test_ia3_linear_errors(kwargs, match):
    x = torch.randn(4, kwargs.get("x_features", 32)).to(kwargs.get("x_dtype", F32))
    with pytest.raises(ValueError, match=match):
        I.ia3_linear(x, torch.randn(24, 32), torch.randn(kwargs.get("bias_n", 24)),
                     torch.randn(kwargs.get("scale_n", 32)), True)


# ----------------------------------------------------------------------------------------------
# elementwise versions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["input", "output"])
@pytest.mark.parametrize("dtypes", [(F32, F32), (F16, F32), (F16, F16), (F32, F16)],
                         ids=["fp32", "fp16x-fp32s", "fp16", "fp32x-fp16s"])
def test_ia3_scale_ops_match_float64(backend, which, dtypes):
    xdt, sdt = dtypes
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 37, 203, generator=g).to(xdt)
    s = (1.0 + 0.5 * torch.randn(203, generator=g)).to(sdt)
    dy = torch.randn(3, 37, 203, generator=g).to(xdt)
    if which == "input":
        op, ref = I.ia3_scale_input, peft_scale_input
    else:
        op, ref = I.ia3_scale_output, peft_scale_output
    check(op, ref, [x, s], [True, True], dy, ["dx", "dscale"])


def test_ia3_scale_input_rounds_to_scale_dtype_like_peft(backend):
    """ia3_scale_input casts x to the scale dtype first; ia3_scale_output does not."""
    x = torch.tensor([[1.0 + 2**-14, 3.0]])  # 1 + 2^-14 is not representable in fp16
    s = torch.tensor([1.0, 1.0], dtype=F16)
    assert I.ia3_scale_input(x, s)[0, 0].item() == 1.0
    assert I.ia3_scale_output(x, s)[0, 0].item() == 1.0 + 2**-14


def test_ia3_scale_errors():
    with pytest.raises(ValueError, match="one value per feature"):
        I.ia3_scale_output(torch.randn(4, 8), torch.randn(7))


# ----------------------------------------------------------------------------------------------
# memory saved for backward
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "out"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_ia3_linear_saves_no_intermediate(backend, feedforward, dtype):
    """Triton path: everything saved for backward is an input (x, W, scale) or the output itself:
    no x * s copy, no fp32 copy of x, no z = x @ W^T + b. The PyTorch path runs PEFT's own ops
    and saves exactly what PEFT saves."""
    T, d_in, d_out = 64, 96, 80
    x, w, b, s, _ = make((T,), d_in, d_out, feedforward, dtype)
    x.requires_grad_(True)
    s.requires_grad_(True)

    def extra_bytes(fn):
        y, saved = record_saved(fn)
        owned = {t.untyped_storage().data_ptr() for t in (x, w, b, s, y)}
        return sum(t.numel() * t.element_size() for t in saved if t.untyped_storage().data_ptr() not in owned)

    ours = extra_bytes(lambda: I.ia3_linear(x, w, b, s, feedforward))
    peft_extra = extra_bytes(lambda: peft_ia3_linear(x, w, b, s, feedforward))
    if not feedforward or dtype != F32:  # PEFT keeps z, or an fp32 copy of x
        assert peft_extra >= T * min(d_in, d_out) * 2
    assert ours == (0 if backend == "triton" else peft_extra)
