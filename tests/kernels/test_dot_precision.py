"""tests/dot_precision.py: Triton's interpreter with ``input_precision`` honoured as a GPU computes
it (the interpreter alone multiplies fp32 dot operands in full fp32 whatever is asked), and what it
shows about the kernels' fp32 dots. tests/kernels/conftest.py switches it on for every kernel test.

fp32 adapters on a 16-bit model use 3xTF32 adapter dots (``runtime.dot_precision``); with plain
TF32 their adapter gradients missed the float64 bound by orders of magnitude under this mode, as
they would on a GPU."""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from peftfast.kernels import runtime

from tests import dot_precision
from tests.kernels.test_lora_fused import assert_matches_float64, make_inputs

F16, F32 = torch.float16, torch.float32


@pytest.fixture
def gpu_dots(triton_kernels):
    """tests/kernels/conftest.py switches the rounding on for every kernel test."""
    assert dot_precision.enabled()
    yield


def test_round_tf32_keeps_ten_mantissa_bits_ties_away():
    one = np.float32(1.0)
    ulp = np.float32(2.0**-10)
    a = np.array([one + ulp / 2, one + ulp / 4, -(one + ulp / 2), one + ulp, np.inf, 3.0], dtype=np.float32)
    got = dot_precision.round_tf32(a)
    assert got.tolist() == [1 + 2**-10, 1.0, -(1 + 2**-10), 1 + 2**-10, np.inf, 3.0]


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr, PRECISION: tl.constexpr):
    offs = tl.arange(0, N)
    a = tl.load(a_ptr + offs[:, None] * N + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * N + offs[None, :])
    tl.store(c_ptr + offs[:, None] * N + offs[None, :], tl.dot(a, b, input_precision=PRECISION))


@pytest.mark.parametrize("precision", ["tf32", "tf32x3", "ieee"])
def test_interpreter_dot_rounds_as_requested(precision, gpu_dots):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, N=16, PRECISION=precision)
    exact = a.double() @ b.double()
    tf32 = torch.from_numpy(dot_precision.round_tf32(a.numpy())).double() @ \
        torch.from_numpy(dot_precision.round_tf32(b.numpy())).double()
    err = (c.double() - exact).abs().max().item()
    if precision == "tf32":
        assert torch.allclose(c.double(), tf32, rtol=0, atol=1e-5) and err > 1e-4
    else:  # ~fp32: two orders of magnitude below TF32's error
        assert err < 1e-5, err


def test_fp32_model_is_gpu_accurate(gpu_dots):
    """An fp32 model's dots (3xTF32) stay within the float64 bound under GPU rounding."""
    assert_matches_float64(make_inputs((37,), 72, 40, (5,), F32, F32, seed=5), [0.0])


def test_fp32_adapters_on_fp16_model_are_gpu_accurate(gpu_dots):
    """fp32 adapters on a 16-bit model: 3xTF32 adapter dots (runtime.dot_precision) keep every
    gradient within the float64 bound under GPU rounding (plain TF32 missed dA's by ~300x)."""
    assert_matches_float64(make_inputs((37,), 72, 40, (5,), F16, F32, seed=5), [0.0])


def test_dot_precision_rule():
    assert runtime.dot_precision(F32) == runtime.dot_precision(F16, F32) == "tf32x3"
    assert runtime.dot_precision(F16) == runtime.dot_precision(torch.bfloat16, torch.bfloat16) == "tf32"
