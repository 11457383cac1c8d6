"""Dequantisation of bitsandbytes 4-bit (NF4/FP4) and 8-bit (LLM.int8) weights, read in place.

4-bit storage (``Params4bit`` + ``QuantState``). The weight W is [N, K] = [out, in], row-major,
flattened to w_e with e = n*K + k. Byte e // 2 of ``data`` holds the 4-bit index q_e: the HIGH
nibble for even e, the LOW nibble for odd e (an odd numel leaves the last low nibble unused).
Blocks of ``blocksize`` (a power of two) consecutive elements of the flattened weight share one
scale; a block may span two rows and the last block may be partial.

    scale_b = absmax[b]                                                      (plain)
    scale_b = nested_code[absmax[b]] * nested_absmax[b // nested_blocksize] + offset   (double quant)
    W[e]    = round_to_dtype(code[q_e] * scale_{e // blocksize})             (fp32 math, one rounding)

This is exactly what bitsandbytes computes (checked bit for bit against
``bitsandbytes.functional.dequantize_4bit``; the one difference is the sign of zero for FP4 index
8, which bnb's native CPU kernels write as -0.0 and its code table as +0.0).

8-bit storage (``Int8Params``): CB int8 [N, K], SCB fp32 [N] (row absmax)

    W[n, k] = round_to_dtype((CB[n, k] * SCB[n]) * 7.874015718698502e-3)   (fp32, bnb's 1/127)

Blocked algorithm (4-bit): one program per BLOCK consecutive elements of the flattened weight;
each loads the bytes under its elements, picks the nibble by parity, looks the index up in the
16-entry code table, gathers the block scale (decoding the nested scale on the fly) and stores
one rounded product per element. The 8-bit kernel works on [BLOCK_N, BLOCK_K] tiles.
Memory: reads N*K/2 bytes + N*K/blocksize scale bytes (4-bit) or N*K + 4N bytes (8-bit), writes
N*K * elem_size. The matmul kernels (qmatmul.py) use the same element helpers inside their
tiles and never write the dequantised weight; this standalone dequantisation serves merging
adapters and the PyTorch path.

The element helpers keep per-element offsets in int32: a tile's position in the flattened
weight is an int64 scalar ``base`` plus an int32 tile ``local``; the byte, parity and block
indices are split the same way (exact, since base = 2*(base >> 1) + (base & 1), likewise for
the power-of-two block sizes), so the index math never needs 64-bit registers per element.

Nested scales are a separate multiply and add in bnb; the kernels are launched with
``enable_fp_fusion=False`` so the compiler cannot contract them into an fma.

PyTorch path: ``dequantize_4bit_reference`` is the pure-PyTorch oracle (one gather per byte,
one fused multiply-and-round). On CPU, ``dequantize_4bit`` uses bitsandbytes' own native kernel
when it is loaded and applies (``dequantize_4bit_native``; bit-identical, checked by the
tests), so the CPU path is exactly as fast as bitsandbytes' layers; otherwise the reference.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .aot import AotSpec
from .runtime import DTYPE_NAMES, aot_signature, declare_int32_operands, launch, use_triton

# bnb's 1/127 for the int8 row-wise scale (bitsandbytes int8_vectorwise_dequant)
INT8_SCALE = 7.874015718698502e-3
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Packed4bit(NamedTuple):
    """A bitsandbytes 4-bit weight, as stored (see the module docstring for the math).

    data:          uint8 [ceil(N*K/2)]  packed indices (element 2j in the HIGH nibble of byte j);
                   another dtype viewing the same contiguous bytes (bnb ``quant_storage``) is accepted
    absmax:        fp32 [n_blocks] scales, or uint8 [n_blocks] codes when nested
    code:          fp32 [16] value of each 4-bit index (NF4 or FP4 table, from ``quant_state.code``)
    blocksize:     elements per scale block, a power of two
    shape:         (N, K) = (out_features, in_features)
    dtype:         dtype of the dequantised weight (``quant_state.dtype``)
    nested_absmax: fp32 [ceil(n_blocks / nested_blocksize)] or None
    nested_code:   fp32 [256] or None
    nested_blocksize: blocks per nested scale (bnb uses 256)
    offset:        float added to the decoded nested scales, or None
    """

    data: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple
    dtype: torch.dtype
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_blocksize: int = 256
    offset: Optional[float] = None

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


def log2_exact(value: int, what: str) -> int:
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{what} must be a positive power of two, got {value}")
    return value.bit_length() - 1


def packed_bytes(data: torch.Tensor) -> torch.Tensor:
    """The packed weight as a flat uint8 tensor (a view: bnb may store it as bf16/fp16/... )."""
    if not data.is_contiguous():
        raise ValueError("the packed 4-bit weight must be contiguous (it is a flat byte buffer)")
    if data.dtype != torch.uint8:
        data = data.reshape(-1).view(torch.uint8)
    return data.reshape(-1)


def check_packed4bit(p: Packed4bit) -> tuple[torch.Tensor, int, int]:
    """Validate ``p``; return (flat uint8 data, N, K)."""
    if len(p.shape) != 2:
        raise ValueError(f"Packed4bit.shape must be (out_features, in_features), got {tuple(p.shape)}")
    n, k = int(p.shape[0]), int(p.shape[1])
    if n <= 0 or k <= 0:
        raise ValueError(f"Packed4bit.shape must be positive, got {(n, k)}")
    if p.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"Packed4bit.dtype must be float32, float16 or bfloat16, got {p.dtype}")
    log2_exact(p.blocksize, "Packed4bit.blocksize")
    data = packed_bytes(p.data)
    numel = n * k
    if data.numel() != (numel + 1) // 2:
        raise ValueError(
            f"Packed4bit.data holds {data.numel()} bytes; a {n}x{k} weight needs {(numel + 1) // 2}"
        )
    n_blocks = -(-numel // p.blocksize)
    if p.absmax.numel() != n_blocks:
        raise ValueError(
            f"Packed4bit.absmax has {p.absmax.numel()} entries; {numel} elements in blocks of "
            f"{p.blocksize} need {n_blocks}"
        )
    if p.code.numel() != 16 or p.code.dtype != torch.float32:
        raise ValueError(f"Packed4bit.code must be fp32 [16], got {p.code.dtype} {tuple(p.code.shape)}")
    if p.nested:
        log2_exact(p.nested_blocksize, "Packed4bit.nested_blocksize")
        if p.absmax.dtype != torch.uint8:
            raise ValueError(f"nested Packed4bit.absmax must hold uint8 codes, got {p.absmax.dtype}")
        if p.nested_code is None or p.nested_code.numel() != 256 or p.offset is None:
            raise ValueError("nested Packed4bit needs nested_code (fp32 [256]) and offset")
        if p.nested_absmax.numel() != -(-n_blocks // p.nested_blocksize):
            raise ValueError(
                f"Packed4bit.nested_absmax has {p.nested_absmax.numel()} entries; {n_blocks} blocks "
                f"in groups of {p.nested_blocksize} need {-(-n_blocks // p.nested_blocksize)}"
            )
    elif p.absmax.dtype != torch.float32:
        raise ValueError(
            f"Packed4bit.absmax must be fp32 (or uint8 with nested_absmax), got {p.absmax.dtype}")
    return data, n, k


# ----------------------------------------------------------------------------- Triton helpers


@triton.jit
def lookup16(q, code_ptr):
    """code[q] for 4-bit indices q (int32 tile).

    A gather from the 64-byte table: one cache line, so a warp's lookups are served from L1 in
    one pass (a 15-select tree instead costs ~20 ALU ops per element and more registers).
    """
    return tl.load(code_ptr + q)


@triton.jit
def unpack_pairs(byte):
    """[..] bytes -> [.., 2] int32 indices (HIGH nibble = even element, LOW = odd)."""
    b = byte.to(tl.int32)
    return tl.join(b >> 4, b & 15)


@triton.jit
def as_operand(w, a, w_round):
    """fp32 weight values -> the dot operand dtype (a's); w_round 1/2 rounds through fp16/bf16 first
    (``weight_rounding``: a weight whose dtype is not the activations')."""
    w = tl.where(w_round == 1, w.to(tl.float16).to(tl.float32), w)
    w = tl.where(w_round == 2, w.to(tl.bfloat16).to(tl.float32), w)
    return w.to(a.dtype)


@triton.jit
def block_scale(
    blk_base,  # int64 scalar: first block index
    lblk,  # int32 tile: block offsets from blk_base
    mask,  # valid entries
    absmax_ptr,  # fp32 [n_blocks] scales, or uint8 [n_blocks] codes when NESTED
    nested_absmax_ptr,  # fp32 [ceil(n_blocks / nested_blocksize)] (NESTED only)
    nested_code_ptr,  # fp32 [256] (NESTED only)
    offset,  # fp32 added to nested scales
    log2_nbs,  # log2(nested_blocksize)
    NESTED: tl.constexpr,
):
    """fp32 scale of blocks blk_base + lblk, decoding double quantisation like bnb."""
    if NESTED:
        qa = tl.load(absmax_ptr + blk_base + lblk, mask=mask, other=0).to(tl.int32)
        nb_base = blk_base >> log2_nbs
        lnb = ((blk_base & ((1 << log2_nbs) - 1)).to(tl.int32) + lblk) >> log2_nbs
        scale = tl.load(nested_code_ptr + qa, mask=mask, other=0.0)
        scale = scale * tl.load(nested_absmax_ptr + nb_base + lnb, mask=mask, other=0.0)
        return scale + offset
    else:
        return tl.load(absmax_ptr + blk_base + lblk, mask=mask, other=0.0)


@triton.jit
def dequant_4bit(
    base,  # int64 scalar: flattened index of the tile origin
    local,  # int32 tile: offsets from base (e = base + local)
    mask,  # valid elements of the tile
    data_ptr,  # packed indices, uint8 [ceil(N*K/2)]
    code_ptr,  # fp32 [16] code table
    absmax_ptr,  # fp32 [n_blocks] scales, or uint8 [n_blocks] codes when NESTED
    nested_absmax_ptr,  # fp32 [ceil(n_blocks / nested_blocksize)] (NESTED only)
    nested_code_ptr,  # fp32 [256] (NESTED only)
    offset,  # fp32 added to nested scales
    log2_bs,  # log2(blocksize)
    log2_nbs,  # log2(nested_blocksize)
    NESTED: tl.constexpr,
):
    """fp32 code[q_e] * scale_{e // blocksize} for e = base + local, any layout (see module docstring)."""
    lb = (base & 1).to(tl.int32) + local
    byte = tl.load(data_ptr + (base >> 1) + (lb >> 1), mask=mask, other=0).to(tl.int32)
    value = lookup16((byte >> (4 - (lb & 1) * 4)) & 15, code_ptr)
    blk_base = base >> log2_bs
    lblk = ((base & ((1 << log2_bs) - 1)).to(tl.int32) + local) >> log2_bs
    scale = block_scale(blk_base, lblk, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                         log2_nbs, NESTED)
    return value * scale


@triton.jit
def dequant_int8(
    offs_n,  # int64 row indices (broadcastable against offs_k)
    offs_k,  # int64 column indices
    mask,  # valid elements
    cb_ptr,  # int8 [N, K] CB
    stride_cbn,  # CB row stride
    stride_cbk,  # CB column stride
    scb_ptr,  # fp32 [N] SCB (row absmax)
    N,  # rows of CB
):
    """fp32 (CB[n, k] * SCB[n]) * (1/127) (bitsandbytes' int8 row-wise dequantisation)."""
    cb = tl.load(cb_ptr + offs_n * stride_cbn + offs_k * stride_cbk, mask=mask, other=0).to(tl.float32)
    scb = tl.load(scb_ptr + offs_n, mask=offs_n < N, other=0.0)
    return (cb * scb) * 7.874015718698502e-3


@triton.jit
def _dequantize_4bit_kernel(
    out_ptr,  # [N*K] output, dtype of the dequantised weight
    data_ptr,  # packed indices, uint8 [ceil(N*K/2)]
    code_ptr,  # fp32 [16]
    absmax_ptr,  # fp32 [n_blocks] or uint8 [n_blocks] (NESTED)
    nested_absmax_ptr,  # fp32 nested scales (NESTED only)
    nested_code_ptr,  # fp32 [256] (NESTED only)
    offset,  # fp32 nested offset
    numel,  # N*K
    log2_bs,  # log2(blocksize)
    log2_nbs,  # log2(nested_blocksize)
    NESTED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    base = pid * BLOCK
    local = tl.arange(0, BLOCK)
    mask = local < numel - base
    w = dequant_4bit(base, local, mask, data_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                      offset, log2_bs, log2_nbs, NESTED)
    tl.store(out_ptr + base + local, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_int8_kernel(
    out_ptr,  # [N, K] output, contiguous
    cb_ptr,  # int8 [N, K]
    scb_ptr,  # fp32 [N]
    N,  # rows
    K,  # columns
    stride_cbn,  # CB row stride
    stride_cbk,  # CB column stride
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = dequant_int8(offs_n[:, None], offs_k[None, :], mask, cb_ptr, stride_cbn, stride_cbk, scb_ptr, N)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


declare_int32_operands(_dequantize_4bit_kernel, "code_ptr", "nested_code_ptr")  # 16 / 256-entry tables
_DEQ4_BLOCK = 1024
_DEQ8_BLOCK_N, _DEQ8_BLOCK_K = 32, 128


def weight_rounding(w_dtype: torch.dtype, x_dtype: torch.dtype) -> int:
    """``as_operand``'s w_round for a 4-bit weight of dtype ``w_dtype`` used with ``x_dtype`` activations: 0 (cast
    once), 1 (round through fp16 first) or 2 (through bf16), as bitsandbytes dequantises, then casts."""
    if w_dtype == x_dtype or w_dtype == torch.float32:
        return 0
    return 1 if w_dtype == torch.float16 else 2


def nested_args(p: Packed4bit) -> tuple:
    """(nested_absmax, nested_code, offset, log2_nested_blocksize) for a launch; dummies when flat."""
    if p.nested:
        return p.nested_absmax, p.nested_code, float(p.offset), log2_exact(p.nested_blocksize, "nested_blocksize")
    return p.code, p.code, 0.0, 0


# ----------------------------------------------------------------------------- launchers


def dequantize_4bit_triton(p: Packed4bit) -> torch.Tensor:
    data, n, k = check_packed4bit(p)
    out = torch.empty((n, k), dtype=p.dtype, device=data.device)
    nested_absmax, nested_code, offset, log2_nbs = nested_args(p)
    grid = (triton.cdiv(n * k, _DEQ4_BLOCK),)
    launch(_dequantize_4bit_kernel, grid,
        out, data, p.code.contiguous(), p.absmax.contiguous(), nested_absmax.contiguous(),
        nested_code.contiguous(), offset, n * k,
        log2_exact(p.blocksize, "blocksize"), log2_nbs,
        NESTED=p.nested, BLOCK=_DEQ4_BLOCK, num_warps=4, enable_fp_fusion=False,
    )
    return out


def check_int8(cb: torch.Tensor, scb: torch.Tensor) -> tuple[int, int]:
    """Validate a bnb row-wise int8 weight; return (N, K)."""
    if cb.dtype != torch.int8 or cb.dim() != 2:
        raise ValueError(
            f"CB must be an int8 [out_features, in_features] matrix, got {cb.dtype} {tuple(cb.shape)}")
    if scb.dtype != torch.float32 or scb.numel() != cb.shape[0] or scb.device != cb.device:
        raise ValueError(f"SCB must be fp32 [{cb.shape[0]}] on {cb.device} (one scale per row of CB), got "
                         f"{scb.dtype} {tuple(scb.shape)} on {scb.device}")
    return cb.shape


def _check_int8(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> tuple[int, int]:
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return check_int8(cb, scb)


def dequantize_int8_triton(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n, k = _check_int8(cb, scb, dtype)
    out = torch.empty((n, k), dtype=dtype, device=cb.device)
    grid = (triton.cdiv(n, _DEQ8_BLOCK_N), triton.cdiv(k, _DEQ8_BLOCK_K))
    launch(_dequantize_int8_kernel, grid,
        out, cb, scb.reshape(-1), n, k, cb.stride(0), cb.stride(1),
        BLOCK_N=_DEQ8_BLOCK_N, BLOCK_K=_DEQ8_BLOCK_K, num_warps=4, enable_fp_fusion=False,
    )
    return out


# ----------------------------------------------------------------------------- PyTorch reference


def decode_absmax(p: Packed4bit) -> torch.Tensor:
    """fp32 [n_blocks] block scales (decodes double quantisation the way bnb does)."""
    if not p.nested:
        return p.absmax
    n_blocks = p.absmax.numel()
    group = torch.arange(n_blocks, device=p.absmax.device) >> log2_exact(p.nested_blocksize, "nested_blocksize")
    scale = p.nested_code[p.absmax.long()] * p.nested_absmax[group]
    return scale + p.offset


def _nibble_table(code: torch.Tensor) -> torch.Tensor:
    # byte -> (code[high nibble], code[low nibble]): one gather per byte instead of two per element
    byte = torch.arange(256, device=code.device)
    return torch.stack((code[byte >> 4], code[byte & 15]), dim=1)


def dequantize_4bit_reference(p: Packed4bit) -> torch.Tensor:
    data, n, k = check_packed4bit(p)
    numel, bs = n * k, p.blocksize
    # fp32 [2 * n_bytes]: one gather per byte
    values = torch.nn.functional.embedding(data.int(), _nibble_table(p.code)).reshape(-1)
    scale = decode_absmax(p)
    n_blocks = scale.numel()
    padded = n_blocks * bs
    if values.numel() < padded:
        values = torch.nn.functional.pad(values, (0, padded - values.numel()))
    out = torch.empty(padded, dtype=p.dtype, device=data.device)
    # fp32 product, rounded once on store into the output dtype
    torch.mul(values[:padded].view(n_blocks, bs), scale[:, None], out=out.view(n_blocks, bs))
    return out[:numel].view(n, k)


def dequantize_int8_reference(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _check_int8(cb, scb, dtype)
    return (cb.float() * scb.reshape(-1, 1) * INT8_SCALE).to(dtype)


# ----------------------------------------------------------------------------- CPU fast path

# bytes 0x01, 0x23, ..., 0xEF: the 16 indices in order, to read a native kernel's code table
_PROBE_BYTES = [(2 * j) << 4 | (2 * j + 1) for j in range(8)]


_native_tables: dict = {}


def _native_code_table(quant_type: str, device: torch.device) -> Optional[torch.Tensor]:
    key = (quant_type, device)
    if key not in _native_tables:  # only successes are cached: bitsandbytes may be imported later
        try:
            op = torch.ops.bitsandbytes.dequantize_4bit.default
            probe = torch.tensor(_PROBE_BYTES, dtype=torch.uint8, device=device)
            scale = torch.ones(1, dtype=torch.float32, device=device)
            _native_tables[key] = op(probe, scale, 64, quant_type, (1, 16), torch.float32).reshape(16)
        except (AttributeError, RuntimeError, NotImplementedError):
            return None
    return _native_tables[key]


def dequantize_4bit_native(p: Packed4bit) -> Optional[torch.Tensor]:
    """bitsandbytes' own dequantisation kernel (AVX512 on CPU) when it is loaded and applies.

    Used by the PyTorch path so that it is exactly as fast as bitsandbytes' own layers. It
    applies when ``torch.ops.bitsandbytes.dequantize_4bit`` is registered (i.e. bitsandbytes is
    imported, which it is whenever a bitsandbytes layer exists), K is even (bnb's native layout;
    odd K would go through its torch.compile fallback) and ``p.code`` is exactly bnb's NF4 or FP4
    table (read back from the kernel itself, not assumed). Returns None otherwise. The result is
    bit-identical to :func:`dequantize_4bit_reference` (checked by the tests).
    """
    data, n, k = check_packed4bit(p)
    if k % 2:
        return None
    for quant_type in ("nf4", "fp4"):
        table = _native_code_table(quant_type, data.device)
        if table is not None and torch.equal(table, p.code):
            scale = p.absmax
            if p.nested:  # bnb's own blockwise kernel: the same products, one pass
                scale = torch.ops.bitsandbytes.dequantize_blockwise.default(
                    p.absmax, p.nested_absmax, p.nested_code, p.nested_blocksize, torch.float32) + p.offset
            op = torch.ops.bitsandbytes.dequantize_4bit.default
            return op(data, scale, p.blocksize, quant_type, (n, k), p.dtype)
    return None


def dequantize_4bit_torch(p: Packed4bit) -> torch.Tensor:
    """The PyTorch (CPU) path: bnb's native kernel when it applies, else the reference."""
    out = dequantize_4bit_native(p)
    return dequantize_4bit_reference(p) if out is None else out


# ----------------------------------------------------------------------------- public ops


def dequantize_4bit(p: Packed4bit) -> torch.Tensor:
    """[N, K] weight in ``p.dtype``, bit-exact with bitsandbytes' dequantize_4bit."""
    if use_triton(p.data, p.absmax):
        return dequantize_4bit_triton(p)
    return dequantize_4bit_torch(p)


def dequantize_int8(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] weight in ``dtype``: bnb's int8_vectorwise_dequant(CB, SCB) cast to ``dtype``."""
    if use_triton(cb, scb):
        return dequantize_int8_triton(cb, scb, dtype)
    return dequantize_int8_reference(cb, scb, dtype)


# ----------------------------------------------------------------------------- AOT declarations


def aot_specs() -> list[AotSpec]:
    specs = []
    for dtype, name in DTYPE_NAMES.items():
        for nested in (False, True):
            consts = {"NESTED": nested, "BLOCK": _DEQ4_BLOCK}
            types = {"out_ptr": f"*{name}", "data_ptr": "*u8", "code_ptr": "*fp32",
                     "absmax_ptr": "*u8" if nested else "*fp32", "nested_absmax_ptr": "*fp32",
                     "nested_code_ptr": "*fp32", "offset": "fp32"}
            specs.append(AotSpec(
                name=f"dequantize_4bit[{name},nested={nested},BLOCK={_DEQ4_BLOCK}]",
                fn=_dequantize_4bit_kernel, signature=aot_signature(_dequantize_4bit_kernel, types, consts),
                constexprs=consts, num_warps=4, num_stages=1,
            ))
        consts = {"BLOCK_N": _DEQ8_BLOCK_N, "BLOCK_K": _DEQ8_BLOCK_K}
        types = {"out_ptr": f"*{name}", "cb_ptr": "*i8", "scb_ptr": "*fp32"}
        specs.append(AotSpec(
            name=f"dequantize_int8[{name},BN={_DEQ8_BLOCK_N},BK={_DEQ8_BLOCK_K}]",
            fn=_dequantize_int8_kernel, signature=aot_signature(_dequantize_int8_kernel, types, consts),
            constexprs=consts, num_warps=4, num_stages=1,
        ))
    return specs
