"""Linear layers over bitsandbytes 4-bit / 8-bit weights, dequantised tile by tile in registers.

Math (W = deq(W_packed) in its dtype, then cast to the activation dtype like bitsandbytes):

    forward   y[m, n]  = sum_k x[m, k] * W[n, k] + bias[n]          x: [..., K] -> y: [..., N]
    backward  dx[m, k] = sum_n dy[m, n] * W[n, k]                    (dL/dx = dL/dy @ W)
              dbias[n] = sum_m dy[m, n]                              (when bias requires grad)

W is frozen, so it has no gradient and nothing of W beyond its packed tensors (already resident)
is kept for backward; x is not saved at all.

Both directions are one kernel, ``out[m, c] = sum_r a[m, r] * B[r, c]`` with
B = W^T (forward: a = x, r = k, c = n) or B = W (backward: a = dy, r = n, c = k):

    for each program (row tile m, column tile c, reduction slice s):
        acc = 0                                                    # fp32 [BLOCK_M, BLOCK_C]
        for r0 in slice s, step BLOCK_R:
            a_tile = load a[m, r0:r0+BLOCK_R]
            b_tile = dequant(packed W under [r0:r0+BLOCK_R] x [c]) # registers only, never stored
            acc += dot(a_tile, b_tile)                             # tensor cores, fp32 accumulate
        store acc (+ bias), or fp32 partials when the reduction is split

Dequantising a B tile (4-bit). ALIGNED layout (K % blocksize == 0 and the tile's extent
along K <= blocksize, i.e. every transformers checkpoint): each packed byte is loaded once as a
[.., BLOCK/2] tile, split into its two indices (tl.join + reshape), looked up in the 16-entry
code table (L1-resident gather), and multiplied by ONE scale per row of W (a vector load, the
nested scale decoded per row). GENERAL layout (odd K, blocks spanning rows, blocksize 32): per
element byte / parity / block indices, same values. 8-bit: B = CB (int8 loads) * SCB per row.

Paths and the cost rule (``pick_config``), with T = number of tokens (rows of x):
  * decode (T <= 16): one 16-row tile, so every packed byte is read by exactly one program
    (the weight is read once; no dequantised copy anywhere). The forward's column tiles are 32
    wide (N=4096 -> 128 programs). When that leaves SMs idle, the reduction is split into S slices,
    S = min(#reduction blocks, ceil(2 * #SMs / #column tiles), S_max): programs write fp32
    partials [S, T, C] and a small kernel sums them, adds the bias and casts (deterministic, no
    atomics). That reduce re-reads S * T * C * 4 bytes; S_max = max(1, floor(3 * R / (800 * T)))
    keeps it within 3% of the packed weight (R * C / 2 bytes), so the bytes read stay within 5%
    of the packed weight and its scales. With S = 1 the kernel stores the output itself.
  * T > 16: each row tile dequantises the W tiles it needs again, so the dequant work and the
    W traffic are (T / BLOCK_M) * N*K. 128-row tiles halve both against 64-row tiles and are
    used when they still give at least one program per SM ("large"); otherwise 64x64 tiles
    keep the SMs busy ("medium").
Tile configs are in CONFIGS / resolve_config (fp32 and the general layout use shallower
reduction steps); every variant compiles without register spills for sm_80/86/89/90.
Memory: no [N, K] tensor is ever materialised; saved for backward: the packed tensors only.

LoRA in the same kernel (HAS_LORA, both the 4-bit and the int8 kernel, used by
``qlora.qlora_linear_fused``; ``_finish_tile``): after the quantised K-loop the forward adds a
short loop over the adapter ranks, acc += t @ B^T (t = s' drop(x) A^T, [M, RL]); the dX
direction adds the masked sum_i m_i * (G_i @ A_i) (adapters.accumulate_lora_dx) (G = s' dY B). With a split reduction
only split 0 adds the term. Extra traffic: t and B (or G and A), RL/K of the work.
With LORA_DA (unsplit dX; for 4-bit the aligned layout) the dX kernel also computes dA = sum_i G_i^T @ (m_i * x)
for its columns: it reads its x tile, stores an fp32 partial per row block, and the last row
block of each column block sums them in order (adapters.lora_grad_a_tile).

fp32 activations use ``input_precision="tf32x3"`` (fp32-accurate, on tensor cores); fp16/bf16
use the native MMA. The PyTorch path (CPU) dequantises (bitsandbytes' native kernel when it
applies, see quant.dequantize_4bit_native), multiplies and frees the weight, and recomputes it
in backward. Both ops are declared once (``MATMUL_4BIT``, ``MATMUL_INT8``; kernels/opdecl.py) as
``torch.library.custom_op``s (``peftfast::matmul_4bit``,
``peftfast::matmul_int8``) with fake implementations and registered autograd, so
torch.compile traces them without graph breaks. The LLM.int8 outlier threshold is not used:
like bitsandbytes' CPU training path, the 8-bit product uses the dequantised weight.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .adapters import accumulate_lora_dx, accumulate_lora_y, grad_a_operands, lora_grad_a_tile
from .aot import AotSpec
from .opdecl import OpDecl
from .runtime import DTYPE_NAMES, aot_signature, declare_int32_operands, dot_precision, gpu_target, launch, use_triton
from .tiles import NO_EPOCH, grouped_tile
from .quant import (
    Packed4bit,
    as_operand,
    block_scale,
    dequant_4bit,
    dequant_int8,
    log2_exact,
    lookup16,
    check_int8,
    check_packed4bit,
    dequantize_4bit_torch,
    dequantize_int8_reference,
    nested_args,
    unpack_pairs,
    weight_rounding,
)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _dot(a, b, acc):
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _finish_tile(acc, pid_m, pid_c, pid_s, offs_m, offs_c, M, C, out_ptr, bias_ptr, stride_os, stride_om, stride_oc,
                 lora_a_ptr, lora_w_ptr, lora_adapters_ptr, lora_seed, lora_n_adapters, RL, stride_lam, stride_lar,
                 stride_lw0, stride_lw1, lora_x_ptr, lora_dap_ptr, lora_da_ptr, lora_count_ptr, lora_count_base,
                 stride_lxm, stride_lxk, stride_dps, stride_dpr, stride_dpk, stride_dar, stride_dak,
                 TRANSPOSE_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                 LORA_DROPOUT: tl.constexpr, LORA_PRECISION: tl.constexpr, BLOCK_LR: tl.constexpr,
                 LORA_DA: tl.constexpr, BLOCK_M: tl.constexpr):
    """The epilogue shared by the quantised GEMMs (only their K-loops differ): the adapter term, a
    short second reduction over the ranks into the same accumulator (split 0 only): acc += t @ B^T
    (forward) or sum_i mask_i * (G_i @ A_i) (dX); the bias; one store; then, with LORA_DA, dA of
    these columns (adapters.lora_grad_a_tile; x read in 32-row slices: no spills)."""
    mask_m = offs_m < M
    mask_c = offs_c < C
    if HAS_LORA:
        rl = tl.where(pid_s == 0, RL, 0)
        if TRANSPOSE_W:
            acc = accumulate_lora_y(acc, lora_a_ptr, lora_w_ptr, rl, offs_m, offs_c, mask_m, mask_c, stride_lam,
                                       stride_lar, stride_lw0, stride_lw1, BLOCK_LR, LORA_PRECISION)
        else:
            n_ad = tl.where(pid_s == 0, lora_n_adapters, 0)
            acc = accumulate_lora_dx(acc, lora_a_ptr, lora_w_ptr, lora_adapters_ptr, n_ad, rl, lora_seed,
                                        offs_m, offs_c, mask_m, mask_c, stride_lam, stride_lar, stride_lw0,
                                        stride_lw1, LORA_DROPOUT, BLOCK_LR, LORA_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_c[None, :] * stride_oc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])
    if LORA_DA:
        lora_grad_a_tile(lora_x_ptr, lora_a_ptr, lora_dap_ptr, lora_da_ptr, lora_count_ptr + pid_c,
                            lora_count_base, lora_adapters_ptr, lora_n_adapters, RL, lora_seed, pid_m,
                            tl.cdiv(M, BLOCK_M), M, offs_c, mask_c, stride_lxm, stride_lxk, stride_lam, stride_lar,
                            stride_dps, stride_dpr, stride_dpk, stride_dar, stride_dak, LORA_DROPOUT, BLOCK_M,
                            min(BLOCK_M, 32), BLOCK_LR, LORA_PRECISION)


@triton.jit(do_not_specialize=["lora_seed", "lora_count_base"])
def _matmul_4bit_kernel(
    a_ptr,  # [M, R] activations: x (forward) or dy (backward), any strides
    out_ptr,  # [M, C] result, or fp32 [SPLIT, M, C] partial sums
    bias_ptr,  # [C] bias (read only when HAS_BIAS)
    data_ptr,  # packed 4-bit indices, uint8 [ceil(N*K/2)]
    code_ptr,  # fp32 [16] code table
    absmax_ptr,  # fp32 [n_blocks] scales, or uint8 [n_blocks] codes when NESTED
    nested_absmax_ptr,  # fp32 nested scales (NESTED only)
    nested_code_ptr,  # fp32 [256] (NESTED only)
    offset,  # fp32 nested offset
    K,  # row length of W (in_features)
    log2_bs,  # log2(blocksize)
    log2_nbs,  # log2(nested_blocksize)
    w_round,  # 0: none, 1: round W through fp16, 2: through bf16 (its dtype) before the cast to a's
    M, C, R,  # out rows, out columns, reduction length
    stride_am, stride_ar,  # strides of a
    stride_os, stride_om, stride_oc,  # strides of out (split, row, column)
    r_per_split,  # reduction length per grid-axis-1 program (a multiple of BLOCK_R)
    TRANSPOSE_W: tl.constexpr,  # True: B = W^T (forward); False: B = W (backward)
    NESTED: tl.constexpr,
    ALIGNED: tl.constexpr,  # K % blocksize == 0 and the tile's block-direction size <= blocksize
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    lora_a_ptr,  # [M, RL] t = s' drop(x) A^T (forward) or G = s' dY B (dX), adapter dtype (HAS_LORA)
    lora_w_ptr,  # [N, RL] stacked B (forward) or [RL, K] stacked A (dX), adapter dtype (HAS_LORA)
    lora_adapters_ptr,  # [n_adapters, 4] int64 rank start, end, stream, keep threshold (dX with dropout)
    lora_seed,  # 64-bit dropout seed (dX with dropout)
    lora_n_adapters,  # number of adapters
    RL,  # total adapter rank
    stride_lam, stride_lar,  # strides of lora_a (row, rank)
    stride_lw0, stride_lw1,  # strides of lora_w (dim 0, dim 1)
    HAS_LORA: tl.constexpr,  # add the adapter term (split 0 only when the reduction is split)
    LORA_DROPOUT: tl.constexpr,  # dX: mask each adapter's G_i @ A_i with its dropout mask
    LORA_PRECISION: tl.constexpr,  # dot precision of the adapter product
    BLOCK_LR: tl.constexpr,  # the adapter loop's rank step
    lora_x_ptr,  # [M, C] layer input x (dX with LORA_DA)
    lora_dap_ptr,  # [cdiv(M, BLOCK_M), RL, C] fp32 dA partials (LORA_DA)
    lora_da_ptr,  # [RL, C] stacked dA_i, adapter dtype (LORA_DA)
    lora_count_ptr,  # [cdiv(C, BLOCK_C)] int64 epoch counters (LORA_DA)
    lora_count_base,  # this launch's epoch base (tiles.epoch_counters; LORA_DA)
    stride_lxm, stride_lxk, stride_dps, stride_dpr, stride_dpk, stride_dar, stride_dak,
    LORA_DA: tl.constexpr,  # dX (unsplit): also dA = sum_i G_i^T @ (mask_i * x) for these columns
):
    pid_m, pid_c = grouped_tile(tl.program_id(0), M, C, BLOCK_M, BLOCK_C, GROUP_M)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c0 = pid_c * BLOCK_C
    lc = tl.arange(0, BLOCK_C)
    offs_c = c0 + lc
    lr = tl.arange(0, BLOCK_R)
    r_begin = pid_s * r_per_split
    r_end = tl.minimum(r_begin + r_per_split, R)
    half_k = K // 2
    k_blocks = K >> log2_bs
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r0 in range(r_begin, r_end, BLOCK_R):
        offs_r = r0 + lr
        a_mask = (offs_m[:, None] < M) & (offs_r[None, :] < r_end)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar, mask=a_mask, other=0.0)
        if ALIGNED:
            # rows of W are whole blocks and the tile never crosses a block along K: load each
            # byte once, split it into its two elements, scale by one value per row of W
            if TRANSPOSE_W:  # B[r, c] = W[c, r]: byte pairs run along r
                lh = tl.arange(0, BLOCK_R // 2)
                byte = tl.load(data_ptr + (c0 * half_k + (r0 >> 1)) + (lc[None, :] * half_k + lh[:, None]),
                               mask=((r0 + 2 * lh[:, None]) < r_end) & (offs_c[None, :] < C), other=0)
                q = tl.reshape(tl.permute(unpack_pairs(byte), (0, 2, 1)), (BLOCK_R, BLOCK_C))
                scale = block_scale(c0 * k_blocks + (r0 >> log2_bs), lc * k_blocks, offs_c < C, absmax_ptr,
                                     nested_absmax_ptr, nested_code_ptr, offset, log2_nbs, NESTED)
                w = lookup16(q, code_ptr) * scale[None, :]
            else:  # B[r, c] = W[r, c]: byte pairs run along c
                lh = tl.arange(0, BLOCK_C // 2)
                byte = tl.load(data_ptr + (r0 * half_k + (c0 >> 1)) + (lr[:, None] * half_k + lh[None, :]),
                               mask=(offs_r[:, None] < r_end) & ((c0 + 2 * lh[None, :]) < C), other=0)
                q = tl.reshape(unpack_pairs(byte), (BLOCK_R, BLOCK_C))
                scale = block_scale(r0 * k_blocks + (c0 >> log2_bs), lr * k_blocks, offs_r < r_end,
                                     absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, log2_nbs, NESTED)
                w = lookup16(q, code_ptr) * scale[:, None]
        else:
            # general layout (odd K, blocks spanning rows): per-element byte and block indices
            if TRANSPOSE_W:
                base = c0 * K + r0
                local = lc[None, :] * K + lr[:, None]  # B[r, c] = W[c, r]
            else:
                base = r0 * K + c0
                local = lr[:, None] * K + lc[None, :]  # B[r, c] = W[r, c]
            w_mask = (offs_r[:, None] < r_end) & (offs_c[None, :] < C)
            w = dequant_4bit(base, local, w_mask, data_ptr, code_ptr, absmax_ptr, nested_absmax_ptr,
                              nested_code_ptr, offset, log2_bs, log2_nbs, NESTED)
        acc = _dot(a, as_operand(w, a, w_round), acc)
    _finish_tile(acc, pid_m, pid_c, pid_s, offs_m, offs_c, M, C, out_ptr, bias_ptr, stride_os, stride_om, stride_oc,
                 lora_a_ptr, lora_w_ptr, lora_adapters_ptr, lora_seed, lora_n_adapters, RL, stride_lam, stride_lar,
                 stride_lw0, stride_lw1, lora_x_ptr, lora_dap_ptr, lora_da_ptr, lora_count_ptr, lora_count_base,
                 stride_lxm, stride_lxk, stride_dps, stride_dpr, stride_dpk, stride_dar, stride_dak, TRANSPOSE_W,
                 HAS_BIAS, HAS_LORA, LORA_DROPOUT, LORA_PRECISION, BLOCK_LR, LORA_DA, BLOCK_M)


@triton.jit(do_not_specialize=["lora_seed", "lora_count_base"])
def _matmul_int8_kernel(
    a_ptr,  # [M, R] activations: x (forward) or dy (backward), any strides
    out_ptr,  # [M, C] result, or fp32 [SPLIT, M, C] partial sums
    bias_ptr,  # [C] bias (read only when HAS_BIAS)
    cb_ptr,  # int8 [N, K] CB
    stride_cbn, stride_cbk,  # strides of CB
    scb_ptr,  # fp32 [N] SCB (row absmax)
    N,  # rows of CB (out_features)
    M, C, R,  # out rows, out columns, reduction length
    stride_am, stride_ar,  # strides of a
    stride_os, stride_om, stride_oc,  # strides of out (split, row, column)
    r_per_split,  # reduction length per grid-axis-1 program (a multiple of BLOCK_R)
    TRANSPOSE_W: tl.constexpr,  # True: B = W^T (forward); False: B = W (backward)
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    lora_a_ptr,  # [M, RL] t = s' drop(x) A^T (forward) or G = s' dY B (dX), adapter dtype (HAS_LORA)
    lora_w_ptr,  # [N, RL] stacked B (forward) or [RL, K] stacked A (dX), adapter dtype (HAS_LORA)
    lora_adapters_ptr,  # [n_adapters, 4] int64 rank start, end, stream, keep threshold (dX with dropout)
    lora_seed,  # 64-bit dropout seed (dX with dropout)
    lora_n_adapters,  # number of adapters
    RL,  # total adapter rank
    stride_lam, stride_lar,  # strides of lora_a (row, rank)
    stride_lw0, stride_lw1,  # strides of lora_w (dim 0, dim 1)
    HAS_LORA: tl.constexpr,  # add the adapter term (split 0 only when the reduction is split)
    LORA_DROPOUT: tl.constexpr,  # dX: mask each adapter's G_i @ A_i with its dropout mask
    LORA_PRECISION: tl.constexpr,  # dot precision of the adapter product
    BLOCK_LR: tl.constexpr,  # the adapter loop's rank step
    lora_x_ptr,  # [M, C] layer input x (dX with LORA_DA)
    lora_dap_ptr,  # [cdiv(M, BLOCK_M), RL, C] fp32 dA partials (LORA_DA)
    lora_da_ptr,  # [RL, C] stacked dA_i, adapter dtype (LORA_DA)
    lora_count_ptr,  # [cdiv(C, BLOCK_C)] int64 epoch counters (LORA_DA)
    lora_count_base,  # this launch's epoch base (tiles.epoch_counters; LORA_DA)
    stride_lxm, stride_lxk, stride_dps, stride_dpr, stride_dpk, stride_dar, stride_dak,
    LORA_DA: tl.constexpr,  # dX (unsplit): also dA = sum_i G_i^T @ (mask_i * x) for these columns
):
    pid_m, pid_c = grouped_tile(tl.program_id(0), M, C, BLOCK_M, BLOCK_C, GROUP_M)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_begin = pid_s * r_per_split
    r_end = tl.minimum(r_begin + r_per_split, R)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r0 in range(r_begin, r_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        a_mask = (offs_m[:, None] < M) & (offs_r[None, :] < r_end)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_r[None, :] * stride_ar, mask=a_mask, other=0.0)
        w_mask = (offs_r[:, None] < r_end) & (offs_c[None, :] < C)
        if TRANSPOSE_W:
            w = dequant_int8(offs_c[None, :], offs_r[:, None], w_mask, cb_ptr, stride_cbn, stride_cbk,
                              scb_ptr, N)
        else:
            w = dequant_int8(offs_r[:, None], offs_c[None, :], w_mask, cb_ptr, stride_cbn, stride_cbk,
                              scb_ptr, N)
        acc = _dot(a, w.to(a.dtype), acc)
    _finish_tile(acc, pid_m, pid_c, pid_s, offs_m, offs_c, M, C, out_ptr, bias_ptr, stride_os, stride_om, stride_oc,
                 lora_a_ptr, lora_w_ptr, lora_adapters_ptr, lora_seed, lora_n_adapters, RL, stride_lam, stride_lar,
                 stride_lw0, stride_lw1, lora_x_ptr, lora_dap_ptr, lora_da_ptr, lora_count_ptr, lora_count_base,
                 stride_lxm, stride_lxk, stride_dps, stride_dpr, stride_dpk, stride_dar, stride_dak, TRANSPOSE_W,
                 HAS_BIAS, HAS_LORA, LORA_DROPOUT, LORA_PRECISION, BLOCK_LR, LORA_DA, BLOCK_M)


@triton.jit
def _split_reduce_kernel(
    part_ptr,  # fp32 [SPLIT, M*C] partial sums, contiguous
    out_ptr,  # [M*C] result, contiguous
    bias_ptr,  # [C] bias (read only when HAS_BIAS)
    MC,  # M*C
    C,  # columns (bias length)
    SPLIT,  # number of partial sums
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MC
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, SPLIT):
        acc += tl.load(part_ptr + offs, mask=mask, other=0.0)
        part_ptr += MC
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % C, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# small operands addressed with 32-bit offsets (checked by runtime.launch on each call): the code tables and the adapter table
declare_int32_operands(_matmul_4bit_kernel, "code_ptr", "nested_code_ptr", "lora_adapters_ptr")
declare_int32_operands(_matmul_int8_kernel, "lora_adapters_ptr")


# ----------------------------------------------------------------------------- launchers


class Config(NamedTuple):
    block_m: int
    block_c: int
    block_r: int
    group_m: int
    num_warps: int
    num_stages: int


# forward tiles (c = n, r = k) and dx tiles (c = k, r = n); the tile size along K stays <= 64 so a
# tile lies inside one quantisation block (blocksize >= 64) and takes the ALIGNED path
DECODE_MAX_TOKENS = 16
CONFIGS = {
    ("decode", True): Config(block_m=16, block_c=32, block_r=64, group_m=1, num_warps=8, num_stages=2),
    ("large", True): Config(block_m=128, block_c=64, block_r=64, group_m=8, num_warps=8, num_stages=3),
    ("medium", True): Config(block_m=64, block_c=64, block_r=64, group_m=8, num_warps=8, num_stages=3),
    ("decode", False): Config(block_m=16, block_c=64, block_r=64, group_m=1, num_warps=4, num_stages=3),
    ("large", False): Config(block_m=128, block_c=64, block_r=64, group_m=8, num_warps=8, num_stages=3),
    ("medium", False): Config(block_m=64, block_c=64, block_r=64, group_m=8, num_warps=8, num_stages=3),
}
_REDUCE_BLOCK = 1024


def resolve_config(name: str, transpose: bool, dtype: torch.dtype, general: bool = False) -> Config:
    """The tile config a launch uses.

    fp32 activations (3xTF32 MMA: each operand split into a high and a low half) use a reduction
    depth of 16 and two stages to stay within registers and shared memory. The general
    4-bit layout (per-element indices; the pipeliner stages its gathers in shared memory) uses
    8 warps, a reduction depth of 16, fewer stages (two; one with fp32) and never the 128-row
    tile. (Chosen so that every variant compiles without spills on sm_80/86/89/90.)
    """
    if general and name == "large":
        name = "medium"
    cfg = CONFIGS[name, transpose]
    if dtype == torch.float32:
        cfg = cfg._replace(block_r=16, num_stages=2)
    if general:
        cfg = cfg._replace(block_r=16, num_warps=8, num_stages=1 if dtype == torch.float32 else 2)
    return cfg


def sm_count(device: torch.device) -> int:
    """SMs of the GPU a launch on ``device`` is planned for (``runtime.gpu_target``: the CUDA device's;
    else an H100's, or the recorded architecture's reference GPU)."""
    return gpu_target(device).sms


def decode_split_limit(m: int, r: int) -> int:
    """Largest reduction split whose partial sums (m * C * 4 bytes per slice, re-read by the
    reduce) stay within 3% of the packed weight (r * C / 2 bytes)."""
    return max(1, (3 * r) // (800 * max(m, 1)))


def pick_config(m: int, c: int, r: int, transpose: bool, device: torch.device,
                sms: Optional[int] = None) -> tuple[str, int]:
    """(config name, reduction split) for out [m, c] reduced over r (rule in the module docstring);
    ``sms`` overrides the device's SM count (for modelling another GPU)."""
    sms = sm_count(device) if sms is None else sms
    if m <= DECODE_MAX_TOKENS:
        cfg = CONFIGS["decode", transpose]
        tiles = triton.cdiv(c, cfg.block_c)
        split = min(triton.cdiv(r, cfg.block_r), triton.cdiv(2 * sms, tiles), decode_split_limit(m, r))
        return "decode", max(split, 1)
    cfg = CONFIGS["large", transpose]
    if triton.cdiv(m, cfg.block_m) * triton.cdiv(c, cfg.block_c) >= sms:
        return "large", 1
    return "medium", 1


def lora_dx_config(config: str) -> str:
    """The config of a dX launch that carries the adapter term: never the 128-row tile (the masked
    G @ A loop on top of it spills on sm_86/89), the medium one instead."""
    return "medium" if config == "large" else config


def int8_lora_da_config(cfg: Config, adapter_dtype: Optional[torch.dtype], da: bool,
                        act: Optional[torch.dtype] = None) -> Config:
    """The int8 dX kernel that also computes dA of adapters in another dtype than the activations ``act``
    runs two stages: with three, ptxas keeps it at 128 registers and spills on sm_80 for fp32 adapters
    (16-bit activations, 64-bit addresses), and spills 8 bytes on sm_86 for fp16 adapters on bf16
    activations or the reverse (decode tile, dropout, aligned shapes: kernels/launch_specs.py)."""
    other = adapter_dtype == torch.float32 or (act is not None and adapter_dtype != act)
    return cfg._replace(num_stages=2) if da and other else cfg


def nested_lora_config(cfg: Config, nested: bool, lora: bool, arch: int) -> Config:
    """The 4-bit kernel with double-quantised scales (NESTED) and the adapter term runs two stages below
    sm_90: with three, ptxas caps it at 128 registers and spills 8-12 bytes on sm_80 (dX with dA, 64-row
    tile), sm_86 and sm_89 (decode dX with dA; the forward with fp32 adapters, 64-row tile), once Triton
    specialises aligned shapes (kernels/launch_specs.py). sm_90 keeps three."""
    return cfg._replace(num_stages=min(cfg.num_stages, 2)) if nested and lora and arch < 90 else cfg


def qlora_dx_block_m(t: int, act: torch.dtype) -> int:
    """Rows per program of the adapter-carrying quantised dX kernel for T = t tokens: the decode
    tile (16) for T <= DECODE_MAX_TOKENS, else the medium tile (64) whatever the SM count (a
    'large' pick becomes medium). dA's fp32 partials are [cdiv(T, this), R, K]."""
    name = "decode" if t <= DECODE_MAX_TOKENS else "large"  # pick_config: decode, else large or medium
    return resolve_config(lora_dx_config(name), False, act).block_m


def split_reduction(r: int, block_r: int, split: Optional[int]) -> tuple[int, int]:
    """(slices, reduction length per slice) of a reduction of length r asked to split ``split`` ways:
    whole blocks of block_r per slice, so fewer slices than asked when they would not divide evenly."""
    blocks = triton.cdiv(r, block_r)
    split = max(1, min(split or 1, blocks))
    r_per_split = triton.cdiv(blocks, split) * block_r
    return triton.cdiv(r, r_per_split), r_per_split


def _launch(kernel, weight_args, constexprs, a, c, r, bias, transpose, name, cfg, split):
    """out [M, C] = a [M, R] @ B [R, C] where the kernel dequantises B from ``weight_args``."""
    m = a.shape[0]
    out = torch.empty((m, c), dtype=a.dtype, device=a.device)
    if m == 0 or c == 0:
        return out
    split, r_per_split = split_reduction(r, cfg.block_r, split)
    # a split reduction goes through fp32 partials (the bias and the cast happen in the reduce)
    partial = split > 1
    target = torch.empty((split, m, c), dtype=torch.float32, device=a.device) if partial else out
    bias = None if bias is None else bias.contiguous()
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(c, cfg.block_c), split)
    launch(kernel, grid,
        a, target, bias if bias is not None else target, *weight_args,
        m, c, r, a.stride(0), a.stride(1),
        target.stride(0) if partial else 0, target.stride(-2), target.stride(-1), r_per_split,
        TRANSPOSE_W=transpose, HAS_BIAS=bias is not None and not partial, BLOCK_M=cfg.block_m,
        BLOCK_C=cfg.block_c, BLOCK_R=cfg.block_r, GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, enable_fp_fusion=False, **constexprs,
    )
    if partial:
        launch(_split_reduce_kernel, (triton.cdiv(m * c, _REDUCE_BLOCK),),
            target, out, bias if bias is not None else out, m * c, c, split,
            HAS_BIAS=bias is not None, BLOCK=_REDUCE_BLOCK, num_warps=4, enable_fp_fusion=False,
        )
    return out


def aligned_4bit(k: int, blocksize: int, cfg: Config, transpose: bool) -> bool:
    """Rows of W are whole blocks and a tile's extent along K fits in one block."""
    return k % blocksize == 0 and blocksize >= (cfg.block_r if transpose else cfg.block_c)


_LORA_BLOCK_R = 16  # the adapter loop's rank step


def _lora_args(lora, dummy: torch.Tensor) -> dict:
    """Kernel arguments for the adapter term: lora = (t or G [M, RL], B [N, RL] or A [RL, K],
    adapter table [n, 4] int64, seed, dropout, dot precision), or None for none."""
    no_da = dict(lora_x_ptr=dummy, lora_dap_ptr=dummy, lora_da_ptr=dummy, lora_count_ptr=dummy,
                 lora_count_base=NO_EPOCH, stride_lxm=0,
                 stride_lxk=0, stride_dps=0, stride_dpr=0, stride_dpk=0, stride_dar=0, stride_dak=0, LORA_DA=False)
    if lora is None:
        return dict(lora_a_ptr=dummy, lora_w_ptr=dummy, lora_adapters_ptr=dummy, lora_seed=0, lora_n_adapters=0,
                    RL=0, stride_lam=0, stride_lar=0, stride_lw0=0, stride_lw1=0, HAS_LORA=False,
                    LORA_DROPOUT=False, LORA_PRECISION="ieee", BLOCK_LR=_LORA_BLOCK_R, **no_da)
    la, lw, table, seed, dropout, precision = lora
    return dict(lora_a_ptr=la, lora_w_ptr=lw, lora_adapters_ptr=table, lora_seed=seed,
                lora_n_adapters=table.shape[0], RL=la.shape[1], stride_lam=la.stride(0), stride_lar=la.stride(1),
                stride_lw0=lw.stride(0), stride_lw1=lw.stride(1), HAS_LORA=True, LORA_DROPOUT=bool(dropout),
                LORA_PRECISION=precision, BLOCK_LR=_LORA_BLOCK_R, **no_da)


def matmul_4bit_triton(a, p: Packed4bit, bias=None, transpose=True, config=None, split=None, aligned=None,
                       lora=None, lora_x=None):
    """a [M, R] @ deq(W)^T (transpose, R = K) or a @ deq(W) (R = N); bias [C] or None.

    ``config`` (a CONFIGS name), ``split`` and ``aligned`` override the automatic choices.
    ``lora`` (see _lora_args) adds t @ B^T (transpose) or sum_i mask_i * G_i @ A_i in the same kernel.
    ``lora_x`` (dX with ``lora``): x [M, K]; the call returns (dX, dA) where the kernel also
    computes dA = sum_i G_i^T @ (mask_i * x) ([RL, K] in A's dtype; the aligned layout only:
    the general one returns (dX, None) and the caller computes dA separately).
    """
    data, n, k = check_packed4bit(p)
    c, r = (n, k) if transpose else (k, n)
    if config is None:
        config, split = pick_config(a.shape[0], c, r, transpose, a.device)
    if lora is not None and not transpose:
        config = lora_dx_config(config)
    can_align = aligned_4bit(k, p.blocksize, resolve_config(config, transpose, a.dtype), transpose)
    if aligned is None:
        aligned = can_align
    elif aligned and not can_align:
        raise ValueError(f"the aligned path needs in_features % blocksize == 0 and blocksize >= the tile; "
                         f"got in_features={k}, blocksize={p.blocksize}, config={config}")
    cfg = resolve_config(config, transpose, a.dtype, general=not aligned)
    cfg = nested_lora_config(cfg, p.nested, lora is not None, gpu_target(a.device).arch)
    nested_absmax, nested_code, offset, log2_nbs = nested_args(p)
    weight_args = (data, p.code.contiguous(), p.absmax.contiguous(), nested_absmax.contiguous(),
                   nested_code.contiguous(), offset, k,
                   log2_exact(p.blocksize, "blocksize"), log2_nbs, weight_rounding(p.dtype, a.dtype))
    constexprs = dict(NESTED=p.nested, ALIGNED=aligned)
    if lora_x is not None and not aligned:  # the general layout has no registers to spare for dA
        constexprs.update(_lora_args(lora, data))
        return _launch(_matmul_4bit_kernel, weight_args, constexprs, a, c, r, bias, transpose, config, cfg, split), None
    return _launch_with_lora(_matmul_4bit_kernel, weight_args, constexprs, a, c, r, bias, transpose, config, cfg,
                             split, lora, lora_x, data)


def _launch_with_lora(kernel, weight_args, constexprs, a, c, r, bias, transpose, config, cfg, split, lora, lora_x,
                      dummy):
    """``_launch`` with the adapter arguments (``_lora_args``); with ``lora_x`` the dX kernel also
    computes dA (unsplit) and this returns (dX, dA)."""
    constexprs = dict(constexprs, **_lora_args(lora, dummy))
    if lora_x is None:
        return _launch(kernel, weight_args, constexprs, a, c, r, bias, transpose, config, cfg, split)
    num_m = triton.cdiv(a.shape[0], cfg.block_m)
    da, ptrs, strides = grad_a_operands(lora_x, lora[1], num_m, cfg.block_c)
    constexprs.update(zip(("lora_x_ptr", "lora_dap_ptr", "lora_da_ptr", "lora_count_ptr", "lora_count_base"),
                          ptrs))
    constexprs.update(zip(("stride_lxm", "stride_lxk", "stride_dps", "stride_dpr", "stride_dpk", "stride_dar",
                           "stride_dak"), strides))
    constexprs["LORA_DA"] = True
    return _launch(kernel, weight_args, constexprs, a, c, r, bias, transpose, config, cfg, 1), da


def matmul_int8_triton(a, cb, scb, bias=None, transpose=True, config=None, split=None, lora=None, lora_x=None):
    """a [M, R] @ W^T (transpose) or a @ W with W = CB * SCB / 127; ``lora`` and ``lora_x`` as for
    ``matmul_4bit_triton`` (with ``lora_x`` the call returns (dX, dA))."""
    n, k = cb.shape
    c, r = (n, k) if transpose else (k, n)
    if config is None:
        config, split = pick_config(a.shape[0], c, r, transpose, a.device)
    if lora is not None and not transpose:
        config = lora_dx_config(config)  # as the 4-bit dX kernel
    cfg = resolve_config(config, transpose, a.dtype)
    if lora is not None and lora_x is not None:
        cfg = int8_lora_da_config(cfg, lora[1].dtype, True, a.dtype)
    weight_args = (cb, cb.stride(0), cb.stride(1), scb.reshape(-1).contiguous(), n)
    return _launch_with_lora(_matmul_int8_kernel, weight_args, {}, a, c, r, bias, transpose, config, cfg, split,
                             lora, lora_x, cb)


# ----------------------------------------------------------------------------- PyTorch reference


def matmul_4bit_reference(x, p: Packed4bit, bias=None):
    """x [..., K] @ deq(W).to(x.dtype)^T + bias (the weight lives only during this call)."""
    w = dequantize_4bit_torch(p).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def matmul_int8_reference(x, cb, scb, bias=None):
    w = dequantize_int8_reference(cb, scb, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


# ----------------------------------------------------------------------------- checks


def check_x(x: torch.Tensor, k: int, n: int, bias: Optional[torch.Tensor], weight: torch.Tensor, what: str):
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{what}: x must be [..., {k}] (in_features of the weight), got {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"{what}: x is on {x.device} but the weight is on {weight.device}")
    bad_bias = bias is not None and (bias.shape != (n,) or bias.device != x.device
                                     or bias.dtype not in _FLOAT_DTYPES)
    if bad_bias:
        raise ValueError(f"{what}: bias must be a float [{n}] tensor on {x.device}, got {bias.dtype} "
                         f"{tuple(bias.shape)} on {bias.device}")


def _bias_grad(dy: torch.Tensor, bias_dtype: torch.dtype) -> torch.Tensor:
    return dy.reshape(-1, dy.shape[-1]).sum(0, dtype=torch.float32).to(bias_dtype)


# ----------------------------------------------------------------------------- 4-bit op


def _unpack4(data, absmax, code, blocksize, out_features, in_features, dtype,
             nested_absmax, nested_code, nested_blocksize, offset) -> Packed4bit:
    return Packed4bit(data, absmax, code, blocksize, (out_features, in_features), dtype,
                      nested_absmax, nested_code, nested_blocksize, offset)


def _forward_4bit(
    x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
    out_features: int, in_features: int, dtype: torch.dtype, nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor], nested_blocksize: int, offset: Optional[float],
    bias: Optional[torch.Tensor], *, hint=None,
) -> torch.Tensor:
    p = _unpack4(data, absmax, code, blocksize, out_features, in_features, dtype,
                 nested_absmax, nested_code, nested_blocksize, offset)
    x2 = x.reshape(-1, in_features)
    if use_triton(x, data):
        y = matmul_4bit_triton(x2, p, bias, transpose=True)
    else:
        y = matmul_4bit_reference(x2, p, bias)
    return y.reshape(*x.shape[:-1], out_features)


def _save_4bit(args, outputs) -> list:
    """The packed tensors only (already resident; x is not needed: W is frozen)."""
    _x, data, absmax, code, _bs, _n, _k, _dtype, nested_absmax, nested_code, _nbs, _offset, bias = args
    return [data, absmax, code, nested_absmax, nested_code, bias]


def _backward_4bit(saved, grads, needs, statics, *, hint=None) -> list:
    """Gradients of (x, data, absmax, code, nested_absmax, nested_code, bias): dx = dy @ deq(W), db."""
    data, absmax, code, nested_absmax, nested_code, bias = saved
    bs, n, k, dtype, nbs, offset = statics
    dy = grads[0]
    dx = dbias = None
    if needs[0]:
        p = _unpack4(data, absmax, code, bs, n, k, dtype, nested_absmax, nested_code, nbs, offset)
        dy2 = dy.reshape(-1, n)
        if use_triton(dy, data):
            dx = matmul_4bit_triton(dy2, p, None, transpose=False)
        else:
            dx = dy2 @ dequantize_4bit_torch(p).to(dy.dtype)  # recomputed, freed on return
        dx = dx.reshape(*dy.shape[:-1], k)
    if bias is not None and needs[6]:
        dbias = _bias_grad(dy, bias.dtype)
    return [dx, None, None, None, None, None, dbias]


def _fake_4bit(x, data, absmax, code, blocksize, out_features, in_features, dtype, nested_absmax, nested_code,
               nested_blocksize, offset, bias):
    return x.new_empty((*x.shape[:-1], out_features))


def _backward_fake_4bit(saved, grads, needs, statics) -> list:
    bias, k, dy = saved[5], statics[2], grads[0]
    return [dy.new_empty((*dy.shape[:-1], k)) if needs[0] else None, None, None, None, None, None,
            bias.new_empty(bias.shape) if bias is not None and needs[6] else None]


# the op, declared once: peftfast::matmul_4bit (+ fake, backward op, autograd)
MATMUL_4BIT = OpDecl("peftfast::matmul_4bit", _forward_4bit, _backward_4bit, save=_save_4bit, fake=_fake_4bit,
                     backward_fake=_backward_fake_4bit)


def matmul_4bit(x: torch.Tensor, p: Packed4bit, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ deq(W)^T + bias, in x.dtype (fp32 accumulation).

    x: fp32/fp16/bf16, any leading dims, any strides; p: the packed weight (N, K);
    bias: [N] or None. Differentiable in x and bias.
    """
    data, n, k = check_packed4bit(p)
    check_x(x, k, n, bias, data, "matmul_4bit")
    offset = None if p.offset is None else float(p.offset)
    # as ever, the custom op in eager mode too (one op for a TorchDispatchMode, the same saved tensors)
    return MATMUL_4BIT.packet(
        x, data, p.absmax, p.code, int(p.blocksize), n, k, p.dtype, p.nested_absmax, p.nested_code,
        int(p.nested_blocksize), offset, bias,
    )


# ----------------------------------------------------------------------------- 8-bit op


def _forward_int8(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor],
                  *, hint=None) -> torch.Tensor:
    n, k = cb.shape
    x2 = x.reshape(-1, k)
    if use_triton(x, cb):
        y = matmul_int8_triton(x2, cb, scb, bias, transpose=True)
    else:
        y = matmul_int8_reference(x2, cb, scb, bias)
    return y.reshape(*x.shape[:-1], n)


def _backward_int8(saved, grads, needs, statics, *, hint=None) -> list:
    """Gradients of (x, cb, scb, bias)."""
    cb, scb, bias = saved
    dy = grads[0]
    dx = dbias = None
    if needs[0]:
        n, k = cb.shape
        dy2 = dy.reshape(-1, n)
        if use_triton(dy, cb):
            dx = matmul_int8_triton(dy2, cb, scb, None, transpose=False)
        else:
            dx = dy2 @ dequantize_int8_reference(cb, scb, dy.dtype)
        dx = dx.reshape(*dy.shape[:-1], k)
    if bias is not None and needs[3]:
        dbias = _bias_grad(dy, bias.dtype)
    return [dx, None, None, dbias]


def _backward_fake_int8(saved, grads, needs, statics) -> list:
    cb, _scb, bias = saved
    dy = grads[0]
    return [dy.new_empty((*dy.shape[:-1], cb.shape[1])) if needs[0] else None, None, None,
            bias.new_empty(bias.shape) if bias is not None and needs[3] else None]


# the op, declared once: peftfast::matmul_int8 (+ fake, backward op, autograd)
MATMUL_INT8 = OpDecl("peftfast::matmul_int8", _forward_int8, _backward_int8,
                     save=lambda args, outputs: [args[1], args[2], args[3]],
                     fake=lambda x, cb, scb, bias: x.new_empty((*x.shape[:-1], cb.shape[0])),
                     backward_fake=_backward_fake_int8)


def matmul_int8(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """y [..., N] = x [..., K] @ W^T + bias with W = CB * SCB[:, None] / 127 (bnb row-wise int8).

    The LLM.int8 outlier threshold is not applied: like bitsandbytes' own CPU training path, the
    product uses the dequantised weight. Differentiable in x and bias.
    """
    n, k = check_int8(cb, scb)
    check_x(x, k, n, bias, cb, "matmul_int8")
    return MATMUL_INT8.packet(x, cb, scb.reshape(-1), bias)


# ----------------------------------------------------------------------------- AOT declarations

_COMMON_SIG = {
    "M": "i32", "C": "i32", "R": "i32", "stride_am": "i32", "stride_ar": "i32", "stride_os": "i32",
    "stride_om": "i32", "stride_oc": "i32", "r_per_split": "i32",
}


def _lora_sig(ad: Optional[torch.dtype], a_dtype: torch.dtype, dropout: bool, da: bool) -> tuple[dict, dict]:
    """(signature, constexprs) of the 4-bit kernel's adapter arguments; ad None: HAS_LORA=False."""
    w = DTYPE_NAMES[ad] if ad is not None else "fp32"
    sig = {"lora_a_ptr": f"*{w}", "lora_w_ptr": f"*{w}", "lora_adapters_ptr": "*i64", "lora_seed": "i64",
           "lora_n_adapters": "i32", "RL": "i32", "stride_lam": "i32", "stride_lar": "i32", "stride_lw0": "i32",
           "stride_lw1": "i32", "lora_x_ptr": f"*{DTYPE_NAMES[a_dtype]}", "lora_dap_ptr": "*fp32",
           "lora_da_ptr": f"*{w}", "lora_count_ptr": "*i64", "lora_count_base": "i64",
           **{k: "i32" for k in ("stride_lxm", "stride_lxk", "stride_dps", "stride_dpr", "stride_dpk", "stride_dar",
                                 "stride_dak")}}
    consts = dict(HAS_LORA=ad is not None, LORA_DROPOUT=dropout,
                  LORA_PRECISION="ieee" if ad is None else dot_precision(a_dtype, ad), BLOCK_LR=_LORA_BLOCK_R,
                  LORA_DA=da)
    return sig, consts


def _matmul_spec(kernel, name, weight_sig, a_dtype, config_name, transpose, extra, general=False, lora=None,
                 partial=False):
    """partial: the split reduction's fp32 partial sums (decode); else the output itself."""
    cfg = resolve_config(config_name, transpose, a_dtype, general)
    if kernel is _matmul_int8_kernel and lora is not None:
        cfg = int8_lora_da_config(cfg, lora[0], lora[2], a_dtype)
    a = DTYPE_NAMES[a_dtype]
    signature = {"a_ptr": f"*{a}", "out_ptr": "*fp32" if partial else f"*{a}", "bias_ptr": f"*{a}",
                 **weight_sig, **_COMMON_SIG}
    constexprs = dict(TRANSPOSE_W=transpose, **extra, HAS_BIAS=transpose and not partial, BLOCK_M=cfg.block_m,
                      BLOCK_C=cfg.block_c, BLOCK_R=cfg.block_r, GROUP_M=cfg.group_m)
    tags = "".join(f",{k}={v}" for k, v in extra.items()) + (",split" if partial else "")
    # both kernels take the adapter arguments; lora = (adapter dtype, dropout, dA in the dX kernel) or None
    ad, dropout, da = lora if lora is not None else (None, False, False)
    lsig, lconsts = _lora_sig(ad, a_dtype, dropout, da)
    signature.update(lsig)
    constexprs.update(lconsts)
    if lora is not None:
        tags += f",lora={DTYPE_NAMES[ad]},dropout={int(dropout)}" + (",dA=1" if da else "")
    signature = aot_signature(kernel, signature, constexprs)
    return AotSpec(
        name=f"{name}[{a},{config_name},{'fwd' if transpose else 'dx'}{tags}]",
        fn=kernel, signature=signature, constexprs=constexprs, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, uses_dot=True,
    )


def aot_specs() -> list[AotSpec]:
    """Every (kernel, config, activation dtype, direction, layout flag) a launch can use."""
    specs = []
    for a_dtype, name in DTYPE_NAMES.items():
        for config_name, transpose in CONFIGS:
            for nested in (False, True):
                for aligned in (True, False):
                    if not aligned and config_name == "large":
                        continue  # the general layout runs the large tile as medium
                    weight_sig = {
                        "data_ptr": "*u8", "code_ptr": "*fp32", "absmax_ptr": "*u8" if nested else "*fp32",
                        "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset": "fp32",
                        "K": "i32", "log2_bs": "i32", "log2_nbs": "i32", "w_round": "i32",
                    }
                    for partial in (False, True) if config_name == "decode" else (False,):
                        specs.append(_matmul_spec(_matmul_4bit_kernel, "matmul_4bit", weight_sig, a_dtype,
                                                  config_name, transpose, dict(NESTED=nested, ALIGNED=aligned),
                                                  general=not aligned, partial=partial))
                    if config_name == "decode" or nested or (config_name == "large" and not transpose):
                        continue  # adapter-carrying dX launches use the medium tile (see matmul_4bit_triton)
                    # the adapter term fused in (adapters in the activation dtype, or fp32 adapters)
                    for ad in dict.fromkeys((a_dtype, torch.float32)):
                        for dropout, da in (((False, False),) if transpose else
                                            ((False, False), (True, False)) + aligned * ((False, True), (True, True))):
                            specs.append(_matmul_spec(_matmul_4bit_kernel, "matmul_4bit", weight_sig, a_dtype,
                                                      config_name, transpose, dict(NESTED=nested, ALIGNED=aligned),
                                                      general=not aligned, lora=(ad, dropout, da)))
            weight_sig = {"cb_ptr": "*i8", "stride_cbn": "i32", "stride_cbk": "i32", "scb_ptr": "*fp32",
                          "N": "i32"}
            for partial in (False, True) if config_name == "decode" else (False,):
                specs.append(_matmul_spec(_matmul_int8_kernel, "matmul_int8", weight_sig, a_dtype, config_name,
                                          transpose, {}, partial=partial))
            if config_name != "decode" and not (config_name == "large" and not transpose):
                for ad in dict.fromkeys((a_dtype, torch.float32)):  # the adapter fused in, as for 4-bit
                    for dropout, da in (((False, False),) if transpose else
                                        ((False, False), (True, False), (False, True), (True, True))):
                        specs.append(_matmul_spec(_matmul_int8_kernel, "matmul_int8", weight_sig, a_dtype,
                                                  config_name, transpose, {}, lora=(ad, dropout, da)))
        for has_bias in (False, True):
            consts = {"HAS_BIAS": has_bias, "BLOCK": _REDUCE_BLOCK}
            signature = aot_signature(_split_reduce_kernel,
                                      {"part_ptr": "*fp32", "out_ptr": f"*{name}", "bias_ptr": f"*{name}"}, consts)
            specs.append(AotSpec(
                name=f"split_reduce[{name},bias={has_bias}]", fn=_split_reduce_kernel, signature=signature,
                constexprs=consts, num_warps=4, num_stages=1,
            ))
    return specs
