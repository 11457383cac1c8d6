"""LoHa / LoKr on a frozen linear: the delta weight generated tile by tile inside the GEMMs.

Math (frozen W [N, K], optional bias b [N], x [M, K]; s the adapter's scaling):

    LoHa:  D = s * (w1a @ w1b) * (w2a @ w2b)         w1a, w2a [N, r1|r2]; w1b, w2b [r1|r2, K]
    LoKr:  D = s * kron(w1, w2)                       w1 [a, c] (or w1a @ w1b), w2 [p, q] (or w2a @ w2b),
                                                      N = a * p, K = c * q
    y  = x @ (W + D)^T + b
    dX = dY @ (W + D),  dD = dY^T @ x  ->  the factor gradients (chain rule below), db = sum_m dY

One form covers both: D[n, k] = s * P1[n, k] * P2[n, k] with factor f in {1, 2} either FULL
(P[n, k] = F[row(n), col(k)]) or LOW-RANK (P[n, k] = U[row(n)] . V[:, col(k)]), where
row(n) = (n // rdiv) % rmod and col(k) = (k // cdiv) % cmod (the ``layout``):

    LoHa:  both low rank, rdiv = cdiv = 1, rmod = N, cmod = K (row(n) = n, col(k) = k)
    LoKr:  factor 1 = w1: row(n) = n // p, col(k) = k // q;  factor 2 = w2: row(n) = n % p, col(k) = k % q
           (a LoKr factor is FULL when PEFT keeps it whole, LOW-RANK when it is stored as a product)

Once per call (``prepare``, torch, O(size of the factors)): a LoKr factor stored low rank whose whole form is
small (at most ``FORM_LIMIT`` elements and 1 / ``FORM_SHARE`` of the delta: the usual [64, 64] w2 of a 4096 x
4096 layer) is formed, F = U @ V in fp32, so the kernels gather it instead of regenerating a rank-r product for
every block of rows; a full factor is read as an fp32 copy, or, when both factors are full and the weight is
16-bit, in the weight's dtype; a low-rank factor in the weight's 16-bit dtype too (else its own; see Dtypes for
the factor gradients); s is folded into one tensor (the first full factor, else factor 1's U). The kernels then
compute D = P1 * P2, and W + D is one FMA per element (in the 16-bit dtype in the second case: paired HFMA2 in
the SASS, no widening of W; else in fp32). The factor gradients the kernels produce map back with s and, for a
formed factor, dU = dF @ V^T, dV = U^T @ dF (``unprepare_grads``, small torch matmuls).

Blocked algorithm (Triton, CUDA tensors; the interpreter on CPU tensors for the tests):

    forward, program (M block, N block), grouped order:
        for K blocks: P1, P2 tiles [BK, BN] from the factors (a low-rank P: gathered U rows [BR, BN] and
                      V columns [BK, BR], one small dot per 16 ranks; a full P: one gathered load),
                      Wt = fma(P1, P2, W^T tile as fp32) rounded to x's dtype,
                      acc += x tile @ Wt                (ONE dot per K block on the tensor cores)
        acc += b; y stored once
    dX, program (M block, K block): for N blocks: W' tile [BN, BK] the same way, acc += dY tile @ W'
    factor gradients, program (N block, K block):
        dD tile = sum over M blocks dY^T tile @ x tile          (fp32, registers; the inherent GEMM)
        dP1 = dD * P2,  dP2 = dD * P1                           (Hadamard / Kronecker chain rule)
        FULL:     dF[row(n), col(k)] += dP                      (fp32 atomics; LoKr's full w1 with blocks of whole
                                                                 tiles: the tile's sum, one atomic, ``SUM1``)
        LOW-RANK: dU[row(n)] += dP @ V[:, col(k)]^T, dV[:, col(k)] += U[row(n)]^T @ dP  (fp32 atomics)
      then ``unprepare_grads`` and one cast of the fp32 sums to each factor's dtype (torch).

Cost of generating W + D: once per program, i.e. once per BLOCK_M rows of x (256 on GPUs with 16-bit activations,
128 in the ALIGN 4 and HELD variants): per delta element the FMA and what the compiler emits around it (index and
address arithmetic, masks, operand packing), plus, per low-rank factor left low rank, a share 2 * R_pad / BLOCK_M of
the GEMM's tensor-core work (its K = R_pad dot). ``peftfast.tools.costmodel.sass`` counts the extra ALU instructions
per delta element in the compiled main loops (sm_90, bf16, the issue's shape): LoHa ~18 (forward and dX); LoKr with
both factors whole and aligned ~0.9 (forward) and, dX holding w2's tiles (HELD, below), ~0.25 (dX; ~5.4 on blocks
too tall to hold). ALIGN (LoKr with both factors whole, p a multiple of BLOCK_N and q of BLOCK_K): a tile lies in
one block, so it reads one value of w1 and a contiguous tile of w2; the kernel computes its place in the blocks once
along its fixed direction and keeps it as the loop steps along the other: no integer division in the loop (the
general variant divides per index: 64-bit, software-emulated on GPUs), no masks on those loads. ALIGN 2 (the blocks
hold whole tiles along the loop's direction only: q of BLOCK_K in the forward, p of BLOCK_N in dX; a GQA k/v
projection's 1024 = 32 x 32 rows in the forward's 64-row tiles): the fixed direction's block indices are vectors
computed once per program, w1 is read as one vector and w2 as a gather of those rows (columns) per step; counted
~0.9 (forward) and ~8.1 (dX) instructions per element on sm_90. ALIGN 3 (blocks along the loop larger than the tile,
not a multiple: 5120 = 64 x 80): the same, a tile's offsets past the block's end taken from the next block (w1: a
select between two vectors in the forward, a gather in dX): ~2.0 and ~9.1 on sm_90, where the general variant counts
12.6 and 10.6 there. ALIGN 4 (blocks smaller than the tiles along the loop, e.g. 24 x 24 blocks of a 576-wide
layer): the general variant, each index's block and offset from an fp32 reciprocal and one correction
(``reciprocal_divmod``) instead of a 64-bit integer division, computed once per index for both factors (the fixed
direction's before the loop), on 128-row tiles (with 256 its 16-bit kernels spill registers on sm_80): ~21.0 and
~11.1 where the divisions counted ~33.6 and ~64.8 (ALIGN 0 keeps those past ``DIVMOD_LIMIT``). HELD (dX, 16-bit
activations, ALIGN 1 with blocks of p <= 4 tiles of BLOCK_N rows, e.g. w2 [64, 64]): a program's columns meet the
same p / BLOCK_N tiles of w2 in every block, so they are read once and held in registers, w1 read once per block,
the loop nested (blocks, then their tiles, unrolled); on 128-row tiles (256 spill): ~0.25 instructions per element
on sm_90, where the plain ALIGN 1 loop counts ~5.4 (a w2 tile's address, w1's, the place's steps per 8 elements).

No [N, K] tensor is ever allocated: the extra memory of a call is ``prepare``'s copies (the size of the
factors, plus a formed factor's [p, q]), the fp32 gradient buffers of the kernels' factors and y / dX
themselves. Nothing beyond x and references to W and the factors is saved for backward (``prepare`` runs
again in backward).

Atomics: the factor gradients sum tile contributions with fp32 atomic adds, so their last bits
depend on the order the programs run in (not bitwise deterministic, like torch's index_add_ on CUDA).
LoKr's full (or formed) factors take every contribution of a whole tile at few addresses (a [BN, BK] tile
hits (BN / p + 1) x (BK / q + 1) elements of w1): correct, contended.

Dtypes: W and x share a dtype (as F.linear requires) and so do the factors, in x's dtype or fp32 (the
layers call the op with fp32 factors on a 16-bit model: PEFT's default, autocast_adapter_dtype=True). W + D is
rounded once to x's dtype before the dot (the rounding of F.linear(x, W + D) in x's dtype), so on a 16-bit model
the forward and dX read the factors rounded to x's dtype (``prepare``: once per call, O(factors)); the relative
error this adds to D (a few 16-bit ulps of D) is below the rounding of W + D itself when |D| is below |W|. The
factor-gradient kernel reads fp32 factors as fp32 (``prepare(..., exact=True)``): dD = dY^T X and dD * P in
fp32, a full factor's gradient exact to fp32; a low-rank factor's rank-r dots (P, dU, dV) in TF32
(``factor_precision``: 10-bit-mantissa products, fp32 sums, what torch's fp32 matmuls do with allow_tf32), at
about 2x a 16-bit dot: LoHa's six per tile cost 12 r / M of the dD GEMM (2.3% at M = 8192, r = 16) instead of
6 r / M. s is folded into a factor in the dtype the kernels read it in. fp32 models use 3xTF32 dots (~fp32),
16-bit models the tensor cores natively.

CPU (the reference path): the same math in PyTorch over blocks of output rows (about
``BLOCK_ELEMENTS`` elements of [rows, K] at a time): forward y[:, R] = x @ (W[R] + D[R])^T; backward
dX += dY[:, R] @ (W[R] + D[R]), dD[R] = dY[:, R]^T @ x and the factor chain rule by hand on that
block. It holds one block of D and dD at a time, never [N, K].

Declared once (``LYCORIS_LINEAR``, kernels/opdecl.py); public wrappers ``loha_linear`` and
``lokr_linear``. Launches: forward 1 (after ``prepare``'s few small torch ops); backward ``prepare`` again,
1 (dX) + 1 (factor gradients, with their fp32 buffers zeroed by torch, mapped back and cast by torch) +
torch's sum for db.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .aot import AotSpec
from .opdecl import OpDecl
from .runtime import (DTYPE_NAMES, aot_signature, as_2d, declare_int32_operands, dot_precision, interpreting, launch,
                      records_weight_grad, use_triton)
from .tiles import grouped_tile, tile_offsets

# The largest N and K whose block indices ALIGN 4 computes with fp32 reciprocals (``reciprocal_divmod``: the
# quotient's error stays below 1 there, one correction step makes it exact)
DIVMOD_LIMIT = 1 << 22
# Elements of one [rows, K] block of the reference path (4M: 16 MiB in fp32)
BLOCK_ELEMENTS = 1 << 22

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _indices(offs_n, offs_k, rdiv, rmod, cdiv, cmod, INDEX: tl.constexpr):
    """(row(n), col(k)) of a factor, specialised on the layout (``kron``): INDEX 0 LoHa, (n, k);
    1 LoKr's w1, (n // p, k // q) (below (a, c) already); 2 LoKr's w2, (n % p, k % q). One integer division per
    index instead of two, none for LoHa."""
    if INDEX == 0:
        return offs_n, offs_k
    elif INDEX == 1:
        return offs_n // rdiv, offs_k // cdiv
    else:
        return offs_n % rmod, offs_k % cmod


@triton.jit
def reciprocal_divmod(offs, d):
    """(offs // d, offs % d) (int64) for 0 <= offs <= DIVMOD_LIMIT and d >= 1: the quotient from an fp32 product
    with 1 / d, off by at most one there even with 1 / d a few ulps off (a GPU's fast division), then one correction
    step each way (GPUs emulate integer division in software: tens of instructions, more for 64 bits)."""
    # int32 throughout (int64 products counted 53 instructions per element in the forward, against 30): the
    # indices address the factors, declared 32-bit operands (``declare_int32_operands``, checked at launch)
    o = offs.to(tl.int32)
    q = (o.to(tl.float32) * (1.0 / d.to(tl.float32))).to(tl.int32)
    r = o - q * d
    q = tl.where(r < 0, q - 1, tl.where(r >= d, q + 1, q))
    return q, o - q * d


@triton.jit
def _factor_tile(u_ptr, v_ptr, R, offs_n, offs_k, nq, nr, kq, kr, mask_n, mask_k, rdiv, rmod, cdiv, cmod,
                 stride_u0, stride_u1, stride_v0, stride_v1,
                 FULL: tl.constexpr, TRANS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                 INDEX: tl.constexpr, ALIGN: tl.constexpr):
    """P[n, k] for the tile's n (offs_n) and k (offs_k): [BN, BK], or [BK, BN] with TRANS; a FULL factor in its
    own dtype, a low-rank one in fp32. FULL: P[n, k] = u[row(n), col(k)]; else P[n, k] = sum_r u[row(n), r] *
    v[r, col(k)].
    ALIGN 1 (LoKr, both factors FULL, the tile inside one block of p rows and q columns: it starts at row
    nq * p + nr and column kq * q + kr, which the caller keeps as it steps): w1's value is one scalar,
    w1[nq, kq], and w2's tile the contiguous w2[nr:nr + BN, kr:kr + BK] (no division, no mask: in bounds).
    ALIGN 2 (the same, but only along the loop's direction, K in the forward (TRANS), N in dX): the fixed
    direction's indices are vectors the caller computed once, before its loop (forward: nq, nr [BN] for the
    tile's rows, clamped in bounds; dX: kq, kr [BK]); w1 is one vector [1, BN] / [1, BK], w2 a gather of
    those rows (columns) at the contiguous offsets of the loop's direction."""
    if FULL and ALIGN == 2 and INDEX == 1:
        if TRANS:  # forward: [BK, BN], w1[n // p, kq] per row n
            p = tl.load(u_ptr + nq * stride_u0 + kq.to(tl.int64) * stride_u1)[None, :]
        else:  # dX: [BN, BK], w1[nq, k // q] per column k
            p = tl.load(u_ptr + nq.to(tl.int64) * stride_u0 + kq * stride_u1)[None, :]
    elif FULL and ALIGN == 2:
        if TRANS:
            cols = kr.to(tl.int64) + tl.arange(0, offs_k.shape[0])
            p = tl.load(u_ptr + nr[None, :] * stride_u0 + cols[:, None] * stride_u1)
        else:
            rows = nr.to(tl.int64) + tl.arange(0, offs_n.shape[0])
            p = tl.load(u_ptr + rows[:, None] * stride_u0 + kr[None, :] * stride_u1)
    elif FULL and ALIGN == 3:
        # the loop's direction as with ALIGN 2, but its blocks (q, or p in dX) are not a multiple of the tile: the
        # tile's offsets at or past the block's end belong to the next block (at most one, as q >= BLOCK_K)
        if TRANS:  # forward, [BK, BN]
            at = kr + tl.arange(0, offs_k.shape[0])
            if INDEX == 1:  # w1[n // p, kq or kq + 1] (clamped: the K tail's columns, masked in W, stay in bounds)
                here = tl.load(u_ptr + nq * stride_u0 + kq.to(tl.int64) * stride_u1)
                after = tl.load(u_ptr + nq * stride_u0 + tl.minimum(kq + 1, cmod - 1).to(tl.int64) * stride_u1)
                p = tl.where((at >= cdiv)[:, None], after[None, :], here[None, :])
            else:  # w2[n % p, (kr + j) mod q]
                col = tl.where(at >= cmod, at - cmod, at).to(tl.int64)
                p = tl.load(u_ptr + nr[None, :] * stride_u0 + col[:, None] * stride_u1)
        else:  # dX, [BN, BK]
            at = nr + tl.arange(0, offs_n.shape[0])
            if INDEX == 1:  # a gather (counted: fewer instructions here than selecting between two rows)
                row = tl.minimum(nq + (at >= rdiv).to(tl.int32), rmod - 1).to(tl.int64)
                p = tl.load(u_ptr + row[:, None] * stride_u0 + kq[None, :] * stride_u1)
            else:
                row = tl.where(at >= rmod, at - rmod, at).to(tl.int64)
                p = tl.load(u_ptr + row[:, None] * stride_u0 + kr[None, :] * stride_u1)
    elif FULL and ALIGN == 1 and INDEX == 1:
        p = tl.load(u_ptr + nq.to(tl.int64) * stride_u0 + kq.to(tl.int64) * stride_u1)
    elif FULL and ALIGN == 1:
        rows = nr.to(tl.int64) + tl.arange(0, offs_n.shape[0])
        cols = kr.to(tl.int64) + tl.arange(0, offs_k.shape[0])
        if TRANS:
            p = tl.load(u_ptr + rows[None, :] * stride_u0 + cols[:, None] * stride_u1)
        else:
            p = tl.load(u_ptr + rows[:, None] * stride_u0 + cols[None, :] * stride_u1)
    elif FULL:
        if ALIGN == 4 and INDEX == 1:  # both factors full, blocks smaller than the tiles: each index's block and
            rows, cols = nq, kq  # offset, one reciprocal division per index shared by both factors (the caller's)
        elif ALIGN == 4:
            rows, cols = nr, kr
        else:
            rows, cols = _indices(offs_n, offs_k, rdiv, rmod, cdiv, cmod, INDEX)
        if TRANS:
            p = tl.load(u_ptr + rows[None, :] * stride_u0 + cols[:, None] * stride_u1,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        else:
            p = tl.load(u_ptr + rows[:, None] * stride_u0 + cols[None, :] * stride_u1,
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    else:
        rows, cols = _indices(offs_n, offs_k, rdiv, rmod, cdiv, cmod, INDEX)
        if TRANS:
            p = tl.zeros((offs_k.shape[0], offs_n.shape[0]), dtype=tl.float32)
        else:
            p = tl.zeros((offs_n.shape[0], offs_k.shape[0]), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            mask_r = offs_r < R
            if TRANS:
                vt = tl.load(v_ptr + offs_r[None, :] * stride_v0 + cols[:, None] * stride_v1,
                             mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # [BK, BR]
                ut = tl.load(u_ptr + rows[None, :] * stride_u0 + offs_r[:, None] * stride_u1,
                             mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # [BR, BN]
                p = tl.dot(vt, ut, p, input_precision=PRECISION)
            else:
                u = tl.load(u_ptr + rows[:, None] * stride_u0 + offs_r[None, :] * stride_u1,
                            mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [BN, BR]
                v = tl.load(v_ptr + offs_r[:, None] * stride_v0 + cols[None, :] * stride_v1,
                            mask=mask_r[:, None] & mask_k[None, :], other=0.0)  # [BR, BK]
                p = tl.dot(u, v, p, input_precision=PRECISION)
    return p


@triton.jit
def _add_delta(w, u1_ptr, v1_ptr, u2_ptr, v2_ptr, R1, R2, offs_n, offs_k, nq, nr, kq, kr, mask_n, mask_k,
               rdiv1, rmod1, cdiv1, cmod1, rdiv2, rmod2, cdiv2, cmod2,
               su1_0, su1_1, sv1_0, sv1_1, su2_0, su2_1, sv2_0, sv2_1,
               FULL1: tl.constexpr, FULL2: tl.constexpr, TRANS: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_R: tl.constexpr, KRON: tl.constexpr, ALIGN: tl.constexpr):
    """(w + P1 * P2) in w's dtype on the tile ([BN, BK], or [BK, BN] with TRANS), s folded into a factor (see
    ``prepare``): with both factors gathered in w's dtype, one FMA in that dtype per element (paired
    HFMA2 for 16-bit on sm_80+); otherwise one fp32 FMA, w widened before and the sum rounded once after."""
    p1 = _factor_tile(u1_ptr, v1_ptr, R1, offs_n, offs_k, nq, nr, kq, kr, mask_n, mask_k, rdiv1, rmod1, cdiv1,
                      cmod1, su1_0, su1_1, sv1_0, sv1_1, FULL1, TRANS, PRECISION, BLOCK_R, KRON, ALIGN)
    p2 = _factor_tile(u2_ptr, v2_ptr, R2, offs_n, offs_k, nq, nr, kq, kr, mask_n, mask_k, rdiv2, rmod2, cdiv2,
                      cmod2, su2_0, su2_1, sv2_0, sv2_1, FULL2, TRANS, PRECISION, BLOCK_R, 2 * KRON, ALIGN)
    return _fma_delta(p1, p2, w)


@triton.jit
def _fma_delta(p1, p2, w):
    """w + p1 * p2 in w's dtype: one FMA in that dtype when both factors are in it, else in fp32."""
    if p1.dtype == w.dtype and p2.dtype == w.dtype:
        return tl.fma(p1, p2, w)
    return tl.fma(p1.to(tl.float32), p2.to(tl.float32), w.to(tl.float32)).to(w.dtype)


@triton.jit
def _held_tile(u_ptr, j, cols, stride_0, stride_1, BLOCK_N: tl.constexpr):
    """Rows j * BLOCK_N.. of a full factor at columns ``cols``, [BLOCK_N, len(cols)] (in bounds: the caller's rows
    and columns lie inside the factor)."""
    rows = j * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.load(u_ptr + rows[:, None] * stride_0 + cols[None, :] * stride_1)


@triton.jit
def _fixed_place(offs, pid, size, block, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """(block index, offset in the block) along a kernel's fixed direction, for LoKr blocks of ``block`` indices:
    ALIGN 2 and 3, per index (vectors; indices past ``size`` clamped, their loads then in bounds); ALIGN 4, per
    index too, by ``reciprocal_divmod`` (past ``size``: masked); else the tile's first index (a tile inside one
    block, ALIGN 1; unused by the general variant, ALIGN 0)."""
    if ALIGN == 4:
        q, r = reciprocal_divmod(offs, block)
    elif ALIGN == 2 or ALIGN == 3:
        at = tl.minimum(offs, size - 1)
        q, r = at // block, at % block
    else:
        at = pid * BLOCK
        q, r = at // block, at % block
    return q, r


@triton.jit
def _next_place(q, r, block, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """The loop's (block index, offset) one tile further, for LoKr blocks of ``block`` >= BLOCK indices (ALIGN 1
    and 2: a multiple of BLOCK, so the offset returns to exactly 0)."""
    r += BLOCK
    if ALIGN == 3:
        wrap = r >= block
        return q + wrap.to(tl.int32), tl.where(wrap, r - block, r)
    else:
        return q + (r == block).to(tl.int32), tl.where(r == block, 0, r)


@triton.jit
def _lycoris_forward_kernel(
    x_ptr,  # [M, K] input, activation dtype
    w_ptr,  # [N, K] frozen base weight, activation dtype
    bias_ptr,  # [N] bias, activation dtype (unused without HAS_BIAS)
    u1_ptr, v1_ptr, u2_ptr, v2_ptr,  # the factors (factor dtype); v*_ptr unused for a FULL factor
    y_ptr,  # [M, N] output, activation dtype
    M, N, K, R1, R2,
    rdiv1, rmod1, cdiv1, cmod1, rdiv2, rmod2, cdiv2, cmod2,
    stride_xm, stride_xk, stride_wn, stride_wk,
    su1_0, su1_1, sv1_0, sv1_1, su2_0, su2_1, sv2_0, sv2_1,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, FULL1: tl.constexpr, FULL2: tl.constexpr, KRON: tl.constexpr,
    BASE_PRECISION: tl.constexpr, DELTA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, ALIGN: tl.constexpr = 0,  # LoKr's blocks against the tiles (``aligned``)
    DELTA: tl.constexpr = True,  # False: the base GEMM alone (never launched; the instruction count's baseline)
):
    pid_m, pid_n = grouped_tile(tl.program_id(0).to(tl.int64), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m, offs_n, mask_m, mask_n = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # ALIGN: the tile's place in LoKr's blocks (p = rdiv1 rows, q = cdiv1 columns): rows nq * p + nr.. (fixed),
    # columns kq * q + kr.. (kept as the loop steps, no division in it); ALIGN 2, 3: each row's (n // p, n % p)
    nq, nr = _fixed_place(offs_n, pid_n, N, rdiv1, BLOCK_N, ALIGN)
    kq = tl.full((), 0, tl.int32)
    kr = tl.full((), 0, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # W^T tile [BK, BN]
        cq, cr = kq, kr
        if ALIGN == 4:  # each column's block and offset, for both factors
            cq, cr = reciprocal_divmod(offs_k, cdiv1)
        if DELTA:
            wt = _add_delta(wt, u1_ptr, v1_ptr, u2_ptr, v2_ptr, R1, R2, offs_n, offs_k, nq, nr, cq, cr,
                            mask_n, mask_k, rdiv1, rmod1, cdiv1, cmod1, rdiv2, rmod2, cdiv2, cmod2,
                            su1_0, su1_1, sv1_0, sv1_1, su2_0, su2_1, sv2_0, sv2_1,
                            FULL1, FULL2, True, DELTA_PRECISION, BLOCK_R, KRON, ALIGN)
        acc = tl.dot(x, wt, acc, input_precision=BASE_PRECISION)
        if ALIGN == 1 or ALIGN == 2 or ALIGN == 3:  # the general variants (0, 4) keep no place
            kq, kr = _next_place(kq, kr, cdiv1, BLOCK_K, ALIGN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lycoris_grad_x_kernel(
    dy_ptr,  # [M, N] gradient of y, activation dtype
    w_ptr,  # [N, K] frozen base weight
    u1_ptr, v1_ptr, u2_ptr, v2_ptr,
    dx_ptr,  # [M, K] output, activation dtype
    M, N, K, R1, R2,
    rdiv1, rmod1, cdiv1, cmod1, rdiv2, rmod2, cdiv2, cmod2,
    stride_dym, stride_dyn, stride_wn, stride_wk,
    su1_0, su1_1, sv1_0, sv1_1, su2_0, su2_1, sv2_0, sv2_1,
    stride_dxm, stride_dxk,
    FULL1: tl.constexpr, FULL2: tl.constexpr, KRON: tl.constexpr, BASE_PRECISION: tl.constexpr,
    DELTA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, ALIGN: tl.constexpr = 0,  # LoKr's blocks against the tiles (``aligned``)
    DELTA: tl.constexpr = True,  # False: the base GEMM alone (never launched; the instruction count's baseline)
    HELD: tl.constexpr = 0,  # ALIGN 1 with p = HELD * BLOCK_N (``held_tiles``): w2's tiles held in registers
):
    pid_m, pid_k = grouped_tile(tl.program_id(0).to(tl.int64), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m, offs_k, mask_m, mask_k = tile_offsets(pid_m, pid_k, M, K, BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    # ALIGN: the tile's place in LoKr's blocks: columns kq * q + kr.. (fixed), rows nq * p + nr.. (kept as the
    # loop steps); ALIGN 2, 3: each column's (k // q, k % q)
    kq, kr = _fixed_place(offs_k, pid_k, K, cdiv1, BLOCK_K, ALIGN)
    if HELD > 0:
        # blocks of p = HELD * BLOCK_N rows: the program's columns see the same HELD tiles of w2 in every block, read
        # once here and held in registers; w1[nq, kq] is read once per block; the loop nested (blocks, then the
        # block's tiles, unrolled), no place to keep (N = a * p, K a multiple of BLOCK_K: no masks along N, K)
        cols = kr + tl.arange(0, BLOCK_K)
        t0 = _held_tile(u2_ptr, 0, cols, su2_0, su2_1, BLOCK_N)
        t1 = t0
        t2 = t0
        t3 = t0
        if HELD > 1:
            t1 = _held_tile(u2_ptr, 1, cols, su2_0, su2_1, BLOCK_N)
        if HELD > 2:
            t2 = _held_tile(u2_ptr, 2, cols, su2_0, su2_1, BLOCK_N)
        if HELD > 3:
            t3 = _held_tile(u2_ptr, 3, cols, su2_0, su2_1, BLOCK_N)
        w1 = u1_ptr + kq * su1_1  # w1[0, kq], then a row further per block
        for n0 in range(0, N, HELD * BLOCK_N):
            v1 = tl.load(w1)
            w1 += su1_0
            for j in tl.static_range(HELD):
                offs_n = n0 + j * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
                dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                             mask=mask_m[:, None], other=0.0)
                w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk)  # [BN, BK]
                if DELTA:
                    if j == 0:
                        w = _fma_delta(v1, t0, w)
                    elif j == 1:
                        w = _fma_delta(v1, t1, w)
                    elif j == 2:
                        w = _fma_delta(v1, t2, w)
                    else:
                        w = _fma_delta(v1, t3, w)
                acc = tl.dot(dy, w, acc, input_precision=BASE_PRECISION)
    else:
        nq = tl.full((), 0, tl.int32)
        nr = tl.full((), 0, tl.int32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            mask_n = offs_n < N
            dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # [BN, BK]
            rq, rr = nq, nr
            if ALIGN == 4:  # each row's block and offset, for both factors
                rq, rr = reciprocal_divmod(offs_n, rdiv1)
            if DELTA:
                w = _add_delta(w, u1_ptr, v1_ptr, u2_ptr, v2_ptr, R1, R2, offs_n, offs_k, rq, rr, kq, kr,
                               mask_n, mask_k, rdiv1, rmod1, cdiv1, cmod1, rdiv2, rmod2, cdiv2, cmod2,
                               su1_0, su1_1, sv1_0, sv1_1, su2_0, su2_1, sv2_0, sv2_1,
                               FULL1, FULL2, False, DELTA_PRECISION, BLOCK_R, KRON, ALIGN)
            acc = tl.dot(dy, w, acc, input_precision=BASE_PRECISION)
            if ALIGN == 1 or ALIGN == 2 or ALIGN == 3:  # the general variants (0, 4) keep no place
                nq, nr = _next_place(nq, nr, rdiv1, BLOCK_N, ALIGN)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _factor_grad(dp, u_ptr, v_ptr, gu_ptr, gv_ptr, R, offs_n, offs_k, mask_n, mask_k, rdiv, rmod, cdiv, cmod,
                 stride_u0, stride_u1, stride_v0, stride_v1, sgu_0, sgu_1, sgv_0, sgv_1,
                 FULL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, INDEX: tl.constexpr):
    """Adds the tile's dP [BN, BK] (fp32) into the factor's fp32 gradient buffers (atomics)."""
    rows, cols = _indices(offs_n, offs_k, rdiv, rmod, cdiv, cmod, INDEX)
    if FULL:
        tl.atomic_add(gu_ptr + rows[:, None] * sgu_0 + cols[None, :] * sgu_1, dp,
                      mask=mask_n[:, None] & mask_k[None, :], sem="relaxed")
    else:
        dpc = dp.to(u_ptr.dtype.element_ty)
        for r0 in range(0, R, BLOCK_R):
            offs_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            mask_r = offs_r < R
            vt = tl.load(v_ptr + offs_r[None, :] * stride_v0 + cols[:, None] * stride_v1,
                         mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # V^T [BK, BR]
            ut = tl.load(u_ptr + rows[None, :] * stride_u0 + offs_r[:, None] * stride_u1,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # U^T [BR, BN]
            gu = tl.dot(dpc, vt, input_precision=PRECISION)  # [BN, BR]
            gv = tl.dot(ut, dpc, input_precision=PRECISION)  # [BR, BK]
            tl.atomic_add(gu_ptr + rows[:, None] * sgu_0 + offs_r[None, :] * sgu_1, gu,
                          mask=mask_n[:, None] & mask_r[None, :], sem="relaxed")
            tl.atomic_add(gv_ptr + offs_r[:, None] * sgv_0 + cols[None, :] * sgv_1, gv,
                          mask=mask_r[:, None] & mask_k[None, :], sem="relaxed")


@triton.jit
def _lycoris_grad_factors_kernel(
    dy_ptr,  # [M, N] gradient of y, activation dtype
    x_ptr,  # [M, K] layer input, activation dtype
    u1_ptr, v1_ptr, u2_ptr, v2_ptr,  # the factors
    gu1_ptr, gv1_ptr, gu2_ptr, gv2_ptr,  # fp32 gradient buffers shaped like the factors (zeroed)
    M, N, K, R1, R2,
    rdiv1, rmod1, cdiv1, cmod1, rdiv2, rmod2, cdiv2, cmod2,
    stride_dym, stride_dyn, stride_xm, stride_xk,
    su1_0, su1_1, sv1_0, sv1_1, su2_0, su2_1, sv2_0, sv2_1,
    sgu1_0, sgu1_1, sgv1_0, sgv1_1, sgu2_0, sgu2_1, sgv2_0, sgv2_1,
    FULL1: tl.constexpr, FULL2: tl.constexpr, KRON: tl.constexpr, NEED1: tl.constexpr, NEED2: tl.constexpr,
    BASE_PRECISION: tl.constexpr, DELTA_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    SUM1: tl.constexpr = False,  # LoKr, w1 full, blocks of whole tiles (``sums_w1``): the tile is one w1 value
):
    pid_n, pid_k = grouped_tile(tl.program_id(0).to(tl.int64), N, K, BLOCK_N, BLOCK_K, GROUP_M)
    offs_n, offs_k, mask_n, mask_k = tile_offsets(pid_n, pid_k, N, K, BLOCK_N, BLOCK_K)
    dd = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < M
        dyt = tl.load(dy_ptr + offs_m[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
                      mask=mask_n[:, None] & mask_m[None, :], other=0.0)  # dY^T [BN, BM]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        dd = tl.dot(dyt, x, dd, input_precision=BASE_PRECISION)
    p1 = _factor_tile(u1_ptr, v1_ptr, R1, offs_n, offs_k, 0, 0, 0, 0, mask_n, mask_k, rdiv1, rmod1, cdiv1, cmod1,
                      su1_0, su1_1, sv1_0, sv1_1, FULL1, False, DELTA_PRECISION, BLOCK_R, KRON,
                      False).to(tl.float32)
    p2 = _factor_tile(u2_ptr, v2_ptr, R2, offs_n, offs_k, 0, 0, 0, 0, mask_n, mask_k, rdiv2, rmod2, cdiv2, cmod2,
                      su2_0, su2_1, sv2_0, sv2_1, FULL2, False, DELTA_PRECISION, BLOCK_R, 2 * KRON,
                      False).to(tl.float32)
    if NEED1 and SUM1:
        # the tile lies in one block (p = rdiv1 rows, q = cdiv1 columns): its sum is its whole contribution to w1's
        # gradient, one atomic (a tree sum, not BN * BK atomics on one address)
        g1 = tl.sum(tl.sum(dd * p2, axis=1), axis=0)
        tl.atomic_add(gu1_ptr + (pid_n * BLOCK_N // rdiv1) * sgu1_0 + (pid_k * BLOCK_K // cdiv1) * sgu1_1, g1,
                      sem="relaxed")
    elif NEED1:
        _factor_grad(dd * p2, u1_ptr, v1_ptr, gu1_ptr, gv1_ptr, R1, offs_n, offs_k, mask_n, mask_k,
                     rdiv1, rmod1, cdiv1, cmod1, su1_0, su1_1, sv1_0, sv1_1, sgu1_0, sgu1_1, sgv1_0, sgv1_1,
                     FULL1, DELTA_PRECISION, BLOCK_R, KRON)
    if NEED2:
        _factor_grad(dd * p1, u2_ptr, v2_ptr, gu2_ptr, gv2_ptr, R2, offs_n, offs_k, mask_n, mask_k,
                     rdiv2, rmod2, cdiv2, cmod2, su2_0, su2_1, sv2_0, sv2_1, sgu2_0, sgu2_1, sgv2_0, sgv2_1,
                     FULL2, DELTA_PRECISION, BLOCK_R, 2 * KRON)


# ----------------------------------------------------------------------------------------------
# Launch configurations (shared by the launchers and aot_specs)
# ----------------------------------------------------------------------------------------------
# (kernel, fp32 activations) -> meta-parameters. BLOCK_R: ranks per small dot of a low-rank factor.
# 16-bit forward and dX: 256 rows per program, so W + D is generated once per 256 rows (the CUDA-core work and a
# low-rank factor's dots per delta element halve against 128-row tiles); 64 columns keep the accumulator at 64
# fp32 registers per thread. With both factors full the pipelined gathers spill (the compile report, sm_80 to
# sm_90): fewer stages there (_FULL_STAGES).
_CONFIGS = {
    ("forward", False): {"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_R": 16, "GROUP_M": 8,
                         "num_warps": 8, "num_stages": 3},
    ("forward", True): {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "BLOCK_R": 16, "GROUP_M": 8,
                        "num_warps": 4, "num_stages": 2},
    ("grad_x", False): {"BLOCK_M": 256, "BLOCK_K": 64, "BLOCK_N": 32, "BLOCK_R": 16, "GROUP_M": 8,
                        "num_warps": 8, "num_stages": 3},
    ("grad_x", True): {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_N": 16, "BLOCK_R": 16, "GROUP_M": 8,
                       "num_warps": 4, "num_stages": 2},
    ("grad_factors", False): {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 64, "BLOCK_R": 16, "GROUP_M": 8,
                              "num_warps": 8, "num_stages": 3},
    ("grad_factors", True): {"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_M": 16, "BLOCK_R": 16, "GROUP_M": 8,
                             "num_warps": 4, "num_stages": 2},  # 64 x 64 spills on sm_80 with 3xTF32
}
# (kernel, fp32 activations) -> num_stages when both factors are full
_FULL_STAGES = {("forward", False): 2, ("forward", True): 1, ("grad_x", True): 1}
# The interpreter (tests on CPU tensors) runs the same kernels on 16 x 16 x 16 tiles: small odd shapes
# then cover several tiles, masked edges and the K / N / M loops.
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_R": 16, "GROUP_M": 2,
                     "num_warps": 4, "num_stages": 1}


# ALIGN 4's per-index blocks and offsets, and dX's held tiles of w2 (HELD), hold more registers: with 256-row tiles
# their 16-bit kernels spill (the compile report: ALIGN 4 on sm_80, HELD on sm_80 to sm_90), not with 128
VARIANT_BLOCK_M = 128
# The most tiles of w2 dX's HELD variant keeps in registers (4 x 32 x 64 16-bit values per 256-thread program: 16
# registers a thread)
MAX_HELD = 4


def variant_block_m(block_m: int, align: int, held: int) -> int:
    """Rows per program of a forward or dX variant: the config's, at most VARIANT_BLOCK_M for ALIGN 4 and HELD."""
    return min(block_m, VARIANT_BLOCK_M) if align == 4 or held else block_m


def _may_hold(act: torch.dtype) -> bool:
    """Whether dX's HELD variants are built for activations ``act`` (fp32's spill 8-32 bytes on sm_80 and sm_86,
    the compile report)."""
    return act != torch.float32


def held_tiles(layout: Sequence[int], cfg: dict, act: torch.dtype) -> int:
    """dX's ``HELD``: with 16-bit activations and LoKr's blocks holding whole tiles (``ALIGN`` 1) of p <= MAX_HELD *
    BLOCK_N rows, p / BLOCK_N, the tiles of w2 a program sees (the same ones in each of the a blocks along its
    loop); else 0 (and for fp32 activations, ``_may_hold``)."""
    if cfg["ALIGN"] != 1 or not _may_hold(act):
        return 0
    held = layout[2] // cfg["BLOCK_N"]
    return held if held <= MAX_HELD else 0


def gpu_config(kernel: str, act: torch.dtype, full: Sequence[int] = (0, 0)) -> dict:
    """Meta-parameters of ``kernel`` ("forward", "grad_x", "grad_factors") on a GPU, activations ``act``, for
    the factor kinds ``full`` (FULL1, FULL2) the kernel sees."""
    key = (kernel, act == torch.float32)
    cfg = dict(_CONFIGS[key])
    if full[0] and full[1] and key in _FULL_STAGES:
        cfg["num_stages"] = _FULL_STAGES[key]
    return cfg


def config(kernel: str, act: torch.dtype, full: Sequence[int] = (0, 0), layout: Sequence[int] | None = None) -> dict:
    """What the launchers use: ``gpu_config``, or 16 x 16 tiles under the interpreter; with the op's ``layout``,
    the variant: ``ALIGN`` (forward and dX, ``aligned``), ``SUM1`` (the factor gradients, ``sums_w1``)."""
    cfg = dict(_INTERPRET_CONFIG) if interpreting() else gpu_config(kernel, act, full)
    return cfg if layout is None else with_variant(cfg, kernel, act, layout)


def with_variant(cfg: dict, kernel: str, act: torch.dtype, layout: Sequence[int]) -> dict:
    """``cfg`` (a kernel's tiles) with the variant its launcher picks for ``layout``: ``SUM1`` (the factor
    gradients, ``sums_w1``), or ``ALIGN`` (forward and dX, ``aligned``), ``HELD`` (dX, ``held_tiles``) and the
    variant's ``BLOCK_M`` (``variant_block_m``). The cost model plans with it too."""
    if kernel == "grad_factors":
        cfg["SUM1"] = sums_w1(layout, cfg, act)
        return cfg
    cfg["ALIGN"] = aligned(kernel, layout, cfg)
    if kernel == "grad_x":
        cfg["HELD"] = held_tiles(layout, cfg, act)
    cfg["BLOCK_M"] = variant_block_m(cfg["BLOCK_M"], cfg["ALIGN"], cfg.get("HELD", 0))
    return cfg


# ALIGN 4 computes the factors' indices in int32 (``reciprocal_divmod``): each factor must span fewer than 2^31
# elements (they are at most the size of the weight's blocks; the launch checks it)
for _kernel in (_lycoris_forward_kernel, _lycoris_grad_x_kernel):
    declare_int32_operands(_kernel, "u1_ptr", "v1_ptr", "u2_ptr", "v2_ptr")

# ----------------------------------------------------------------------------------------------
# The factor layout
# ----------------------------------------------------------------------------------------------
# layout (static list of ints): [full1, full2, rdiv1, rmod1, cdiv1, cmod1, rdiv2, rmod2, cdiv2, cmod2]
# factors (tensors): factor 1's (F,) or (U, V), then factor 2's


def loha_layout(n: int, k: int) -> list[int]:
    """Both factors low rank, indexed by (n, k) directly."""
    return [0, 0, 1, n, 1, k, 1, n, 1, k]


def lokr_layout(w1_full: bool, w2_full: bool, p: int, q: int, a: int, c: int) -> list[int]:
    """delta = kron(w1 [a, c], w2 [p, q]): w1 at (n // p, k // q), w2 at (n % p, k % q)."""
    return [int(w1_full), int(w2_full), p, a, q, c, 1, p, 1, q]


def kron(layout: Sequence[int]) -> int:
    """1 for a LoKr layout (the kernels index w1 by quotients, w2 by remainders), 0 for LoHa's (n, k)."""
    return 0 if layout[2:6] == layout[6:10] and layout[2] == layout[4] == 1 else 1


def _split(factors: Sequence[torch.Tensor], layout: Sequence[int]):
    """((U1, V1 or None), (U2, V2 or None))."""
    n1 = 1 if layout[0] else 2
    f1, f2 = list(factors[:n1]), list(factors[n1:])
    if len(f2) != (1 if layout[1] else 2):
        raise ValueError(f"layout {list(layout)} expects {n1 + (1 if layout[1] else 2)} factors, got {len(factors)}")
    return (f1[0], f1[1] if n1 == 2 else None), (f2[0], f2[1] if not layout[1] else None)


def _maps(layout):
    return layout[2:6], layout[6:10]


def _rank(uv) -> int:
    return 0 if uv[1] is None else uv[0].shape[1]


def _strides(uv) -> tuple[int, int, int, int]:
    u, v = uv
    return (u.stride(0), u.stride(1), *((0, 0) if v is None else (v.stride(0), v.stride(1))))


def _ptrs(uv):
    return uv[0], uv[0] if uv[1] is None else uv[1]


# ----------------------------------------------------------------------------------------------
# The kernels' operands: formed factors, fp32 copies, the scale folded in (once per call, O(factors))
# ----------------------------------------------------------------------------------------------
# A LoKr factor stored low rank (w = U @ V, [rows, cols]) is formed whole, once per call, when it has at most
# FORM_LIMIT elements and at most 1 / FORM_SHARE of the delta's: the kernels then gather it (a FULL factor)
# instead of regenerating the rank-r product for every block of rows. LoHa's factors ([N, K]) never qualify.
FORM_LIMIT = 1 << 18
FORM_SHARE = 8


class Operands(NamedTuple):
    """What the kernels read for D = s * P1 * P2 (``prepare``)."""

    factors: list[torch.Tensor]  # factor 1's (F,) or (U, V), then factor 2's; every F in fp32, s folded in
    layout: list[int]  # the caller's layout with the formed factors marked full
    formed: tuple[bool, bool]  # factor f was (U, V) and is formed here as F = U @ V
    folded: int  # index in ``factors`` of the tensor that carries s
    dot_dtype: torch.dtype  # the operands' dtype of the low-rank products' dots


def _formable(uv, rmap, n: int, k: int) -> bool:
    size = rmap[1] * rmap[3]
    return uv[1] is not None and size <= FORM_LIMIT and size * FORM_SHARE <= n * k


def rounds_factors(factor_dtype: torch.dtype, dtype: torch.dtype | None) -> bool:
    """Whether ``prepare`` rounds factors of ``factor_dtype`` to the 16-bit weight ``dtype`` for the GEMMs (fp32
    factors on a 16-bit model), so that the factor gradients need their own ``prepare(..., exact=True)``."""
    return dtype in (torch.float16, torch.bfloat16) and factor_dtype != dtype


def prepare(factors: Sequence[torch.Tensor], layout: Sequence[int], scale: float, n: int, k: int,
            dtype: torch.dtype | None = None, exact: bool = False) -> Operands:
    """The kernels' operands for the delta of ``factors`` / ``layout`` on an [n, k] weight of ``dtype``: small
    low-rank LoKr factors formed whole (F = U @ V in fp32), every full factor as an fp32 copy, and s folded into
    one tensor (the first full factor, else factor 1's U, in the dtype the kernels read it in): the kernels compute
    W + P1 * P2 with one FMA per element and never multiply by s. Extra memory: the factors' size, never [n, k].

    16-bit ``dtype`` (the GEMMs' W + D, rounded to that dtype before the dot): the low-rank factors are read in it
    (fp32 factors, PEFT's default on a 16-bit model, rounded once here: their rank-r dots run on the tensor cores
    natively, not in 3xTF32), and when both factors end up full they are kept in it too, so the FMA runs in it
    (paired 16-bit FMAs, no widening of W). With ``exact`` (the factor-gradient kernel) factors of another dtype
    keep their own precision: fp32 factors are read as fp32 and their gradients computed from them."""
    f1, f2 = _split(factors, layout)
    m1, m2 = _maps(layout)
    own = factors[0].dtype
    narrow = dtype in (torch.float16, torch.bfloat16) and not (exact and rounds_factors(own, dtype))
    kinds, formed = [], []
    for uv, rmap in ((f1, m1), (f2, m2)):
        form = _formable(uv, rmap, n, k)
        formed.append(form)
        if form:
            kinds.append([uv[0].float() @ uv[1].float()])
        else:
            kinds.append([t for t in uv if t is not None])
    full = [len(f) == 1 for f in kinds]
    keep = narrow and full[0] and full[1]
    target = 0 if full[0] or not full[1] else 1  # a full factor if there is one, else factor 1's U
    for i, kind in enumerate(kinds):
        want = (dtype if keep else torch.float32) if full[i] else (dtype if narrow else own)
        kinds[i] = [t.to(want) for t in kind]
    kinds[target][0] = kinds[target][0] * scale
    dot_dtype = next((kind[0].dtype for kind, f in zip(kinds, full) if not f), own)
    folded = 0 if target == 0 else len(kinds[0])
    out_layout = [int(full[0]), int(full[1]), *layout[2:]]
    return Operands(kinds[0] + kinds[1], out_layout, (formed[0], formed[1]), folded, dot_dtype)


def unprepare_grads(ops: Operands, factors: Sequence[torch.Tensor], layout: Sequence[int], scale: float,
                    grads: list) -> list:
    """fp32 gradients of the caller's ``factors`` from those of ``ops.factors`` (None stays None): s for the
    tensor that carries it, then dU = dF @ V^T, dV = U^T @ dF for a formed factor (small torch matmuls)."""
    grads = list(grads)
    if grads[ops.folded] is not None:
        grads[ops.folded] = grads[ops.folded] * scale
    f1, f2 = _split(factors, layout)
    n1 = 1 if ops.layout[0] else 2
    out = []
    for uv, g, formed in ((f1, grads[:n1], ops.formed[0]), (f2, grads[n1:], ops.formed[1])):
        if not formed:
            out += g
        elif g[0] is None:
            out += [None, None]
        else:
            out += [g[0] @ uv[1].float().t(), uv[0].float().t() @ g[0]]
    return out


# ----------------------------------------------------------------------------------------------
# Launchers (2-D operands, any strides)
# ----------------------------------------------------------------------------------------------
def aligned(kernel: str, layout: Sequence[int], cfg: dict) -> int:
    """The ``ALIGN`` variant ``kernel`` runs: for LoKr with both factors full (after ``prepare``: the usual LoKr,
    w2 formed), 1 when its blocks hold whole tiles (p % BLOCK_N == 0, q % BLOCK_K == 0), so a tile sees one value
    of w1 and a contiguous tile of w2; 2 when they do only along the kernel's loop (the forward's K: q % BLOCK_K
    == 0; dX's N: p % BLOCK_N == 0; e.g. GQA's k/v projections, N = 1024 = 32 x 32 in the forward's 64-row tiles),
    the other direction's block indices computed once per program; 3 when the blocks along the loop are larger than
    the tile but not a multiple of it (a 5120-wide layer: blocks of 80), the same with the tile's offsets past a
    block's end moved to the next block; 4 when they are smaller than the tile along the loop (a 576-wide layer's
    blocks of 24), the general variant with each index's block and offset from an fp32 reciprocal and one
    correction (``reciprocal_divmod``, N and K up to ``DIVMOD_LIMIT``); else 0, the general variant's integer
    division per index. Never for LoHa (nothing to divide) or the factor-gradient kernel (its tile's factors are
    read once); a factor left low rank keeps the general variant."""
    if kernel not in ("forward", "grad_x") or not kron(layout) or not (layout[0] and layout[1]):
        return 0
    rows, cols = layout[2] % cfg["BLOCK_N"] == 0, layout[4] % cfg["BLOCK_K"] == 0
    if rows and cols:
        return 1
    if cols if kernel == "forward" else rows:
        return 2
    if layout[4] >= cfg["BLOCK_K"] if kernel == "forward" else layout[2] >= cfg["BLOCK_N"]:
        return 3
    # blocks smaller than the tiles: the general variant, its divisions as fp32 reciprocals (exact below 2^22)
    return 4 if max(layout[2] * layout[3], layout[4] * layout[5]) <= DIVMOD_LIMIT else 0


def _may_sum1(act: torch.dtype, w2_full: bool) -> bool:
    """Whether the factor-gradient kernel's SUM1 variant is built for activations ``act`` and w2's kind (fp32
    activations with w2 left low rank spill 8 bytes on sm_90, the compile report)."""
    return w2_full or act != torch.float32


def sums_w1(layout: Sequence[int], cfg: dict, act: torch.dtype) -> bool:
    """The factor-gradient kernel's ``SUM1``: LoKr with w1 full and blocks of whole tiles (p a multiple of BLOCK_N,
    q of BLOCK_K), so each tile is one value of w1 and its contribution to w1's gradient one sum. Not for fp32
    activations with w2 left low rank (``_may_sum1``)."""
    if not _may_sum1(act, bool(layout[1])):
        return False
    return bool(kron(layout) and layout[0] and layout[2] % cfg["BLOCK_N"] == 0 and layout[4] % cfg["BLOCK_K"] == 0)


def factor_precision(act: torch.dtype, operand: torch.dtype) -> str:
    """``input_precision`` of the rank-r dots on ``operand``-dtype factors in a model of dtype ``act``:
    ``dot_precision``'s, except fp32 factors on a 16-bit model (the factor-gradient kernel's ``exact`` operands):
    TF32 (operands rounded to 10 mantissa bits, fp32 sums; 3xTF32 spills registers in that kernel on sm_80 to
    sm_89, the compile report)."""
    if act != torch.float32 and operand == torch.float32:
        return "tf32"
    return dot_precision(act, operand)


def _common(ops: Operands):
    f1, f2 = _split(ops.factors, ops.layout)
    m1, m2 = _maps(ops.layout)
    consts = dict(FULL1=bool(ops.layout[0]), FULL2=bool(ops.layout[1]), KRON=kron(ops.layout))
    return (*_ptrs(f1), *_ptrs(f2)), (_rank(f1), _rank(f2), *m1, *m2), (*_strides(f1), *_strides(f2)), consts


def launch_forward(x2, weight, bias, ops: Operands):
    """y = x2 @ (weight + D)^T + bias [M, N] in x2's dtype (D from ``ops = prepare(...)``)."""
    M, K = x2.shape
    N = weight.shape[0]
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    cfg = config("forward", x2.dtype, ops.layout[:2], ops.layout)
    ptrs, scalars, strides, consts = _common(ops)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    launch(_lycoris_forward_kernel, grid,
           x2, weight, weight if bias is None else bias, *ptrs, y, M, N, K, *scalars,
           x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), *strides, y.stride(0), y.stride(1),
           HAS_BIAS=bias is not None, BASE_PRECISION=dot_precision(x2.dtype),
           DELTA_PRECISION=factor_precision(x2.dtype, ops.dot_dtype), **consts, **cfg)
    return y


def launch_grad_x(dy2, weight, ops: Operands):
    """dX = dy2 @ (weight + D) [M, K] in dy2's dtype."""
    M, N = dy2.shape
    K = weight.shape[1]
    dx = torch.empty(M, K, dtype=dy2.dtype, device=dy2.device)
    cfg = config("grad_x", dy2.dtype, ops.layout[:2], ops.layout)
    ptrs, scalars, strides, consts = _common(ops)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
    launch(_lycoris_grad_x_kernel, grid,
           dy2, weight, *ptrs, dx, M, N, K, *scalars,
           dy2.stride(0), dy2.stride(1), weight.stride(0), weight.stride(1), *strides, dx.stride(0), dx.stride(1),
           BASE_PRECISION=dot_precision(dy2.dtype), DELTA_PRECISION=factor_precision(dy2.dtype, ops.dot_dtype),
           **consts, **cfg)
    return dx


def launch_grad_factors(dy2, x2, ops: Operands, need1: bool, need2: bool):
    """fp32 gradients of the kernels' factors ``ops.factors`` (None where not needed); ``unprepare_grads``
    turns them into the caller's."""
    f1, f2 = _split(ops.factors, ops.layout)
    M, N = dy2.shape
    K = x2.shape[1]
    grads = []
    for uv, need in ((f1, need1), (f2, need2)):
        for t in uv:
            if t is not None:
                grads.append(torch.zeros(t.shape, dtype=torch.float32, device=t.device) if need else None)
    g1 = grads[:1 if ops.layout[0] else 2]
    g2 = grads[len(g1):]

    def gptrs(g, uv):
        if g[0] is None:  # not needed: any pointer (never dereferenced)
            return (uv[0], uv[0]), (0, 0, 0, 0)
        v = g[1] if len(g) == 2 else g[0]
        return (g[0], v), (g[0].stride(0), g[0].stride(1), v.stride(0), v.stride(1))

    (gp1, gs1), (gp2, gs2) = gptrs(g1, f1), gptrs(g2, f2)
    cfg = config("grad_factors", dy2.dtype, ops.layout[:2], ops.layout)
    ptrs, scalars, strides, consts = _common(ops)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
    launch(_lycoris_grad_factors_kernel, grid,
           dy2, x2, *ptrs, *gp1, *gp2, M, N, K, *scalars,
           dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), *strides, *gs1, *gs2,
           NEED1=need1, NEED2=need2, BASE_PRECISION=dot_precision(dy2.dtype),
           DELTA_PRECISION=factor_precision(dy2.dtype, ops.dot_dtype), **consts, **cfg)
    return grads


# ----------------------------------------------------------------------------------------------
# PyTorch reference (the CPU backend and the blocked oracle): blocks of output rows
# ----------------------------------------------------------------------------------------------
def _block_rows(n: int, k: int, layout) -> int:
    align = 1 if layout[2] == 1 else layout[2]  # LoKr: whole rows of w1 per block
    rows = max(align, BLOCK_ELEMENTS // max(1, k) // align * align)
    return min(rows, n)


def _p_rows(uv, rmap, r0, r1, k):
    """P[r0:r1, :k] (the factor expanded to the delta's rows r0:r1), in the factors' dtype."""
    rdiv, rmod, cdiv, cmod = rmap
    rows = torch.div(torch.arange(r0, r1, device=uv[0].device), rdiv, rounding_mode="floor") % rmod
    cols = torch.div(torch.arange(k, device=uv[0].device), cdiv, rounding_mode="floor") % cmod
    u, v = uv
    if v is None:
        return u[rows][:, cols]
    return u[rows] @ v[:, cols]


def _delta_rows(f1, f2, layout, scale, r0, r1, k):
    m1, m2 = _maps(layout)
    p1, p2 = _p_rows(f1, m1, r0, r1, k), _p_rows(f2, m2, r0, r1, k)
    return p1, p2, p1 * p2 * scale


def _accumulate_factor(grads, uv, rmap, dp, r0, r1, k):
    """Adds dP (the gradient of P[r0:r1, :k]) into the factor's gradients (index_add_ over repeated rows/cols)."""
    rdiv, rmod, cdiv, cmod = rmap
    dev = dp.device
    rows = torch.div(torch.arange(r0, r1, device=dev), rdiv, rounding_mode="floor") % rmod
    cols = torch.div(torch.arange(k, device=dev), cdiv, rounding_mode="floor") % cmod
    u, v = uv
    if v is None:
        gu = torch.zeros(dp.shape[0], u.shape[1], dtype=dp.dtype, device=dev).index_add_(1, cols, dp)
        grads[0].index_add_(0, rows, gu)
        return
    vg = v[:, cols].to(dp.dtype)
    grads[0].index_add_(0, rows, dp @ vg.t())
    grads[1].index_add_(1, cols, u[rows].to(dp.dtype).t() @ dp)


def forward_reference(x2, weight, bias, factors, layout, scale):
    f1, f2 = _split(factors, layout)
    N, K = weight.shape
    rows = _block_rows(N, K, layout)
    if rows >= N:
        return F.linear(x2, weight + _delta_rows(f1, f2, layout, scale, 0, N, K)[2].to(weight.dtype), bias)
    y = x2.new_empty(x2.shape[0], N)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        d = _delta_rows(f1, f2, layout, scale, r0, r1, K)[2].to(weight.dtype)
        y[:, r0:r1] = F.linear(x2, weight[r0:r1] + d, None if bias is None else bias[r0:r1])
    return y


def backward_reference(dy2, x2, weight, factors, layout, scale, need_x, need1, need2):
    """(dX or None, fp32 factor gradients like launch_grad_factors)."""
    f1, f2 = _split(factors, layout)
    m1, m2 = _maps(layout)
    N, K = weight.shape
    rows = _block_rows(N, K, layout)
    dx = torch.zeros_like(x2) if need_x else None
    g1 = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) if need1 else None for t in f1 if t is not None]
    g2 = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) if need2 else None for t in f2 if t is not None]
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        p1, p2, d = _delta_rows(f1, f2, layout, scale, r0, r1, K)
        g = dy2[:, r0:r1]
        if need_x:
            dx += g @ (weight[r0:r1] + d.to(weight.dtype))
        if need1 or need2:
            dd = (g.t() @ x2).float() * scale  # the block of dD, times s
            if need1:
                _accumulate_factor(g1, f1, m1, dd * p2.float(), r0, r1, K)
            if need2:
                _accumulate_factor(g2, f2, m2, dd * p1.float(), r0, r1, K)
    return dx, [*g1, *g2]


# ----------------------------------------------------------------------------------------------
# The op's declaration (kernels/opdecl.py)
# ----------------------------------------------------------------------------------------------
def _op_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, factors: list[torch.Tensor],
                layout: list[int], scale: float, *, hint=None) -> torch.Tensor:
    """y [..., N]. hint (eager): the backend already chosen (True: Triton)."""
    on_triton = use_triton(x, weight, *factors) if hint is None else hint
    x2 = as_2d(x)
    if on_triton and x2.shape[0] > 0:
        y2 = launch_forward(x2, weight, bias, prepare(factors, layout, scale, *weight.shape, weight.dtype))
    else:
        y2 = forward_reference(x2, weight, bias, factors, layout, scale)
    return y2.view(*x.shape[:-1], weight.shape[0])


def _op_save(args, outputs) -> list:
    x, weight, _bias, factors, _layout, _scale = args
    return [x, weight, *factors]  # references: nothing new is allocated


def _op_backward(saved, grads, needs, statics, *, hint=None) -> list:
    """Gradients of (x, weight (frozen: None), bias, factors...)."""
    x, weight, *factors = saved
    layout, scale = statics
    dy = grads[0]
    on_triton = use_triton(dy, x, weight, *factors) if hint is None else hint
    n1 = 1 if layout[0] else 2
    need_f = needs[3:]
    need1, need2 = any(need_f[:n1]), any(need_f[n1:])
    dy2, x2 = as_2d(dy), as_2d(x)
    if on_triton and dy2.shape[0] > 0:
        ops = prepare(factors, layout, scale, *weight.shape, weight.dtype)
        dx = launch_grad_x(dy2, weight, ops) if needs[0] else None
        fgrads = [None] * len(factors)
        if need1 or need2:
            if rounds_factors(factors[0].dtype, weight.dtype):  # the gradients from the factors as they are
                ops = prepare(factors, layout, scale, *weight.shape, weight.dtype, exact=True)
            fgrads = unprepare_grads(ops, factors, layout, scale, launch_grad_factors(dy2, x2, ops, need1, need2))
    else:
        dx, fgrads = backward_reference(dy2, x2, weight, factors, layout, scale, needs[0], need1, need2)
    dbias = dy2.sum(0, dtype=torch.float32).to(dy2.dtype) if needs[2] else None
    out = [None if g is None or not n else g.to(f.dtype) for g, f, n in zip(fgrads, factors, need_f)]
    return [dx.view(x.shape) if dx is not None else None, None, dbias, *out]


def _op_fake(x, weight, bias, factors, layout, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _op_backward_fake(saved, grads, needs, statics) -> list:
    x, _weight, *factors = saved
    dy = grads[0]
    return [x.new_empty(x.shape) if needs[0] else None, None, dy.new_empty(dy.shape[-1]) if needs[2] else None,
            *(f.new_empty(f.shape) if n else None for f, n in zip(factors, needs[3:]))]


# the op, declared once: peftfast::lycoris_linear (+ fake, backward op, autograd) and the eager path
LYCORIS_LINEAR = OpDecl("peftfast::lycoris_linear", _op_forward, _op_backward, save=_op_save, fake=_op_fake,
                        backward_fake=_op_backward_fake)


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------
def _check(x, weight, bias, factors, name):
    if records_weight_grad(weight):
        raise ValueError(f"{name} needs a frozen base weight (weight.requires_grad=False) while autograd records")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., d_in] and weight [d_out, d_in] must agree on d_in; got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [d_out={weight.shape[0]}] in x's dtype {x.dtype} or None, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must have x's dtype {x.dtype} (as F.linear requires), got {weight.dtype}")
    dtypes = {f.dtype for f in factors}
    if len(dtypes) != 1:
        raise ValueError(f"{name}'s factors must share one dtype, got {sorted(map(str, dtypes))}")
    for f in factors:
        if f.dim() != 2 or f.device != x.device:
            raise ValueError(f"{name}'s factors must be 2-D tensors on x's device {x.device}, got "
                             f"{tuple(f.shape)} on {f.device}")


def _call(x, weight, bias, factors, layout, scale):
    if torch.compiler.is_compiling():
        return LYCORIS_LINEAR(x, weight, bias, factors, layout, float(scale))
    return LYCORIS_LINEAR(x, weight, bias, factors, layout, float(scale),
                          hint=use_triton(x, weight, *factors))


def loha_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w1a: torch.Tensor,
                w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float) -> torch.Tensor:
    """``F.linear(x, weight + scale * (w1a @ w1b) * (w2a @ w2b), bias)`` without forming the delta.

    weight [N, K] frozen in x's dtype; w1a [N, r1], w1b [r1, K], w2a [N, r2], w2b [r2, K] (one dtype).
    Gradients flow to x, bias and every factor that requires grad."""
    factors = [w1a, w1b, w2a, w2b]
    _check(x, weight, bias, factors, "loha_linear")
    N, K = weight.shape
    if w1a.shape[0] != N or w2a.shape[0] != N or w1b.shape[1] != K or w2b.shape[1] != K \
            or w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0]:
        raise ValueError(f"loha_linear: factors must be w1a [N={N}, r1], w1b [r1, K={K}], w2a [N, r2], w2b [r2, K]; "
                         f"got {[tuple(f.shape) for f in factors]}")
    return _call(x, weight, bias, factors, loha_layout(N, K), scale)


def lokr_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w1: Sequence[torch.Tensor],
                w2: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
    """``F.linear(x, weight + scale * kron(W1, W2), bias)`` without forming the delta.

    w1: (lokr_w1 [a, c],) or (w1_a [a, r], w1_b [r, c]); w2: (lokr_w2 [p, q],) or (w2_a [p, r], w2_b [r, q]);
    weight [N = a * p, K = c * q] frozen in x's dtype. Gradients flow to x, bias and every factor that
    requires grad."""
    w1, w2 = list(w1), list(w2)
    if len(w1) not in (1, 2) or len(w2) not in (1, 2):
        raise ValueError("lokr_linear: w1 and w2 are each (full,) or (a, b) of a low-rank product")
    factors = w1 + w2
    _check(x, weight, bias, factors, "lokr_linear")
    a, c = w1[0].shape[0], w1[-1].shape[1]
    p, q = w2[0].shape[0], w2[-1].shape[1]
    N, K = weight.shape
    ok = a * p == N and c * q == K and (len(w1) == 1 or w1[0].shape[1] == w1[1].shape[0]) \
        and (len(w2) == 1 or w2[0].shape[1] == w2[1].shape[0])
    if not ok:
        raise ValueError(f"lokr_linear: kron(w1 [a, c], w2 [p, q]) must be weight's shape {(N, K)}; got factors "
                         f"{[tuple(f.shape) for f in factors]}")
    return _call(x, weight, bias, factors, lokr_layout(len(w1) == 1, len(w2) == 1, p, q, a, c), scale)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# ----------------------------------------------------------------------------------------------
_ACTS = (torch.float16, torch.bfloat16, torch.float32)
# (full1, full2, kron) the kernels see (after prepare): LoHa (0, 0, 0); LoKr with its small factors formed, the
# usual case (1, 1, 1); LoKr's full w1 with a w2 too large to form (1, 0, 1); both too large (0, 0, 1)
_FACTOR_KINDS = ((0, 0, 0), (1, 1, 1), (1, 0, 1), (0, 0, 1))


def aot_specs() -> list[AotSpec]:
    kernels = (
        ("forward", _lycoris_forward_kernel,
         {"x_ptr": "a", "w_ptr": "a", "bias_ptr": "a", "y_ptr": "a"}, ("HAS_BIAS",)),
        ("grad_x", _lycoris_grad_x_kernel, {"dy_ptr": "a", "w_ptr": "a", "dx_ptr": "a"}, ()),
        ("grad_factors", _lycoris_grad_factors_kernel, {"dy_ptr": "a", "x_ptr": "a", "gu1_ptr": "fp32",
                                                        "gv1_ptr": "fp32", "gu2_ptr": "fp32", "gv2_ptr": "fp32"},
         ()),
    )
    specs = []
    for act in _ACTS:
        for kname, fn, ptrs, flags in kernels:
            for full1, full2, kr in _FACTOR_KINDS:
                for align in ((0, 1, 2, 3, 4) if full1 and full2 and kname != "grad_factors" else (0,)):
                    # fp32 factors on a 16-bit model: the factor gradients read them as fp32 (prepare, exact)
                    for wide in ((False, True) if kname == "grad_factors" and act != torch.float32 else (False,)):
                        held_ok = kname == "grad_x" and align == 1 and _may_hold(act)
                        for held in range(MAX_HELD + 1) if held_ok else (0,):
                            specs.append(_aot_spec(kname, fn, ptrs, flags, act, full1, full2, kr, align, wide, held))
                        if kname == "grad_factors" and full1 and kr and _may_sum1(act, bool(full2)):
                            # w1's gradient summed per tile (``sums_w1``)
                            specs.append(_aot_spec(kname, fn, ptrs, flags, act, full1, full2, kr, 0, wide, 0, True))
    return specs


def _aot_spec(kname, fn, ptrs, flags, act, full1, full2, kr, align, wide, held=0, sum1=False) -> AotSpec:
    an = DTYPE_NAMES[act]
    cfg = gpu_config(kname, act, (full1, full2))
    cfg["BLOCK_M"] = variant_block_m(cfg["BLOCK_M"], align, held)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    extra = {"HAS_BIAS": True} if flags else {}
    if kname == "grad_factors":
        extra = {"NEED1": True, "NEED2": True, "SUM1": sum1}
    else:  # DELTA: as launched (its default; left out, the signature would make it an i32 argument)
        extra.update(ALIGN=align, DELTA=True)
    if kname == "grad_x":
        extra["HELD"] = held
    factor = torch.float32 if wide else act
    consts = dict(FULL1=bool(full1), FULL2=bool(full2), KRON=kr, BASE_PRECISION=dot_precision(act),
                  DELTA_PRECISION=factor_precision(act, factor), **cfg, **extra)
    types = {k: "*" + (an if v == "a" else v) for k, v in ptrs.items()}
    # a full factor is read as its fp32 copy next to a low-rank one, in the 16-bit weight's dtype when both are
    # full (prepare); a low-rank one in the activations' dtype; every factor in fp32 with ``wide``
    full_type = an if full1 and full2 and act != torch.float32 and not wide else "fp32"
    low_type = "fp32" if wide else an
    types.update({f"{p}{i}_ptr": "*" + (full_type if full else low_type)
                  for i, full in ((1, full1), (2, full2)) for p in ("u", "v")})
    sig = aot_signature(fn, types, consts)
    name = (f"lycoris_{kname}[x={an},full={full1}{full2},kron={kr},"
            f"{','.join(f'{k}={v}' for k, v in cfg.items())},stages={stages}"
            f"{f',align={align}' if align else ''}{f',held={held}' if held else ''}{',sum1' if sum1 else ''}"
            f"{',factors=fp32' if wide else ''}]")
    return AotSpec(name, fn, sig, consts, warps, stages, True)
