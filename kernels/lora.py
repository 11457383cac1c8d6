"""LoRA: all active adapters of a linear layer in one fused forward and backward.

Math (PEFT's, one layer, adapters i = 1..n, x: [M, K], base_out: [M, N]):

    s'_i  = s_i / (1 - p_i)                        scaling with the inverted-dropout factor
    m_i   = keep mask of adapter i ([M, K], kept with probability 1 - p_i; all ones if off)
    t_i   = s'_i * (m_i * x) @ A_i^T               [M, r_i]   "shrink"   (A_i: [r_i, K])
    y     = base_out + sum_i t_i @ B_i^T           [M, N]     "expand"   (B_i: [N, r_i])

Stacking A = [A_1; ...; A_n] ([R, K], R = sum r_i), B = [B_1 ... B_n] ([N, R]) and
t = [t_1 ... t_n] ([M, R]) makes the expand a single matmul y = base_out + t @ B^T, and without
dropout the shrink one too: t = (x @ A^T) * s' (s' per rank column).

Backward, with G = dT (scaled) = (dY @ B) * s' ([M, R]), derived from the two lines above:

    d base_out = dY                               (identity)
    dB         = dY^T @ t                         [N, R]
    dA_i       = G_i^T @ (m_i * x)                [r_i, K]
    dX         = sum_i m_i * (G_i @ A_i)          [M, K]

Blocked algorithm (Triton, fp32 accumulation, operands cast to the adapter dtype as PEFT does):

    shrink:  program (rank tile, M block): for K blocks: acc += mask(x tile) @ A_tile^T;
             t = acc * s'                                 one launch for every adapter
    expand:  program (M block, N block): for R blocks: acc += t @ B^T; out = base + acc, cast once;
             out is base_out itself when it may be updated in place (no extra [M, N] buffer)
    dT:      the shrink kernel on (dY, B^T) without mask, scaled by s'  -> G
    dA, dB:  program (rank tile, column block, split of M): acc += G^T @ mask(x) (dA) or
             t^T @ dY (dB); fp32 partials per split summed once (deterministic)
    dX:      program (M block, K block): per adapter acc_i = G_i @ A_i; acc += mask_i * acc_i

Dropout masks are never stored: every kernel that needs m_i regenerates it from (seed, adapter
index, row, column) with the counter-based hash of ``kernels/dropout.py``; the PyTorch reference
regenerates the same bits. A rank tile never straddles two adapters when dropout is on. Ranks are
tiled (tiles of 16, 64 or 128 ranks), so any rank works; the kernels are tested for 1..256.

Dot precision: 16-bit adapters use the tensor cores natively; fp32 adapters, on a 16-bit or an
fp32 model, use 3xTF32 (~fp32 accuracy, as torch's default fp32 matmul and PEFT's fp32 adapters).

Memory saved for backward: x (the tensor the caller passed, which the base layer keeps too;
never a cast or dropped copy), t ([M, R] in the adapter dtype: at most 2*R/K of x's bytes), the
seed (a Python int; a 0-d int64 tensor under torch.compile) and references to the A_i / B_i
parameters. No mask, no [M, K] copy.

Declared once (``LORA_LINEAR``, kernels/opdecl.py): one forward, one backward and the fake rules
yield the custom op ``peftfast::lora_linear`` (traced by torch.compile) and the eager autograd
path. Launch plan: ``grad_w_splits`` (splits of the weight-gradient reduction over T) is what
``launch_grad_w`` uses; the cost model reads the same function.

Launches: forward 2 (shrink, expand). Backward up to 4 kernels (dT, dB, dA, dX) plus one sum
of partials for each of dA and dB when the reduction over M is split.

CPU (the reference path, used for real training): with dropout, the same math with torch
matmuls and the mask regenerated from the seed in backward (an autograd.Function: no mask and no
dropped copy of x saved); without dropout and with adapters in x's dtype, plain autograd ops (no
per-call Function cost; the same saved tensors): t = (x @ A^T) * s, then one addmm into base_out.
One core, T=512, d=256, r=8, against nn.Dropout + two nn.Linear: forward 0.71x the time with
p=0.1; forward+backward 0.98x.
Small layers (T=64, d=64) pay the fixed cost of the ~16 tensor ops of a mask: 2.2x with dropout.

On the Triton path, when a program's operands are not 16-byte aligned (odd feature sizes) the
compiler cannot vectorise; the configurations are chosen so that even then no variant spills.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .adapters import (
    Plan,
    accumulate_lora_dx,
    accumulate_lora_y,
    adapter_grads,
    adapter_table,
    cat_a,
    cat_b,
    check_adapters,
    make_plan,
    rank_scale,
    rank_tiles,
)
from .aot import AotSpec
from .opdecl import OpDecl
from .dropout import check_p, draw_seed, keep_mask, keep_mask_torch, stream_key
from .runtime import DTYPE_NAMES, aot_signature, as_2d, dot_precision, launch, use_triton

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed"])
def _lora_shrink_kernel(
    x_ptr,  # [M, K] left operand: x (forward) or dY (for G = dY @ B)
    a_ptr,  # [R, K] stacked A_i (or B^T); its dtype is the compute dtype
    t_ptr,  # [M, R] output in the compute dtype
    tiles_ptr,  # [n_tiles, 4] int64: rank start, rank end, stream, keep threshold
    scale_ptr,  # [R] fp32 scale of each rank column (s_i / (1 - p_i))
    seed,  # 64-bit dropout seed
    M, K, n_tiles,  # n_tiles: rows of tiles_ptr
    stride_xm, stride_xk, stride_ar, stride_ak, stride_tm, stride_tr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # one grid axis (rows on axis 0: axis 1 allows only 65535 programs); rank tiles vary fastest so
    # the programs reading one x block run back to back (L2 reuse)
    pid = tl.program_id(0).to(tl.int64)
    pid_r = pid % n_tiles
    pid_m = pid // n_tiles
    r_start = tl.load(tiles_ptr + pid_r * 4)
    r_end = tl.load(tiles_ptr + pid_r * 4 + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = r_start + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < r_end
    if HAS_DROPOUT:
        key = stream_key(seed, tl.load(tiles_ptr + pid_r * 4 + 2))
        thresh = tl.load(tiles_ptr + pid_r * 4 + 3).to(tl.uint32)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    a_ptrs = a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k + k0 < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        x = x.to(a_ptr.dtype.element_ty)
        if HAS_DROPOUT:
            x = tl.where(keep_mask(key, offs_m, offs_k + k0, thresh), x, 0.0)
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    acc = acc * tl.load(scale_ptr + offs_r, mask=mask_r, other=0.0)[None, :]
    t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
    tl.store(t_ptrs, acc.to(t_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_expand_kernel(
    t_ptr,  # [M, R] scaled shrink output, compute dtype
    b_ptr,  # [N, R] stacked B_i, compute dtype
    base_ptr,  # [M, N] base layer output
    out_ptr,  # [M, N] result; may be base_ptr (each program reads its tile before writing it)
    M, N, R,
    stride_tm, stride_tr, stride_bn, stride_br,
    stride_basem, stride_basen, stride_om, stride_on,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = accumulate_lora_y(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), t_ptr, b_ptr, R, offs_m, offs_n,
                             mask_m, mask_n, stride_tm, stride_tr, stride_bn, stride_br, BLOCK_R, DOT_PRECISION)
    mask = mask_m[:, None] & mask_n[None, :]
    base = tl.load(base_ptr + offs_m[:, None] * stride_basem + offs_n[None, :] * stride_basen,
                   mask=mask, other=0.0)
    out = acc + base.to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _lora_grad_w_kernel(
    g_ptr,  # [M, R] left operand, compute dtype: G (for dA) or t (for dB)
    x_ptr,  # [M, N] right operand: x (for dA, masked) or dY (for dB)
    out_ptr,  # [S, R, N] fp32 partial sums, one slice per split of M (any strides)
    tiles_ptr,  # [n_tiles, 4] int64: rank start, rank end, stream, keep threshold
    seed,  # 64-bit dropout seed
    M, N, rows_per_split,
    stride_gm, stride_gr, stride_xm, stride_xn, stride_os, stride_or, stride_on,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    r_start = tl.load(tiles_ptr + pid_r * 4)
    r_end = tl.load(tiles_ptr + pid_r * 4 + 1)
    offs_r = r_start + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = offs_r < r_end
    mask_n = offs_n < N
    if HAS_DROPOUT:
        key = stream_key(seed, tl.load(tiles_ptr + pid_r * 4 + 2))
        thresh = tl.load(tiles_ptr + pid_r * 4 + 3).to(tl.uint32)
    m_lo = pid_s * rows_per_split
    m_hi = tl.minimum(m_lo + rows_per_split, M)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_hi
        g = tl.load(g_ptr + offs_r[:, None] * stride_gr + offs_m[None, :] * stride_gm,
                    mask=mask_r[:, None] & mask_m[None, :], other=0.0)  # [BLOCK_R, BLOCK_M] = G^T
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        x = x.to(g_ptr.dtype.element_ty)
        if HAS_DROPOUT:
            x = tl.where(keep_mask(key, offs_m, offs_n, thresh), x, 0.0)
        acc = tl.dot(g, x, acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + pid_s * stride_os + offs_r[:, None] * stride_or + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc, mask=mask_r[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["seed"])
def _lora_grad_x_kernel(
    g_ptr,  # [M, R] G = (dY @ B) * s', compute dtype
    a_ptr,  # [R, K] stacked A_i, compute dtype
    dx_ptr,  # [M, K] output in the dtype of x
    adapters_ptr,  # [n_adapters, 4] int64: rank start, rank end, stream, keep threshold
    seed,  # 64-bit dropout seed
    M, K, R, n_adapters,
    stride_gm, stride_gr, stride_ar, stride_ak, stride_dxm, stride_dxk,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc = accumulate_lora_dx(acc, g_ptr, a_ptr, adapters_ptr, n_adapters, R, seed, offs_m, offs_k, mask_m, mask_k,
                              stride_gm, stride_gr, stride_ar, stride_ak, HAS_DROPOUT, BLOCK_R, DOT_PRECISION)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configurations (shared by the launchers and aot_specs)
# ----------------------------------------------------------------------------------------------
# rank-tile kernels (shrink, grad_w): one rank tile of BLOCK_R per program
_TILE_BLOCK_R = (16, 64, 128)
# rank-loop kernels (expand, grad_x): loop over R in chunks of BLOCK_R
_LOOP_BLOCK_R = (16, 64)
# (kernel, BLOCK_R, fp32 operands) -> meta-parameters; fp32 operands (3xTF32 dots) take half-size
# K tiles, and quarter-size ones for the 64- and 128-rank shrink (32 spilled on sm_86/89 with 64-bit
# row offsets, and for 64 ranks with a 16-bit x and dropout). 8 warps everywhere: no variant spills
# on sm_80..sm_90 even without 16-byte alignment
_CONFIGS = {}
for _wide in (False, True):
    _k = 32 if _wide else 64
    for _br in _TILE_BLOCK_R:
        _CONFIGS["shrink", _br, _wide] = {"BLOCK_M": 64, "BLOCK_K": 16 if _wide and _br >= 64 else _k,
                                          "num_warps": 8, "num_stages": 3}
        _CONFIGS["grad_w", _br, _wide] = {"BLOCK_M": _k, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    for _br in _LOOP_BLOCK_R:
        _m = 32 if _wide and _br == 64 else 64
        _CONFIGS["expand", _br, _wide] = {"BLOCK_M": _m, "BLOCK_N": 64 if _wide else 128,
                                          "num_warps": 8, "num_stages": 3}
        _CONFIGS["grad_x", _br, _wide] = {"BLOCK_M": 32 if _wide else 64, "BLOCK_K": 64,
                                          "num_warps": 8, "num_stages": 3}
_TARGET_PROGRAMS = 528  # ~4 waves on a 132-SM GPU for the split reductions over M


def _config(kernel: str, block_r: int, dtype: torch.dtype) -> dict:
    return _CONFIGS[kernel, block_r, dtype == torch.float32]


def _tile_block_r(extent: int) -> int:
    return next((b for b in _TILE_BLOCK_R if b >= extent), _TILE_BLOCK_R[-1])


def _loop_block_r(rank: int) -> int:
    return _LOOP_BLOCK_R[0] if rank <= _LOOP_BLOCK_R[0] else _LOOP_BLOCK_R[-1]


# ----------------------------------------------------------------------------------------------
# Adapter plan: per-adapter constants and the small device tables the kernels read
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Launchers: check, allocate, launch (2-D [M, *] operands, any strides)
# ----------------------------------------------------------------------------------------------
def launch_shrink(x2: torch.Tensor, a: torch.Tensor, plan: Plan, seed: int, dropout: bool) -> torch.Tensor:
    """t = (mask(x2) @ a^T) * s' -> [M, R] in a's dtype. a: [R, K] (any strides)."""
    M, K = x2.shape
    R = a.shape[0]
    assert a.shape[1] == K and R == plan.total_rank
    t = torch.empty(M, R, dtype=a.dtype, device=x2.device)
    block_r = _tile_block_r(max(plan.ranks) if dropout else R)
    tiles = rank_tiles(plan, dropout, block_r, x2.device)
    cfg = _config("shrink", block_r, a.dtype)
    grid = (tiles.shape[0] * triton.cdiv(M, cfg["BLOCK_M"]),)
    launch(_lora_shrink_kernel, grid,
        x2, a, t, tiles, rank_scale(plan, x2.device), seed, M, K, tiles.shape[0],
        x2.stride(0), x2.stride(1), a.stride(0), a.stride(1), t.stride(0), t.stride(1),
        HAS_DROPOUT=dropout, DOT_PRECISION=dot_precision(x2.dtype, a.dtype), BLOCK_R=block_r, **cfg)
    return t


def launch_expand(t: torch.Tensor, b: torch.Tensor, base2: torch.Tensor, out2: torch.Tensor) -> None:
    """out2 = base2 + t @ b^T (out2 may be base2)."""
    M, R = t.shape
    N = b.shape[0]
    assert b.shape[1] == R and base2.shape == (M, N) and out2.shape == (M, N)
    block_r = _loop_block_r(R)
    cfg = _config("expand", block_r, b.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    launch(_lora_expand_kernel, grid,
        t, b, base2, out2, M, N, R,
        t.stride(0), t.stride(1), b.stride(0), b.stride(1),
        base2.stride(0), base2.stride(1), out2.stride(0), out2.stride(1),
        DOT_PRECISION=dot_precision(base2.dtype, b.dtype), BLOCK_R=block_r, **cfg)


def grad_w_plan(t: int, n: int, ranks, ad: torch.dtype, by_adapter: bool) -> tuple[int, int, int]:
    """(BLOCK_R, splits of T, rows per split) of the weight-gradient kernel for an [R, n] gradient
    reduced over t rows: rank tiles of 16/64/128 covering the largest rank (per adapter when
    ``by_adapter``, i.e. the dropout masks differ) or R; enough programs for ~4 waves on 132 SMs
    (_TARGET_PROGRAMS), at most one split per row block; whole row blocks per split."""
    block_r = _tile_block_r(max(ranks) if by_adapter else sum(ranks))
    n_tiles = sum(triton.cdiv(r, block_r) for r in ranks) if by_adapter else triton.cdiv(sum(ranks), block_r)
    cfg = _config("grad_w", block_r, ad)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    splits = max(1, min(triton.cdiv(_TARGET_PROGRAMS, n_tiles * triton.cdiv(n, block_n)), triton.cdiv(t, block_m)))
    rows_per_split = triton.cdiv(triton.cdiv(t, splits), block_m) * block_m
    return block_r, triton.cdiv(t, rows_per_split), rows_per_split


def grad_w_splits(t: int, n: int, ranks, ad: torch.dtype, by_adapter: bool) -> int:
    """How many ways ``launch_grad_w`` splits the reduction over T of a weight gradient [R, n] with
    adapters of ``ad`` (fp32 partials [splits, R, n] summed once afterwards when > 1)."""
    return grad_w_plan(t, n, ranks, ad, by_adapter)[1]


def launch_grad_w(g: torch.Tensor, x2: torch.Tensor, plan: Plan, seed: int, dropout: bool,
                  transpose_out: bool) -> torch.Tensor:
    """fp32 g^T @ mask(x2): [R, N], or its transpose [N, R] with ``transpose_out``."""
    M, R = g.shape
    N = x2.shape[1]
    block_r, splits, rows_per_split = grad_w_plan(M, N, plan.ranks, g.dtype, dropout)
    tiles = rank_tiles(plan, dropout, block_r, x2.device)
    cfg = _config("grad_w", block_r, g.dtype)
    block_n = cfg["BLOCK_N"]
    shape = (splits, N, R) if transpose_out else (splits, R, N)
    part = torch.empty(shape, dtype=torch.float32, device=x2.device)
    stride_or, stride_on = part.stride(1), part.stride(2)
    if transpose_out:
        stride_or, stride_on = stride_on, stride_or
    grid = (tiles.shape[0], triton.cdiv(N, block_n), splits)
    launch(_lora_grad_w_kernel, grid,
        g, x2, part, tiles, seed, M, N, rows_per_split,
        g.stride(0), g.stride(1), x2.stride(0), x2.stride(1), part.stride(0), stride_or, stride_on,
        HAS_DROPOUT=dropout, DOT_PRECISION=dot_precision(x2.dtype, g.dtype), BLOCK_R=block_r, **cfg)
    return part[0] if splits == 1 else part.sum(0)


def launch_grad_x(g: torch.Tensor, a: torch.Tensor, plan: Plan, seed: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """dX = sum_i mask_i * (g_i @ a_i) -> [M, K] in ``dtype``."""
    M, R = g.shape
    K = a.shape[1]
    dx = torch.empty(M, K, dtype=dtype, device=g.device)
    table = adapter_table(plan, g.device)
    block_r = _loop_block_r(max(plan.ranks) if plan.dropout else R)
    cfg = _config("grad_x", block_r, a.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"]))
    launch(_lora_grad_x_kernel, grid,
        g, a, dx, table, seed, M, K, R, len(plan.ranks),
        g.stride(0), g.stride(1), a.stride(0), a.stride(1), dx.stride(0), dx.stride(1),
        HAS_DROPOUT=plan.dropout, DOT_PRECISION=dot_precision(dtype, a.dtype), BLOCK_R=block_r, **cfg)
    return dx


def _forward_triton(x2, base2, weights_a, weights_b, plan, seed, out2):
    a, b = cat_a(weights_a), cat_b(weights_b)
    t = launch_shrink(x2, a, plan, seed, plan.dropout)
    launch_expand(t, b, base2, out2)
    return out2, t


def _backward_triton(dy2, x2, t, weights_a, weights_b, plan, seed, need_x, need_a, need_b):
    a, b = cat_a(weights_a), cat_b(weights_b)
    no_drop = Plan(plan.ranks, (1.0,) * len(plan.ranks), (0.0,) * len(plan.ranks))
    dx = da = db = None
    if need_b:
        db = launch_grad_w(t, dy2, no_drop, 0, False, transpose_out=True).to(b.dtype)
    if need_x or need_a:
        scaled = Plan(plan.ranks, plan.scales, (0.0,) * len(plan.ranks))
        g = launch_shrink(dy2, b.t(), scaled, 0, False)
        if need_a:
            da = launch_grad_w(g, x2, plan, seed, plan.dropout, transpose_out=False).to(a.dtype)
        if need_x:
            dx = launch_grad_x(g, a, plan, seed, x2.dtype)
    return dx, da, db


# ----------------------------------------------------------------------------------------------
# PyTorch reference (the test oracle and the CPU backend): same math, torch matmuls
# ----------------------------------------------------------------------------------------------
def forward_reference(x2, base2, weights_a, weights_b, plan, seed):
    cd = weights_a[0].dtype
    xc = x2 if x2.dtype == cd else x2.to(cd)
    M, K = x2.shape
    if not plan.dropout:
        t = xc @ cat_a(weights_a).t()
        t = t.mul_(plan.scales[0]) if plan.single_scale else t.mul_(rank_scale(plan, t.device, cd))
    else:
        parts = []
        for i, (a, p, s) in enumerate(zip(weights_a, plan.ps, plan.scales)):
            xi = xc if p == 0.0 else xc * keep_mask_torch(seed, i, M, K, p, xc.device)
            parts.append((xi @ a.t()).mul_(s))
        t = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    b = cat_b(weights_b)
    if base2.dtype == cd:
        y = torch.addmm(base2, t, b.t())
    else:  # PEFT: result + lora term in the promoted dtype, then one cast back
        wide = torch.promote_types(base2.dtype, cd)
        y = torch.addmm(base2.to(wide), t.to(wide), b.t().to(wide)).to(base2.dtype)
    return y, t


def backward_reference(dy2, x2, t, weights_a, weights_b, plan, seed, need_x, need_a, need_b):
    cd = weights_a[0].dtype
    dyc = dy2 if dy2.dtype == cd else dy2.to(cd)
    b = cat_b(weights_b)
    dx = da = db = None
    if need_b:
        db = dyc.t() @ t
    if need_x or need_a:
        g = dyc @ b
        g = g.mul_(plan.scales[0]) if plan.single_scale else g.mul_(rank_scale(plan, g.device, cd))
        xc = (x2 if x2.dtype == cd else x2.to(cd)) if need_a else None
        M, K = x2.shape
        if not plan.dropout:
            a = cat_a(weights_a)
            da = g.t() @ xc if need_a else None
            dx = g @ a if need_x else None
        else:
            das = []
            for i, (a, p, r0, r) in enumerate(zip(weights_a, plan.ps, plan.offsets, plan.ranks)):
                keep = keep_mask_torch(seed, i, M, K, p, x2.device) if p > 0.0 else None
                gi = g[:, r0:r0 + r]
                if need_a:
                    das.append(gi.t() @ (xc if keep is None else xc * keep))
                if need_x:
                    dxi = gi @ a
                    dxi = dxi if keep is None else dxi.mul_(keep)
                    dx = dxi if dx is None else dx.add_(dxi)
            da = (das[0] if len(das) == 1 else torch.cat(das, 0)) if need_a else None
        if dx is not None and dx.dtype != x2.dtype:
            dx = dx.to(x2.dtype)
    return dx, da, db


# ----------------------------------------------------------------------------------------------
# Dispatch and the op's declaration (kernels/opdecl.py)
# ----------------------------------------------------------------------------------------------


def plan_forward(x, base_out, weights_a, weights_b, plan, seed, inplace, on_triton):
    """(y, t) with y shaped like base_out; y is base_out itself when ``inplace``."""
    x2, base2 = as_2d(x), as_2d(base_out)
    if on_triton and x2.shape[0] > 0:
        out2 = base2 if inplace else torch.empty(base2.shape, dtype=base2.dtype, device=base2.device)
        y2, t = _forward_triton(x2, base2, weights_a, weights_b, plan, seed, out2)
        y = base_out if inplace else y2.view(base_out.shape)
    else:
        y2, t = forward_reference(x2, base2, weights_a, weights_b, plan, seed)
        y = y2 if base_out.dim() == 2 else y2.view(base_out.shape)
    return y, t


def plan_backward(dy, x, t, weights_a, weights_b, plan, seed, need_x, need_a, need_b, on_triton):
    """(dx shaped like x, stacked dA [R, K], stacked dB [N, R]); None where not needed."""
    dy2, x2, t2 = as_2d(dy), as_2d(x), as_2d(t)
    impl = _backward_triton if on_triton and dy2.shape[0] > 0 else backward_reference
    dx, da, db = impl(dy2, x2, t2, weights_a, weights_b, plan, seed, need_x, need_a, need_b)
    return (dx.view(x.shape) if dx is not None and x.dim() != 2 else dx), da, db


def _can_update_in_place(base_out: torch.Tensor) -> bool:
    return (base_out._base is None and base_out.is_contiguous()
            and not (base_out.is_leaf and base_out.requires_grad)
            and (not base_out.is_inference() or torch.is_inference_mode_enabled()))


def _op_forward(x: torch.Tensor, base_out: torch.Tensor, weights_a: list[torch.Tensor],
                weights_b: list[torch.Tensor], scalings: list[float], dropout_ps: list[float],
                seed: torch.Tensor, *, hint=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y shaped like base_out, t [..., R]); dropout_ps are the active probabilities (0 where off).
    hint (eager): (plan, on_triton, inplace) as ``lora_linear`` decided them once per call."""
    if hint is None:
        plan = make_plan([a.shape[0] for a in weights_a], scalings, dropout_ps)
        on_triton, inplace = use_triton(x, base_out, *weights_a, *weights_b), False
    else:
        plan, on_triton, inplace = hint
    y, t = plan_forward(x, base_out, weights_a, weights_b, plan, int(seed), inplace, on_triton)
    return y, (t if x.dim() == 2 else t.view(*x.shape[:-1], t.shape[-1]))


def _op_save(args, outputs) -> list:
    x, _base_out, weights_a, weights_b, _scalings, _ps, seed = args
    return [x, outputs[1], seed, *weights_a, *weights_b]  # x and t; no mask, no dropped x


def _op_backward(saved, grads, needs, statics, *, hint=None) -> list:
    """Gradients of (x, base_out, A_1..A_n, B_1..B_n, seed); base_out's is dY (passthrough)."""
    x, t, seed, *weights = saved
    n = len(weights) // 2
    dy = grads[0]
    if hint is None:
        plan = make_plan([a.shape[0] for a in weights[:n]], *statics)
        on_triton = use_triton(dy, x, *weights)
    else:
        plan, on_triton, _ = hint
    need_a, need_b = needs[2:2 + n], needs[2 + n:2 + 2 * n]
    dx, da, db = plan_backward(dy, x, t, weights[:n], weights[n:], plan, int(seed), needs[0], any(need_a), any(need_b),
                           on_triton)
    return [dx, None, *adapter_grads(plan, da, db, need_a, need_b), None]


def _op_fake(x, base_out, weights_a, weights_b, scalings, dropout_ps, seed):
    rank = sum(a.shape[0] for a in weights_a)
    return base_out.new_empty(base_out.shape), x.new_empty((*x.shape[:-1], rank), dtype=weights_a[0].dtype)


def _op_backward_fake(saved, grads, needs, statics) -> list:
    x, _t, _seed, *weights = saved
    return [x.new_empty(x.shape) if needs[0] else None, None,
            *(w.new_empty(w.shape) if need else None for w, need in zip(weights, needs[2:-1])), None]


# the op, declared once: peftfast::lora_linear (+ its fake, backward op and autograd) and the eager path
LORA_LINEAR = OpDecl("peftfast::lora_linear", _op_forward, _op_backward, save=_op_save, fake=_op_fake,
                     backward_fake=_op_backward_fake, passthrough={"base_out": 0}, aux_outputs=(1,),
                     dirty=lambda args, hint: (args[1],) if hint is not None and hint[2] else ())


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------


def lora_linear(x: torch.Tensor, base_out: torch.Tensor, weights_a: Sequence[torch.Tensor],
                weights_b: Sequence[torch.Tensor], scalings: Sequence[float], dropout_ps: Sequence[float],
                training: bool) -> torch.Tensor:
    """``(base_out + sum_i s_i * drop_i(x as A_i.dtype) @ A_i^T @ B_i^T)`` in base_out's dtype.

    x: [..., d_in]; base_out: [..., d_out] (the base layer's output for x; on the Triton path it
    is updated in place and returned when autograd allows it); weights_a[i]: [r_i, d_in];
    weights_b[i]: [d_out, r_i] (A_i and B_i share a dtype, which may differ from x's);
    scalings[i]: float; dropout_ps[i] in [0, 1), used only when ``training``. Gradients flow to
    x, base_out, and every A_i / B_i that requires grad. Each call with dropout draws one seed
    from torch's default generator.
    """
    check_adapters(x, base_out, weights_a, weights_b, scalings, dropout_ps)
    if len(weights_a) == 0:
        return base_out
    ps = [check_p(p) if training else 0.0 for p in dropout_ps]
    dtypes = [a.dtype for a in weights_a]
    if len(set(dtypes)) > 1:  # adapters of different dtypes: one call per run of equal dtype
        out, start = base_out, 0
        for i in range(1, len(dtypes) + 1):
            if i == len(dtypes) or dtypes[i] != dtypes[start]:
                out = lora_linear(x, out, weights_a[start:i], weights_b[start:i], scalings[start:i],
                                  dropout_ps[start:i], training)
                start = i
        return out
    dropout = any(p > 0.0 for p in ps)
    if torch.compiler.is_compiling():
        seed = draw_seed() if dropout else torch.zeros((), dtype=torch.int64)
        return LORA_LINEAR(x, base_out, list(weights_a), list(weights_b), [float(s) for s in scalings], ps, seed)[0]
    on_triton = use_triton(x, base_out, *weights_a, *weights_b)
    if not dropout and dtypes[0] == x.dtype and not on_triton:
        # the reference path without dropout: plain autograd ops (no autograd.Function cost), saving
        # what the op would (x, t): t = (x @ A^T) * s on the small [M, r] side, then one addmm adds
        # t @ B^T to base_out (PEFT scales and adds the [M, N] product in two more passes)
        base2 = base_out.reshape(-1, base_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        out = base2 if base2.dtype == x.dtype else base2.to(x.dtype)
        for a, b, s in zip(weights_a, weights_b, scalings):
            out = torch.addmm(out, F.linear(x2, a) * s, b.t())
        out = out.view(base_out.shape)
        return out if out.dtype == base_out.dtype else out.to(base_out.dtype)
    seed = int(draw_seed()) if dropout else 0
    plan = make_plan([a.shape[0] for a in weights_a], scalings, ps)
    inplace = on_triton and base_out.numel() > 0 and _can_update_in_place(base_out)
    return LORA_LINEAR(x, base_out, list(weights_a), list(weights_b), scalings, ps, seed,
                       hint=(plan, on_triton, inplace))[0]


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# ----------------------------------------------------------------------------------------------
# (activation dtype, adapter dtype): same dtype, plus PEFT's default of fp32 adapters on a 16-bit model
DTYPE_PAIRS = ((torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                (torch.float32, torch.float32), (torch.float16, torch.float32),
                (torch.bfloat16, torch.float32))


def aot_specs() -> list[AotSpec]:
    # (kernel, fn, pointer dtypes given (act, adapter) type strings, unit strides, dropout variants)
    kernels = (
        ("shrink", _lora_shrink_kernel, lambda x, w: {"x_ptr": x, "a_ptr": w, "t_ptr": w},
         ("stride_xk", "stride_ak", "stride_tr"), (False, True), _TILE_BLOCK_R),
        ("grad_w", _lora_grad_w_kernel, lambda x, w: {"g_ptr": w, "x_ptr": x, "out_ptr": "fp32"},
         ("stride_gr", "stride_xn"), (False, True), _TILE_BLOCK_R),
        ("expand", _lora_expand_kernel, lambda x, w: {"t_ptr": w, "b_ptr": w, "base_ptr": x, "out_ptr": x},
         ("stride_tr", "stride_br", "stride_basen", "stride_on"), (None,), _LOOP_BLOCK_R),
        ("grad_x", _lora_grad_x_kernel, lambda x, w: {"g_ptr": w, "a_ptr": w, "dx_ptr": x},
         ("stride_gr", "stride_ak", "stride_dxk"), (False, True), _LOOP_BLOCK_R),
    )
    specs = []
    for act, ad in DTYPE_PAIRS:
        xa, wa = DTYPE_NAMES[act], DTYPE_NAMES[ad]
        for kname, fn, ptrs, unit, drops, block_rs in kernels:
            for block_r in block_rs:
                for drop in drops:
                    cfg = dict(_config(kname, block_r, ad))
                    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                    consts = dict(DOT_PRECISION=dot_precision(act, ad), BLOCK_R=block_r, **cfg,
                                  **{u: 1 for u in unit})
                    if drop is not None:
                        consts["HAS_DROPOUT"] = drop
                    types = {k: "*" + v for k, v in ptrs(xa, wa).items()}
                    types.update(tiles_ptr="*i64", adapters_ptr="*i64", scale_ptr="*fp32", seed="i64")
                    sig = aot_signature(fn, types, consts)
                    blocks = ",".join(f"B{k[6:]}={v}" for k, v in cfg.items()) + f",warps={warps}"
                    name = f"lora_{kname}[x={xa},w={wa},BR={block_r},{blocks}" + (
                        "]" if drop is None else f",dropout={int(drop)}]")
                    specs.append(AotSpec(name, fn, sig, consts, warps, stages, True))
    return specs
