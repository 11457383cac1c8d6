"""Quantised bases in bitsandbytes storage: NF4/FP4 4-bit and row-wise int8, and QLoRA.

Two ways to multiply by a quantised weight: dequantise in the GEMM's operand load (peftfast's
kernels/qmatmul.py: the packed weight is read once, no dequantised copy is written) or
dequantise to a dense copy first, then a plain GEMM (bitsandbytes' training path, under PEFT).
The storage bytes follow bitsandbytes' layout (shared/notes/bitsandbytes-format.md).
``qlora_fused_*``: the LoRA adapter inside the 4-bit GEMMs (``qlora_linear_fused``); its dX
tile comes from ``plans.qlora_dx_block_m``. ``decode_reads``: the decode GEMM (T <= 16), whose
reduction split (``plans.decode_split``) adds fp32 partials and a reduce launch.
"""
from __future__ import annotations

import torch

from ..plans import decode_split, qlora_dx_block_m
from ..specs import Kernel, nbytes
from .eager import base_linear_backward, base_linear_forward
from .fused import peftfast_fused_backward
from .lora import peftfast_lora_forward


def nf4_weight_bytes(n: int, k: int, blocksize: int = 64, nested: bool = False, nested_blocksize: int = 256) -> int:
    """Bytes of a bitsandbytes 4-bit weight [n, k]: packed data ceil(nk/2), the 16-entry fp32
    code, and absmax: fp32 per block, or (nested) one uint8 code per block plus fp32 per
    nested block and the 256-entry fp32 nested code."""
    blocks = -(-n * k // blocksize)
    absmax = blocks * 4 if not nested else blocks + -(-blocks // nested_blocksize) * 4 + 256 * 4
    return -(-n * k // 2) + absmax + 16 * 4


def matmul_4bit_fused(t: int, d_in: int, d_out: int, act: torch.dtype, backward: bool = False,
                      blocksize: int = 64, nested: bool = False) -> Kernel:
    """Dequantisation in the GEMM's operand load: forward Y = X @ deq(W)^T reads X and the
    packed weight once; backward dX = dY @ deq(W) reads dY and the packed weight (no
    dequantised copy of W is ever written)."""
    w = nf4_weight_bytes(d_out, d_in, blocksize, nested)
    a, b = (t * d_in, t * d_out) if not backward else (t * d_out, t * d_in)
    return Kernel("4-bit GEMM (dequant in prologue)" + (" dX" if backward else ""),
                  a * nbytes(act) + w, b * nbytes(act), 2 * t * d_in * d_out, True)


def dequant_4bit_then_matmul(t: int, d_in: int, d_out: int, act: torch.dtype, backward: bool = False,
                             blocksize: int = 64, nested: bool = False) -> list[Kernel]:
    """bitsandbytes' training path: dequantise W to ``act`` (reads packed, writes N*K*act),
    then a plain GEMM; the backward dequantises again for dX = dY @ W."""
    w = nf4_weight_bytes(d_out, d_in, blocksize, nested)
    deq = Kernel("bnb: dequantize_4bit", w, d_out * d_in * nbytes(act), d_out * d_in)
    mm = base_linear_backward(t, d_in, d_out, act) if backward else base_linear_forward(t, d_in, d_out, act)
    return [deq] + mm


def matmul_int8_fused(t: int, d_in: int, d_out: int, act: torch.dtype, backward: bool = False) -> Kernel:
    """Row-wise int8 weight (CB [N, K] int8, SCB [N] fp32) dequantised in the GEMM's operand
    load; same structure as ``matmul_4bit_fused``."""
    w = d_out * d_in + d_out * 4
    a, b = (t * d_in, t * d_out) if not backward else (t * d_out, t * d_in)
    return Kernel("int8 GEMM (dequant in prologue)" + (" dX" if backward else ""),
                  a * nbytes(act) + w, b * nbytes(act), 2 * t * d_in * d_out, True)


def dequant_int8_then_matmul(t: int, d_in: int, d_out: int, act: torch.dtype, backward: bool = False) -> list[Kernel]:
    """Dequantise CB * SCB / 127 to ``act`` (reads N*K + 4N, writes N*K*act), then a GEMM."""
    deq = Kernel("dequantize_int8", d_out * d_in + d_out * 4, d_out * d_in * nbytes(act), d_out * d_in)
    mm = base_linear_backward(t, d_in, d_out, act) if backward else base_linear_forward(t, d_in, d_out, act)
    return [deq] + mm


def packed_gemm(k: Kernel, name: str, d_in: int, d_out: int, act: torch.dtype, blocksize: int,
                 nested: bool) -> Kernel:
    """``k`` (a fused LoRA GEMM reading the dense [d_out, d_in] weight) reading the packed 4-bit weight instead."""
    w = nf4_weight_bytes(d_out, d_in, blocksize, nested)
    return Kernel(name, k.bytes_read - d_out * d_in * nbytes(act) + w, k.bytes_written, k.flops, True)


def qlora_fused_forward(t: int, d_in: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype,
                        bias: bool = False, blocksize: int = 64, nested: bool = False) -> list[Kernel]:
    """``qlora_linear_fused`` (kernels/qlora.py) forward, as built: lora.py's shrink, then
    qmatmul's 4-bit kernel with the adapter loop: reads X, the packed weight, t, B (and the bias)
    and writes Y once (``peftfast_fused_forward`` with the packed instead of the dense weight)."""
    big_r = sum(ranks)
    shrink = peftfast_lora_forward(t, d_in, d_out, ranks, act, ad)[0]
    gemm = Kernel("X @ W^T + t @ B^T (+ b)",
                  t * d_in * nbytes(act) + d_out * d_in * nbytes(act) + t * big_r * nbytes(ad)
                  + d_out * big_r * nbytes(ad) + (d_out * nbytes(act) if bias else 0),
                  t * d_out * nbytes(act), 2 * t * d_in * d_out + 2 * t * d_out * big_r, True)
    return [shrink, packed_gemm(gemm, "peftfast: X @ deq(W)^T + t @ B^T (+ b), one store", d_in, d_out, act,
                                blocksize, nested)]


def qlora_fused_backward(t: int, d_in: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype,
                         bias: bool = False, blocksize: int = 64, nested: bool = False) -> list[Kernel]:
    """``qlora_linear_fused`` backward, as built: ``peftfast_fused_backward`` (dY pass) with the
    dX + dA kernel reading the packed weight (qmatmul's dX tile when it carries the adapter,
    ``plans.qlora_dx_block_m``): dX = dY @ deq(W) + mask * (G @ A) and dA = G^T @ mask(X), each stored once."""
    ks = peftfast_fused_backward(t, d_in, d_out, ranks, act, ad, bias, block_m_dx=qlora_dx_block_m(t, act))
    return [packed_gemm(k, "peftfast bwd: dX = dY @ deq(W) + mask * (G @ A), dA = G^T @ mask(X)", d_in, d_out,
                        act, blocksize, nested) if k.name.startswith("peftfast bwd: dX") else k for k in ks]



def decode_reads(t: int, n: int, k: int, sms: int, act: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes of the 4-bit decode path: the GEMM reads x, the packed weight, absmax and code; with a
    split reduction it writes fp32 partials [split, T, N] and a reduction reads them and writes the
    output, else it writes the output itself."""
    split = decode_split(t, n, k, sms, act)
    partials = split * t * n * 4 if split > 1 else 0
    return {"gemm_read": matmul_4bit_fused(t, k, n, act).bytes_read, "reduce_read": partials,
            "split": split, "partials_written": partials, "out_written": t * n * act.itemsize}
