"""Grouped LoRA: each row of a batch uses its own adapter (PEFT's ``adapter_names``), in one pass.

Math (one layer; x: [M, K]; base_out: [M, O]; adapter slot a(m) of row m, -1 for none):

    y[m] = base_out[m] + s_a * (x[m] @ A_a^T) @ B_a^T       (a = a(m) >= 0)
    y[m] = base_out[m]                                      (a(m) = -1: the base model)

Adapters live in a stacked store: A [N, R, K], B [N, O, R], scale [N] (fp32), R a power of two >= every
rank, rank rows r_a..R-1 of A and columns of B zero. The store is built once and reused while the
adapters' tensors are unchanged (the layer keeps it; see ``peftfast.tuners.lora.layer``): adding or
deleting an adapter changes only the store's contents, never a kernel.

Plan (``group_plan``, torch ops on the device, no host synchronisation, a fixed number of launches
whatever N is): rows are sorted by adapter (stable argsort) and each adapter's run of rows is cut into
blocks of ``block_rows``; ``table`` [nb, block_rows] holds the row index of each block slot (M for an
empty slot), ``block_adapter`` [nb] the adapter of each block (N for an unused block). nb = N +
ceil(M / block_rows) bounds the blocks any assignment needs, so it is known without reading counts.
Rows of ``__base__`` are in no block.

Per block (SGMV, one adapter per block):

    shrink:  h = s_a * m_a(x[table]) @ A_a^T      [block_rows, R]    (fp32 accumulation)
    expand:  y[table] = base_out[table] + h @ B_a^T

Dropout (training): m_a keeps element (m, k) of x by adapter a's mask, the counter-based hash of
``kernels/dropout.py`` at (seed, stream a, row m of x, column k), and s_a includes 1 / (1 - p_a)
(``dropout_tables``). The kernels and the reference regenerate the same bits wherever they need them
(shrink, dA, dX), so no mask and no dropped copy of x is ever stored.

Triton: one shrink launch (grid nb) and one expand launch (grid nb x O blocks) per layer; a program of an
unused block returns at once. Offsets are int64 throughout; rank tiles are max(16, R) wide with the
store's ranks beyond R masked (no padded copy of the store per call). The PyTorch reference runs the same plan with
two batched matmuls over the blocks (gathering each block's A and B from the store: at most
nb <= N + M / block_rows copies of an adapter's factors), so neither path loops over adapters in Python.

Backward, G = dY[table] (derived from the two lines above; s_a includes 1 / (1 - p_a) with dropout):

    dH = (G @ B_a) * s_a           dx[table] = m_a(dH @ A_a)          (base rows: dx = 0)
    dA_a = sum over a's blocks of dH^T @ m_a(x[table])                dB_a = sum over a's blocks of G^T @ h

Triton (four launches whatever N is, plus a sum of split partials and a cast to the adapter dtype for each of
dA and dB when needed): dH is the shrink kernel on (dY, B^T) without mask; dX the expand kernel on (dH, A^T)
writing a zero-filled dX with the mask applied; dA and dB one weight-gradient kernel each, grid
(adapter, column tile, split): a program walks its adapter's run of blocks (blocks are sorted by adapter;
``adapter_bounds``), accumulating in fp32 registers, one partial per split (``grad_w_splits``: ~4 waves when
few adapters hold many blocks), summed once afterwards (deterministic, no atomics). The reference computes the
same with batched matmuls and ``index_add`` over blocks. Each adapter's own A and B receive views of their
rank rows / columns of the [N, R, K] / [N, O, R] results (cast once).

Saved for backward: x (the caller's tensor, never a cast or dropped copy), h ([nb, block_rows, R'] in the
adapter dtype), the plan and the seed; none of it grows with the number of adapters.

Fused with the base linear (``lora_grouped_linear``, prefill over a frozen nn.Linear): after the base layer,
the shrink reads x again and the expand reads and writes y again, which at prefill is about as many bytes as
the base GEMM itself. One kernel instead (``_grouped_linear_kernel``, grid: blocks x O tiles in grouped order)
runs the base GEMM over each block's gathered rows and, in the same K loop on the same x tile, the block's
adapter shrink h = s_a * m_a(x) @ A_a^T (recomputed by every O tile of the block: R / BLOCK_O more tensor-core
work, no bytes); the epilogue adds h @ B_a^T and the bias and stores y once; the O-tile-0 program stores h
for the backward. Its plan (``fused_plan``) puts the base model's rows in blocks of their own (slot N: no
adapter loads, masked). Bytes: x, W and every used adapter's A and B read once, y written once, h and the
plan. Padding costs GEMM rows, not bytes: at most N + 1 blocks are partly filled, so the layer fuses only
when the rows fill 4x that (``fused_worthwhile``; decode keeps the base GEMM + the two grouped kernels).
Backward (x needs a gradient): one kernel (``_grouped_linear_dx_kernel``, grid: blocks x K tiles) runs dX = dY @ W
over each block's gathered rows and, in the same O loop on the same dY tile, the block's dH = s_a * dY @ B_a; the
epilogue adds m_a(dH @ A_a) and stores dX once; the K-tile-0 program stores dH (rounded to the adapter dtype, as
the dH shrink stores it) for dA. Then dA on (dH, x) and dB on (dY, h) with the weight-gradient kernel. Bytes: dY,
W and the used adapters' A and B read once, dX written once, dH and the plan. Without an x gradient, or on other
plans: dX = dY @ W (torch), then the grouped backward above over the same plan, its dX expand adding into it.
The forward kernel also reads a bitsandbytes 4-bit (aligned layout) or int8 base, dequantising each W^T tile in
registers (WEIGHT "4bit" / "int8", ``_base_wt_tile``; the op and its backward: ``kernels/lora_grouped_q.py``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .aot import AotSpec
from .dropout import draw_seed, keep_mask, keep_mask_rows_torch, stream_key, threshold
from .opdecl import OpDecl
from .quant import as_operand, block_scale, dequant_int8, lookup16, unpack_pairs
from .runtime import (DTYPE_NAMES, aot_signature, declare_int32_operands, dot_precision, launch, records_weight_grad,
                      use_triton)
from .tiles import grouped_tile

# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------


def rank_bucket(rank: int) -> int:
    """The store's rank: the next power of two >= ``rank`` (a new adapter of a smaller rank reuses it)."""
    return 1 << max(0, int(rank) - 1).bit_length()


TRITON_ROW_SPLIT = 16  # the Triton path's block rows: ~rows / 16, whatever the adapters (see block_rows_for)


def block_rows_for(rows: int, adapters: int, on_triton: bool) -> int:
    """Rows per block, a power of two. PyTorch: ~rows / adapters (so the blocks' padding is at most ~M). Triton:
    ~rows / 16 within 16..64 (``tl.dot`` tiles), from the rows alone: BLOCK_ROWS is a constexpr of the kernels,
    so a choice that followed the adapters held would compile a new variant when an adapter is added or deleted
    while serving (padding costs GEMM rows, not bytes; at most one partly filled block per used adapter)."""
    per = max(1, -(-rows // max(1, TRITON_ROW_SPLIT if on_triton else adapters)))
    b = rank_bucket(per)
    return min(64, max(16, b)) if on_triton else min(256, b)


def num_blocks(rows: int, adapters: int, block_rows: int) -> int:
    """Blocks that any assignment of ``rows`` rows to ``adapters`` adapters fits in."""
    return adapters + -(-rows // block_rows)


def group_plan(index: torch.Tensor, adapters: int, block_rows: int, counts: torch.Tensor | None = None,
               used: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(table [nb, block_rows] int64, block_adapter [nb] int64) for rows whose adapter slots are ``index``
    ([M] int64, -1 for the base model); see the module docstring. Torch ops only, no host synchronisation.
    ``used``: how many distinct slots ``index`` holds, when the caller knows it (a layer does, from the call's
    names): nb then bounds those, not every slot, so the kernels' grids do not grow with the adapters held (at
    most one partly filled block per used slot). It must not be below the true count: rows would be dropped.

    ``dense_plan`` instead: one block per adapter (block_rows >= every adapter's row count, which the caller
    read), so block b is adapter b and the stores are used as they are, without gathering per block."""
    m = index.shape[0]
    dev = index.device
    key = torch.where(index < 0, torch.full_like(index, adapters), index)
    order = torch.argsort(key, stable=True)
    if counts is None:
        counts = torch.bincount(key, minlength=adapters + 1)
        blocks = (counts[:adapters] + block_rows - 1) // block_rows
        nb = num_blocks(m, adapters if used is None else min(used, adapters), block_rows)
    else:
        blocks = torch.ones(adapters, dtype=torch.int64, device=dev)
        nb = adapters
    seg_start = torch.cumsum(counts, 0) - counts
    blk_end = torch.cumsum(blocks, 0)
    blk_start = blk_end - blocks
    ks = key[order]
    pos = torch.arange(m, device=dev) - seg_start[ks]
    valid = ks < adapters
    ks_c = ks.clamp(max=max(adapters - 1, 0))
    flat = torch.where(valid, (blk_start[ks_c] + pos // block_rows) * block_rows + pos % block_rows,
                       torch.full_like(pos, nb * block_rows))
    table = torch.full(((nb + 1) * block_rows,), m, dtype=torch.int64, device=dev)
    table.scatter_(0, flat, order)  # base rows all land in the extra block, dropped below
    table = table[:nb * block_rows].view(nb, block_rows)
    block_adapter = torch.searchsorted(blk_end, torch.arange(nb, device=dev), right=True)
    return table, block_adapter


def dense_plan(index: torch.Tensor, adapters: int, slack: float = 2.0):
    """The CPU plan: (table [N, C], block_adapter = arange(N)) with C the largest adapter's row count, when the
    padding N * C stays within ``slack`` x the rows (else None: use ``group_plan``). Reads the counts on the
    host (free on the CPU; the Triton path never calls it)."""
    m = index.shape[0]
    key = torch.where(index < 0, torch.full_like(index, adapters), index)
    counts = torch.bincount(key, minlength=adapters + 1)
    c = max(1, int(counts[:adapters].max()))
    if adapters * c > slack * m + adapters:
        return None
    return group_plan(index, adapters, c, counts=counts)


def run_plan(index: torch.Tensor, run: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The CPU plan for rows in runs of ``run`` consecutive rows with one adapter each (a sample's tokens): block b
    is run b, in order (table = arange(M) as [M / run, run], block_adapter = the run's adapter), so the reference
    multiplies x and base_out as they are, without gathered copies of them or a scatter of the outputs. None when
    a run has no adapter (base rows are in no block) or the rows are not such runs. Reads the index on the host."""
    m = index.shape[0]
    if run <= 1 or m % run or m == 0:
        return None
    runs = index.view(m // run, run)
    if bool((runs[:, 0] < 0).any()) or not bool((runs == runs[:, :1]).all()):
        return None
    return torch.arange(m, device=index.device).view(m // run, run), runs[:, 0].contiguous()


def make_plan(index: torch.Tensor, adapters: int, on_triton: bool, run: int = 1,
              rank: int = 0, used: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan ``lora_grouped`` uses for ``index``: on the CPU, runs (``run_plan``) when the rows come in runs of
    ``run`` >= the store's ``rank`` rows of one adapter (gathering each run's factors, M / run x R x (K + O)
    elements, then costs less than gathering the rows, M x (K + O)), else dense when its padding is small; else
    blocks."""
    dense = not (on_triton or index.is_cuda or torch.compiler.is_compiling())  # dense_plan reads counts on the host
    plan = run_plan(index, run) if dense and run >= max(rank, 2) else None
    if plan is not None:
        return plan
    plan = dense_plan(index, adapters) if dense else None
    return plan if plan is not None else group_plan(index, adapters, block_rows_for(index.shape[0], adapters,
                                                                                     on_triton), used=used)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

# Integer arguments that follow the number of adapters a layer holds (the count, the plan's blocks, the
# weight-gradient splits and the stride over them) are not specialised: Triton compiles a variant for integers equal
# to 1 and for those divisible by 16, so adding or deleting an adapter while serving would compile one. The store's
# rank (the largest rank held, rounded up to a power of two) is part of a variant: its rank tile BLOCK_R and the
# strides it sets (a B row's stride is the rank); so is dropout switched on in training (HAS_DROPOUT).
ADAPTER_COUNTS = ["seed", "N_ADAPTERS"]


@triton.jit(do_not_specialize=ADAPTER_COUNTS)
def _grouped_shrink_kernel(
    x_ptr,  # [M, K] rows of the batch (x, or dY for the backward's dH), any strides
    a_ptr,  # [N, R, K] stacked A (or B^T [N, R, O] for dH), any strides
    scale_ptr,  # [N] fp32 per-adapter scale (s / (1 - p) with dropout)
    table_ptr,  # [nb, BLOCK_ROWS] int64 row of each block slot (M: empty)
    badapter_ptr,  # [nb] int64 adapter of each block (N: unused block)
    h_ptr,  # [nb, BLOCK_ROWS, BLOCK_R] output, in the adapter dtype (the store's)
    thresh_ptr,  # [N] int64 keep threshold per adapter (read only with HAS_DROPOUT)
    seed,  # 64-bit dropout seed (HAS_DROPOUT)
    M, K, R, N_ADAPTERS,
    stride_xm, stride_xk, stride_an, stride_ar, stride_ak,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """h[b] = scale[a] * mask_a(x[table[b]]) @ A[a]^T for block b of adapter a ([BLOCK_ROWS, BLOCK_R], fp32
    accumulation; ranks R..BLOCK_R-1 zero); mask_a: adapter a's dropout mask at (row, column) of x,
    regenerated from (seed, a, row, column)."""
    b = tl.program_id(0).to(tl.int64)
    adapter = tl.load(badapter_ptr + b).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_ROWS).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    h_ptrs = h_ptr + (b * BLOCK_ROWS + offs_m[:, None]) * BLOCK_R + offs_r[None, :]
    if adapter >= N_ADAPTERS:  # an unused block: zeros (backward multiplies them by zero gradients)
        tl.store(h_ptrs, tl.zeros((BLOCK_ROWS, BLOCK_R), dtype=tl.float32).to(h_ptr.dtype.element_ty))
        return
    rows = tl.load(table_ptr + b * BLOCK_ROWS + offs_m).to(tl.int64)
    row_ok = rows < M
    r_ok = offs_r < R
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_ROWS, BLOCK_R), dtype=tl.float32)
    a_base = a_ptr + adapter * stride_an
    if HAS_DROPOUT:
        key = stream_key(seed, adapter)
        thresh = tl.load(thresh_ptr + adapter).to(tl.uint32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            xt = tl.where(keep_mask(key, rows, kk, thresh), xt, 0.0)
        at = tl.load(a_base + offs_r[:, None] * stride_ar + kk[None, :] * stride_ak,
                     mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(xt.to(at.dtype), tl.trans(at), input_precision=DOT_PRECISION)
    s = tl.load(scale_ptr + adapter)
    tl.store(h_ptrs, (acc * s).to(h_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=ADAPTER_COUNTS)
def _grouped_expand_kernel(
    h_ptr,  # [nb, BLOCK_ROWS, BLOCK_R] per-block left operand: h (forward) or dH (dX)
    b_ptr,  # [N, O, R] stacked B (or A^T [N, K, R] for dX), any strides
    table_ptr,  # [nb, BLOCK_ROWS] int64 row of each block slot (M: empty)
    badapter_ptr,  # [nb] int64 adapter of each block (N: unused block)
    out_ptr,  # [M, O] y (holding the base output, ACCUMULATE) or dX (written)
    thresh_ptr,  # [N] int64 keep threshold per adapter (read only with HAS_DROPOUT)
    seed,  # 64-bit dropout seed (HAS_DROPOUT)
    M, O, R, N_ADAPTERS,
    stride_bn, stride_bo, stride_br, stride_om, stride_oo,
    ACCUMULATE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[table[b], o-block] (+)= mask_a(h[b] @ B[a]^T) (each row is in one block; the mask only for dX)."""
    b = tl.program_id(0).to(tl.int64)
    pid_o = tl.program_id(1).to(tl.int64)
    adapter = tl.load(badapter_ptr + b).to(tl.int64)
    if adapter >= N_ADAPTERS:
        return
    offs_m = tl.arange(0, BLOCK_ROWS).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    rows = tl.load(table_ptr + b * BLOCK_ROWS + offs_m).to(tl.int64)
    row_ok = rows < M
    o_ok = offs_o < O
    h = tl.load(h_ptr + (b * BLOCK_ROWS + offs_m[:, None]) * BLOCK_R + offs_r[None, :])
    bt = tl.load(b_ptr + adapter * stride_bn + offs_r[:, None] * stride_br + offs_o[None, :] * stride_bo,
                 mask=(offs_r < R)[:, None] & o_ok[None, :], other=0.0)
    acc = tl.dot(h.to(bt.dtype), bt, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = keep_mask(stream_key(seed, adapter), rows, offs_o, tl.load(thresh_ptr + adapter).to(tl.uint32))
        acc = tl.where(keep, acc, 0.0)
    o_ptrs = out_ptr + rows[:, None] * stride_om + offs_o[None, :] * stride_oo
    mask = row_ok[:, None] & o_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "S", "stride_os"])
def _grouped_grad_w_kernel(
    left_ptr,  # [nb, BLOCK_ROWS, >= R] per-block left operand, adapter dtype: h (dB) or dH (dA), any strides
    right_ptr,  # [M, C] rows of the batch: dY (dB) or x (dA, masked), any strides
    table_ptr,  # [nb, BLOCK_ROWS] int64 row of each block slot (M: empty)
    bounds_ptr,  # [N + 1] int64: adapter a's blocks are bounds[a] .. bounds[a + 1] - 1 (sorted by adapter)
    out_ptr,  # [S, N, R, C] fp32 partial sums, one slice per split (any strides)
    thresh_ptr,  # [N] int64 keep threshold per adapter (read only with HAS_DROPOUT)
    seed,  # 64-bit dropout seed (HAS_DROPOUT)
    M, C, R, S,
    stride_lb, stride_lm, stride_lr, stride_rm, stride_rc, stride_os, stride_on, stride_or, stride_oc,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[s, a, :, c-block] = sum over split s of adapter a's blocks b: left[b]^T @ mask_a(right[table[b]])
    (fp32 accumulation in registers: one adapter's gradient tile per program, no atomics)."""
    adapter = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_ROWS).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    r_ok = offs_r < R
    c_ok = offs_c < C
    lo = tl.load(bounds_ptr + adapter)
    hi = tl.load(bounds_ptr + adapter + 1)
    if HAS_DROPOUT:
        key = stream_key(seed, adapter)
        thresh = tl.load(thresh_ptr + adapter).to(tl.uint32)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for b in range(lo + pid_s, hi, S):
        rows = tl.load(table_ptr + b * BLOCK_ROWS + offs_m).to(tl.int64)
        row_ok = rows < M
        lt = tl.load(left_ptr + b * stride_lb + offs_r[:, None] * stride_lr + offs_m[None, :] * stride_lm,
                     mask=r_ok[:, None], other=0.0)  # [BLOCK_R, BLOCK_ROWS]: left^T
        rt = tl.load(right_ptr + rows[:, None] * stride_rm + offs_c[None, :] * stride_rc,
                     mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        rt = rt.to(lt.dtype)
        if HAS_DROPOUT:
            rt = tl.where(keep_mask(key, rows, offs_c, thresh), rt, 0.0)
        acc = tl.dot(lt, rt, acc, input_precision=DOT_PRECISION)
    o_ptrs = (out_ptr + pid_s * stride_os + adapter * stride_on + offs_r[:, None] * stride_or
              + offs_c[None, :] * stride_oc)
    tl.store(o_ptrs, acc, mask=r_ok[:, None] & c_ok[None, :])


# launch configurations (shared by the launchers and aot_specs): the tile along K (shrink), O (expand) or the
# gradient's columns (grad_w) and the warps, per (block rows, rank tile, adapter dtype); large tiles take
# smaller steps and 8 warps so that the gathered rows' int64 pointers do not spill (the compile report checks
# every entry)
_STAGES = 2
MAX_KERNEL_RANK = 64
_TARGET_PROGRAMS = 528  # ~4 waves on a 132-SM GPU for the weight-gradient reduction over blocks


def launch_config(kernel: str, block_rows: int, block_r: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_O or BLOCK_C, num_warps) of ``kernel`` ("shrink" / "expand" / "grad_w")."""
    big = block_rows * block_r >= 64 * 64
    wide = dtype == torch.float32
    # 8 warps from 64 x 32 tiles on (4 spilled there on sm_86 for the shrink, on sm_90 for fp32 dA)
    warps = 8 if block_rows * block_r >= 64 * 32 else 4
    if kernel == "shrink":  # fp32 x fp32 (3xTF32 dots) at the largest tile: 16-wide K steps
        return (16 if big and wide else 32 if big or wide else 64), warps
    if kernel == "grad_w":
        return (32 if big or wide else 64), warps
    # fp32 adapters from rank tiles of 32 on: 32-wide O steps (64 spilled 8 bytes on sm_80 for dX)
    return (32 if big or (wide and (block_rows >= 64 or block_r >= 32)) or block_r >= 64 else 64), (8 if big else 4)


def kernel_rank(rank: int) -> int:
    """The rank tile of the kernels: the store's rank, at least 16 (``tl.dot``)."""
    return max(16, rank)


def grad_w_splits(blocks: int, adapters: int, cols: int, block_c: int) -> int:
    """Splits of each adapter's blocks in the weight-gradient kernel: enough programs for ~4 waves
    (``_TARGET_PROGRAMS``) when few adapters hold many blocks, at most the blocks per adapter on average."""
    tiles = adapters * triton.cdiv(cols, block_c)
    return max(1, min(triton.cdiv(_TARGET_PROGRAMS, tiles), triton.cdiv(blocks, max(1, adapters))))


def updatable_in_place(base_out: torch.Tensor) -> bool:
    """Whether the expand may add into ``base_out`` itself (a fresh contiguous output no one else holds as a
    leaf or a view base), saving the copy of y."""
    return (base_out._base is None and base_out.is_contiguous() and base_out.numel() > 0
            and not (base_out.is_leaf and base_out.requires_grad)
            and (not base_out.is_inference() or torch.is_inference_mode_enabled()))


def launch_shrink(x2, a, scale, table, badapter, thresholds, seed):
    """h [nb, block_rows, kernel_rank(R)] in a's dtype: scale[a] * mask_a(x2[table]) @ A[a]^T per block.
    a: [N, R, K] any strides (B^T [N, R, O] for the backward's dH)."""
    m, k = x2.shape
    n, rank = a.shape[0], a.shape[1]
    nb, block_rows = table.shape
    br = kernel_rank(rank)
    h = torch.empty(nb, block_rows, br, dtype=a.dtype, device=x2.device)
    drop = thresholds is not None
    block_k, warps = launch_config("shrink", block_rows, br, a.dtype)
    launch(_grouped_shrink_kernel, (nb,), x2, a, scale, table, badapter, h, thresholds if drop else badapter, seed,
           m, k, rank, n, x2.stride(0), x2.stride(1), a.stride(0), a.stride(1), a.stride(2), HAS_DROPOUT=drop,
           BLOCK_ROWS=block_rows, BLOCK_R=br, BLOCK_K=block_k, DOT_PRECISION=dot_precision(x2.dtype, a.dtype),
           num_warps=warps, num_stages=_STAGES)
    return h


def launch_expand(h, b, table, badapter, out, thresholds, seed, accumulate):
    """out[table] (+)= mask(h @ B[a]^T) per block; b: [N, O, R] any strides (A^T [N, K, R] for dX)."""
    m, o = out.shape
    n, rank = b.shape[0], b.shape[2]
    nb, block_rows, br = h.shape
    drop = thresholds is not None
    block_o, warps = launch_config("expand", block_rows, br, b.dtype)
    launch(_grouped_expand_kernel, (nb, triton.cdiv(o, block_o)), h, b, table, badapter, out,
           thresholds if drop else badapter, seed, m, o, rank, n,
           b.stride(0), b.stride(1), b.stride(2), out.stride(0), out.stride(1), ACCUMULATE=accumulate,
           HAS_DROPOUT=drop, BLOCK_ROWS=block_rows, BLOCK_R=br, BLOCK_O=block_o,
           DOT_PRECISION=dot_precision(out.dtype, b.dtype), num_warps=warps, num_stages=_STAGES)


def adapter_bounds(badapter: torch.Tensor, n: int) -> torch.Tensor:
    """[N + 1] int64: adapter a's blocks are bounds[a] .. bounds[a + 1] - 1 (the plan sorts blocks by adapter,
    unused blocks last)."""
    return torch.searchsorted(badapter, torch.arange(n + 1, device=badapter.device))


def launch_grad_w(left, right, table, bounds, n, rank, thresholds, seed, transpose_out=False):
    """fp32 [N, R, C] (``transpose_out``: [N, C, R], contiguous): per adapter a, the sum over its blocks of
    left[b]^T @ mask_a(right[table[b]]). left: [nb, block_rows, >= R] in the adapter dtype; right: [M, C]."""
    m, c = right.shape
    nb, block_rows = table.shape
    br = kernel_rank(rank)
    block_c, warps = launch_config("grad_w", block_rows, br, left.dtype)
    splits = grad_w_splits(nb, n, c, block_c)
    shape = (splits, n, c, rank) if transpose_out else (splits, n, rank, c)
    part = torch.empty(shape, dtype=torch.float32, device=right.device)
    stride_or, stride_oc = part.stride(2), part.stride(3)
    if transpose_out:
        stride_or, stride_oc = stride_oc, stride_or
    drop = thresholds is not None
    launch(_grouped_grad_w_kernel, (n, triton.cdiv(c, block_c), splits), left, right, table, bounds, part,
           thresholds if drop else bounds, seed, m, c, rank, splits,
           left.stride(0), left.stride(1), left.stride(2), right.stride(0), right.stride(1),
           part.stride(0), part.stride(1), stride_or, stride_oc, HAS_DROPOUT=drop,
           BLOCK_ROWS=block_rows, BLOCK_R=br, BLOCK_C=block_c, DOT_PRECISION=dot_precision(right.dtype, left.dtype),
           num_warps=warps, num_stages=_STAGES)
    return part[0] if splits == 1 else part.sum(0)


def forward_triton(x2, base2, a, b, scale, table, badapter, thresholds, seed, inplace=False):
    h = launch_shrink(x2, a, scale, table, badapter, thresholds, seed)
    out = base2 if inplace else base2.clone()
    launch_expand(h, b, table, badapter, out, None, 0, accumulate=True)
    return out, h


def backward_triton(dy2, x2, h, a, b, scale, table, badapter, need_x, need_w, thresholds, seed, dx_init=None):
    """(dx | None, dA [N, R, K] fp32 | None, dB [N, O, R] fp32 | None): one dH shrink, one dX expand and two
    weight-gradient launches over the forward's plan, whatever the number of adapters. ``dx_init`` (e.g. the
    base layer's dY @ W): the dX expand adds into it instead of a zero-filled dX."""
    n, rank = a.shape[0], a.shape[1]
    dh = launch_shrink(dy2, b.transpose(1, 2), scale, table, badapter, None, 0)  # (dY[table] @ B_a) * s_a
    dx = da = db = None
    if need_x:  # base rows are in no block: their dX stays zero (or dx_init's)
        dx = torch.zeros(x2.shape, dtype=x2.dtype, device=x2.device) if dx_init is None else dx_init
        launch_expand(dh, a.transpose(1, 2), table, badapter, dx, thresholds, seed, accumulate=dx_init is not None)
    if need_w:
        bounds = adapter_bounds(badapter, n)
        da = launch_grad_w(dh, x2, table, bounds, n, rank, thresholds, seed)
        # dB [N, O, R] contiguous: an adapter of the store's rank gets a contiguous gradient (no copy by autograd)
        db = launch_grad_w(h, dy2, table, bounds, n, rank, None, 0, transpose_out=True)
    return dx, da, db


# ----------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------


# the last plan's slot indices (``_slots``): one (key, value) tuple, replaced whole. A plan is made once per call
# and often reused by the next calls (``peftfast.tuners.lora.grouped.shared_plan``), so every layer of a call, and
# forward and backward, derive them once
_LAST_SLOTS: dict = {}


def _slots(table: torch.Tensor, badapter: torch.Tensor, m: int, n: int) -> tuple:
    """(row of each slot [nb * block_rows] int64 with empty slots (M) sent to row M - 1, bool [nb, block_rows, 1]:
    the empty slots, dense: block i is adapter i (``dense_plan``), identity: slot j of block b is row
    b * block_rows + j, every row once (``run_plan``), full: no slot is empty) for the plan (``table``,
    ``badapter``) over M rows and N adapters. The last three read on the host, once per plan."""
    hit = _LAST_SLOTS.get("entry")
    check = (table._version, badapter._version, table.device, m, n)
    if hit is not None and hit[0] is table and hit[1] is badapter and hit[2] == check:
        return hit[3]
    nb, rows = table.shape
    dense = nb == n and bool((badapter == torch.arange(n, device=badapter.device)).all())
    identity = nb * rows == m and m > 0 and bool((table.reshape(-1) == torch.arange(m, device=table.device)).all())
    empty = (table == m).unsqueeze(-1)
    value = (table.reshape(-1).clamp(max=max(m - 1, 0)), empty, dense, identity, m > 0 and not bool(empty.any()))
    _LAST_SLOTS["entry"] = (table, badapter, check, value)
    return value


def _slot_rows(t: torch.Tensor, table: torch.Tensor, badapter: torch.Tensor, n: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(``t`` [M, D]'s rows at the plan's slots as [nb, block_rows, D] in ``dtype``, a fresh tensor, bool
    [nb, block_rows, 1] of the empty slots). An empty slot (index M) reads row M - 1 instead of a zero row, so ``t``
    is never copied with a zero row appended; each caller zeroes what an empty slot yields (a row of h, or the
    gathered row itself)."""
    m = t.shape[0]
    rows, empty = _slots(table, badapter, m, n)[:2]
    if m == 0:
        return t.new_zeros(*table.shape, t.shape[1], dtype=dtype), empty
    # index_select: a plain copy of whole rows (advanced indexing, t[table], is several times slower on the CPU)
    return t.index_select(0, rows).view(*table.shape, t.shape[1]).to(dtype), empty


def _scatter_add(base2: torch.Tensor, table: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``base2`` [M, D] in ``dtype`` plus each slot's row of ``rows`` [nb, block_rows, D], added to the row the slot
    holds: base2 is copied once, with a zero row appended (index M) that takes the empty slots and is dropped;
    returns the [M, D] view."""
    m, d = base2.shape[0], rows.shape[-1]
    acc = torch.cat([base2.to(dtype), base2.new_zeros(1, d, dtype=dtype)])
    acc.index_add_(0, table.reshape(-1), rows.reshape(-1, d))
    return acc[:m]


def _block_factors(a, b, scale, badapter, dense):
    n = a.shape[0]
    if dense:  # block i is adapter i
        return a, b, scale
    used = badapter.clamp(max=n - 1)
    live = (badapter < n).to(scale.dtype) * scale[used]
    return a[used], b[used], live


def block_keep(table, badapter, n, k, thresholds, seed):
    """bool [nb, block_rows, K]: each block slot's dropout mask (its adapter's stream, its row of x), the bits
    the Triton kernels regenerate; None without dropout."""
    if thresholds is None:
        return None
    streams = badapter.clamp(max=n - 1)[:, None].expand(table.shape).reshape(-1)
    keep = keep_mask_rows_torch(seed, table.reshape(-1), streams, k, thresholds[streams])
    return keep.view(*table.shape, k)


def forward_reference(x2, base2, a, b, scale, table, badapter, thresholds=None, seed=0, inplace=False):
    """(y [M, O] in base2's dtype, h [nb, block_rows, R] fp32-or-adapter dtype). ``inplace``: y is base2 itself,
    updated (where base2 has the adapter dtype and the plan is a run plan or has no empty slot; else a new y)."""
    m, k = x2.shape
    n = a.shape[0]
    empty, dense, identity, full = _slots(table, badapter, m, n)[1:]
    ab, bb, s = _block_factors(a, b, scale, badapter, dense)
    keep = block_keep(table, badapter, n, k, thresholds, seed)
    inplace = inplace and base2.dtype == a.dtype and base2.is_contiguous()
    if identity:  # a run plan: the blocks are x's and base_out's rows in order, used as they are (no empty slot)
        xb = x2.reshape(*table.shape, k).to(a.dtype)
        xb = xb if keep is None else xb * keep
        h = torch.bmm(xb, ab.transpose(1, 2)).mul_(s.to(a.dtype)[:, None, None])
        if inplace:
            base2.view(*table.shape, -1).baddbmm_(h, bb.transpose(1, 2))
            return base2, h
        y = torch.baddbmm(base2.reshape(*table.shape, -1).to(a.dtype), h, bb.transpose(1, 2))
        return y.view(m, -1).to(base2.dtype), h
    xb = _slot_rows(x2, table, badapter, n, a.dtype)[0]  # [nb, rows, K]
    if keep is not None:
        xb.mul_(keep)
    h = torch.bmm(xb, ab.transpose(1, 2)).mul_(s.to(a.dtype)[:, None, None])
    if not full:
        h.masked_fill_(empty, 0)  # what a zero row of x would give: empty slots add nothing
    nb, rows, k = xb.shape
    o = bb.shape[1]
    # the gathered x is dead once h is made: the expand writes into it when it is large enough (one allocation
    # fewer, and one buffer fewer passing through the caches)
    out = xb.view(-1)[:nb * rows * o].view(nb, rows, o) if k >= o and not xb.requires_grad else None
    yb = torch.bmm(h, bb.transpose(1, 2), out=out)  # [nb, rows, O]
    if full:  # every slot holds a row, each row at most once: added straight into base2 (or a copy of it)
        acc = base2 if inplace else base2.to(a.dtype, copy=True)
        return acc.index_add_(0, table.reshape(-1), yb.view(-1, o)).to(base2.dtype), h
    return _scatter_add(base2, table, yb, a.dtype).to(base2.dtype), h


def backward_reference(dy2, x2, h, a, b, scale, table, badapter, need_x, need_w, thresholds=None, seed=0):
    """(dx [M, K] | None, dA [N, R, K] | None, dB [N, O, R] | None); dropout masks regenerated from the seed."""
    m, n = x2.shape[0], a.shape[0]
    ab, bb, s = _block_factors(a, b, scale, badapter, _slots(table, badapter, m, n)[2])
    g, empty = _slot_rows(dy2, table, badapter, n, a.dtype)  # [nb, rows, O]
    g.masked_fill_(empty, 0)  # as zero rows of dY: an empty slot adds nothing to dB, dH or dX
    h = h[..., :a.shape[1]].to(a.dtype)
    dh = torch.bmm(g, bb) * s.to(a.dtype)[:, None, None]  # [nb, rows, R]
    keep = block_keep(table, badapter, n, x2.shape[1], thresholds, seed)
    dx = da = db = None
    if need_x:
        dxb = torch.bmm(dh, ab)
        if keep is not None:
            dxb.mul_(keep)
        acc = x2.new_zeros(m + 1, x2.shape[1], dtype=a.dtype)
        acc.index_add_(0, table.reshape(-1), dxb.reshape(-1, dxb.shape[-1]))
        dx = acc[:m].to(x2.dtype)
    if need_w:
        xb = _slot_rows(x2, table, badapter, n, a.dtype)[0].masked_fill_(empty, 0)
        if keep is not None:
            xb.mul_(keep)
        da, db = torch.bmm(dh.transpose(1, 2), xb), torch.bmm(g.transpose(1, 2), h)
        if ab is not a:  # blocks gathered per adapter: sum them into the store's shape
            used = badapter.clamp(max=n - 1)
            da = torch.zeros_like(a).index_add_(0, used, da)
            db = torch.zeros_like(b).index_add_(0, used, db)
    return dx, da, db


# ----------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------


def _op_forward(x: torch.Tensor, base_out: torch.Tensor, weights_a: list[torch.Tensor],
                weights_b: list[torch.Tensor], a_store: torch.Tensor, b_store: torch.Tensor,
                scale: torch.Tensor, table: torch.Tensor, block_adapter: torch.Tensor,
                thresholds: Optional[torch.Tensor], seed: torch.Tensor, *,
                hint=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y shaped like base_out, h). weights_a / weights_b are the adapters' own tensors (what gradients go
    to); the stores hold the same values (see the module docstring). thresholds: [N] int64 keep thresholds
    (dropout) or None; seed: the dropout seed (a Python int in eager mode)."""
    x2 = x.reshape(-1, x.shape[-1])
    base2 = base_out.reshape(-1, base_out.shape[-1])
    on_triton, inplace = (use_triton(x, base_out, a_store, b_store), False) if hint is None else hint
    if on_triton:
        y, h = forward_triton(x2, base2, a_store, b_store, scale, table, block_adapter, thresholds, int(seed),
                               inplace)
    else:
        y, h = forward_reference(x2, base2, a_store, b_store, scale, table, block_adapter, thresholds, int(seed),
                                 inplace)
        inplace = inplace and y is base2  # the reference may decline (a dtype cast, empty slots)
    # updated in place: base_out itself is the output (autograd requires the dirty input to be returned)
    return (base_out if inplace else y.view(base_out.shape)), h


def _op_save(args, outputs) -> list:
    x, _base, weights_a, weights_b, a_store, b_store, scale, table, badapter, thresholds, seed = args
    # x as the caller passed it (no cast or dropped copy), h, references to the stores and weights
    return [x, outputs[1], a_store, b_store, scale, table, badapter, thresholds, seed, *weights_a, *weights_b]


def split_grads(full: torch.Tensor, weights: list[torch.Tensor], needs: list[bool], dim: int) -> list:
    """Each adapter's gradient as a view of its rank rows of ``full`` (cast once when the adapters share a dtype:
    one op, not one per adapter)."""
    if full is None:
        return [None] * len(weights)
    if len({w.dtype for w in weights}) == 1:
        full = full.to(weights[0].dtype)
    return [full[i].narrow(dim, 0, w.shape[dim]).to(w.dtype) if need else None
            for i, (w, need) in enumerate(zip(weights, needs))]


def _op_backward(saved, grads, needs, statics, *, hint=None) -> list:
    """Gradients of (x, base_out, A_1..A_n, B_1..B_n, stores, scale, table, block_adapter, thresholds, seed)."""
    x, h, a, b, scale, table, badapter, thresholds, seed, *weights = saved
    n = len(weights) // 2
    dy = grads[0]
    need_a, need_b = needs[2:2 + n], needs[2 + n:2 + 2 * n]
    on_triton = hint[0] if hint is not None else use_triton(dy, x, a, b) and a.shape[1] <= MAX_KERNEL_RANK
    # the kernels tile a block's rows with tl.dot: a plan of 16..64-row blocks (group_plan on that backend)
    impl = backward_triton if on_triton and table.shape[1] in (16, 32, 64) else backward_reference
    dx, da, db = impl(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), h, a, b, scale, table, badapter,
                      needs[0], any(need_a) or any(need_b), thresholds, int(seed))
    if dx is not None:
        dx = dx.view(x.shape)
    return [dx, None, *split_grads(da, weights[:n], need_a, 0), *split_grads(db, weights[n:], need_b, 1),
            None, None, None, None, None, None, None]


def _op_fake(x, base_out, weights_a, weights_b, a_store, b_store, scale, table, block_adapter, thresholds, seed):
    r = a_store.shape[1]
    return base_out.new_empty(base_out.shape), x.new_empty((table.shape[0], table.shape[1], r), dtype=a_store.dtype)


def _op_backward_fake(saved, grads, needs, statics) -> list:
    x, _h, _a, _b, _s, _t, _ba, _th, _seed, *weights = saved
    n = len(weights) // 2
    return [x.new_empty(x.shape) if needs[0] else None, None,
            *(w.new_empty(w.shape) if need else None for w, need in zip(weights, needs[2:2 + 2 * n])),
            None, None, None, None, None, None, None]


LORA_GROUPED = OpDecl("peftfast::lora_grouped", _op_forward, _op_backward, save=_op_save, fake=_op_fake,
                      backward_fake=_op_backward_fake, passthrough={"base_out": 0}, aux_outputs=(1,),
                      dirty=lambda args, hint: (args[1],) if hint is not None and hint[1] else ())


def dropout_tables(scalings: Sequence[float], dropout_ps: Sequence[float], device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [N] fp32 = s_i / (1 - p_i), keep thresholds [N] int64) for ``lora_grouped``'s dropout: the
    inverted-dropout factor folded into the scale, as ``kernels/lora.py`` does."""
    scale = torch.tensor([float(s) / (1.0 - float(p)) for s, p in zip(scalings, dropout_ps)], dtype=torch.float32,
                         device=device)
    return scale, torch.tensor([threshold(p) for p in dropout_ps], dtype=torch.int64, device=device)


def check_stores(x, weights_a, weights_b, a_store, b_store, index, thresholds) -> tuple[int, int, int]:
    """(N, R, K) of the stores after checking them against the weights, x's rows (``index``) and the dropout
    thresholds; ValueError naming what does not match."""
    n, r, k = a_store.shape
    if len(weights_a) != n or len(weights_b) != n or b_store.shape[0] != n or b_store.shape[2] != r:
        raise ValueError(f"lora_grouped: stores of {n} adapters (A {tuple(a_store.shape)}, B "
                         f"{tuple(b_store.shape)}) for {len(weights_a)} A and {len(weights_b)} B weights")
    m = index.shape[0]
    if x.shape[-1] != k or x.numel() != m * k:
        raise ValueError(f"lora_grouped: x {tuple(x.shape)} does not match {m} rows of index and stores with K={k}")
    if thresholds is not None and thresholds.shape != (n,):
        raise ValueError(f"lora_grouped: thresholds {tuple(thresholds.shape)} for {n} adapters; give one keep "
                         "threshold per adapter (dropout_tables) or None")
    return n, r, k


def lora_grouped(x: torch.Tensor, base_out: torch.Tensor, weights_a: Sequence[torch.Tensor],
                 weights_b: Sequence[torch.Tensor], a_store: torch.Tensor, b_store: torch.Tensor,
                 scale: torch.Tensor, index: torch.Tensor,
                 plan: tuple[torch.Tensor, torch.Tensor] | None = None,
                 thresholds: torch.Tensor | None = None, seed: int | None = None,
                 update_base_out: bool = False) -> torch.Tensor:
    """``base_out`` plus, for each row m of x ([..., K] as [M, K]), adapter ``index[m]``'s ``s * x A^T B^T``
    (index [M] int64, -1: none). The stores ([N, R, K], [N, O, R], scale [N] fp32) hold ``weights_a`` /
    ``weights_b`` ([r_i, K] / [O, r_i], zero-padded to R); gradients go to x, base_out and the weights.
    ``plan``: ``make_plan(index, N, use_triton(...))`` made once for every layer of a call with the same rows.
    Dropout: ``thresholds`` [N] int64 (``dropout_tables``; the scale then includes 1 / (1 - p)): row m sees
    adapter a's mask, regenerated from (seed, a, m, column) in forward and backward, never stored; ``seed``
    (drawn from torch's generator when None) makes it reproducible. ``update_base_out``: the caller hands a fresh
    ``base_out`` that no one else reads (e.g. its own base layer's output), so while no gradient is recorded the
    op may add into it and return it (no copy of y; a fresh tensor that is not a view is updated on the Triton
    path anyway)."""
    n, r, k = check_stores(x, weights_a, weights_b, a_store, b_store, index, thresholds)
    if base_out.numel() != index.shape[0] * b_store.shape[1]:
        raise ValueError(f"lora_grouped: base_out {tuple(base_out.shape)} does not match {index.shape[0]} rows of "
                         f"index and stores with O={b_store.shape[1]}")
    # rank tiles above MAX_KERNEL_RANK would spill: such stores run the reference (batched matmuls) on the GPU
    on_triton = use_triton(x, base_out, a_store, b_store) and r <= MAX_KERNEL_RANK
    table, badapter = make_plan(index, n, on_triton) if plan is None else plan
    if torch.compiler.is_compiling():
        drawn = draw_seed() if thresholds is not None and seed is None else torch.tensor(int(seed or 0))
        return LORA_GROUPED(x, base_out, list(weights_a), list(weights_b), a_store, b_store, scale, table, badapter,
                            thresholds, drawn)[0]
    if thresholds is not None and seed is None:
        seed = int(draw_seed())
    seed = 0 if seed is None else int(seed)
    if on_triton:
        inplace = updatable_in_place(base_out) and base_out.is_contiguous()
    else:
        inplace = False
    if update_base_out and not inplace and not torch.is_grad_enabled():  # no autograd: nothing sees the write
        inplace = base_out.is_contiguous() and (not base_out.is_inference() or torch.is_inference_mode_enabled())
    return LORA_GROUPED(x, base_out, list(weights_a), list(weights_b), a_store, b_store, scale, table, badapter,
                        thresholds, seed, hint=(on_triton, inplace))[0]



# ----------------------------------------------------------------------------------------------
# Fused with the base linear (prefill): one GEMM launch writes y
# ----------------------------------------------------------------------------------------------


@triton.jit
def _block_of(table_ptr, slot, pid_b, M, R, N_ADAPTERS, BLOCK_ROWS: tl.constexpr):
    """Block ``pid_b`` of a fused plan, of slot ``slot`` (< N an adapter, N the base model): (the adapter whose
    tiles it loads; its rank limit, 0 for base-model blocks so every adapter load is masked off; its rows; which
    of them are real)."""
    adapter = tl.minimum(slot, N_ADAPTERS - 1)
    r_lim = tl.where(slot < N_ADAPTERS, R, 0)
    rows = tl.load(table_ptr + pid_b * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS))
    return adapter, r_lim, rows, rows < M


@triton.jit
def _base_wt_tile(w_ptrs, w_ptr, wscale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, log2_bs, log2_nbs,
                  w_round, k0, o0, offs_k, offs_o, k_ok, o_ok, K, O, stride_wo, stride_wk, like,
                  WEIGHT: tl.constexpr, NESTED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr):
    """The base weight's tile W^T[k0 : k0 + BLOCK_K, o0 : o0 + BLOCK_O] as the base dot's operand (``like``'s
    dtype): read as it is at ``w_ptrs`` (WEIGHT "dense": the kernel's pointer tile, advanced each K step; computing
    the addresses per step instead spilled 8 bytes on sm_86/89 for fp32 at rank tile 64), or dequantised in
    registers as qmatmul.py's kernels do it, "4bit":
    the ALIGNED layout only (K % blocksize == 0, BLOCK_K <= blocksize: one scale per column of the tile; each
    packed byte loaded once and split into its two indices, looked up in the code table, times the block scale,
    nested scales decoded per column), "int8": CB * SCB / 127 (``quant.dequant_int8``). 64-bit scalar bases
    (k0 is the loop's int32), tile-local int32 offsets."""
    if WEIGHT == "4bit":
        half_k = K // 2
        row0 = tl.cast(o0, tl.int64)  # the tile's first row: 64-bit bases into the packed bytes and the scales
        lh = tl.arange(0, BLOCK_K // 2)
        byte = tl.load(w_ptr + (row0 * half_k + (k0 >> 1)) + (offs_o[None, :] * half_k + lh[:, None]),
                       mask=(2 * lh[:, None] < K - k0) & o_ok[None, :], other=0)  # [BK / 2, BO]: W[o, k pairs]
        q = tl.reshape(tl.permute(unpack_pairs(byte), (0, 2, 1)), (BLOCK_K, BLOCK_O))
        k_blocks = K >> log2_bs
        scale = block_scale(row0 * k_blocks + (k0 >> log2_bs), offs_o * k_blocks, o_ok, wscale_ptr, nested_absmax_ptr,
                            nested_code_ptr, offset, log2_nbs, NESTED)
        return as_operand(lookup16(q, code_ptr) * scale[None, :], like, w_round)
    elif WEIGHT == "int8":
        base = w_ptr + o0 * stride_wo + tl.cast(k0, tl.int64) * stride_wk
        return dequant_int8(offs_o[None, :], offs_k[:, None], k_ok[:, None] & o_ok[None, :], base, stride_wo,
                            stride_wk, wscale_ptr + o0, O - o0).to(like.dtype)
    else:
        return tl.load(w_ptrs, mask=k_ok[:, None] & o_ok[None, :], other=0.0)


@triton.jit(do_not_specialize=[*ADAPTER_COUNTS, "NB"])
def _grouped_linear_kernel(
    x_ptr,  # [M, K] rows of the batch, activation dtype, any strides
    w_ptr,  # base weight: [O, K] in the activation dtype (dense), int8 CB [O, K], or packed 4-bit bytes [O * K / 2]
    wscale_ptr,  # 4-bit: absmax [O * K / blocksize] (fp32, or uint8 codes when NESTED); int8: SCB fp32 [O]
    code_ptr,  # 4-bit: fp32 [16] code table
    nested_absmax_ptr,  # 4-bit NESTED: fp32 nested scales
    nested_code_ptr,  # 4-bit NESTED: fp32 [256]
    offset,  # 4-bit NESTED: fp32 offset of the decoded scales
    log2_bs,  # 4-bit: log2(blocksize)
    log2_nbs,  # 4-bit NESTED: log2(nested blocksize)
    w_round,  # 4-bit: 0, or round W through fp16 (1) / bf16 (2) before the cast to x's dtype
    bias_ptr,  # [O] base bias (HAS_BIAS)
    a_ptr,  # [N, R, K] stacked A, adapter dtype
    b_ptr,  # [N, O, R] stacked B, adapter dtype
    scale_ptr,  # [N] fp32 per-adapter scale (s / (1 - p) with dropout)
    table_ptr,  # [nb, BLOCK_ROWS] int64 row of each block slot (M: empty)
    badapter_ptr,  # [nb] int64 slot of each block: < N an adapter, N the base model, > N unused
    h_ptr,  # [nb, BLOCK_ROWS, BLOCK_R] output h = s_a * mask_a(x) @ A_a^T, adapter dtype (for backward)
    y_ptr,  # [M, O] output, activation dtype
    thresh_ptr,  # [N] int64 keep threshold per adapter (HAS_DROPOUT)
    seed,  # 64-bit dropout seed (HAS_DROPOUT)
    M, O, K, R, N_ADAPTERS, NB,
    stride_xm, stride_xk, stride_wo, stride_wk, stride_an, stride_ar, stride_ak, stride_bn, stride_bo, stride_br,
    stride_ym, stride_yo,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    WEIGHT: tl.constexpr,  # "dense", "4bit" (aligned layout) or "int8": how the W^T tile is read (_base_wt_tile)
    NESTED: tl.constexpr,  # 4-bit: double-quantised absmax
):
    """y[table[b], o-block] = x[rows] @ W^T (+ bias) + (s_a * mask_a(x[rows]) @ A_a^T) @ B_a^T for block b of
    slot a: the base GEMM and the adapter's shrink share the K loop (x read once), the expand is the epilogue,
    y stored once. Base-model blocks (a = N) load no adapter tile (masked); the O-block-0 program of each
    block stores h for the backward. A quantised base (WEIGHT "4bit" / "int8") is dequantised tile by tile in
    registers (``_base_wt_tile``), never stored."""
    pid_b, pid_o = grouped_tile(tl.program_id(0), NB * BLOCK_ROWS, O, BLOCK_ROWS, BLOCK_O, GROUP_M)
    slot = tl.load(badapter_ptr + pid_b).to(tl.int64)
    if slot > N_ADAPTERS:  # an unused block
        return
    adapter, r_lim, rows, row_ok = _block_of(table_ptr, slot, pid_b, M, R, N_ADAPTERS, BLOCK_ROWS)
    # 64-bit scalar bases, tile-local int32 offsets (registers): the gathered rows' offsets are int64
    offs_m = tl.arange(0, BLOCK_ROWS)
    offs_r = tl.arange(0, BLOCK_R)
    offs_o = tl.arange(0, BLOCK_O)
    offs_k = tl.arange(0, BLOCK_K)
    o_ok = offs_o < O - pid_o * BLOCK_O
    r_ok = offs_r < r_lim
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    o0 = pid_o * BLOCK_O
    w_ptrs = w_ptr + o0 * stride_wo + offs_o[None, :] * stride_wo + offs_k[:, None] * stride_wk  # dense W^T tile
    a_ptrs = a_ptr + adapter * stride_an + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak
    if HAS_DROPOUT:
        key = stream_key(seed, adapter)
        thresh = tl.load(thresh_ptr + adapter).to(tl.uint32)
    acc = tl.zeros((BLOCK_ROWS, BLOCK_O), dtype=tl.float32)
    h = tl.zeros((BLOCK_ROWS, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = _base_wt_tile(w_ptrs, w_ptr, wscale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, log2_bs,
                           log2_nbs, w_round, k0, o0, offs_k, offs_o, k_ok, o_ok, K, O, stride_wo, stride_wk, xt, WEIGHT,
                           NESTED, BLOCK_K, BLOCK_O)  # W^T tile [BK, BO]
        acc = tl.dot(xt, wt, acc, input_precision=BASE_PRECISION)
        at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)  # A_a^T tile [BK, BR]
        xa = xt.to(at.dtype)
        if HAS_DROPOUT:
            xa = tl.where(keep_mask(key, rows, k0 + offs_k, thresh), xa, 0.0)
        h = tl.dot(xa, at, h, input_precision=LORA_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
        if WEIGHT == "dense":
            w_ptrs += BLOCK_K * stride_wk
    h = h * tl.load(scale_ptr + adapter)
    hc = h.to(h_ptr.dtype.element_ty)
    if pid_o == 0:
        tl.store(h_ptr + pid_b * BLOCK_ROWS * BLOCK_R + offs_m[:, None] * BLOCK_R + offs_r[None, :], hc)
    bt = tl.load(b_ptr + adapter * stride_bn + o0 * stride_bo + offs_r[:, None] * stride_br
                 + offs_o[None, :] * stride_bo, mask=r_ok[:, None] & o_ok[None, :], other=0.0)  # B_a^T [BR, BO]
    acc = tl.dot(hc.to(bt.dtype), bt, acc, input_precision=LORA_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o0 + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + o0 * stride_yo + rows[:, None] * stride_ym + offs_o[None, :] * stride_yo,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & o_ok[None, :])


# the 16- and 256-entry code tables of a 4-bit base, indexed with int32 tiles
declare_int32_operands(_grouped_linear_kernel, "code_ptr", "nested_code_ptr")

FUSED_BLOCK_ROWS = 64  # rows per block of the fused kernel (one adapter per block)
FUSED_MIN_FILL = 4  # fused when rows >= 4 x (slots x block rows): padding wastes at most 1/4 of the GEMM's rows


def fused_worthwhile(rows: int, adapters: int) -> bool:
    """Whether ``rows`` rows over ``adapters`` adapters (those the batch uses; and the base model) fill the fused
    kernel's blocks: each block re-reads W's tiles and a block holds one slot's rows, so at most (N + 1) blocks are
    partly empty; below ``FUSED_MIN_FILL`` x that (decode, small batches) the separate grouped kernels after the
    base GEMM move fewer bytes and waste no GEMM rows."""
    return rows >= FUSED_MIN_FILL * (adapters + 1) * FUSED_BLOCK_ROWS


class FusedPlan(NamedTuple):
    """A plan made by ``fused_plan`` (a (table, block_adapter) pair like every plan): the only kind the fused
    kernels take, since in any other the base model's rows lie in no block and would never be written."""

    table: torch.Tensor
    block_adapter: torch.Tensor


def fused_plan(index: torch.Tensor, adapters: int, used: int | None = None) -> FusedPlan:
    """The plan of ``lora_grouped_linear`` on the Triton path: ``group_plan`` with the base model as slot N (its
    rows need the base GEMM too), blocks of ``FUSED_BLOCK_ROWS``; unused blocks get slot N + 1. The grouped
    backward reads it as it is (slot N >= N: blocks without an adapter)."""
    slots = torch.where(index < 0, torch.full_like(index, adapters), index)
    return FusedPlan(*group_plan(slots, adapters + 1, FUSED_BLOCK_ROWS, used=None if used is None else used + 1))


def check_fused_plan(plan, on_triton: bool, op: str) -> None:
    """Raise where a caller's plan cannot drive the fused kernel (``on_triton``): one not made by ``fused_plan``."""
    if on_triton and not isinstance(plan, FusedPlan):
        raise ValueError(f"{op}: on the Triton path the plan must be fused_plan(index, N)'s (got "
                         f"{type(plan).__name__}); a plan of make_plan puts the base model's rows in no block, so "
                         "they would never be written. Pass plan=None to have it made")


def fused_config(act: torch.dtype, ad: torch.dtype, rank_tile: int, kind: str = "dense") -> dict:
    """Tiles of ``_grouped_linear_kernel`` per (activation, adapter) dtype and rank tile, none spilling on
    sm_80..sm_90 even without 16-byte alignment (the compile report checks each; 64 x 128 tiles spilled
    0.3-10 KB): 64 x 64 output tiles, K steps of 16 where the rank tile is 64 or the adapters are fp32 (3xTF32
    operands), and 32 output columns for fp32 adapters at rank tile 64 (also at 32 with fp32 activations, on 4
    warps: 8-28 B spilled on sm_80-89 at 64 columns, 8 B at 32 columns on 8 warps). The same tiles for every base
    ``kind`` ("dense", "4bit", "int8"): the quantised ones compile without spills with them too (the 4-bit K tile,
    16 or 32, lies inside one quantisation block of 32 or more)."""
    if ad == torch.float32:
        wide = rank_tile <= (32 if act != torch.float32 else 16)
        warps = 4 if act == torch.float32 and rank_tile == 32 else 8
        return dict(BLOCK_O=64 if wide else 32, BLOCK_K=16, GROUP_M=8, num_warps=warps, num_stages=2)
    return dict(BLOCK_O=64, BLOCK_K=32 if rank_tile <= 32 else 16, GROUP_M=8, num_warps=8, num_stages=3)


class BaseWeight(NamedTuple):
    """The base weight as ``_grouped_linear_kernel`` reads it (its ``w_ptr`` .. ``w_round`` arguments and the
    WEIGHT / NESTED constexprs); ``dense_base`` for a float weight, ``lora_grouped_q.quantised_base`` for a
    bitsandbytes one. Arguments a kind does not read are small stand-ins."""

    kind: str  # "dense", "4bit" or "int8"
    w: torch.Tensor  # [O, K] float weight / int8 CB, or the flat uint8 packed 4-bit bytes
    stride_wo: int
    stride_wk: int
    wscale: torch.Tensor  # 4-bit absmax (fp32, or uint8 codes when nested) / int8 SCB [O]
    code: torch.Tensor  # 4-bit code table fp32 [16]
    nested_absmax: torch.Tensor
    nested_code: torch.Tensor
    offset: float
    log2_bs: int
    log2_nbs: int
    w_round: int
    nested: bool = False


def dense_base(weight: torch.Tensor, small: torch.Tensor) -> BaseWeight:
    """A float [O, K] weight; ``small`` (any tiny fp32 tensor, e.g. the adapters' scales) stands in for the
    quantised weight's tables."""
    return BaseWeight("dense", weight, weight.stride(0), weight.stride(1), small, small, small, small, 0.0, 0, 0, 0)


def launch_grouped_linear(x2, weight, bias, a, b, scale, table, badapter, thresholds, seed):
    """(y [M, O] in x's dtype, h [nb, block_rows, kernel_rank(R)] in the adapter dtype): one launch. ``weight``: a
    float [O, K] tensor or a ``BaseWeight`` (a quantised base: launched without fp contraction, so the scales
    round as bitsandbytes' do)."""
    w = dense_base(weight, scale) if isinstance(weight, torch.Tensor) else weight
    m, k = x2.shape
    o = b.shape[1]
    n, rank = a.shape[0], a.shape[1]
    nb, block_rows = table.shape
    br = kernel_rank(rank)
    y = torch.empty(m, o, dtype=x2.dtype, device=x2.device)
    h = torch.empty(nb, block_rows, br, dtype=a.dtype, device=x2.device)
    cfg = fused_config(x2.dtype, a.dtype, br, w.kind)
    drop = thresholds is not None
    extra = {} if w.kind == "dense" else dict(enable_fp_fusion=False)
    launch(_grouped_linear_kernel, (nb * triton.cdiv(o, cfg["BLOCK_O"]),), x2, w.w, w.wscale, w.code,
           w.nested_absmax, w.nested_code, w.offset, w.log2_bs, w.log2_nbs, w.w_round,
           bias if bias is not None else y, a, b, scale, table, badapter, h, y,
           thresholds if drop else badapter, seed, m, o, k, rank, n, nb,
           x2.stride(0), x2.stride(1), w.stride_wo, w.stride_wk, a.stride(0), a.stride(1), a.stride(2),
           b.stride(0), b.stride(1), b.stride(2), y.stride(0), y.stride(1),
           HAS_BIAS=bias is not None, HAS_DROPOUT=drop, BASE_PRECISION=dot_precision(x2.dtype),
           LORA_PRECISION=dot_precision(x2.dtype, a.dtype), BLOCK_ROWS=block_rows, BLOCK_R=br, WEIGHT=w.kind,
           NESTED=w.nested, **cfg, **extra)
    return y, h


@triton.jit(do_not_specialize=[*ADAPTER_COUNTS, "NB"])
def _grouped_linear_dx_kernel(
    dy_ptr,  # [M, O] output gradient, activation dtype, any strides
    w_ptr,  # frozen base weight: [O, K] in the activation dtype (dense), int8 CB [O, K], or packed 4-bit [O * K / 2]
    wscale_ptr,  # 4-bit: absmax (fp32, or uint8 codes when NESTED); int8: SCB fp32 [O] (as _grouped_linear_kernel)
    code_ptr,  # 4-bit: fp32 [16] code table
    nested_absmax_ptr,  # 4-bit NESTED: fp32 nested scales
    nested_code_ptr,  # 4-bit NESTED: fp32 [256]
    offset,  # 4-bit NESTED: fp32 offset of the decoded scales
    log2_bs,  # 4-bit: log2(blocksize)
    log2_nbs,  # 4-bit NESTED: log2(nested blocksize)
    w_round,  # 4-bit: 0, or round W through fp16 (1) / bf16 (2) before the cast to dY's dtype
    a_ptr,  # [N, R, K] stacked A, adapter dtype
    b_ptr,  # [N, O, R] stacked B, adapter dtype
    scale_ptr,  # [N] fp32 per-adapter scale (s / (1 - p) with dropout)
    table_ptr,  # [nb, BLOCK_ROWS] int64 row of each block slot (M: empty)
    badapter_ptr,  # [nb] int64 slot of each block: < N an adapter, N the base model, > N unused
    g_ptr,  # [nb, BLOCK_ROWS, BLOCK_R] output dH = s_a * dY[rows] @ B_a, adapter dtype (for dA)
    dx_ptr,  # [M, K] output dX, activation dtype
    thresh_ptr,  # [N] int64 keep threshold per adapter (HAS_DROPOUT)
    seed,  # 64-bit dropout seed (HAS_DROPOUT)
    M, O, K, R, N_ADAPTERS, NB,
    stride_dm, stride_do, stride_wo, stride_wk, stride_an, stride_ar, stride_ak, stride_bn, stride_bo, stride_br,
    stride_xm, stride_xk,
    HAS_DROPOUT: tl.constexpr, BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    WEIGHT: tl.constexpr,  # "dense", "4bit" (aligned layout, BLOCK_K <= blocksize) or "int8" (_base_wt_tile)
    NESTED: tl.constexpr,  # 4-bit: double-quantised absmax
):
    """dX[table[b], k-block] = dY[rows] @ W (+ mask_a((s_a * dY[rows] @ B_a) @ A_a)) for block b of slot a: the
    base GEMM and the adapter's dH shrink share the O loop (dY read once), the dX expand is the epilogue, dX stored
    once. Base-model blocks (a = N) load no adapter tile (masked); the K-block-0 program of each block stores dH
    for dA. A quantised base is dequantised tile by tile in registers as in the forward (``_base_wt_tile``'s
    W^T tile of this program's K columns and the loop's O rows, transposed), never stored."""
    pid_b, pid_k = grouped_tile(tl.program_id(0), NB * BLOCK_ROWS, K, BLOCK_ROWS, BLOCK_K, GROUP_M)
    slot = tl.load(badapter_ptr + pid_b).to(tl.int64)
    if slot > N_ADAPTERS:  # an unused block
        return
    adapter, r_lim, rows, row_ok = _block_of(table_ptr, slot, pid_b, M, R, N_ADAPTERS, BLOCK_ROWS)
    offs_m = tl.arange(0, BLOCK_ROWS)
    offs_r = tl.arange(0, BLOCK_R)
    offs_o = tl.arange(0, BLOCK_O)
    offs_k = tl.arange(0, BLOCK_K)
    k0 = pid_k * BLOCK_K
    k_ok = offs_k < K - k0
    r_ok = offs_r < r_lim
    dy_ptrs = dy_ptr + rows[:, None] * stride_dm + offs_o[None, :] * stride_do
    w_ptrs = w_ptr + k0 * stride_wk + offs_o[:, None] * stride_wo + offs_k[None, :] * stride_wk
    b_ptrs = b_ptr + adapter * stride_bn + offs_o[:, None] * stride_bo + offs_r[None, :] * stride_br
    acc = tl.zeros((BLOCK_ROWS, BLOCK_K), dtype=tl.float32)
    g = tl.zeros((BLOCK_ROWS, BLOCK_R), dtype=tl.float32)
    for o0 in range(0, O, BLOCK_O):
        o_ok = offs_o < O - o0
        dyt = tl.load(dy_ptrs, mask=row_ok[:, None] & o_ok[None, :], other=0.0)
        if WEIGHT == "dense":
            wt = tl.load(w_ptrs, mask=o_ok[:, None] & k_ok[None, :], other=0.0)  # W tile [BO, BK]
        else:
            wt = tl.trans(_base_wt_tile(w_ptrs, w_ptr, wscale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                                        offset, log2_bs, log2_nbs, w_round, k0, o0, offs_k, offs_o, k_ok, o_ok, K, O,
                                        stride_wo, stride_wk, dyt, WEIGHT, NESTED, BLOCK_K, BLOCK_O))
        acc = tl.dot(dyt, wt, acc, input_precision=BASE_PRECISION)
        bt = tl.load(b_ptrs, mask=o_ok[:, None] & r_ok[None, :], other=0.0)  # B_a tile [BO, BR]
        g = tl.dot(dyt.to(bt.dtype), bt, g, input_precision=LORA_PRECISION)
        dy_ptrs += BLOCK_O * stride_do
        if WEIGHT == "dense":
            w_ptrs += BLOCK_O * stride_wo
        b_ptrs += BLOCK_O * stride_bo
    gc = (g * tl.load(scale_ptr + adapter)).to(g_ptr.dtype.element_ty)  # dH, rounded as the dH shrink stores it
    if pid_k == 0:
        tl.store(g_ptr + pid_b * BLOCK_ROWS * BLOCK_R + offs_m[:, None] * BLOCK_R + offs_r[None, :], gc)
    at = tl.load(a_ptr + adapter * stride_an + k0 * stride_ak + offs_r[:, None] * stride_ar
                 + offs_k[None, :] * stride_ak, mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # A_a tile [BR, BK]
    lora = tl.dot(gc.to(at.dtype), at, input_precision=LORA_PRECISION)
    if HAS_DROPOUT:
        keep = keep_mask(stream_key(seed, adapter), rows, k0 + offs_k, tl.load(thresh_ptr + adapter).to(tl.uint32))
        lora = tl.where(keep, lora, 0.0)
    acc += lora
    tl.store(dx_ptr + k0 * stride_xk + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
             acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


declare_int32_operands(_grouped_linear_dx_kernel, "code_ptr", "nested_code_ptr")

# every kernel a mixed batch may launch (the GPU check counts their compiled variants while adapters come and go)
GROUPED_KERNELS = (_grouped_shrink_kernel, _grouped_expand_kernel, _grouped_grad_w_kernel, _grouped_linear_kernel,
                   _grouped_linear_dx_kernel)


def fused_dx_config(act: torch.dtype, ad: torch.dtype, rank_tile: int) -> dict:
    """Tiles of ``_grouped_linear_dx_kernel``: the forward's (``fused_config``) with the roles of O and K swapped
    (dX tiles of BLOCK_K columns, O steps of BLOCK_O): the same register footprint (a [64, BLOCK_K] accumulator,
    a [64, BLOCK_R] dH, the same operand tiles)."""
    cfg = dict(fused_config(act, ad, rank_tile))
    cfg["BLOCK_K"], cfg["BLOCK_O"] = cfg["BLOCK_O"], cfg["BLOCK_K"]
    return cfg


def fused_dx_supported(table: torch.Tensor, rank: int) -> bool:
    """Whether ``launch_grouped_linear_dx`` takes this plan and store: ``fused_plan``'s 64-row blocks and a rank
    tile the kernels compile for (``MAX_KERNEL_RANK``)."""
    return table.dim() == 2 and table.shape[1] == FUSED_BLOCK_ROWS and rank <= MAX_KERNEL_RANK


def launch_grouped_linear_dx(dy2, weight, a, b, scale, table, badapter, thresholds, seed):
    """(dX [M, K] in dY's dtype, dH [nb, block_rows, kernel_rank(R)] in the adapter dtype): one launch; dH is
    left unwritten for unused blocks (the weight-gradient kernel reads only adapters' blocks). ``weight``: a float
    [O, K] tensor or a ``BaseWeight`` (a quantised base the dX tile fits, ``lora_grouped_q.aligned(..., dx=True)``:
    launched without fp contraction, as the forward)."""
    w = dense_base(weight, scale) if isinstance(weight, torch.Tensor) else weight
    m, o = dy2.shape
    n, rank, k = a.shape
    nb, block_rows = table.shape
    br = kernel_rank(rank)
    dx = torch.empty(m, k, dtype=dy2.dtype, device=dy2.device)
    dh = torch.empty(nb, block_rows, br, dtype=a.dtype, device=dy2.device)
    cfg = fused_dx_config(dy2.dtype, a.dtype, br)
    drop = thresholds is not None
    extra = {} if w.kind == "dense" else dict(enable_fp_fusion=False)
    launch(_grouped_linear_dx_kernel, (nb * triton.cdiv(k, cfg["BLOCK_K"]),), dy2, w.w, w.wscale, w.code,
           w.nested_absmax, w.nested_code, w.offset, w.log2_bs, w.log2_nbs, w.w_round, a, b, scale, table,
           badapter, dh, dx, thresholds if drop else badapter, seed, m, o, k, rank, n, nb,
           dy2.stride(0), dy2.stride(1), w.stride_wo, w.stride_wk, a.stride(0), a.stride(1), a.stride(2),
           b.stride(0), b.stride(1), b.stride(2), dx.stride(0), dx.stride(1),
           HAS_DROPOUT=drop, BASE_PRECISION=dot_precision(dy2.dtype),
           LORA_PRECISION=dot_precision(dy2.dtype, a.dtype), BLOCK_ROWS=block_rows, BLOCK_R=br, WEIGHT=w.kind,
           NESTED=w.nested, **cfg, **extra)
    return dx, dh


def backward_fused_triton(dy2, x2, h, weight, a, b, scale, table, badapter, need_w, thresholds, seed):
    """(dX [M, K], dA [N, R, K] fp32 | None, dB [N, O, R] fp32 | None) of ``lora_grouped_linear`` on its plan:
    dX (base and adapter terms) and dH in one launch (``launch_grouped_linear_dx``), then dA on (dH, x) and dB on
    (dY, h) with the weight-gradient kernel, as ``backward_triton``."""
    n, rank = a.shape[0], a.shape[1]
    dx, dh = launch_grouped_linear_dx(dy2, weight, a, b, scale, table, badapter, thresholds, seed)
    da = db = None
    if need_w:
        bounds = adapter_bounds(badapter, n)
        da = launch_grad_w(dh, x2, table, bounds, n, rank, thresholds, seed)
        db = launch_grad_w(h, dy2, table, bounds, n, rank, None, 0, transpose_out=True)
    return dx, da, db


def _linear_op_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       weights_a: list[torch.Tensor], weights_b: list[torch.Tensor], a_store: torch.Tensor,
                       b_store: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, block_adapter: torch.Tensor,
                       thresholds: Optional[torch.Tensor], seed: torch.Tensor, *,
                       hint=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y = F.linear(x, weight, bias) + each row's adapter term, h). Triton: one fused launch over the plan of
    ``fused_plan``; elsewhere F.linear then ``forward_reference``."""
    x2 = x.reshape(-1, x.shape[-1])
    on_triton = use_triton(x, weight, a_store, b_store) if hint is None else hint
    if on_triton:
        y, h = launch_grouped_linear(x2, weight, bias, a_store, b_store, scale, table, block_adapter, thresholds,
                                     int(seed))
    else:
        base = torch.nn.functional.linear(x2, weight, bias)
        y, h = forward_reference(x2, base, a_store, b_store, scale, table, block_adapter, thresholds, int(seed))
    return y.view(*x.shape[:-1], weight.shape[0]), h


def _linear_op_save(args, outputs) -> list:
    x, weight, _bias, weights_a, weights_b, a_store, b_store, scale, table, badapter, thresholds, seed = args
    return [x, outputs[1], weight, a_store, b_store, scale, table, badapter, thresholds, seed, *weights_a,
            *weights_b]


def _linear_op_backward(saved, grads, needs, statics, *, hint=None) -> list:
    """Gradients of (x, weight (frozen: None), bias, A_1..A_n, B_1..B_n, stores, scale, plan, thresholds, seed).
    Triton, dX needed, ``fused_plan``'s plan: dX (dY @ W and the adapters' terms) in one launch, then dA and dB
    (``backward_fused_triton``); else dX = dY @ W plus the grouped backward's dX (added into it by the dX expand on
    Triton)."""
    x, h, weight, a, b, scale, table, badapter, thresholds, seed, *weights = saved
    n = len(weights) // 2
    dy2 = grads[0].reshape(-1, grads[0].shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    need_a, need_b = needs[3:3 + n], needs[3 + n:3 + 2 * n]
    need_w = any(need_a) or any(need_b)
    on_triton = hint if hint is not None else use_triton(dy2, x, a, b) and a.shape[1] <= MAX_KERNEL_RANK
    if on_triton and needs[0] and fused_dx_supported(table, a.shape[1]):
        dx, da, db = backward_fused_triton(dy2, x2, h, weight, a, b, scale, table, badapter, need_w, thresholds,
                                           int(seed))
        ga, gb = split_grads(da, weights[:n], need_a, 0), split_grads(db, weights[n:], need_b, 1)
    else:
        dx, ga, gb = fused_base_backward(dy2, x2, h, a, b, scale, table, badapter, thresholds, int(seed), weights,
                                         needs[0], need_a, need_b, dy2 @ weight if needs[0] else None, on_triton)
    dbias = dy2.sum(0).to(weight.dtype) if needs[2] else None
    return [None if dx is None else dx.view(x.shape), None, dbias, *ga, *gb, None, None, None, None, None, None, None]


def fused_base_backward(dy2, x2, h, a, b, scale, table, badapter, thresholds, seed, weights, need_x, need_a, need_b,
                        base_dx, on_triton) -> tuple:
    """(dx [M, K] | None, gradients of A_1..A_n, of B_1..B_n) of a base GEMM fused with the grouped adapters over
    the op's plan (``weights``: A_1..A_n, B_1..B_n): the grouped backward, its dX added into ``base_dx`` (the
    base's dY @ W; None when x needs no gradient), by the dX expand itself on the Triton kernels."""
    n = len(weights) // 2
    need_w = any(need_a) or any(need_b)
    if on_triton and table.shape[1] in (16, 32, 64):
        dx, da, db = backward_triton(dy2, x2, h, a, b, scale, table, badapter, need_x, need_w, thresholds, seed,
                                     dx_init=base_dx)
    else:
        dx, da, db = backward_reference(dy2, x2, h, a, b, scale, table, badapter, need_x, need_w, thresholds, seed)
        dx = None if dx is None else dx + base_dx
    return dx, split_grads(da, weights[:n], need_a, 0), split_grads(db, weights[n:], need_b, 1)


def _linear_op_fake(x, weight, bias, weights_a, weights_b, a_store, b_store, scale, table, block_adapter,
                    thresholds, seed):
    r = kernel_rank(a_store.shape[1])
    return (x.new_empty((*x.shape[:-1], weight.shape[0])),
            x.new_empty((table.shape[0], table.shape[1], r), dtype=a_store.dtype))


def _linear_op_backward_fake(saved, grads, needs, statics) -> list:
    x, _h, weight, _a, _b, _s, _t, _ba, _th, _seed, *weights = saved
    n = len(weights) // 2
    return [x.new_empty(x.shape) if needs[0] else None, None,
            weight.new_empty(weight.shape[:1]) if needs[2] else None,
            *(w.new_empty(w.shape) if need else None for w, need in zip(weights, needs[3:3 + 2 * n])),
            None, None, None, None, None, None, None]


LORA_GROUPED_LINEAR = OpDecl("peftfast::lora_grouped_linear", _linear_op_forward, _linear_op_backward,
                             save=_linear_op_save, fake=_linear_op_fake, backward_fake=_linear_op_backward_fake,
                             aux_outputs=(1,))


def lora_grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        weights_a: Sequence[torch.Tensor], weights_b: Sequence[torch.Tensor], a_store: torch.Tensor,
                        b_store: torch.Tensor, scale: torch.Tensor, index: torch.Tensor,
                        plan: tuple[torch.Tensor, torch.Tensor] | None = None,
                        thresholds: torch.Tensor | None = None, seed: int | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` plus, for each row m of x, adapter ``index[m]``'s term, as ``lora_grouped``
    (same stores, index, dropout and seed), with the base GEMM in the same launch on the Triton path: x read
    once, y written once (``_grouped_linear_kernel``). ``weight`` [O, K] is frozen (no gradient); ``plan``:
    ``fused_plan(index, N)`` on the Triton path (any other plan is refused there), ``make_plan(index, N, False)``
    elsewhere (made when None)."""
    n, r, k = check_stores(x, weights_a, weights_b, a_store, b_store, index, thresholds)
    if weight.dim() != 2 or weight.shape[1] != k or b_store.shape[1] != weight.shape[0] or (
            bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"lora_grouped_linear: weight {tuple(weight.shape)} / bias "
                         f"{None if bias is None else tuple(bias.shape)} do not match stores with K={k}, "
                         f"O={b_store.shape[1]}; give the base nn.Linear's weight [O, K] and bias [O] or None")
    if records_weight_grad(weight):
        raise ValueError("lora_grouped_linear: the base weight requires grad; this op computes no weight gradient "
                         "(freeze the base layer, or use lora_grouped after the base layer's own forward)")
    on_triton = use_triton(x, weight, a_store, b_store) and r <= MAX_KERNEL_RANK
    if plan is None:
        plan = fused_plan(index, n) if on_triton else make_plan(index, n, False)
    check_fused_plan(plan, on_triton, "lora_grouped_linear")
    table, badapter = plan
    if torch.compiler.is_compiling():
        drawn = draw_seed() if thresholds is not None and seed is None else torch.tensor(int(seed or 0))
        return LORA_GROUPED_LINEAR(x, weight, bias, list(weights_a), list(weights_b), a_store, b_store, scale, table,
                                   badapter, thresholds, drawn)[0]
    if thresholds is not None and seed is None:
        seed = int(draw_seed())
    seed = 0 if seed is None else int(seed)
    return LORA_GROUPED_LINEAR(x, weight, bias, list(weights_a), list(weights_b), a_store, b_store, scale, table,
                               badapter, thresholds, seed, hint=on_triton)[0]


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# ----------------------------------------------------------------------------------------------
DTYPE_PAIRS = ((torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
               (torch.float32, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.float32))
SPEC_BLOCK_ROWS = (16, 32, 64)
SPEC_RANKS = (16, 32, 64)


def aot_specs() -> list[AotSpec]:
    """Every launch of the forward (shrink with or without dropout, expand adding into y) and the backward (the
    shrink as dH, the expand writing dX with or without the mask, the weight gradients dA (masked or not) and
    dB), per dtype pair, block rows and rank tile, and of ``lora_grouped_linear`` (forward and fused dX); the
    stores' innermost strides are 1 (A [N, R, K], B kept as [N, R, O]: ``peftfast.tuners.lora.grouped.AdapterStore``)."""
    specs = []
    for act, ad in DTYPE_PAIRS:
        xa, wa = DTYPE_NAMES[act], DTYPE_NAMES[ad]
        prec = dot_precision(act, ad)
        for rows in SPEC_BLOCK_ROWS:
            for br in SPEC_RANKS:
                tag = f"x={xa},w={wa},BM={rows},BR={br}"
                block_k, warps = launch_config("shrink", rows, br, ad)
                for drop in (False, True):
                    c = dict(BLOCK_ROWS=rows, BLOCK_R=br, BLOCK_K=block_k, DOT_PRECISION=prec, stride_xk=1,
                             stride_ak=1, HAS_DROPOUT=drop)
                    types = {"x_ptr": "*" + xa, "a_ptr": "*" + wa, "scale_ptr": "*fp32", "table_ptr": "*i64",
                             "badapter_ptr": "*i64", "h_ptr": "*" + wa, "thresh_ptr": "*i64", "seed": "i64",
                             "stride_xm": "i64", "stride_an": "i64"}
                    specs.append(AotSpec(f"lora_grouped_shrink[{tag},BK={block_k},warps={warps}"
                                         f"{',dropout' if drop else ''}]", _grouped_shrink_kernel,
                                         aot_signature(_grouped_shrink_kernel, types, c), c, warps, _STAGES, True))
                block_o, warps = launch_config("expand", rows, br, ad)
                # y += ; dX = (masked); dX += masked (the fused op's backward adds into dY @ W)
                for acc, drop in ((True, False), (False, False), (False, True), (True, True)):
                    c = dict(BLOCK_ROWS=rows, BLOCK_R=br, BLOCK_O=block_o, DOT_PRECISION=prec, stride_bo=1,
                             stride_oo=1, ACCUMULATE=acc, HAS_DROPOUT=drop)
                    types = {"h_ptr": "*" + wa, "b_ptr": "*" + wa, "table_ptr": "*i64", "badapter_ptr": "*i64",
                             "out_ptr": "*" + xa, "thresh_ptr": "*i64", "seed": "i64", "stride_om": "i64",
                             "stride_bn": "i64"}
                    what = ("dx+=,dropout" if drop else "y") if acc else "dx" + (",dropout" if drop else "")
                    specs.append(AotSpec(f"lora_grouped_expand[{tag},BO={block_o},warps={warps},{what}]",
                                         _grouped_expand_kernel, aot_signature(_grouped_expand_kernel, types, c), c,
                                         warps, _STAGES, True))
                block_c, warps = launch_config("grad_w", rows, br, ad)
                for what, drop in (("dA", False), ("dA", True), ("dB", False)):  # dB: written as [N, O, R]
                    c = dict(BLOCK_ROWS=rows, BLOCK_R=br, BLOCK_C=block_c, DOT_PRECISION=prec, stride_lr=1,
                             stride_rc=1, HAS_DROPOUT=drop, **({"stride_oc": 1} if what == "dA" else {"stride_or": 1}))
                    types = {"left_ptr": "*" + wa, "right_ptr": "*" + xa, "table_ptr": "*i64", "bounds_ptr": "*i64",
                             "out_ptr": "*fp32", "thresh_ptr": "*i64", "seed": "i64", "stride_lb": "i64",
                             "stride_rm": "i64", "stride_os": "i64", "stride_on": "i64"}
                    specs.append(AotSpec(f"lora_grouped_grad_w[{tag},BC={block_c},warps={warps},{what}"
                                         f"{',dropout' if drop else ''}]", _grouped_grad_w_kernel,
                                         aot_signature(_grouped_grad_w_kernel, types, c), c, warps, _STAGES, True))
        specs += fused_specs(act, ad)
        specs += fused_dx_specs(act, ad)
    return specs


# the quantised-weight arguments of ``_grouped_linear_kernel`` as a dense launch passes them (``dense_base``)
UNUSED_QUANT_TYPES = {"wscale_ptr": "*fp32", "code_ptr": "*fp32", "nested_absmax_ptr": "*fp32",
                      "nested_code_ptr": "*fp32", "offset": "fp32"}


def fused_specs(act: torch.dtype, ad: torch.dtype, kind: str = "dense", nested: bool = False) -> list[AotSpec]:
    """The fused kernel's launches for one dtype pair and base weight (``kind`` "dense", "4bit" with ``nested``
    absmax or not, "int8"; ``lora_grouped_q.aot_specs`` lists the quantised ones): every rank tile, with bias or
    not, with dropout or not."""
    xa, wa = DTYPE_NAMES[act], DTYPE_NAMES[ad]
    if kind == "dense":
        name, wtypes, options = "lora_grouped_linear[", {"w_ptr": "*" + xa, **UNUSED_QUANT_TYPES}, {}
    else:  # launched without fp contraction (``launch_grouped_linear``)
        name, options = f"lora_grouped_qlinear[{kind}{',nested' if nested else ''},", {"enable_fp_fusion": False}
        wtypes = ({"w_ptr": "*i8", **UNUSED_QUANT_TYPES} if kind == "int8" else
                  {"w_ptr": "*u8", "wscale_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32",
                   "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset": "fp32"})
    specs = []
    for br in SPEC_RANKS:
        cfg = fused_config(act, ad, br, kind)
        for bias, drop in ((True, False), (False, False), (True, True), (False, True)):
            c = dict(BLOCK_ROWS=FUSED_BLOCK_ROWS, BLOCK_R=br, BLOCK_O=cfg["BLOCK_O"], BLOCK_K=cfg["BLOCK_K"],
                     GROUP_M=cfg["GROUP_M"], BASE_PRECISION=dot_precision(act), LORA_PRECISION=dot_precision(act, ad),
                     HAS_BIAS=bias, HAS_DROPOUT=drop, stride_xk=1, stride_ak=1, stride_bo=1, stride_yo=1,
                     WEIGHT=kind, NESTED=nested, **({} if kind == "4bit" else {"stride_wk": 1}))
            types = {"x_ptr": "*" + xa, "bias_ptr": "*" + xa, "a_ptr": "*" + wa, "b_ptr": "*" + wa,
                     "scale_ptr": "*fp32", "table_ptr": "*i64", "badapter_ptr": "*i64", "h_ptr": "*" + wa,
                     "y_ptr": "*" + xa, "thresh_ptr": "*i64", "seed": "i64", "stride_xm": "i64", "stride_wo": "i64",
                     "stride_an": "i64", "stride_bn": "i64", "stride_ym": "i64", **wtypes}
            specs.append(AotSpec(f"{name}x={xa},w={wa},BR={br},BO={cfg['BLOCK_O']},"
                                 f"BK={cfg['BLOCK_K']},warps={cfg['num_warps']}{',bias' if bias else ''}"
                                 f"{',dropout' if drop else ''}]",
                                 _grouped_linear_kernel, aot_signature(_grouped_linear_kernel, types, c), c,
                                 cfg["num_warps"], cfg["num_stages"], True, options=options))
    return specs


def fused_dx_specs(act: torch.dtype, ad: torch.dtype, kind: str = "dense", nested: bool = False) -> list[AotSpec]:
    """The fused backward's dX launch (``_grouped_linear_dx_kernel``) for one dtype pair and base weight (``kind``
    as in ``fused_specs``; ``lora_grouped_q.aot_specs`` lists the quantised ones): every rank tile, with dropout or
    not."""
    xa, wa = DTYPE_NAMES[act], DTYPE_NAMES[ad]
    if kind == "dense":
        name, wtypes, options = "lora_grouped_linear_dx[", {"w_ptr": "*" + xa, **UNUSED_QUANT_TYPES}, {}
    else:  # launched without fp contraction (``launch_grouped_linear_dx``)
        name, options = f"lora_grouped_qlinear_dx[{kind}{',nested' if nested else ''},", {"enable_fp_fusion": False}
        wtypes = ({"w_ptr": "*i8", **UNUSED_QUANT_TYPES} if kind == "int8" else
                  {"w_ptr": "*u8", "wscale_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32",
                   "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset": "fp32"})
    specs = []
    for br in SPEC_RANKS:
        cfg = fused_dx_config(act, ad, br)
        for drop in (False, True):
            c = dict(BLOCK_ROWS=FUSED_BLOCK_ROWS, BLOCK_R=br, BLOCK_K=cfg["BLOCK_K"], BLOCK_O=cfg["BLOCK_O"],
                     GROUP_M=cfg["GROUP_M"], BASE_PRECISION=dot_precision(act), LORA_PRECISION=dot_precision(act, ad),
                     HAS_DROPOUT=drop, stride_do=1, stride_ak=1, stride_bo=1, stride_xk=1, WEIGHT=kind,
                     NESTED=nested, **({} if kind == "4bit" else {"stride_wk": 1}))
            types = {"dy_ptr": "*" + xa, "a_ptr": "*" + wa, "b_ptr": "*" + wa,
                     "scale_ptr": "*fp32", "table_ptr": "*i64", "badapter_ptr": "*i64", "g_ptr": "*" + wa,
                     "dx_ptr": "*" + xa, "thresh_ptr": "*i64", "seed": "i64", "stride_dm": "i64", "stride_wo": "i64",
                     "stride_an": "i64", "stride_bn": "i64", "stride_xm": "i64", **wtypes}
            specs.append(AotSpec(f"{name}x={xa},w={wa},BR={br},BK={cfg['BLOCK_K']},"
                                 f"BO={cfg['BLOCK_O']},warps={cfg['num_warps']}{',dropout' if drop else ''}]",
                                 _grouped_linear_dx_kernel, aot_signature(_grouped_linear_dx_kernel, types, c), c,
                                 cfg["num_warps"], cfg["num_stages"], True, options=options))
    return specs
