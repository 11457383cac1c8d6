"""matmul_4bit / matmul_int8: forward and gradients against a float64 reference.

The reference is computed in float64 from the dequantised weight (bit-exact with bitsandbytes,
see test_quant.py). Tolerances are derived: the op's max error must be at most K_TOL times the
error of plain PyTorch doing the same computation in the same dtype, plus one ulp of the
largest reference value. Every path runs: the PyTorch reference (CPU backend) and the Triton
kernels in the interpreter, with each tile config, both weight layouts (aligned / general) and
the split-reduction decode path.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

BF = pytest.importorskip("bitsandbytes.functional")

from peftfast.kernels import qmatmul as Q  # noqa: E402
from peftfast.kernels.quant import (  # noqa: E402
    Packed4bit,
    dequantize_4bit_reference,
    dequantize_int8_reference,
)

from tests._autograd import record_saved  # noqa: E402
from tests.numerics import assert_matches_float64  # noqa: E402

K_TOL = 2.0


def make_packed(n, k, blocksize=64, nested=True, quant_type="nf4", w_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(w_dtype)
    with torch._dynamo.config.patch(disable=True):
        packed, qs = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested,
                                      quant_type=quant_type)
    extra = {}
    if qs.nested:
        extra = dict(nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
                     nested_blocksize=qs.state2.blocksize, offset=qs.offset.item())
    return Packed4bit(packed, qs.absmax, qs.code, qs.blocksize, (n, k), qs.dtype, **extra)


def make_int8(n, k, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    cb, scb, _ = BF.int8_vectorwise_quant(w.half())
    return cb, scb


def randn(shape, dtype, seed, noncontiguous=False):
    gen = torch.Generator().manual_seed(seed)
    if noncontiguous:  # rows with a gap: a strided view the op must read as is
        return torch.randn(*shape[:-1], shape[-1] + 3, generator=gen).to(dtype)[..., 1:shape[-1] + 1]
    return torch.randn(shape, generator=gen).to(dtype)


def check_close(actual, ref64, plain, what):
    """|actual - ref| <= K_TOL * |plain - ref| + one ulp of max|ref| (plain: PyTorch, same dtype)."""
    assert_matches_float64(what, actual, plain, ref64, K_TOL, check_dtype=False)


def check_op(op, x, weight, bias, n, seed):
    """Forward, dx and dbias of ``op`` against float64, tolerance from plain PyTorch in x.dtype."""
    x = x.detach().requires_grad_(True)
    b = None if bias is None else bias.detach().requires_grad_(True)
    y = op(x, b)
    assert y.shape == (*x.shape[:-1], n) and y.dtype == x.dtype
    dy = randn(y.shape, x.dtype, seed + 100)
    y.backward(dy)

    w64 = weight.double()
    y64 = x.detach().double() @ w64.T + (0 if bias is None else bias.double())
    dx64 = dy.double() @ w64
    w_same = weight.to(x.dtype)
    y_plain = torch.nn.functional.linear(x.detach(), w_same, None if bias is None else bias.to(x.dtype))
    check_close(y, y64, y_plain, "y")
    check_close(x.grad, dx64, dy @ w_same, "dx")
    if bias is not None:
        tokens = tuple(range(dy.dim() - 1))
        check_close(b.grad, dy.double().sum(tokens), dy.sum(tokens).to(bias.dtype), "dbias")


def _case_id(c):
    return f"N{c[0]}-K{c[1]}-bs{c[2]}-T{c[6]}-{str(c[7])[6:]}"


# (N, K, blocksize, nested, quant_type, weight dtype, x shape prefix, x dtype, bias, non-contiguous x)
CASES_4BIT = [
    (97, 203, 64, True, "nf4", torch.float32, (113,), torch.float32, True, True),  # odd K: general layout
    (203, 256, 64, False, "fp4", torch.float16, (2, 3), torch.float16, True, False),  # 3-D, decode, aligned
    (97, 128, 128, True, "nf4", torch.float16, (1,), torch.float32, False, False),  # T=1; W rounded via fp16
    (203, 192, 64, True, "nf4", torch.float32, (4, 4), torch.float16, True, True),  # T=16: decode boundary
    (97, 256, 256, False, "nf4", torch.float16, (113,), torch.float16, True, False),  # many tokens, aligned
    (97, 203, 64, False, "fp4", torch.float32, (5,), torch.float16, False, False),  # decode, general layout
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES_4BIT, ids=_case_id)
def test_matmul_4bit(case, backend):
    n, k, bs, nested, qt, w_dtype, prefix, dtype, has_bias, noncontig = case
    p = make_packed(n, k, bs, nested, qt, w_dtype, seed=n + k)
    x = randn((*prefix, k), dtype, seed=1, noncontiguous=noncontig)
    bias = randn((n,), torch.float32, seed=2) if has_bias else None
    check_op(lambda x_, b_: Q.matmul_4bit(x_, p, b_), x, dequantize_4bit_reference(p), bias, n, seed=3)


CASES_INT8 = [
    (97, 203, (113,), torch.float32, True, True),
    (203, 130, (2, 3), torch.float16, True, False),
    (97, 64, (16,), torch.float16, False, False),
    (33, 77, (1,), torch.float32, True, False),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES_INT8, ids=lambda c: f"N{c[0]}-K{c[1]}-T{c[2]}-{str(c[3])[6:]}")
def test_matmul_int8(case, backend):
    n, k, prefix, dtype, has_bias, noncontig = case
    cb, scb = make_int8(n, k, seed=n)
    x = randn((*prefix, k), dtype, seed=4, noncontiguous=noncontig)
    bias = randn((n,), dtype, seed=5) if has_bias else None
    w = dequantize_int8_reference(cb, scb, torch.float32)
    check_op(lambda x_, b_: Q.matmul_int8(x_, cb, scb, b_), x, w, bias, n, seed=6)


# ----------------------------------------------------------------------------- every launcher path


def _activations(config, transpose, dtype):
    tokens = 7 if config == "decode" else 40  # 40 rows: several 16-row tiles, a partial 64/128-row tile
    return randn((tokens, 256 if transpose else 97), dtype, seed=7)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("transpose", [True, False], ids=["fwd", "dx"])
@pytest.mark.parametrize("config,split", [("decode", 3), ("decode", 1), ("large", 1), ("medium", 2)])
def test_4bit_launcher_paths(config, split, transpose, aligned, dtype, triton_kernels):
    """Each tile config on both weight layouts; split > 1 outside decode goes through partials."""
    p = make_packed(97, 256, 64, nested=True, seed=8)
    w = dequantize_4bit_reference(p)
    a = _activations(config, transpose, dtype)
    bias = randn((97,), torch.float32, seed=9) if transpose else None
    out = Q.matmul_4bit_triton(a, p, bias, transpose=transpose, config=config, split=split, aligned=aligned)
    wt = w.T if transpose else w
    ref = a.double() @ wt.double() + (0 if bias is None else bias.double())
    plain = a @ wt.to(dtype) + (0 if bias is None else bias.to(dtype))
    check_close(out, ref, plain, f"{config} {'fwd' if transpose else 'dx'} aligned={aligned}")


@pytest.mark.interpreter
@pytest.mark.parametrize("transpose", [True, False], ids=["fwd", "dx"])
@pytest.mark.parametrize("config,split", [("decode", 3), ("decode", 1), ("large", 1), ("medium", 2)])
def test_int8_launcher_paths(config, split, transpose, triton_kernels):
    cb, scb = make_int8(97, 256, seed=10)
    w = dequantize_int8_reference(cb, scb, torch.float32)
    a = _activations(config, transpose, torch.float16)
    bias = randn((97,), torch.float16, seed=11) if transpose else None
    out = Q.matmul_int8_triton(a, cb, scb, bias, transpose=transpose, config=config, split=split)
    wt = w.T if transpose else w
    ref = a.double() @ wt.double() + (0 if bias is None else bias.double())
    plain = a @ wt.half() + (0 if bias is None else bias)
    check_close(out, ref, plain, f"int8 {config} {'fwd' if transpose else 'dx'}")


def test_cost_rule():
    cpu = torch.device("cpu")  # the rule assumes 132 SMs off-GPU
    assert Q.pick_config(1, 4096, 4096, True, cpu)[0] == "decode"
    # 128 column tiles of 32 leave SMs idle: split the reduction, as far as the 3% budget of the
    # re-read partial sums allows (T=1: 3 slices; T=16: none)
    assert Q.pick_config(1, 4096, 4096, True, cpu) == ("decode", 3)
    assert Q.pick_config(4, 4096, 4096, True, cpu) == ("decode", 3)
    assert Q.pick_config(8, 4096, 4096, True, cpu) == ("decode", 1)
    assert Q.pick_config(16, 4096, 4096, True, cpu) == ("decode", 1)
    assert Q.decode_split_limit(16, 4096) == 1 and Q.decode_split_limit(1, 4096) == 15
    assert Q.pick_config(17, 4096, 4096, True, cpu) == ("medium", 1)  # 1 x 64 large tiles < 132 SMs
    assert Q.pick_config(8192, 4096, 4096, True, cpu) == ("large", 1)
    assert Q.aligned_4bit(4096, 64, Q.resolve_config("large", True, torch.bfloat16), True)
    assert not Q.aligned_4bit(4095, 64, Q.resolve_config("large", True, torch.bfloat16), True)
    assert not Q.aligned_4bit(4096, 32, Q.resolve_config("large", False, torch.bfloat16), False)


# ----------------------------------------------------------------------------- memory, tracing, errors


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["4bit", "int8"])
def test_backward_saves_no_weight_and_no_input(kind, backend):
    n, k = 97, 128
    if kind == "4bit":
        p = make_packed(n, k, seed=12)

        def op(x_, b_):
            return Q.matmul_4bit(x_, p, b_)
    else:
        cb, scb = make_int8(n, k, seed=12)

        def op(x_, b_):
            return Q.matmul_int8(x_, cb, scb, b_)
    x = randn((n + 1, k), torch.float32, seed=13).requires_grad_(True)  # T != N, so shapes are telling
    bias = randn((n,), torch.float32, seed=14).requires_grad_(True)
    y, saved = record_saved(lambda: op(x, bias))
    assert saved, "nothing saved at all: the op lost its autograd"
    for t in saved:
        assert not (t.is_floating_point() and t.numel() >= n * k), f"saved a float {tuple(t.shape)} tensor"
    y.sum().backward()
    assert x.grad is not None and bias.grad is not None


def test_custom_ops_opcheck(torch_backend):
    p = make_packed(33, 128, seed=15)
    x = randn((5, 128), torch.float32, seed=16).requires_grad_(True)
    bias = randn((33,), torch.float32, seed=17).requires_grad_(True)
    args = (x, p.data.reshape(-1), p.absmax, p.code, p.blocksize, 33, 128, p.dtype, p.nested_absmax,
            p.nested_code, p.nested_blocksize, p.offset, bias)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.peftfast.matmul_4bit.default, args, test_utils=tests)
    cb, scb = make_int8(33, 128, seed=18)
    torch.library.opcheck(torch.ops.peftfast.matmul_int8.default, (x, cb, scb, bias), test_utils=tests)


def test_torch_compile_fullgraph(torch_backend):
    p = make_packed(33, 128, seed=19)
    cb, scb = make_int8(33, 128, seed=20)
    bias = randn((33,), torch.float32, seed=21)

    def f(x):
        return (Q.matmul_4bit(x, p, bias) * Q.matmul_int8(x, cb, scb, bias)).sum()

    x = randn((3, 5, 128), torch.float32, seed=22).requires_grad_(True)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    (gx_compiled,) = torch.autograd.grad(compiled(x), x)
    (gx_eager,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(gx_compiled, gx_eager, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_tokens(backend):
    p = make_packed(33, 128, seed=23)
    x = torch.randn(0, 128, requires_grad=True)
    y = Q.matmul_4bit(x, p, None)
    assert y.shape == (0, 33)
    y.sum().backward()
    assert x.grad.shape == (0, 128)


def test_error_messages():
    p = make_packed(33, 128, seed=24)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 128\]"):
        Q.matmul_4bit(torch.randn(4, 127), p)
    with pytest.raises(ValueError, match=r"bias must be a float \[33\]"):
        Q.matmul_4bit(torch.randn(4, 128), p, torch.randn(32))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        Q.matmul_4bit(torch.randn(4, 128).double(), p)
    cb, scb = make_int8(33, 128, seed=25)
    with pytest.raises(ValueError, match="SCB must be fp32"):
        Q.matmul_int8(torch.randn(4, 128), cb, scb.half())
