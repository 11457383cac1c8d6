"""Dequantisation of bitsandbytes 4-bit / 8-bit storage: bit-exact against bitsandbytes on CPU.

Both implementations are checked: the PyTorch reference and the Triton kernel (in the
interpreter; bf16 output only through the reference, the interpreter truncates fp32->bf16).
Also the storage converters in peftfast.utils.bnb_storage on real bitsandbytes layers.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

from peftfast.kernels import quant  # noqa: E402
from peftfast.kernels.quant import Packed4bit  # noqa: E402
from peftfast.utils import bnb_storage  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd numel, partial last block + blocks spanning rows, whole blocks, tiny odd
SHAPES = [(97, 203), (33, 130), (64, 256), (5, 77)]


def _no_compile():
    # bnb's default CPU path wraps its dequantisation in torch.compile; eager is identical and fast
    return torch._dynamo.config.patch(disable=True)


def _quantize(shape, dtype, quant_type, nested, blocksize, storage=torch.uint8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen).to(dtype)
    with _no_compile():
        packed, qs = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested,
                                      quant_type=quant_type, quant_storage=storage)
        expected = BF.dequantize_4bit(packed, qs)
    return packed, qs, expected


def _packed(packed, qs):
    nested = {}
    if qs.nested:
        nested = dict(nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
                      nested_blocksize=qs.state2.blocksize, offset=qs.offset.item())
    return Packed4bit(packed, qs.absmax, qs.code, qs.blocksize, tuple(qs.shape), qs.dtype, **nested)


def assert_bits_equal(actual, expected):
    """Bitwise equality up to the sign of zero.

    bnb's native CPU kernels write FP4 index 8 as -0.0 while its code table (and its generic
    path) has +0.0; adding +0.0 maps -0.0 to +0.0 and leaves every other value's bits unchanged.
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    int_type = torch.int32 if actual.dtype == torch.float32 else torch.int16
    a, e = (actual + 0.0).view(int_type), (expected + 0.0).view(int_type)
    mismatch = (a != e).sum().item()
    max_diff = (actual.float() - expected.float()).abs().max().item()
    assert mismatch == 0, f"{mismatch} of {a.numel()} elements differ; max |diff| {max_diff}"


CASES_4BIT = list(itertools.product(["nf4", "fp4"], [False, True], [64, 128, 256], SHAPES, DTYPES))


@pytest.mark.parametrize("quant_type,nested,blocksize,shape,dtype", CASES_4BIT)
def test_dequantize_4bit_reference_matches_bnb(quant_type, nested, blocksize, shape, dtype, monkeypatch):
    packed, qs, expected = _quantize(shape, dtype, quant_type, nested, blocksize)
    p = _packed(packed, qs)
    assert_bits_equal(quant.dequantize_4bit_reference(p), expected)  # the pure PyTorch oracle
    monkeypatch.setenv("PEFTFAST_BACKEND", "torch")  # the CPU path (bnb's native kernel when it applies)
    assert_bits_equal(quant.dequantize_4bit(p), expected)


def test_cpu_path_uses_native_kernel_only_for_bnb_tables():
    packed, qs, expected = _quantize((33, 128), torch.float16, "fp4", True, 64)
    p = _packed(packed, qs)
    assert_bits_equal(quant.dequantize_4bit_native(p), expected)
    odd = _packed(*_quantize((33, 127), torch.float16, "nf4", False, 64)[:2])
    assert quant.dequantize_4bit_native(odd) is None  # odd K: bnb would go through torch.compile
    custom = p._replace(code=p.code * 0.5)  # not a table bnb's kernel knows: the reference runs
    assert quant.dequantize_4bit_native(custom) is None
    assert_bits_equal(quant.dequantize_4bit_torch(custom), quant.dequantize_4bit_reference(custom))
    torch.testing.assert_close(quant.dequantize_4bit_torch(custom).float(), expected.float() * 0.5,
                               rtol=1e-3, atol=0)


@pytest.mark.interpreter
@pytest.mark.parametrize("quant_type,nested,blocksize,shape,dtype",
                         [c for c in CASES_4BIT if c[-1] != torch.bfloat16])
def test_dequantize_4bit_triton_matches_bnb(quant_type, nested, blocksize, shape, dtype, triton_kernels):
    packed, qs, expected = _quantize(shape, dtype, quant_type, nested, blocksize)
    assert_bits_equal(quant.dequantize_4bit(_packed(packed, qs)), expected)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dequantize_4bit_bf16_storage(nested, dtype, backend):
    """quant_storage=bf16 (FSDP): the same bytes viewed as bf16."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 output is not reliable in the Triton interpreter (checked via the reference)")
    packed, qs, expected = _quantize((33, 128), dtype, "nf4", nested, 64, storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert_bits_equal(quant.dequantize_4bit(_packed(packed, qs)), expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(97, 203), (5, 77), (64, 130)])
def test_dequantize_int8_matches_bnb(shape, dtype, backend):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 output is not reliable in the Triton interpreter (checked via the reference)")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)).half()
    cb, scb, _ = BF.int8_vectorwise_quant(w)
    expected = BF.int8_vectorwise_dequant(cb, scb).to(dtype)
    assert_bits_equal(quant.dequantize_int8(cb, scb, dtype), expected)
    cb_strided = cb.t().contiguous().t()  # same values, column-major
    assert_bits_equal(quant.dequantize_int8(cb_strided, scb, dtype), expected)


def test_packed4bit_validation_messages():
    packed, qs, _ = _quantize((33, 130), torch.float32, "nf4", False, 64)
    p = _packed(packed, qs)
    with pytest.raises(ValueError, match="power of two"):
        quant.dequantize_4bit(p._replace(blocksize=48))
    with pytest.raises(ValueError, match="bytes"):
        quant.dequantize_4bit(p._replace(data=packed.reshape(-1)[:-1]))
    with pytest.raises(ValueError, match="absmax has"):
        quant.dequantize_4bit(p._replace(absmax=qs.absmax[:-1]))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quant.dequantize_4bit(p._replace(dtype=torch.float64))
    with pytest.raises(ValueError, match="SCB must be fp32"):
        quant.dequantize_int8(torch.zeros(4, 3, dtype=torch.int8), torch.ones(3), torch.float32)


# ----------------------------------------------------------------------------- bnb_storage


def _linear4bit(nested, storage, quant_type="nf4", shape=(96, 128), seed=2):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(shape[1], shape[0])
    layer = bnb.nn.Linear4bit(shape[1], shape[0], compute_dtype=torch.float32, compress_statistics=nested,
                              quant_type=quant_type, quant_storage=storage)
    layer.load_state_dict(dense.state_dict())
    with _no_compile():
        return layer.to("cpu")  # quantises


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
def test_packed4bit_from_linear4bit(nested, storage, monkeypatch):
    monkeypatch.setenv("PEFTFAST_BACKEND", "torch")
    layer = _linear4bit(nested, storage, quant_type="fp4" if nested else "nf4")
    with _no_compile():
        expected = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    for source in (layer, layer.weight):
        p = bnb_storage.packed4bit_from_bnb(source)
        assert p.data.dtype == torch.uint8 and p.data.data_ptr() == layer.weight.data.data_ptr()  # a view
        assert p.nested == nested
        assert_bits_equal(quant.dequantize_4bit(p), expected)


def test_packed4bit_from_cpu_repacked_layer(monkeypatch):
    """bnb's AVX512-BF16 CPU path rewrites weight.data on an eval forward; it is decoded back."""
    monkeypatch.setenv("PEFTFAST_BACKEND", "torch")
    layer = _linear4bit(True, torch.uint8)
    before = bnb_storage.packed4bit_from_bnb(layer)
    data_before = before.data.clone()
    scales_before = quant.decode_absmax(before).clone()
    if BF.has_avx512bf16():
        layer.eval()
        with torch.no_grad():
            layer(torch.randn(2, 128))
    else:  # do what bitsandbytes does on such CPUs
        layer.weight.data, layer.weight.quant_state = BF._convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    with pytest.warns(UserWarning, match="prevent_cpu_repack"):
        after = bnb_storage.packed4bit_from_bnb(layer)
    assert torch.equal(after.data, data_before)  # same 4-bit indices, standard layout again
    assert torch.equal(after.absmax, scales_before.to(torch.bfloat16).float())  # bnb rounded the scales
    assert after.dtype == torch.float32 and not after.nested


def test_prevent_cpu_repack_keeps_storage():
    layer = _linear4bit(False, torch.uint8)
    assert bnb_storage.prevent_cpu_repack(torch.nn.Sequential(layer)) == 1
    layer.eval()
    with torch.no_grad(), _no_compile():
        layer(torch.randn(2, 128))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnb_storage.packed4bit_from_bnb(layer)


def test_packed4bit_from_unquantised_layer_is_refused():
    layer = bnb.nn.Linear4bit(16, 8, quant_type="nf4")  # never moved to a device: not quantised
    with pytest.raises(ValueError, match="not quantised yet"):
        bnb_storage.packed4bit_from_bnb(layer)


def test_int8_from_linear8bitlt_before_and_after_forward(monkeypatch):
    monkeypatch.setenv("PEFTFAST_BACKEND", "torch")
    torch.manual_seed(3)
    dense = torch.nn.Linear(70, 33)
    layer = bnb.nn.Linear8bitLt(70, 33, has_fp16_weights=False, threshold=6.0)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # quantises
    cb, scb = bnb_storage.int8_from_bnb(layer)
    assert cb.dtype == torch.int8 and cb.shape == (33, 70) and scb.shape == (33,)
    expected = BF.int8_vectorwise_dequant(cb, scb)
    assert_bits_equal(quant.dequantize_int8(cb, scb, torch.float32), expected)
    layer(torch.randn(4, 70))  # bnb moves CB/SCB to layer.state
    assert layer.weight.CB is None
    cb2, scb2 = bnb_storage.int8_from_bnb(layer)
    assert cb2.data_ptr() == layer.state.CB.data_ptr() and torch.equal(cb2, cb) and torch.equal(scb2, scb)
    cb3, scb3 = bnb_storage.int8_from_bnb(bnb.nn.Int8Params(cb, requires_grad=False, CB=cb, SCB=scb))
    assert cb3 is cb and torch.equal(scb3, scb)


def test_int8_from_fp16_weights_is_refused():
    layer = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=True)
    with pytest.raises(ValueError, match="has_fp16_weights"):
        bnb_storage.int8_from_bnb(layer)
