"""LoRA fused into the base linear's GEMMs: one kernel writes y, two kernels write the gradients.

Math (one linear layer with frozen weight W [N, K], optional bias b [N], adapters i = 1..n;
x: [M, K]; notation and the stacking A = [A_1; ...; A_n] [R, K], B = [B_1 ... B_n] [N, R] as in
``kernels/lora.py``):

    t   = s' * drop(x) @ A^T                       [M, R]  ONE kernel with y (16-bit activations)
    y   = x @ W^T + b + t @ B^T                    [M, N]  one cast, one store
    G   = s' * dY @ B,  dB = dY^T @ t              [M, R], [N, R]  ONE pass over dY
    dX  = dY @ W + sum_i m_i * (G_i @ A_i)         [M, K]  ONE kernel, one cast, one store,
    dA  = G^T @ drop(x)                            [R, K]  in the same kernel;  db = sum_m dY (torch)

Dtypes: the base product runs in x's dtype (x, W and b share it, as nn.Linear requires), the
adapter product in the adapter dtype (t, B, G, A; fp32 adapters use 3xTF32 on any model),
both accumulate into one fp32 tile, which is cast once to x's dtype. (PEFT rounds x @ W^T + b to
x's dtype before adding the adapter term; this path does not, so it is at least as accurate.)

Blocked algorithm:

    forward (16-bit activations), work items handed out by an atomic ticket counter:
        tickets 0..: shrink slices of the first group's row blocks (GROUP_M row blocks x 4 K slices)
        then the output tiles (M block, N block) in grouped order (GROUP_M row blocks share W in L2);
        a tile of group g first computes one shrink slice of group g+1 (a look-ahead):
            tp[slice, rows] = mask(x[rows, k slice]) @ A[:, k slice]^T     (fp32 partial)
            the last slice of a row block to arrive sums the slices in order, scales by s',
            stores t[rows] (saved for backward) and raises the row block's ready flag
        then: acc = x_tile @ W_tile^T over K (tensor cores); wait for its row block's flag;
              acc += t_tile @ B_tile^T; acc += b; store y once
      A tile only waits for slices with earlier tickets, which are held by running (or finished)
      programs, so no launch deadlocks whatever the number of resident programs (and the
      interpreter, which runs programs in order, never waits). x is read a second time by the
      slices, inside this compute-bound kernel, instead of by a separate memory-bound pass.
      fp32 activations: lora.py's shrink kernel, then the GEMM (the look-ahead variant does not
      fit in registers with 3xTF32 operands).
    dY pass, program (rank tile, N block of 256, split of M); the B tile stays in registers:
        for M blocks of the split: load dY tile once
            G partial[N block] = s' * dY_tile @ B_tile          (stored, fp32)
            dB_acc += t_tile^T @ dY_tile                        (registers)
            the last N block to finish these rows sums the G partials in order -> G (adapter dtype)
        store dB partial[split]; the last split to finish sums them in order -> dB (adapter dtype)
    dX, program (M block, K block):
        acc = 0
        for N blocks: acc += dY_tile @ W_tile              base dX GEMM
        per adapter i: part = G_i @ A_i (over its ranks); acc += where(mask_i, part, 0)
        store dX once
        dA partial[M block] = G[rows]^T @ mask(x[rows, K block])  (fp32; x read here)
        the last M block to finish this K block sums the partials in order -> dA (adapter dtype)

Every counter is an epoch counter (``tiles.epoch_counters``): one int64 buffer per device and
stream; each launch takes a new epoch, counts arrivals above its base and raises flags to its base,
so nothing is ever reset and a launch that died midway leaves nothing a later launch could skip a
ticket for (forward), pick the wrong last arriver for (the backward kernels' sums of partials),
mistake for its own flag, or wait on forever.
Every reduction of partials is in a fixed order: results are deterministic.

The dropout mask of adapter i at (row, column) of x is regenerated from (seed, i, row, column)
by ``kernels/dropout.py``'s hash: the same bits as the shrink and dA kernels of lora.py and as
the PyTorch reference (``keep_mask_torch``).

Memory saved for backward: x (the caller's tensor), t [M, R] in the adapter dtype, the seed and
references to W and the adapter weights. No mask, no y, no [M, K] or [M, N] copy.

Declared once (``LORA_LINEAR_FUSED``, kernels/opdecl.py): the custom op and the eager autograd
path from one forward and one backward. Launch plans, called by the launchers and readable by a
cost model: ``shrink_items`` (look-ahead K slices), ``dy_plan`` (dY pass: N blocks, splits of T),
``fused_dx_block_m`` (rows per program of the dX kernel).

Launches: forward 1 (fp32 activations: 2); backward 2 (dY pass; dX + dA), plus, with a
trainable bias, torch's sum over tokens of dY (and its cast). Without an x gradient dA is
lora.py's separate kernel; without adapter gradients lora.py's separate G / dB kernels run.

Modelled (peftfast.tools.costmodel from counted traffic; T=8192, d_in=d_out=4096, r=16, bf16
model, fp32 adapters, dropout 0.1) as a ratio to the base GEMM alone, without / with 3 us per
launch: H100 forward 1.008 / 1.008, backward 1.099 / 1.107; RTX 4090 forward 1.008 / 1.008,
backward 1.064 / 1.066. The model charges the slices' second read of x and every partial's
write and read as DRAM traffic; it does not model the time a tile may spend waiting for its
row block's t (the slices it waits for were handed out one group of tiles earlier).

Dot precision: 16-bit operands use the tensor cores natively; an fp32 model's base product uses
3xTF32 (~fp32, like torch's default fp32 matmul); the adapter product follows lora.py (3xTF32 for
fp32 adapters on any model: 64-row tiles, and a look-ahead shrink of 16 rows per step over 2
stages, when the model is 16-bit). Tiles (see _CONFIGS) compile for sm_80..sm_90 without spills
even without 16-byte alignment; the adapter loop steps 16 ranks at a time for any rank.

CPU (the reference path): F.linear, then lora.py's reference math on its output; backward adds
dY @ W into lora.py's dX with one addmm. Same cost as nn.Linear followed by ``lora_linear``.

Measured, not assumed: the figures above assume this kernel's base GEMM runs as fast as cuBLAS's.
Where it does not (a GPU, shape or dtype Triton's GEMM handles less well), ``F.linear`` + lora.py's
kernels is faster, so on CUDA ``lora_linear_fused`` times both once per key and keeps the faster
(``dispatch``; kernels/autotune.py). CPU, the interpreter and torch.compile run the fused op.

``qlora_linear_fused`` (the same op over a bitsandbytes 4-bit or int8 weight) lives in
``kernels/qlora.py``.

DoRA (``dora_linear_fused``, one adapter, no dropout) runs on these kernels with a flag (HAS_MNS):
mns = m / norm applied in the forward's epilogue, dY * mns in the dY pass and the dX kernel, dL/dm
reduced in the dX kernel from the saved output; ``dora_row_norm_fused`` computes ||W + s B A||_row in
one pass over W. See the DoRA section below.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import autotune
from . import lora as L
from .adapters import (
    Plan,
    accumulate_lora_dx,
    accumulate_lora_y,
    adapter_grads,
    adapter_ranks,
    adapter_table,
    cat_a,
    cat_b,
    check_adapters,
    grad_a_operands,
    lora_grad_a_tile,
    make_plan,
    rank_scale,
    rank_tiles,
)
from .aot import AotSpec
from .opdecl import OpDecl
from .runtime import (DTYPE_NAMES, aot_signature, as_2d, declare_int32_operands, dot_precision, gpu_target, launch,
                      records_weight_grad, use_triton)
from .tiles import (epoch_arrival, epoch_counters, grouped_tile, last_epoch_arrival, lookahead_work,
                    sum_slices, tile_offsets)
from .dropout import check_p, draw_seed, keep_mask

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _shrink_item(x_ptr, a_ptr, t_ptr, tp_ptr, count_ptr, epoch, adapters_ptr, scale_ptr, seed, n_adapters, M, K, R,
                 row_block, item, n_items, k_per_item, num_m,
                 stride_xm, stride_xk, stride_ar, stride_ak, stride_tm, stride_tr, stride_tpi, stride_tpm, stride_tpr,
                 HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, SUB_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """One slice of the shrink for one row block: tp[item, rows] = mask(x[rows, k slice]) @ A[:, k slice]^T
    (fp32, every adapter's ranks with its own mask). The last of the row block's n_items slices to
    arrive sums them in order, scales by s', stores t [rows, R] in A's dtype and raises the row
    block's ready flag (count_ptr[1 + num_m + row_block] := this launch's epoch base) for the GEMM
    tiles that add t @ B^T. Arrivals are counted per epoch (tiles.epoch_arrival)."""
    # 64-bit addresses from scalar bases (row_block and item are int64); the per-element offsets stay
    # tile-local int32 (registers: this runs inside the GEMM kernel)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = item.to(tl.int64) * k_per_item
    k_len = (tl.minimum(k_lo + k_per_item, K) - k_lo).to(tl.int32)
    row0 = row_block * BLOCK_M
    m_left = (M - row0).to(tl.int32)  # rows of this block (int32 compares: registers)
    x_blk = x_ptr + row0 * stride_xm + k_lo * stride_xk
    tp_blk = tp_ptr + item.to(tl.int64) * stride_tpi + row0 * stride_tpm
    for i in range(n_adapters if HAS_DROPOUT else 1):  # with dropout, each adapter's ranks see its own mask
        r_start, r_end, key, thresh = adapter_ranks(adapters_ptr, i, R, seed, HAS_DROPOUT)
        for r0 in range(r_start, r_end, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < r_end
            for h in range(0, BLOCK_M, SUB_M):  # SUB_M rows at a time: registers stay free
                rows = h + tl.arange(0, SUB_M)
                mask_m = rows < m_left
                acc = tl.zeros((SUB_M, BLOCK_R), dtype=tl.float32)
                for k0 in range(0, k_len, BLOCK_K):
                    mask_k = offs_k < k_len - k0
                    k_abs = (k_lo + k0).to(tl.int32) + offs_k  # columns of x and A (< K)
                    x = tl.load(x_blk + rows[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                                mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(a_ptr.dtype.element_ty)
                    if HAS_DROPOUT:
                        x = tl.where(keep_mask(key, row0.to(tl.int32) + rows, k_abs, thresh), x, 0.0)
                    a = tl.load(a_ptr + offs_r[None, :] * stride_ar + k_abs[:, None] * stride_ak,
                                mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # A^T tile [BK, BR]
                    acc = tl.dot(x, a, acc, input_precision=PRECISION)
                tl.store(tp_blk + rows[:, None] * stride_tpm + offs_r[None, :] * stride_tpr,
                         acc, mask=mask_m[:, None] & mask_r[None, :])
    rows = tl.arange(0, BLOCK_M)
    mask_m = rows < m_left
    tl.debug_barrier()  # every thread's partial stores, then the arrival (see tiles.last_epoch_arrival)
    if epoch_arrival(count_ptr + 1 + row_block, epoch) == n_items - 1:
        t_blk = t_ptr + row0 * stride_tm
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask = mask_m[:, None] & (offs_r < R)[None, :]
            acc = sum_slices(tp_ptr + row0 * stride_tpm + rows[:, None] * stride_tpm + offs_r[None, :] * stride_tpr,
                             n_items, stride_tpi, mask, BLOCK_M, BLOCK_R)
            acc = acc * tl.load(scale_ptr + offs_r, mask=offs_r < R, other=0.0)[None, :]
            tl.store(t_blk + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                     acc.to(t_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # every thread's t stores, then the flag
        tl.atomic_xchg(count_ptr + 1 + num_m + row_block, epoch, sem="release")


@triton.jit
def _gemm_tile(a_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, K, stride_am, stride_ak, stride_bk, stride_bn,
               PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 sum_k a[rows, k] * b[k, cols] over k < K, tensor cores: the base GEMM of the forward
    (a = x, b = W^T) and of the dX kernel (a = dY, b = W)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _load_mns(m_ptr, norm_ptr, offs_n, mask_n, other: tl.constexpr):
    """DoRA's scale mns = m / norm for the columns offs_n (fp32); ``other`` where masked out."""
    m = tl.load(m_ptr + offs_n, mask=mask_n, other=other)
    return m / tl.load(norm_ptr + offs_n, mask=mask_n, other=1.0)


@triton.jit
def _finish_tile(acc, t_ptr, b_ptr, bias_ptr, m_ptr, norm_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, R,
                 stride_tm, stride_tr, stride_bn, stride_br, stride_ym, stride_yn,
                 HAS_BIAS: tl.constexpr, HAS_MNS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc += t[rows] @ B[cols]^T (a short second reduction over the ranks); with HAS_MNS DoRA's
    acc += (mns - 1) * acc per column, mns = m / norm (PEFT's form: m == norm, so mns == 1, leaves acc
    exactly as it was); + bias;
    y stored once."""
    acc = accumulate_lora_y(acc, t_ptr, b_ptr, R, offs_m, offs_n, mask_m, mask_n, stride_tm, stride_tr, stride_bn,
                               stride_br, BLOCK_R, PRECISION)
    if HAS_MNS:
        mns = _load_mns(m_ptr, norm_ptr, offs_n, mask_n, 1.0)
        acc += (mns - 1.0)[None, :] * acc
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lora_fused_forward_kernel(
    x_ptr,  # [M, K] layer input, activation dtype
    w_ptr,  # [N, K] frozen base weight, activation dtype
    bias_ptr,  # [N] base bias (activation dtype); unused without HAS_BIAS
    t_ptr,  # [M, R] scaled shrink output, adapter dtype (lora.py's shrink kernel)
    b_ptr,  # [N, R] stacked B_i, adapter dtype
    y_ptr,  # [M, N] output, activation dtype
    m_ptr,  # [N] fp32 DoRA magnitude; unused without HAS_MNS
    norm_ptr,  # [N] fp32 DoRA row norm ||W + s B A|| (mns = m / norm); unused without HAS_MNS
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_tr, stride_bn, stride_br,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_MNS: tl.constexpr, BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # t computed beforehand by a separate shrink launch (fp32 models; see launch_fused_forward)
    pid_m, pid_n = grouped_tile(tl.program_id(0).to(tl.int64), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m, offs_n, mask_m, mask_n = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    acc = _gemm_tile(x_ptr, w_ptr, offs_m, offs_n, mask_m, mask_n, K, stride_xm, stride_xk, stride_wk, stride_wn,
                     BASE_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    _finish_tile(acc, t_ptr, b_ptr, bias_ptr, m_ptr, norm_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, R, stride_tm,
                 stride_tr, stride_bn, stride_br, stride_ym, stride_yn, HAS_BIAS, HAS_MNS, LORA_PRECISION, BLOCK_R)


@triton.jit(do_not_specialize=["seed", "epoch"])
def _lora_fused_forward_lookahead_kernel(
    x_ptr,  # [M, K] layer input, activation dtype
    w_ptr,  # [N, K] frozen base weight, activation dtype
    bias_ptr,  # [N] base bias (activation dtype); unused without HAS_BIAS
    a_ptr,  # [R, K] stacked A_i, adapter dtype
    t_ptr,  # [M, R] output t = s' * drop(x) @ A^T, adapter dtype (saved for backward)
    tp_ptr,  # [n_items, M, R] fp32 shrink partials, one slice per K slice
    b_ptr,  # [N, R] stacked B_i, adapter dtype
    y_ptr,  # [M, N] output, activation dtype
    m_ptr,  # [N] fp32 DoRA magnitude; unused without HAS_MNS
    norm_ptr,  # [N] fp32 DoRA row norm ||W + s B A|| (mns = m / norm); unused without HAS_MNS
    count_ptr,  # int64 epoch counters (tiles.epoch_counters): [1] tile ticket, [num_m] shrink slices done, [num_m] t ready
    epoch,  # this launch's epoch base (epoch << 32): counters hold base + arrivals, raised flags hold base
    adapters_ptr,  # [n_adapters, 4] int64: rank start, rank end, stream, keep threshold
    scale_ptr,  # [R] fp32 s' per rank
    seed,  # 64-bit dropout seed
    M, N, K, R, n_adapters, n_items, k_per_item,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_tm, stride_tr,
    stride_tpi, stride_tpm, stride_tpr, stride_bn, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_MNS: tl.constexpr, BASE_PRECISION: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SUB_M: tl.constexpr,  # rows per step of the shrink slices
):
    # Work items in ticket order: first the shrink slices of the first group's row blocks, then the
    # output tiles in grouped order. A tile of group g also computes one shrink slice of group g+1
    # (a look-ahead: x read inside this compute-bound kernel, not by a separate pass), so a tile
    # only ever waits for t from work with an earlier ticket, which is running or done: no deadlock
    # whatever the number of resident programs (and the interpreter, which runs tickets in order).
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # tickets of this launch's epoch: whatever a launch that died midway left in the counters is
    # from an older epoch, so nothing is reset and nothing stale is waited for
    ticket = epoch_arrival(count_ptr, epoch).to(tl.int32)
    n_first, tile, next_block, next_item, has_next = lookahead_work(ticket, num_m, num_n, n_items, GROUP_M)
    if ticket < n_first:  # row blocks go to the slices as int64: they address x, t and tp
        _shrink_item(x_ptr, a_ptr, t_ptr, tp_ptr, count_ptr, epoch, adapters_ptr, scale_ptr, seed, n_adapters, M, K, R,
                     (ticket // n_items).to(tl.int64), ticket % n_items, n_items, k_per_item, num_m,
                     stride_xm, stride_xk, stride_ar, stride_ak, stride_tm, stride_tr, stride_tpi, stride_tpm,
                     stride_tpr, HAS_DROPOUT, LORA_PRECISION, BLOCK_M, SUB_M, BLOCK_K, BLOCK_R)
    else:
        pid_m, pid_n = grouped_tile(tile.to(tl.int64), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if has_next:
            _shrink_item(x_ptr, a_ptr, t_ptr, tp_ptr, count_ptr, epoch, adapters_ptr, scale_ptr, seed, n_adapters, M, K,
                         R, next_block.to(tl.int64), next_item, n_items, k_per_item, num_m,
                         stride_xm, stride_xk, stride_ar, stride_ak, stride_tm, stride_tr, stride_tpi, stride_tpm,
                         stride_tpr, HAS_DROPOUT, LORA_PRECISION, BLOCK_M, SUB_M, BLOCK_K, BLOCK_R)
        offs_m, offs_n, mask_m, mask_n = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
        acc = _gemm_tile(x_ptr, w_ptr, offs_m, offs_n, mask_m, mask_n, K, stride_xm, stride_xk, stride_wk,
                         stride_wn, BASE_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        # wait for this row block's t of THIS launch (its slices all have earlier tickets)
        ready = tl.atomic_add(count_ptr + 1 + num_m + pid_m, 0, sem="acquire")
        while ready != epoch:
            ready = tl.atomic_add(count_ptr + 1 + num_m + pid_m, 0, sem="acquire")
        _finish_tile(acc, t_ptr, b_ptr, bias_ptr, m_ptr, norm_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, R, stride_tm,
                     stride_tr, stride_bn, stride_br, stride_ym, stride_yn, HAS_BIAS, HAS_MNS, LORA_PRECISION,
                     BLOCK_R)


@triton.jit
def _dora_dx_base_tile(dy_ptr, w_ptr, m_ptr, norm_ptr, y_ptr, bias_ptr, dmp_ptr, pid_m, pid_k, num_k, offs_m, offs_k,
                       mask_m, mask_k, N, stride_dym, stride_dyn, stride_wn, stride_wk, stride_ym, stride_yn,
                       stride_dmm, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """DoRA's base dX tile: sum_n (dY * mns)[rows, n] W[n, cols] (dY * mns rounded to dY's dtype, as autograd
    rounds it), and this program's share of dL/dmns: the column blocks j with j % num_k == pid_k (each
    (row block, column block) once over the launch, spread evenly over the column programs) get the fp32
    partial sum_rows dY * y_pre, y_pre = (y - bias) / mns read from the forward's output, stored to
    dmp[pid_m, columns]. Columns with mns == 0 get 0 here (_dora_grad_m_kernel recomputes them)."""
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)  # column offsets into W [N, K]: past 2**31 elements on large layers
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + offs_n
        mask_n = cols < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        mns = _load_mns(m_ptr, norm_ptr, cols, mask_n, 0.0)
        if (n0 // BLOCK_N) % num_k == pid_k:
            y = tl.load(y_ptr + offs_m[:, None] * stride_ym + cols[None, :] * stride_yn,
                        mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            if HAS_BIAS:
                y -= tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            zero = mns == 0.0
            y_pre = tl.where(zero[None, :], 0.0, y / tl.where(zero, 1.0, mns)[None, :])
            tl.store(dmp_ptr + pid_m * stride_dmm + cols, tl.sum(dy.to(tl.float32) * y_pre, axis=0), mask=mask_n)
        a = (dy.to(tl.float32) * mns[None, :]).to(dy_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["seed", "count_base"])
def _lora_fused_grad_x_kernel(
    dy_ptr,  # [M, N] gradient of y, activation dtype
    w_ptr,  # [N, K] frozen base weight, activation dtype
    g_ptr,  # [M, R] G = s' * dY @ B, adapter dtype
    a_ptr,  # [R, K] stacked A_i, adapter dtype
    dx_ptr,  # [M, K] output, activation dtype
    adapters_ptr,  # [n_adapters, 4] int64: rank start, rank end, stream, keep threshold
    seed,  # 64-bit dropout seed
    x_ptr,  # [M, K] layer input, activation dtype (HAS_DA)
    dap_ptr,  # [cdiv(M, BLOCK_M), R, K] fp32 dA partials, one slice per row block (HAS_DA)
    da_ptr,  # [R, K] stacked dA_i, adapter dtype (HAS_DA)
    count_ptr,  # [cdiv(K, BLOCK_K)] int64 epoch counters: row blocks done per K block (HAS_DA)
    count_base,  # this launch's epoch base (tiles.epoch_counters; HAS_DA)
    m_ptr,  # [N] fp32 DoRA magnitude: dY's columns are scaled by mns = m / norm before the base GEMM (HAS_MNS)
    norm_ptr,  # [N] fp32 DoRA row norm (HAS_MNS)
    y_ptr,  # [M, N] the forward's output y = mns * y_pre + bias, activation dtype (HAS_MNS)
    bias_ptr,  # [N] base bias, activation dtype (HAS_MNS and HAS_BIAS)
    dmp_ptr,  # [cdiv(M, BLOCK_M), N] fp32 output: partial dL/dmns per row block (HAS_MNS)
    M, K, N, R, n_adapters,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gr, stride_ar, stride_ak,
    stride_dxm, stride_dxk, stride_xm, stride_xk, stride_dps, stride_dpr, stride_dpk, stride_dar, stride_dak,
    stride_ym, stride_yn, stride_dmm,
    HAS_DROPOUT: tl.constexpr, HAS_DA: tl.constexpr, HAS_MNS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BASE_PRECISION: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_k = grouped_tile(tl.program_id(0).to(tl.int64), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m, offs_k, mask_m, mask_k = tile_offsets(pid_m, pid_k, M, K, BLOCK_M, BLOCK_K)
    if HAS_MNS:
        acc = _dora_dx_base_tile(dy_ptr, w_ptr, m_ptr, norm_ptr, y_ptr, bias_ptr, dmp_ptr, pid_m, pid_k, tl.cdiv(K, BLOCK_K),
                                 offs_m, offs_k, mask_m, mask_k, N, stride_dym, stride_dyn, stride_wn, stride_wk,
                                 stride_ym, stride_yn, stride_dmm, HAS_BIAS, BASE_PRECISION, BLOCK_M, BLOCK_K, BLOCK_N)
    else:
        acc = _gemm_tile(dy_ptr, w_ptr, offs_m, offs_k, mask_m, mask_k, N, stride_dym, stride_dyn, stride_wn,
                         stride_wk, BASE_PRECISION, BLOCK_M, BLOCK_K, BLOCK_N)
    acc = accumulate_lora_dx(acc, g_ptr, a_ptr, adapters_ptr, n_adapters, R, seed, offs_m, offs_k, mask_m, mask_k,
                              stride_gm, stride_gr, stride_ar, stride_ak, HAS_DROPOUT, BLOCK_R, LORA_PRECISION)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])
    if HAS_DA:  # dA for these columns: x is read here instead of by a separate pass
        lora_grad_a_tile(x_ptr, g_ptr, dap_ptr, da_ptr, count_ptr + pid_k, count_base, adapters_ptr, n_adapters,
                            R, seed, pid_m, tl.cdiv(M, BLOCK_M), M, offs_k, mask_k,
                            stride_xm, stride_xk, stride_gm, stride_gr, stride_dps, stride_dpr, stride_dpk,
                            stride_dar, stride_dak, HAS_DROPOUT, BLOCK_M, min(BLOCK_M, 64), BLOCK_R,
                            LORA_PRECISION)


@triton.jit(do_not_specialize=["count_base"])
def _lora_fused_dy_kernel(
    dy_ptr,  # [M, N] gradient of y, activation dtype
    t_ptr,  # [M, R] scaled shrink output saved by the forward, adapter dtype
    b_ptr,  # [N, R] stacked B_i, adapter dtype (also the compute dtype)
    g_ptr,  # [M, R] output G = s' dY @ B, adapter dtype
    db_ptr,  # [N, R] output dB = dY^T @ t, adapter dtype
    gp_ptr,  # [n_blocks_n, M, R] fp32 partial G, one slice per N block
    dbp_ptr,  # [n_splits, N, R] fp32 partial dB, one slice per split of M
    count_ptr,  # int64 epoch counters: [n_tiles, cdiv(M, BLOCK_M)] for G, then [n_tiles, n_blocks_n] for dB
    count_base,  # this launch's epoch base (tiles.epoch_counters)
    tiles_ptr,  # [n_tiles, 4] int64 rank tiles: rank start, rank end (columns 2, 3 unused)
    scale_ptr,  # [R] fp32 s' per rank
    m_ptr,  # [N] fp32 DoRA magnitude: dY's columns are scaled by mns = m / norm (HAS_MNS)
    norm_ptr,  # [N] fp32 DoRA row norm (HAS_MNS)
    M, N, rows_per_split,
    stride_dym, stride_dyn, stride_tm, stride_tr, stride_bn, stride_br, stride_gm, stride_gr, stride_dbn, stride_dbr,
    stride_gps, stride_gpm, stride_gpr, stride_dbs, stride_dbpn, stride_dbpr,
    DOT_PRECISION: tl.constexpr, HAS_MNS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # one pass over dY for both reductions: G = s' dY @ B sums over N (partials per N block), dB =
    # dY^T @ t sums over M (partials per split of M). Each partial's last writer to arrive sums
    # the slices in order (deterministic) and stores the result in the adapter dtype.
    # DoRA (HAS_MNS): the inner output's gradient is dY * mns per column: G = s' dY @ (mns * B) (B's
    # tile scaled once, in registers) and dB = mns * (dY^T @ t) (scaled when the sum is stored).
    pid_r = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    n_blocks = tl.num_programs(1)
    n_splits = tl.num_programs(2)
    n_chunks = tl.cdiv(M, BLOCK_M)
    r_start = tl.load(tiles_ptr + pid_r * 4)
    r_end = tl.load(tiles_ptr + pid_r * 4 + 1)
    offs_r = r_start + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = offs_r < r_end
    mask_n = offs_n < N
    b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
    scale = tl.load(scale_ptr + offs_r, mask=mask_r, other=0.0)
    m_lo = pid_s * rows_per_split
    m_hi = tl.minimum(m_lo + rows_per_split, M)
    db_acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    if HAS_MNS:
        mns = _load_mns(m_ptr, norm_ptr, offs_n, mask_n, 0.0)
        b = (b.to(tl.float32) * mns[:, None]).to(b_ptr.dtype.element_ty)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_hi
        mask_mr = mask_m[:, None] & mask_r[None, :]
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        dy = dy.to(b_ptr.dtype.element_ty)
        g = tl.dot(dy, b, input_precision=DOT_PRECISION) * scale[None, :]
        gp_ptrs = gp_ptr + offs_m[:, None] * stride_gpm + offs_r[None, :] * stride_gpr
        tl.store(gp_ptrs + pid_n * stride_gps, g, mask=mask_mr)
        t_tr = tl.load(t_ptr + offs_r[:, None] * stride_tr + offs_m[None, :] * stride_tm,
                       mask=mask_r[:, None] & mask_m[None, :], other=0.0)  # [BLOCK_R, BLOCK_M] = t^T
        db_acc = tl.dot(t_tr.to(b_ptr.dtype.element_ty), dy, db_acc, input_precision=DOT_PRECISION)
        if last_epoch_arrival(count_ptr + pid_r * n_chunks + m0 // BLOCK_M, count_base, n_blocks):  # G rows done
            g_sum = sum_slices(gp_ptrs, n_blocks, stride_gps, mask_mr, BLOCK_M, BLOCK_R)
            tl.store(g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                     g_sum.to(g_ptr.dtype.element_ty), mask=mask_mr)
    mask_rn = mask_r[:, None] & mask_n[None, :]
    dbp_ptrs = dbp_ptr + offs_r[:, None] * stride_dbpr + offs_n[None, :] * stride_dbpn
    tl.store(dbp_ptrs + pid_s * stride_dbs, db_acc, mask=mask_rn)
    n_tiles = tl.num_programs(0)
    db_count = count_ptr + n_tiles * n_chunks + pid_r * n_blocks + pid_n
    if last_epoch_arrival(db_count, count_base, n_splits):  # dB complete
        db_sum = sum_slices(dbp_ptrs, n_splits, stride_dbs, mask_rn, BLOCK_R, BLOCK_N)
        if HAS_MNS:
            db_sum = db_sum * _load_mns(m_ptr, norm_ptr, offs_n, mask_n, 0.0)[None, :]
        tl.store(db_ptr + offs_r[:, None] * stride_dbr + offs_n[None, :] * stride_dbn,
                 db_sum.to(db_ptr.dtype.element_ty), mask=mask_rn)


@triton.jit
def _dora_grad_m_kernel(
    x_ptr,  # [M, K] layer input, activation dtype
    w_ptr,  # [N, K] frozen base weight, activation dtype
    t_ptr,  # [M, R] scaled shrink output saved by the forward, adapter dtype
    b_ptr,  # [N, R] stacked B_i, adapter dtype
    dy_ptr,  # [M, N] gradient of y, activation dtype
    m_ptr,  # [N] fp32 DoRA magnitude
    norm_ptr,  # [N] fp32 DoRA row norm
    dmp_ptr,  # [n_parts, N] fp32 partial dL/dmns, one slice per row block of the dX kernel
    dm_ptr,  # [N] fp32 output dL/dm = dL/dmns / norm
    M, N, K, R, n_parts,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_tr, stride_bn, stride_br, stride_dym, stride_dyn,
    stride_dmp,
    BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # dL/dm for a block of columns: the dX kernel's partials summed in order (deterministic), divided by the
    # norm (mns = m / norm, norm constant). Columns with m == 0, where the forward's output is the bias alone
    # and y_pre cannot be read back from it, recompute y_pre = x @ W^T + t @ B^T (a GEMM over all rows for
    # the column blocks holding such a column only; other blocks skip it).
    pid_n = tl.program_id(0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(0, n_parts):
        acc += tl.load(dmp_ptr + i * stride_dmp + offs_n, mask=mask_n, other=0.0)
    zero = (tl.load(m_ptr + offs_n, mask=mask_n, other=1.0) == 0.0) & mask_n
    if tl.sum(zero.to(tl.int32), axis=0) > 0:
        for m0 in range(0, M, BLOCK_M):
            offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # row offsets into x, dY: 64-bit
            mask_m = offs_m < M
            y_pre = _gemm_tile(x_ptr, w_ptr, offs_m, offs_n, mask_m, mask_n, K, stride_xm, stride_xk, stride_wk,
                               stride_wn, BASE_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            y_pre = accumulate_lora_y(y_pre, t_ptr, b_ptr, R, offs_m, offs_n, mask_m, mask_n, stride_tm, stride_tr,
                                      stride_bn, stride_br, BLOCK_R, LORA_PRECISION)
            dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(tl.where(zero[None, :], dy * y_pre, 0.0), axis=0)
    norm = tl.load(norm_ptr + offs_n, mask=mask_n, other=1.0)
    tl.store(dm_ptr + offs_n, acc / norm, mask=mask_n)


# small operands addressed with 32-bit offsets (checked by runtime.launch on each call)
declare_int32_operands(_lora_fused_dy_kernel, "count_ptr", "tiles_ptr", "scale_ptr")
declare_int32_operands(_lora_fused_forward_lookahead_kernel, "a_ptr", "adapters_ptr", "scale_ptr")


# ----------------------------------------------------------------------------------------------
# Launch configurations (shared by the launchers and aot_specs)
# ----------------------------------------------------------------------------------------------
_BLOCK_R = 16  # the adapter loop's step (ranks are few next to K: a short loop of small dots)
# (kernel, dtypes) -> meta-parameters; dtypes "16" (16-bit model and adapters), "16+fp32" (fp32
# adapters on a 16-bit model: 3xTF32 adapter dots), "fp32" (fp32 model). Output tiles of 128 x 64
# (16-bit), 64 x 64 (16-bit with 3xTF32 adapter dots: 128-row tiles spill) and 64 x 64 with a
# shallow reduction step and 2 stages (fp32: 3xTF32 splits every operand in two); chosen so that no
# variant spills on sm_80..sm_90 even when odd feature sizes prevent vectorised loads.
_CONFIGS = {
    ("forward", "16"): {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "SUB_M": 32, "num_warps": 8,
                        "num_stages": 3},
    ("forward", "16+fp32"): {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "SUB_M": 16,
                             "num_warps": 8, "num_stages": 2},
    ("forward", "fp32"): {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8, "num_warps": 4,
                          "num_stages": 2},  # fp32: no look-ahead kernel (no SUB_M)
    ("grad_x", "16"): {"BLOCK_M": 128, "BLOCK_K": 64, "BLOCK_N": 64, "GROUP_M": 8, "num_warps": 8,
                       "num_stages": 3},
    ("grad_x", "16+fp32"): {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_N": 64, "GROUP_M": 8, "num_warps": 8,
                            "num_stages": 3},
    ("grad_x", "fp32"): {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_N": 16, "GROUP_M": 8, "num_warps": 8,
                         "num_stages": 2},
}


def _dtypes_key(act: torch.dtype, ad: torch.dtype | None) -> str:
    if act == torch.float32:
        return "fp32"
    return "16+fp32" if ad == torch.float32 else "16"


# dY pass (G and dB): wide N blocks halve the G partials; rank tiles of 16 or 32 (always 32 for
# fp32 adapters: ptxas caps the 16-rank TF32 variant at 128 registers on sm_86/89 and spills)
_DY_BLOCK_R = (16, 32)


def _dy_block_rs(ad: torch.dtype) -> tuple[int, ...]:
    return _DY_BLOCK_R[1:] if ad == torch.float32 else _DY_BLOCK_R
# (adapter dtype is fp32, activations are fp32) -> meta-parameters. fp32 adapters use 3xTF32 dots,
# whose split operands spill 256-wide N blocks; on a 16-bit model (dY converted to fp32 in
# registers) 128-wide ones still spill on bf16: 64.
_DY_CONFIGS = {
    (False, False): {"BLOCK_M": 16, "BLOCK_N": 256, "num_warps": 8, "num_stages": 2},
    (True, False): {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 8, "num_stages": 1},
    (True, True): {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 8, "num_stages": 1},
}


def _dy_config(act: torch.dtype, ad: torch.dtype) -> dict:
    return dict(_DY_CONFIGS[ad == torch.float32, act == ad == torch.float32])
DECODE_ROWS = 16  # rows of x up to which a forward is a decode step (its own stage count on sm_86/89)
_DY_TARGET_PROGRAMS = 264  # ~2 programs per SM of a 132-SM GPU: few splits, small dB partials


def _config(kernel: str, act: torch.dtype, ad: torch.dtype | None = None) -> dict:
    """The meta-parameters of ``kernel`` for activations ``act`` and adapters ``ad`` (default: act)."""
    return dict(_CONFIGS[kernel, _dtypes_key(act, ad)])


# ----------------------------------------------------------------------------------------------
# Launchers: check, allocate, launch (2-D operands, any strides)
# ----------------------------------------------------------------------------------------------
_SHRINK_ITEMS = 4  # K slices per row block's shrink, each done by one tile of the previous group


# ----------------------------------------------------------------------------------------------
# Launch plans: pure functions of the shapes; the launchers below call them, and so can a cost model
# ----------------------------------------------------------------------------------------------
def shrink_slices(d_in: int, d_out: int, act: torch.dtype) -> tuple[int, int]:
    """(K per slice, slices) of the look-ahead shrink of one row block (16-bit activations):
    min(_SHRINK_ITEMS, column blocks, K blocks) slices of whole K blocks (at most one slice per
    column block: a group's tiles cover the next group's slices)."""
    cfg = _CONFIGS["forward", _dtypes_key(act, None)]  # BLOCK_K and BLOCK_N: the same for any adapter dtype
    k_blocks = triton.cdiv(d_in, cfg["BLOCK_K"])
    k_per_item = triton.cdiv(k_blocks, min(_SHRINK_ITEMS, triton.cdiv(d_out, cfg["BLOCK_N"]), k_blocks)) * cfg["BLOCK_K"]
    return k_per_item, triton.cdiv(d_in, k_per_item)


def shrink_items(d_in: int, d_out: int, act: torch.dtype) -> int:
    """K slices per row block of the forward's look-ahead shrink (16-bit activations; an fp32
    model runs lora.py's separate shrink instead): fp32 partials [slices, T, R] are written and summed."""
    return shrink_slices(d_in, d_out, act)[1]


def _grad_x_config(act: torch.dtype, ad: torch.dtype, dora: bool) -> dict:
    """The dX kernel's meta-parameters; DoRA's variant (y read, dY scaled in registers) takes the 64-row
    tiles of the fp32-adapter one for any adapter dtype (128-row tiles spill)."""
    return _config("grad_x", act, torch.float32 if dora else ad)


def fused_dx_block_m(act: torch.dtype, ad: torch.dtype | None = None) -> int:
    """Rows per program of the dense fused dX kernel for activations ``act`` and adapters ``ad``
    (default: act): 64 for fp32 activations or fp32 adapters, else 128. dA's fp32 partials are
    [cdiv(T, this), R, K]."""
    return _config("grad_x", act, ad)["BLOCK_M"]


def dy_block_r(rank: int, ad: torch.dtype) -> int:
    """Rank tile of the dY pass: 16 when R <= 16 with 16-bit adapters, else 32."""
    return next((br for br in _dy_block_rs(ad) if br >= rank), _DY_BLOCK_R[-1])


def _dy_splits(m: int, n: int, n_tiles: int, cfg: dict) -> tuple[int, int]:
    """(splits of M, rows per split) for the dY pass."""
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    splits = max(1, min(triton.cdiv(_DY_TARGET_PROGRAMS, n_tiles * triton.cdiv(n, block_n)), triton.cdiv(m, block_m)))
    rows = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m
    return triton.cdiv(m, rows), rows


def _dy_launch_plan(t: int, d_out: int, rank: int, act: torch.dtype, ad: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_R, N blocks, splits of T, rows per split) of the dY pass."""
    block_r = dy_block_r(rank, ad)
    cfg = _dy_config(act, ad)
    splits, rows = _dy_splits(t, d_out, triton.cdiv(rank, block_r), cfg)
    return block_r, triton.cdiv(d_out, cfg["BLOCK_N"]), splits, rows


def dy_plan(t: int, d_out: int, ranks, act: torch.dtype, ad: torch.dtype) -> tuple[int, int]:
    """(N blocks, splits of T) of the dY pass: G's fp32 partials are [N blocks, T, R], dB's
    [splits, N, R]. Rank tiles of ``dy_block_r``, ~_DY_TARGET_PROGRAMS programs."""
    return _dy_launch_plan(t, d_out, sum(ranks), act, ad)[1:3]


def _no_mns(device) -> torch.Tensor:
    """An fp32 stand-in for DoRA's operands in a launch without DoRA (never read)."""
    return torch.empty(1, dtype=torch.float32, device=device)


def _check_dora_vectors(dora, n: int) -> None:
    for v in (dora or ())[:2]:  # the magnitude and the norm: [N] fp32, contiguous
        assert v.shape == (n,) and v.dtype == torch.float32 and v.stride(0) == 1


def launch_fused_forward(x2, weight, bias, a, b, plan, seed, dora=None):
    """(y = x2 @ weight^T + bias + t @ b^T [M, N] in x2's dtype, t = s' * drop(x2) @ a^T [M, R] in
    a's dtype). 16-bit activations: one kernel (the look-ahead shrink); fp32 activations: lora.py's
    shrink kernel, then the GEMM (the look-ahead variant spills registers with 3xTF32 operands).
    With ``dora = (m, norm)`` (DoRA; [N] fp32 each): y = acc + (mns - 1) * acc + bias, mns = m / norm,
    acc = x2 @ weight^T + t @ b^T, in the same epilogue."""
    M, K = x2.shape
    N, R = b.shape
    assert weight.shape == (N, K) and a.shape == (R, K)
    _check_dora_vectors(dora, N)
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    cfg = _config("forward", x2.dtype, a.dtype)
    if x2.dtype != torch.float32 and M <= DECODE_ROWS and gpu_target(x2.device).arch in (86, 89):
        # decode on sm_86/89: with three stages ptxas caps the look-ahead kernel at 128 registers and spills
        # 36-40 bytes once Triton specialises the small row count (kernels/launch_specs.py); two do not
        cfg["num_stages"] = 2
    sub_m = cfg.pop("SUB_M", None)  # the look-ahead's row step (16-bit activations only)
    num_m, num_n = triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"])
    common = dict(HAS_BIAS=bias is not None, HAS_MNS=dora is not None, BASE_PRECISION=dot_precision(x2.dtype),
                  LORA_PRECISION=dot_precision(x2.dtype, b.dtype), BLOCK_R=_BLOCK_R, **cfg)
    m, norm = (_no_mns(x2.device),) * 2 if dora is None else dora
    if x2.dtype == torch.float32:
        t = L.launch_shrink(x2, a, plan, seed, plan.dropout)
        launch(_lora_fused_forward_kernel, (num_m * num_n,),
            x2, weight, weight if bias is None else bias, t, b, y, m, norm, M, N, K, R,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), t.stride(0), t.stride(1),
            b.stride(0), b.stride(1), y.stride(0), y.stride(1), **common)
        return y, t
    k_per_item, n_items = shrink_slices(K, N, x2.dtype)
    t = torch.empty(M, R, dtype=a.dtype, device=x2.device)
    tp = torch.empty(n_items, M, R, dtype=torch.float32, device=x2.device)
    count, epoch = epoch_counters(x2.device, 1 + 2 * num_m)
    grid = (min(cfg["GROUP_M"], num_m) * n_items + num_m * num_n,)
    launch(_lora_fused_forward_lookahead_kernel, grid,
        x2, weight, weight if bias is None else bias, a, t, tp, b, y, m, norm, count, epoch,
        adapter_table(plan, x2.device),
        rank_scale(plan, x2.device), seed, M, N, K, R, len(plan.ranks), n_items, k_per_item,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), a.stride(0), a.stride(1), t.stride(0),
        t.stride(1), tp.stride(0), tp.stride(1), tp.stride(2), b.stride(0), b.stride(1), y.stride(0), y.stride(1),
        HAS_DROPOUT=plan.dropout, SUB_M=sub_m, **common)
    return y, t


def launch_fused_grad_x(dy2, weight, g, a, plan, seed, x2=None, dora=None):
    """(dX = dy2 @ weight + sum_i mask_i * (g_i @ a_i) [M, K] in dy2's dtype, and with x2 also
    dA = sum_i g_i^T @ (mask_i * x2) [R, K] in a's dtype, from the same kernel; else None).
    With ``dora = (m, norm, y2, bias)`` (DoRA; m, norm [N] fp32, mns = m / norm; y2 the forward's output):
    the base term is (dy2 * mns, rounded to dy2's dtype) @ weight, and a third result, the fp32 partials of
    dL/dmns per row block [cdiv(M, BLOCK_M), N] (summed by ``launch_dora_grad_m``)."""
    M, N = dy2.shape
    R, K = a.shape
    dx = torch.empty(M, K, dtype=dy2.dtype, device=dy2.device)
    cfg = _grad_x_config(dy2.dtype, a.dtype, dora is not None)
    num_m = triton.cdiv(M, cfg["BLOCK_M"])
    da, da_ptrs, da_strides = grad_a_operands(x2, a, num_m, cfg["BLOCK_K"])
    grid = (num_m * triton.cdiv(K, cfg["BLOCK_K"]),)
    bias = dmp = None
    if dora is None:
        dora_ops, dora_strides = (_no_mns(dy2.device),) * 5, (0, 0, 0)
    else:
        m, norm, y2, bias = dora
        _check_dora_vectors(dora, N)
        assert y2.shape == (M, N) and not plan.dropout, "DoRA's fused backward: y [M, N], no dropout"
        dmp = torch.empty(num_m, N, dtype=torch.float32, device=dy2.device)
        dora_ops = (m, norm, y2, y2 if bias is None else bias, dmp)
        dora_strides = (y2.stride(0), y2.stride(1), dmp.stride(0))
    launch(_lora_fused_grad_x_kernel, grid,
        dy2, weight, g, a, dx, adapter_table(plan, dy2.device), seed, *da_ptrs, *dora_ops, M, K, N, R, len(plan.ranks),
        dy2.stride(0), dy2.stride(1), weight.stride(0), weight.stride(1), g.stride(0), g.stride(1),
        a.stride(0), a.stride(1), dx.stride(0), dx.stride(1), *da_strides, *dora_strides,
        HAS_DROPOUT=plan.dropout, HAS_DA=x2 is not None, HAS_MNS=dora is not None, HAS_BIAS=bias is not None,
        BASE_PRECISION=dot_precision(dy2.dtype),
        LORA_PRECISION=dot_precision(dy2.dtype, a.dtype),
        BLOCK_R=_BLOCK_R, **cfg)
    return (dx, da) if dora is None else (dx, da, dmp)


_GRAD_M_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_R": 16, "num_warps": 4, "num_stages": 1}


def launch_dora_grad_m(x2, weight, t, b, dy2, m, norm, dmp):
    """dL/dm [N] fp32 = (sum of the dX kernel's partials dmp [n_parts, N]) / norm; columns with m == 0 from
    y_pre = x2 @ weight^T + t @ b^T recomputed for the column blocks holding one."""
    M, K = x2.shape
    N, R = b.shape
    _check_dora_vectors((m, norm), N)
    dm = torch.empty(N, dtype=torch.float32, device=dy2.device)
    cfg = dict(_GRAD_M_CONFIG)
    launch(_dora_grad_m_kernel, (triton.cdiv(N, cfg["BLOCK_N"]),),
        x2, weight, t, b, dy2, m, norm, dmp, dm, M, N, K, R, dmp.shape[0],
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), t.stride(0), t.stride(1), b.stride(0),
        b.stride(1), dy2.stride(0), dy2.stride(1), dmp.stride(0),
        BASE_PRECISION=dot_precision(x2.dtype), LORA_PRECISION=dot_precision(x2.dtype, b.dtype), **cfg)
    return dm


def launch_dy_pass(dy2, t, b, plan, dora=None):
    """(G = s' * dy2 @ b [M, R], dB = dy2^T @ t [N, R]), both in b's dtype, from one read of dy2. With
    ``dora = (m, norm)`` ([N] fp32 each, DoRA): dy2 * (m / norm) in place of dy2."""
    M, N = dy2.shape
    R = b.shape[1]
    block_r, n_blocks, splits, rows = _dy_launch_plan(M, N, R, dy2.dtype, b.dtype)
    tiles = rank_tiles(plan, False, block_r, dy2.device)
    cfg = _dy_config(dy2.dtype, b.dtype)
    n_tiles = tiles.shape[0]
    gp = torch.empty(n_blocks, M, R, dtype=torch.float32, device=dy2.device)
    dbp = torch.empty(splits, N, R, dtype=torch.float32, device=dy2.device)
    g = torch.empty(M, R, dtype=b.dtype, device=dy2.device)
    db = torch.empty(N, R, dtype=b.dtype, device=dy2.device)
    count, base = epoch_counters(dy2.device, n_tiles * (triton.cdiv(M, cfg["BLOCK_M"]) + n_blocks))
    _check_dora_vectors(dora, N)
    launch(_lora_fused_dy_kernel, (n_tiles, n_blocks, splits),
        dy2, t, b, g, db, gp, dbp, count, base, tiles, rank_scale(plan, dy2.device),
        *((_no_mns(dy2.device),) * 2 if dora is None else dora), M, N, rows,
        dy2.stride(0), dy2.stride(1), t.stride(0), t.stride(1), b.stride(0), b.stride(1), g.stride(0), g.stride(1),
        db.stride(0), db.stride(1), gp.stride(0), gp.stride(1), gp.stride(2), dbp.stride(0), dbp.stride(1),
        dbp.stride(2), DOT_PRECISION=dot_precision(dy2.dtype, b.dtype), HAS_MNS=dora is not None, BLOCK_R=block_r,
        **cfg)
    return g, db


def _forward_triton(x2, weight, bias, weights_a, weights_b, plan, seed):
    return launch_fused_forward(x2, weight, bias, cat_a(weights_a), cat_b(weights_b), plan, seed)


def adapter_backward_triton(dy2, x2, t, weights_a, weights_b, plan, seed, need_x, need_a, need_b, grad_x):
    """(dX, stacked dA, stacked dB) on the Triton backend, None where not needed. ``grad_x(g, a, x2 or
    None)`` launches the base layer's dX kernel with the adapter term (and dA when given x2) and
    returns (dX, dA or None); a dA it leaves out comes from lora.py's separate kernel."""
    a, b = cat_a(weights_a), cat_b(weights_b)
    dx = da = db = g = None
    if need_b and (need_x or need_a):  # G and dB from one pass over dY
        g, db = launch_dy_pass(dy2, t, b, plan)
    elif need_b:
        no_drop = make_plan(plan.ranks, (1.0,) * len(plan.ranks), (0.0,) * len(plan.ranks))
        db = L.launch_grad_w(t, dy2, no_drop, 0, False, transpose_out=True).to(b.dtype)
    if need_x or need_a:
        if g is None:
            scaled = Plan(plan.ranks, plan.scales, (0.0,) * len(plan.ranks))
            g = L.launch_shrink(dy2, b.t(), scaled, 0, False)
        if need_x:  # dA (when wanted) inside the dX kernel
            dx, da = grad_x(g, a, x2 if need_a else None)
        if need_a and da is None:
            da = L.launch_grad_w(g, x2, plan, seed, plan.dropout, transpose_out=False).to(a.dtype)
    return dx, da, db


def _backward_triton(dy2, x2, t, weight, weights_a, weights_b, plan, seed, need_x, need_a, need_b):
    return adapter_backward_triton(dy2, x2, t, weights_a, weights_b, plan, seed, need_x, need_a, need_b,
                                    lambda g, a, xa: launch_fused_grad_x(dy2, weight, g, a, plan, seed, xa))


# ----------------------------------------------------------------------------------------------
# PyTorch reference (the test oracle and the CPU backend): nn.Linear, then lora.py's math
# ----------------------------------------------------------------------------------------------
def forward_reference(x2, weight, bias, weights_a, weights_b, plan, seed):
    return L.forward_reference(x2, F.linear(x2, weight, bias), weights_a, weights_b, plan, seed)


def backward_reference(dy2, x2, t, weight, weights_a, weights_b, plan, seed, need_x, need_a, need_b):
    dx, da, db = L.backward_reference(dy2, x2, t, weights_a, weights_b, plan, seed, need_x, need_a, need_b)
    if need_x:
        dx = torch.addmm(dx, dy2, weight) if dx.dtype == dy2.dtype else (dy2 @ weight).add_(dx)
    return dx, da, db


# ----------------------------------------------------------------------------------------------
# Dispatch and the op's declaration (kernels/opdecl.py)
# ----------------------------------------------------------------------------------------------


def plan_forward(x, weight, bias, weights_a, weights_b, plan, seed, on_triton):
    """(y [..., N], t [M, R])."""
    x2 = as_2d(x)
    impl = _forward_triton if on_triton and x2.shape[0] > 0 else forward_reference
    y2, t = impl(x2, weight, bias, weights_a, weights_b, plan, seed)
    return y2.view(*x.shape[:-1], weight.shape[0]), t


def plan_backward(dy, x, t, weight, weights_a, weights_b, plan, seed, need_x, need_bias, need_a, need_b,
              on_triton):
    """(dx shaped like x, dbias, stacked dA [R, K], stacked dB [N, R]); None where not needed."""
    dy2, x2, t2 = as_2d(dy), as_2d(x), as_2d(t)
    impl = _backward_triton if on_triton and dy2.shape[0] > 0 else backward_reference
    dx, da, db = impl(dy2, x2, t2, weight, weights_a, weights_b, plan, seed, need_x, need_a, need_b)
    dbias = dy2.sum(0, dtype=torch.float32).to(dy2.dtype) if need_bias else None
    return (dx.view(x.shape) if dx is not None else None), dbias, da, db


def _op_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weights_a: list[torch.Tensor],
                weights_b: list[torch.Tensor], scalings: list[float], dropout_ps: list[float], seed: torch.Tensor,
                *, hint=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [..., N], t [..., R]); dropout_ps are the active probabilities (0 where off).
    hint (eager): (plan, on_triton) as ``lora_linear_fused`` decided them once per call."""
    if hint is None:
        plan = make_plan([a.shape[0] for a in weights_a], scalings, dropout_ps)
        on_triton = use_triton(x, weight, *weights_a, *weights_b)
    else:
        plan, on_triton = hint
    y, t = plan_forward(x, weight, bias, weights_a, weights_b, plan, int(seed), on_triton)
    return y, (t if x.dim() == 2 else t.view(*x.shape[:-1], t.shape[-1]))


def _op_save(args, outputs) -> list:
    x, weight, _bias, weights_a, weights_b, _scalings, _ps, seed = args
    return [x, outputs[1], weight, seed, *weights_a, *weights_b]  # W and the adapters by reference


def _op_backward(saved, grads, needs, statics, *, hint=None) -> list:
    """Gradients of (x, weight (frozen), bias, A_1..A_n, B_1..B_n, seed)."""
    x, t, weight, seed, *weights = saved
    n = len(weights) // 2
    dy = grads[0]
    if hint is None:
        plan = make_plan([a.shape[0] for a in weights[:n]], *statics)
        on_triton = use_triton(dy, x, weight, *weights)
    else:
        plan, on_triton = hint
    need_a, need_b = needs[3:3 + n], needs[3 + n:3 + 2 * n]
    dx, dbias, da, db = plan_backward(dy, x, t, weight, weights[:n], weights[n:], plan, int(seed), needs[0], needs[2],
                                  any(need_a), any(need_b), on_triton)
    return [dx, None, dbias, *adapter_grads(plan, da, db, need_a, need_b), None]


def _op_fake(x, weight, bias, weights_a, weights_b, scalings, dropout_ps, seed):
    rank = sum(a.shape[0] for a in weights_a)
    return (x.new_empty((*x.shape[:-1], weight.shape[0])),
            x.new_empty((*x.shape[:-1], rank), dtype=weights_a[0].dtype))


def _op_backward_fake(saved, grads, needs, statics) -> list:
    x, _t, _weight, _seed, *weights = saved
    dy = grads[0]
    return [x.new_empty(x.shape) if needs[0] else None, None, dy.new_empty(dy.shape[-1]) if needs[2] else None,
            *(w.new_empty(w.shape) if need else None for w, need in zip(weights, needs[3:-1])), None]


# the op, declared once: peftfast::lora_linear_fused (+ fake, backward op, autograd) and the eager path
LORA_LINEAR_FUSED = OpDecl("peftfast::lora_linear_fused", _op_forward, _op_backward, save=_op_save, fake=_op_fake,
                           backward_fake=_op_backward_fake, aux_outputs=(1,))


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------
def _check(x, weight, bias):
    if records_weight_grad(weight):
        raise ValueError("lora_linear_fused needs a frozen base weight (weight.requires_grad=False) while autograd "
                         "records; for a trainable base weight use F.linear followed by lora_linear")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., d_in] and weight [d_out, d_in] must agree on d_in; got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [d_out={weight.shape[0]}] or None, got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype} (as F.linear requires), got {t.dtype}")


def lora_linear_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      weights_a: Sequence[torch.Tensor], weights_b: Sequence[torch.Tensor],
                      scalings: Sequence[float], dropout_ps: Sequence[float], training: bool) -> torch.Tensor:
    """``F.linear(x, weight, bias) + sum_i s_i * drop_i(x as A_i.dtype) @ A_i^T @ B_i^T`` in x's dtype.

    x: [..., d_in]; weight: [d_out, d_in], frozen, x's dtype; bias: [d_out] in x's dtype or None;
    weights_a[i]: [r_i, d_in]; weights_b[i]: [d_out, r_i] (A_i and B_i share a dtype, which may
    differ from x's); scalings[i]: float; dropout_ps[i] in [0, 1), used only when ``training``.
    Gradients flow to x, bias and every A_i / B_i that requires grad. Each call with dropout
    draws one seed from torch's default generator. The op picks the backend: on the Triton backend
    the fused kernels; elsewhere ``F.linear`` then ``lora_linear`` (the same math, reference path).
    On a CUDA device the first call of each key (``dispatch_key``: GPU, tokens rounded up to a power of
    two, d_out, d_in, ranks, dtypes, backward or not, dropout) times the fused kernels against
    ``F.linear`` (cuBLAS) + lora.py's kernels and keeps the faster (kernels/autotune.py;
    ``PEFTFAST_AUTOTUNE=0``: always fused).
    """
    _check(x, weight, bias)
    if len(weights_a) == 0:
        return F.linear(x, weight, bias)
    if not torch.compiler.is_compiling() and not use_triton(x, weight):
        # the reference backend: the base matmul, then lora.py's op on its output (which checks the adapters)
        return L.lora_linear(x, F.linear(x, weight, bias), weights_a, weights_b, scalings, dropout_ps, training)
    base_shape = torch.empty((), device="meta").expand(*x.shape[:-1], weight.shape[0])
    check_adapters(x, base_shape, weights_a, weights_b, scalings, dropout_ps)
    if len({a.dtype for a in weights_a}) > 1:  # mixed adapter dtypes: base, then lora.py per run
        return L.lora_linear(x, F.linear(x, weight, bias), weights_a, weights_b, scalings, dropout_ps, training)
    ps = [check_p(p) if training else 0.0 for p in dropout_ps]
    dropout = any(p > 0.0 for p in ps)
    if torch.compiler.is_compiling():
        seed = draw_seed() if dropout else torch.zeros((), dtype=torch.int64)
        return LORA_LINEAR_FUSED(x, weight, bias, list(weights_a), list(weights_b), [float(s) for s in scalings], ps,
                                 seed)[0]
    plan = make_plan([a.shape[0] for a in weights_a], scalings, ps)
    on_triton = use_triton(x, weight, *weights_a, *weights_b)
    if on_triton and dispatch(x, weight, bias, weights_a, weights_b, scalings, ps, plan) == UNFUSED:
        return L.lora_linear(x, base_linear(x, weight, bias), weights_a, weights_b, scalings, dropout_ps, training)
    seed = int(draw_seed()) if dropout else 0
    return LORA_LINEAR_FUSED(x, weight, bias, list(weights_a), list(weights_b), scalings, ps, seed,
                             hint=(plan, on_triton))[0]


# ----------------------------------------------------------------------------------------------
# DoRA: the magnitude / norm scale in the same kernels (peftfast::dora_linear_fused)
# ----------------------------------------------------------------------------------------------
# One DoRA adapter (or several LoRA adapters summed, then scaled), no dropout, frozen base:
#
#     y_pre = x @ W^T + t @ B^T,  t = s' x @ A^T                    (what lora_linear_fused computes)
#     y     = y_pre + (mns - 1) * y_pre + b,   mns = m / norm      m, norm [N] fp32; norm a constant
#
# norm = ||W + s B A||_row comes from ``dora_row_norm_fused`` (one kernel) or the caller's torch code.
# Forward: the fused GEMM's epilogue forms mns = m / norm and applies (mns - 1) per column before the
# bias (PEFT's form: m == norm, a fresh adapter, gives the LoRA kernel's output bit for bit); no extra
# pass over y, no launch for m / norm.
# Backward (norm treated as a constant, as PEFT):
#
#     dY' = dY * mns (per column)         G = s' dY' @ B, dB = dY'^T @ t, dX = dY' @ W + G @ A,
#     dA = G^T @ x,  db = sum_m dY,       dL/dm = sum_m dY * y_pre / norm,  y_pre = (y - b) / mns
#
# dY' is formed in registers by the dY pass (G, dB) and by the dX kernel's loads of dY (rounded to dY's
# dtype there, as autograd rounds PEFT's mns * dY). The dX kernel, compute-bound, also reads the
# forward's output y for its share of column blocks and writes fp32 partials of sum_m dY * y_pre per row
# block; ``_dora_grad_m_kernel`` sums them in order and divides by the norm. Nothing [M, N] is saved but
# y itself (which the next layer usually holds anyway). Columns with m == 0 (y == b there, y_pre lost)
# recompute y_pre = x @ W^T + t @ B^T in that last kernel (a GEMM over those column blocks only).
# Accuracy: y_pre recovered from y carries y's rounding divided by mns (|y| ulp / |mns|); for a 16-bit
# model whose bias dwarfs mns * y_pre this is coarser than PEFT's saved y_pre.
# Saved for backward: x, t [M, R], y, m, norm, b and references to W and the adapters.
# Launches: forward as lora_linear_fused; backward 3 (dY pass; dX + dA + dL/dm partials; dL/dm), plus
# torch's sum of dY for a trainable bias. Gradient sets without B's or without x's gradient take the
# reference path below (dY * mns in torch, then the LoRA backward; y_pre recomputed).


def _dora_reference_forward(x2, weight, bias, weights_a, weights_b, plan, m, norm):
    y_pre, t = forward_reference(x2, weight, None, weights_a, weights_b, plan, 0)
    cd = torch.promote_types(y_pre.dtype, torch.float32)
    yf = y_pre.to(cd)
    out = yf + (m.to(cd) / norm.to(cd) - 1) * yf
    if bias is not None:
        out = out + bias.to(cd)
    return out.to(x2.dtype), t


def _dora_op_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     weights_a: list[torch.Tensor], weights_b: list[torch.Tensor], scalings: list[float],
                     magnitude: torch.Tensor, norm: torch.Tensor, *, hint=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [..., N], t [..., R]); magnitude, norm [N] fp32. hint (eager): (plan, on_triton)."""
    if hint is None:
        plan = make_plan([a.shape[0] for a in weights_a], scalings, [0.0] * len(weights_a))
        on_triton = use_triton(x, weight, *weights_a, *weights_b)
    else:
        plan, on_triton = hint
    x2 = as_2d(x)
    if on_triton and x2.shape[0] > 0:
        y2, t = launch_fused_forward(x2, weight, bias, cat_a(weights_a), cat_b(weights_b), plan, 0,
                                     dora=(magnitude, norm))
    else:
        y2, t = _dora_reference_forward(x2, weight, bias, weights_a, weights_b, plan, magnitude, norm)
    return y2.view(*x.shape[:-1], weight.shape[0]), (t if x.dim() == 2 else t.view(*x.shape[:-1], t.shape[-1]))


def _dora_op_save(args, outputs) -> list:
    x, weight, bias, weights_a, weights_b, _scalings, magnitude, norm = args
    return [x, outputs[1], outputs[0], weight, bias, magnitude, norm, *weights_a, *weights_b]


def _dora_dm_reference(dy2, x2, t2, weight, b, norm):
    """dL/dm = sum_m dY * y_pre / norm with y_pre = x @ W^T + t @ B^T recomputed (fp32, or fp64 for fp64)."""
    cd = torch.promote_types(dy2.dtype, torch.float32)
    y_pre = F.linear(x2, weight).to(cd) + t2.to(cd) @ b.to(cd).t()
    return (dy2.to(cd) * y_pre).sum(0) / norm.to(cd)


def _dora_op_backward(saved, grads, needs, statics, *, hint=None) -> list:
    """Gradients of (x, weight (frozen), bias, A_1..A_n, B_1..B_n, magnitude, norm (a constant))."""
    x, t, y, weight, bias, magnitude, norm, *weights = saved
    n = len(weights) // 2
    a_list, b_list = weights[:n], weights[n:]
    dy = grads[0]
    if hint is None:
        plan = make_plan([a.shape[0] for a in a_list], statics[0], [0.0] * n)
        on_triton = use_triton(dy, x, weight, *weights)
    else:
        plan, on_triton = hint
    need_x, need_bias, need_m = needs[0], needs[2], needs[-2]
    need_a, need_b = needs[3:3 + n], needs[3 + n:3 + 2 * n]
    dy2, x2, t2, y2 = as_2d(dy), as_2d(x), as_2d(t), as_2d(y)
    dx = da = db = dm = None
    if on_triton and dy2.shape[0] > 0 and any(need_b) and need_x:
        a, b = cat_a(a_list), cat_b(b_list)
        g, db = launch_dy_pass(dy2, t2, b, plan, dora=(magnitude, norm))
        dx, da, dmp = launch_fused_grad_x(dy2, weight, g, a, plan, 0, x2 if any(need_a) else None,
                                          dora=(magnitude, norm, y2, bias))
        if need_m:
            dm = launch_dora_grad_m(x2, weight, t2, b, dy2, magnitude, norm, dmp)
    else:
        mns = magnitude / norm
        dyi = (dy2 * mns).to(dy2.dtype)
        if need_x or any(need_a) or any(need_b):
            impl = _backward_triton if on_triton and dy2.shape[0] > 0 else backward_reference
            dx, da, db = impl(dyi, x2, t2, weight, a_list, b_list, plan, 0, need_x, any(need_a), any(need_b))
        if need_m:
            dm = _dora_dm_reference(dy2, x2, t2, weight, cat_b(b_list), norm)
    dbias = dy2.sum(0, dtype=torch.float32).to(dy2.dtype) if need_bias else None
    dx = dx.view(x.shape) if dx is not None else None
    return [dx, None, dbias, *adapter_grads(plan, da, db, need_a, need_b),
            dm.to(magnitude.dtype) if need_m else None, None]


def _dora_op_fake(x, weight, bias, weights_a, weights_b, scalings, magnitude, norm):
    rank = sum(a.shape[0] for a in weights_a)
    return (x.new_empty((*x.shape[:-1], weight.shape[0])),
            x.new_empty((*x.shape[:-1], rank), dtype=weights_a[0].dtype))


def _dora_op_backward_fake(saved, grads, needs, statics) -> list:
    x, _t, _y, _weight, _bias, magnitude, _norm, *weights = saved
    dy = grads[0]
    return [x.new_empty(x.shape) if needs[0] else None, None, dy.new_empty(dy.shape[-1]) if needs[2] else None,
            *(w.new_empty(w.shape) if need else None for w, need in zip(weights, needs[3:-2])),
            magnitude.new_empty(magnitude.shape) if needs[-2] else None, None]


DORA_LINEAR_FUSED = OpDecl("peftfast::dora_linear_fused", _dora_op_forward, _dora_op_backward, save=_dora_op_save,
                           fake=_dora_op_fake, backward_fake=_dora_op_backward_fake, aux_outputs=(1,))


def _dora_composed(x, weight, bias, weights_a, weights_b, scalings, magnitude, norm) -> torch.Tensor:
    """DoRA as ``lora_linear_fused`` then PEFT's elementwise scale ``y + (mns - 1) * (y - bias)``."""
    d_out = weight.shape[0]
    y = lora_linear_fused(x, weight, bias, weights_a, weights_b, scalings, [0.0] * len(weights_a), False)
    m = magnitude.reshape(d_out)
    mns = m / norm.reshape(d_out).to(device=m.device, dtype=m.dtype)
    out = y * mns if bias is None else y + (mns - 1) * (y - bias.to(y.dtype))
    return out.to(y.dtype)


def dora_linear_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      weights_a: Sequence[torch.Tensor], weights_b: Sequence[torch.Tensor],
                      scalings: Sequence[float], magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """DoRA without dropout: ``y_pre + (mns - 1) * y_pre + bias`` in x's dtype, ``mns = magnitude / norm``, where
    ``y_pre = x @ W^T + sum_i s_i x @ A_i^T @ B_i^T`` (x cast to the adapters' dtype for their term).

    x: [..., d_in]; weight: [d_out, d_in], frozen, x's dtype; bias: [d_out] in x's dtype or None;
    weights_a / weights_b / scalings as ``lora_linear_fused``; magnitude: [d_out] (DoRA's m, any float dtype;
    its gradient ``sum_tokens dY * y_pre / norm`` flows back); norm: [d_out] ``||W + s B A||_row``, a constant
    (no gradient, as PEFT detaches it). On the Triton backend one fused GEMM (mns formed and applied in its
    epilogue) and the fused backward above; elsewhere ``lora_linear_fused`` then ``y + (mns - 1) * (y - bias)``
    in torch (``y * mns`` without bias), PEFT's rounding. Either way magnitude == norm (mns == 1) returns what
    ``lora_linear_fused`` returns, bit for bit.
    """
    _check(x, weight, bias)
    d_out = weight.shape[0]
    for name, v in (("magnitude", magnitude), ("norm", norm)):
        if v.numel() != d_out or not v.is_floating_point():
            raise ValueError(f"{name} must be a float tensor of d_out={d_out} values, got {tuple(v.shape)} {v.dtype}")
    norm = norm.detach()
    n = len(weights_a)
    compiling = torch.compiler.is_compiling()
    if n == 0 or (not compiling and not use_triton(x, weight)) or len({a.dtype for a in weights_a}) > 1:
        return _dora_composed(x, weight, bias, weights_a, weights_b, scalings, magnitude, norm)
    base_shape = torch.empty((), device="meta").expand(*x.shape[:-1], d_out)
    check_adapters(x, base_shape, weights_a, weights_b, scalings, [0.0] * n)
    m32 = magnitude.reshape(d_out).to(torch.float32).contiguous()
    n32 = norm.reshape(d_out).to(torch.float32).contiguous()
    if compiling:
        return DORA_LINEAR_FUSED(x, weight, bias, list(weights_a), list(weights_b), [float(s) for s in scalings],
                                 m32, n32)[0]
    plan = make_plan([a.shape[0] for a in weights_a], scalings, [0.0] * n)
    on_triton = use_triton(x, weight, *weights_a, *weights_b)
    if on_triton and dispatch(x, weight, bias, weights_a, weights_b, scalings, [0.0] * n, plan) == UNFUSED:
        # measured: torch's base matmul + the adapter kernels beat the fused GEMM for this key (the LoRA
        # op's own key and decision); DoRA's scale then follows as one elementwise step
        return _dora_composed(x, weight, bias, weights_a, weights_b, scalings, magnitude, norm)
    return DORA_LINEAR_FUSED(x, weight, bias, list(weights_a), list(weights_b), [float(s) for s in scalings], m32,
                             n32, hint=(plan, on_triton))[0]


@triton.jit
def _dora_norm_kernel(
    w_ptr,  # [N, K] frozen base weight, activation dtype
    a_ptr,  # [R, K] stacked A_i, adapter dtype
    b_ptr,  # [N, R] stacked B_i, adapter dtype
    scale_ptr,  # [R] fp32 s per rank
    norm_ptr,  # [N] fp32 output ||W_o + (B diag(s) A)_o||
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # DoRA's row norm in one pass over W: each program owns BLOCK_N rows, forms the delta tile
    # (B s) @ A next to the W tile in fp32 (a short reduction over the ranks) and sums the squares of
    # their sum; W + s B A is never stored. Memory-bound: W read once, A re-read per row block (L2).
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + offs_k < K
        v = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        for r0 in range(0, R, BLOCK_R):
            mask_r = r0 + offs_r < R
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + (r0 + offs_r)[None, :] * stride_br,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            b = b * tl.load(scale_ptr + r0 + offs_r, mask=mask_r, other=0.0)[None, :]
            a = tl.load(a_ptr + (r0 + offs_r)[:, None] * stride_ar + (k0 + offs_k)[None, :] * stride_ak,
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            v = tl.dot(b, a, v, input_precision=PRECISION)
        sq += tl.sum(v * v, axis=1)
    tl.store(norm_ptr + offs_n, tl.sqrt(sq), mask=mask_n)


declare_int32_operands(_dora_norm_kernel, "a_ptr", "scale_ptr")  # [R, K] adapter factors, [R] scales
_NORM_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 128, "BLOCK_R": 16, "num_warps": 4, "num_stages": 2}


def launch_dora_norm(weight, a, b, plan):
    """||weight_o + (b diag(s') a)_o|| for every row o: [N] fp32, one kernel (W read once, nothing [N, K]
    written). The delta is formed in fp32 (3xTF32 dots: ~fp32 accuracy), whatever the dtypes."""
    N, K = weight.shape
    R = a.shape[0]
    assert a.shape == (R, K) and b.shape == (N, R)
    norm = torch.empty(N, dtype=torch.float32, device=weight.device)
    cfg = dict(_NORM_CONFIG)
    launch(_dora_norm_kernel, (triton.cdiv(N, cfg["BLOCK_N"]),),
        weight, a, b, rank_scale(plan, weight.device), norm, N, K, R,
        weight.stride(0), weight.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        PRECISION=dot_precision(torch.float32), **cfg)
    return norm


@torch.no_grad()
def dora_row_norm_fused(weight: torch.Tensor, weights_a: Sequence[torch.Tensor], weights_b: Sequence[torch.Tensor],
                        scalings: Sequence[float]) -> torch.Tensor | None:
    """DoRA's ``||W + sum_i s_i B_i A_i||`` per output row [d_out] in fp32 (no gradient) from one Triton kernel
    on the Triton backend (W read once, the merged weight never formed; exact, no expansion); None where that
    backend does not run (the caller computes it in torch). weight: [d_out, d_in]; A_i [r_i, d_in]; B_i [d_out, r_i]."""
    if not weights_a or torch.compiler.is_compiling() or not use_triton(weight, *weights_a, *weights_b) \
            or len({a.dtype for a in weights_a}) > 1 or weight.shape[0] == 0:
        return None
    plan = make_plan([a.shape[0] for a in weights_a], scalings, [0.0] * len(weights_a))
    return launch_dora_norm(weight, cat_a([a.detach() for a in weights_a]), cat_b([b.detach() for b in weights_b]),
                            plan)


# ----------------------------------------------------------------------------------------------
# Measured dispatch (kernels/autotune.py): the fused GEMM, or torch's base matmul + lora.py's kernels
# ----------------------------------------------------------------------------------------------
FUSED, UNFUSED = "fused", "unfused"  # the default: fused (what runs with PEFTFAST_AUTOTUNE=0, on CPU, compiled)
_DTYPE_TAGS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (backward, dX in it, dropout) -> the key's step
_STEPS = {(grads, need_x, drop): (("fwd+bwd" if need_x else "fwd+bwd-dx") if grads else "fwd")
          + ("+dropout" if drop else "") for grads in (False, True) for need_x in (False, True) for drop in (False, True)}


def dispatch_key(x, weight, weights_a, need_x: bool, need_grads: bool, dropout: bool) -> tuple:
    """(op, tokens rounded up to a power of two, d_out, d_in, total rank, adapters, x dtype, adapter
    dtype, step): step is "fwd" (no backward), "fwd+bwd" or "fwd+bwd-dx" (no x gradient), plus
    "+dropout" when a mask is drawn."""
    d_out, d_in = weight.shape
    tokens = x.numel() // max(d_in, 1)
    step = _STEPS[need_grads, need_x, dropout]
    rank = weights_a[0].shape[0] if len(weights_a) == 1 else sum(a.shape[0] for a in weights_a)
    ad = weights_a[0].dtype
    return ("lora_linear_fused", autotune.bucket(tokens), d_out, d_in, rank, len(weights_a),
            _DTYPE_TAGS.get(x.dtype) or str(x.dtype), _DTYPE_TAGS.get(ad) or str(ad), step)


def describe_key(key: tuple) -> str:
    """A ``dispatch_key`` in words: "T<=2048 4096->4096 r=16 bf16/fp32 fwd+bwd+dropout"."""
    _op, tokens, d_out, d_in, rank, n, act, ad, step = key
    return (f"T<={tokens} {d_in}->{d_out} r={rank}" + (f" ({n} adapters)" if n > 1 else "")
            + f" {act}/{ad} {step}")


def dispatch(x, weight, bias, weights_a, weights_b, scalings, ps, plan) -> str:
    """FUSED or UNFUSED for this call on the Triton backend: the measured choice for its key on a CUDA
    device (timed on the first call of the key, see kernels/autotune.py), else FUSED."""
    if x.numel() == 0 or not autotune.tunable(x.device):
        return FUSED
    need_x, need_grads = autotune.grad_needs(x, bias, [*weights_a, *weights_b])
    key = dispatch_key(x, weight, weights_a, need_x, need_grads, plan.dropout)
    return autotune.measured_choice(x.device, key, lambda: dispatch_candidates(x, weight, bias, weights_a, weights_b,
                                                                               scalings, ps, plan), FUSED)


def dispatch_candidates(x, weight, bias, weights_a, weights_b, scalings, ps, plan) -> dict:
    """{FUSED: step, UNFUSED: step}: each runs this call's forward (and, where the call will need one, the
    backward for the gradients it needs, with a random dY) on the Triton backend, on detached views of
    the caller's tensors: no .grad is written, nothing the caller holds is changed."""
    n = len(weights_a)
    leaves, backward = autotune.detached_step([x, bias, *weights_a, *weights_b], (*x.shape[:-1], weight.shape[0]), x)
    xl, bl, al, bbl = leaves[0], leaves[1], leaves[2:2 + n], leaves[2 + n:]
    seed = 0x5EED if plan.dropout else 0

    def fused():
        backward(LORA_LINEAR_FUSED(xl, weight, bl, al, bbl, scalings, ps, seed, hint=(plan, True))[0])

    def unfused():
        backward(L.lora_linear(xl, base_linear(xl, weight, bl), al, bbl, scalings, ps, True))

    return {FUSED: fused, UNFUSED: unfused}


def base_linear(x, weight, bias):
    """``F.linear`` in x's dtype even under autocast: the unfused path returns what the fused op returns."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, weight, bias)
    return F.linear(x, weight, bias)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# ----------------------------------------------------------------------------------------------
def aot_specs() -> list[AotSpec]:
    kernels = (
        ("forward", _lora_fused_forward_kernel,
         lambda x, w: {"x_ptr": x, "w_ptr": x, "bias_ptr": x, "t_ptr": w, "b_ptr": w, "y_ptr": x, "m_ptr": "fp32",
                       "norm_ptr": "fp32"},
         ("stride_xk", "stride_wk", "stride_tr", "stride_br", "stride_yn"), "HAS_BIAS"),
        ("forward_lookahead", _lora_fused_forward_lookahead_kernel,
         lambda x, w: {"x_ptr": x, "w_ptr": x, "bias_ptr": x, "a_ptr": w, "t_ptr": w, "tp_ptr": "fp32", "b_ptr": w,
                       "y_ptr": x, "m_ptr": "fp32", "norm_ptr": "fp32", "count_ptr": "i64", "scale_ptr": "fp32"},
         ("stride_xk", "stride_wk", "stride_ak", "stride_tr", "stride_tpr", "stride_br", "stride_yn"), "HAS_BIAS"),
        ("grad_x", _lora_fused_grad_x_kernel,
         lambda x, w: {"dy_ptr": x, "w_ptr": x, "g_ptr": w, "a_ptr": w, "dx_ptr": x, "x_ptr": x, "dap_ptr": "fp32",
                       "da_ptr": w, "count_ptr": "i64", "m_ptr": "fp32", "norm_ptr": "fp32", "y_ptr": x, "bias_ptr": x,
                       "dmp_ptr": "fp32"},
         ("stride_dyn", "stride_wk", "stride_gr", "stride_ak", "stride_dxk", "stride_yn"), "HAS_DROPOUT"),
    )
    specs = []
    for act, ad in L.DTYPE_PAIRS:  # the dY pass: G and dB partials (DoRA: dY * mns and dL/dmns)
        xa, wa = DTYPE_NAMES[act], DTYPE_NAMES[ad]
        for block_r in _dy_block_rs(ad):
            for mns in (False, True):
                cfg = _dy_config(act, ad)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                consts = dict(DOT_PRECISION=dot_precision(act, ad), HAS_MNS=mns, BLOCK_R=block_r, **cfg,
                              **{u: 1 for u in ("stride_dyn", "stride_tr", "stride_br", "stride_gpr", "stride_dbr")})
                types = {"dy_ptr": "*" + xa, "t_ptr": "*" + wa, "b_ptr": "*" + wa, "g_ptr": "*" + wa,
                         "db_ptr": "*" + wa, "gp_ptr": "*fp32", "dbp_ptr": "*fp32", "count_ptr": "*i64",
                         "count_base": "i64", "tiles_ptr": "*i64", "scale_ptr": "*fp32", "m_ptr": "*fp32",
                         "norm_ptr": "*fp32"}
                sig = aot_signature(_lora_fused_dy_kernel, types, consts)
                name = (f"lora_fused_dy[x={xa},w={wa},BR={block_r},BLOCK_M={cfg['BLOCK_M']},"
                        f"BLOCK_N={cfg['BLOCK_N']},warps={warps},HAS_MNS={int(mns)}]")
                specs.append(AotSpec(name, _lora_fused_dy_kernel, sig, consts, warps, stages, True))
    for act, ad in L.DTYPE_PAIRS:  # DoRA's row norm
        xa, wa = DTYPE_NAMES[act], DTYPE_NAMES[ad]
        cfg = dict(_NORM_CONFIG)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        consts = dict(PRECISION=dot_precision(torch.float32), **cfg, stride_wk=1, stride_ak=1, stride_br=1)
        types = {"w_ptr": "*" + xa, "a_ptr": "*" + wa, "b_ptr": "*" + wa, "scale_ptr": "*fp32", "norm_ptr": "*fp32"}
        sig = aot_signature(_dora_norm_kernel, types, consts)
        name = f"lora_fused_dora_norm[x={xa},w={wa},{','.join(f'{k}={v}' for k, v in cfg.items())},warps={warps}]"
        specs.append(AotSpec(name, _dora_norm_kernel, sig, consts, warps, stages, True))
        cfg = dict(_GRAD_M_CONFIG)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        consts = dict(BASE_PRECISION=dot_precision(act), LORA_PRECISION=dot_precision(act, ad), **cfg,
                      stride_xk=1, stride_wk=1, stride_tr=1, stride_br=1, stride_dyn=1)
        types = {"x_ptr": "*" + xa, "w_ptr": "*" + xa, "t_ptr": "*" + wa, "b_ptr": "*" + wa, "dy_ptr": "*" + xa,
                 "m_ptr": "*fp32", "norm_ptr": "*fp32", "dmp_ptr": "*fp32", "dm_ptr": "*fp32"}
        sig = aot_signature(_dora_grad_m_kernel, types, consts)
        name = (f"lora_fused_dora_grad_m[x={xa},w={wa},{','.join(f'{k}={v}' for k, v in cfg.items())},"
                f"warps={warps}]")
        specs.append(AotSpec(name, _dora_grad_m_kernel, sig, consts, warps, stages, True))
    for act, ad in L.DTYPE_PAIRS:
        xa, wa = DTYPE_NAMES[act], DTYPE_NAMES[ad]
        for kname, fn, ptrs, unit, flag in kernels:
            if kname.startswith("forward") and (kname == "forward") != (act == torch.float32):
                continue  # the launcher: plain forward for fp32 activations, the look-ahead one otherwise
            second = {"forward": None, "forward_lookahead": "HAS_DROPOUT", "grad_x": "HAS_DA"}[kname]
            flags_list = [{flag: on} for on in (False, True)] if second is None else \
                [{flag: on, second: on2} for on in (False, True) for on2 in (False, True)]
            # DoRA's scale (HAS_MNS): launched without dropout only; the dX kernel's HAS_BIAS (y - bias) with it
            flags_list = [{**f, "HAS_MNS": mns} for f in flags_list for mns in (False, True)
                          if not (mns and f.get("HAS_DROPOUT"))]
            if kname == "grad_x":
                flags_list = [{**f, "HAS_BIAS": bias} for f in flags_list for bias in (False, True)
                              if f["HAS_MNS"] or not bias]
            for flags in flags_list:
                cfg = _config("forward" if kname == "forward_lookahead" else kname, act, ad)
                if kname == "grad_x":
                    cfg = _grad_x_config(act, ad, flags["HAS_MNS"])
                if kname != "forward_lookahead":
                    cfg.pop("SUB_M", None)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                consts = dict(BASE_PRECISION=dot_precision(act), LORA_PRECISION=dot_precision(act, ad),
                              BLOCK_R=_BLOCK_R, **cfg, **{u: 1 for u in unit}, **flags)
                types = {k: "*" + v for k, v in ptrs(xa, wa).items()}
                types.update(adapters_ptr="*i64", seed="i64", epoch="i64", count_base="i64")
                sig = aot_signature(fn, types, consts)
                name = (f"lora_fused_{kname}[x={xa},w={wa},BR={_BLOCK_R},"
                        f"{','.join(f'{k}={v}' for k, v in cfg.items())},"
                        f"{','.join(f'{k}={int(v)}' for k, v in flags.items())}]")
                specs.append(AotSpec(name, fn, sig, consts, warps, stages, True))
    return specs

