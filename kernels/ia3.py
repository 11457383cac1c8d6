"""IA3: a learned per-feature scale riding inside the base layer's matmul.

Math (PEFT's IA3, x: [M, K], W: [N, K], bias b: [N], scale s: [K] or [N]):

    feedforward:      y = ((x * s) as x.dtype) @ W^T + b          s: [K]   (scale the input)
    not feedforward:  y = (x @ W^T + b) * s                       s: [N]   (scale the output)

Backward (dY: [M, N]):

    feedforward:      G  = dY @ W                 [M, K]
                      dX = G * s,   ds = sum_m G * x,   dW = dY^T @ (x * s),   db = sum_m dY
    not feedforward:  dZ = dY * s                 [M, N]
                      dX = dZ @ W,  ds = sum_m dY * z = (sum_m dY * y) / s,
                      dW = dZ^T @ x,   db = sum_m dZ

Blocked algorithm: one grouped-tile matmul kernel C = P @ Q with constexpr options, fp32
accumulation, one cast on store:

    SCALE_K:     P tile * s[k] in the prologue (rounded to the operand dtype, as PEFT does)
    HAS_BIAS:    + b[n] in the epilogue
    REDUCE_AUX:  partial[pid_m, n] = sum over the tile's rows of acc * aux (a column reduction)
    SCALE_N:     acc * s[n] in the epilogue

    feedforward forward:   P = x,  Q = W^T, SCALE_K (+ HAS_BIAS)
    output-scale forward:  P = x,  Q = W^T, HAS_BIAS, SCALE_N
    feedforward backward:  P = dY, Q = W,   REDUCE_AUX (aux = x -> ds), SCALE_N (-> dX)
    output-scale backward: P = dY, Q = W,   SCALE_K (-> dX); ds from the elementwise kernel

dW and db (only when they require grad) use torch matmuls (cuBLAS on CUDA). The feedforward
backward writes dX even when only ds is needed (x frozen): the reduction rides on that matmul.
fp32 operands use 3xTF32 dots (~fp32 accuracy); tiles are sized so that no variant spills on
sm_80..sm_90 even with operands that are not 16-byte aligned.

Memory saved for backward: feedforward: x (the input; no x * s copy, no fp32 copy of a 16-bit x);
output scale: y (the op's own output, which the next layer usually keeps anyway; modifying it in
place before backward raises autograd's version error) when s needs a gradient, and x only when
W needs one. z = x @ W^T + b is never kept: ds uses y / s, so a scale entry that is exactly 0
gets gradient 0 (its column of z is lost in y; IA3 vectors start at 1).

CPU (the reference path): PEFT's own two ops under plain autograd (no autograd.Function around
them), so the same cost, the same saved tensors and the same gradients as PEFT, including the
gradient of a scale entry that is exactly 0.

Declared once each (``IA3_LINEAR``, ``IA3_SCALE``; kernels/opdecl.py): the custom ops
``peftfast::ia3_linear`` / ``peftfast::ia3_scale`` and the eager autograd paths come from one
forward and one backward.

``ia3_scale_output(y, s)`` / ``ia3_scale_input(x, s)`` are the elementwise versions for base
layers that are not linears: out = (in * s) in the input dtype; din = dout * s; ds = sum dout * in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .aot import AotSpec
from .opdecl import OpDecl
from .runtime import DTYPE_NAMES, aot_signature, as_2d, dot_precision, launch, use_triton

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ia3_matmul_kernel(
    p_ptr,  # [M, K] left operand (x or dY)
    q_ptr,  # [K, N] right operand (W^T or W as strides), dtype = dot dtype
    c_ptr,  # [M, N] output
    scale_ptr,  # [K] (SCALE_K) or [N] (SCALE_N) IA3 scale
    bias_ptr,  # [N] bias (HAS_BIAS)
    aux_ptr,  # [M, N] second factor of the column reduction (REDUCE_AUX)
    partial_ptr,  # [cdiv(M, BLOCK_M), N] fp32 column sums of acc * aux (REDUCE_AUX)
    M, N, K,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_cm, stride_cn, stride_auxm, stride_auxn,
    SCALE_K: tl.constexpr, SCALE_N: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE_AUX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped ordering: GROUP_M row blocks share each column block of Q while it is in L2
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # rows/columns past the edge wrap onto valid ones for the loads (their results are never
    # stored), so the main loop only masks K: fewer predicate registers
    p_ptrs = p_ptr + (offs_m % M)[:, None] * stride_pm + offs_k[None, :] * stride_pk
    q_ptrs = q_ptr + offs_k[:, None] * stride_qk + (offs_n % N)[None, :] * stride_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k + k0 < K
        p = tl.load(p_ptrs, mask=mask_k[None, :], other=0.0)
        if SCALE_K:
            s = tl.load(scale_ptr + offs_k + k0, mask=mask_k, other=0.0)
            p = p.to(scale_ptr.dtype.element_ty).to(tl.float32) * s.to(tl.float32)[None, :]
        q = tl.load(q_ptrs, mask=mask_k[:, None], other=0.0)
        acc = tl.dot(p.to(q_ptr.dtype.element_ty), q, acc, input_precision=DOT_PRECISION)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if REDUCE_AUX:
        aux = tl.load(aux_ptr + offs_m[:, None] * stride_auxm + offs_n[None, :] * stride_auxn,
                      mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        aux = aux.to(scale_ptr.dtype.element_ty).to(tl.float32)
        tl.store(partial_ptr + pid_m * N + offs_n, tl.sum(acc * aux, axis=0), mask=mask_n)
    if SCALE_N:
        acc *= tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _ia3_scale_kernel(
    x_ptr,  # [M, N] input
    s_ptr,  # [N] scale
    y_ptr,  # [M, N] output (dtype of x)
    M, N,
    stride_xm, stride_xn, stride_ym, stride_yn,
    ROUND_TO_SCALE: tl.constexpr,  # x.to(s.dtype) first (ia3_scale_input), else exact upcast
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0)
    if ROUND_TO_SCALE:
        x = x.to(s_ptr.dtype.element_ty)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    y = x.to(tl.float32) * s[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ia3_scale_backward_kernel(
    dy_ptr,  # [M, N] incoming gradient
    x_ptr,  # [M, N] input of the scaling (or the saved output y for ds = sum dY * y / s)
    s_ptr,  # [N] scale
    dx_ptr,  # [M, N] gradient of the input (WRITE_DX)
    partial_ptr,  # [cdiv(M, BLOCK_M), N] fp32 column sums of dY * x
    M, N,
    stride_dym, stride_dyn, stride_xm, stride_xn, stride_dxm, stride_dxn,
    ROUND_TO_SCALE: tl.constexpr, WRITE_DX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                 mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0)
    if ROUND_TO_SCALE:
        x = x.to(s_ptr.dtype.element_ty)
    tl.store(partial_ptr + pid_m * N + offs_n, tl.sum(dy * x.to(tl.float32), axis=0), mask=mask_n)
    if WRITE_DX:
        s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_n[None, :] * stride_dxn,
                 (dy * s[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configurations (shared by the launchers and aot_specs)
# ----------------------------------------------------------------------------------------------
# by operand dtype: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); sized so that no
# variant spills on sm_80..sm_90 even when the operands are not 16-byte aligned
_MM_CFG = {
    torch.float16: (64, 128, 32, 8, 8, 4),
    torch.bfloat16: (64, 128, 32, 8, 8, 4),
    torch.float32: (128, 64, 32, 8, 8, 3),
}
_EW_CFG = (16, 128, 4)  # elementwise: BLOCK_M, BLOCK_N, num_warps


# ----------------------------------------------------------------------------------------------
# Launchers (2-D operands, any strides)
# ----------------------------------------------------------------------------------------------
def launch_ia3_matmul(p, q, scale, *, bias=None, aux=None, scale_k=False, scale_n=False, out_dtype):
    """C = [scale_k] P @ Q [+ bias] [* scale_n], and the column sums of (P @ Q) * aux when aux
    is given. p: [M, K]; q: [K, N] (any strides); returns (C, partial or None)."""
    M, K = p.shape
    N = q.shape[1]
    bm, bn, bk, group, warps, stages = _MM_CFG[q.dtype]
    c = torch.empty(M, N, dtype=out_dtype, device=p.device)
    partial = c
    if aux is not None:
        partial = torch.empty(triton.cdiv(M, bm), N, dtype=torch.float32, device=p.device)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    aux_t = aux if aux is not None else c
    launch(_ia3_matmul_kernel, grid,
        p, q, c, scale, bias if bias is not None else scale, aux_t, partial, M, N, K,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), c.stride(0), c.stride(1),
        aux_t.stride(0), aux_t.stride(1),
        SCALE_K=scale_k, SCALE_N=scale_n, HAS_BIAS=bias is not None, REDUCE_AUX=aux is not None,
        DOT_PRECISION=dot_precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group,
        num_warps=warps, num_stages=stages)
    return c, (partial if aux is not None else None)


def launch_ia3_scale(x2, s, round_to_scale):
    M, N = x2.shape
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    bm, bn, warps = _EW_CFG
    launch(_ia3_scale_kernel, (triton.cdiv(M, bm), triton.cdiv(N, bn)),
        x2, s, y, M, N, x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        ROUND_TO_SCALE=round_to_scale, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return y


def launch_ia3_scale_backward(dy2, x2, s, round_to_scale, write_dx):
    """(dx or None, fp32 column sums of dY * x)."""
    M, N = dy2.shape
    bm, bn, warps = _EW_CFG
    dx = torch.empty(M, N, dtype=x2.dtype, device=x2.device) if write_dx else dy2
    partial = torch.empty(triton.cdiv(M, bm), N, dtype=torch.float32, device=x2.device)
    launch(_ia3_scale_backward_kernel, (triton.cdiv(M, bm), triton.cdiv(N, bn)),
        dy2, x2, s, dx, partial, M, N, dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1),
        dx.stride(0), dx.stride(1), ROUND_TO_SCALE=round_to_scale, WRITE_DX=write_dx,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return (dx if write_dx else None), partial.sum(0)


# ----------------------------------------------------------------------------------------------
# ia3_linear: forward / backward for both backends
# ----------------------------------------------------------------------------------------------
def _linear_forward(x, weight, bias, s, feedforward):
    K = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    if x2.shape[0] > 0 and use_triton(x, weight, s):
        y2, _ = launch_ia3_matmul(x2, weight.t(), s, bias=bias, scale_k=feedforward, scale_n=not feedforward,
                               out_dtype=x.dtype)
    elif feedforward:
        y2 = F.linear((x2.to(s.dtype) * s).to(x.dtype), weight, bias)
    else:
        z = F.linear(x2, weight, bias)
        y2 = (z * s).to(z.dtype)
    return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], weight.shape[0])


def _linear_backward(dy, x, y, weight, s, feedforward, need_x, need_w, need_b, need_s):
    """(dx, dW, db, ds); None where not needed. x is needed for feedforward or dW, y for the
    output-scale ds."""
    N, K = weight.shape
    dy2 = dy.reshape(-1, N)
    x2 = x.reshape(-1, K) if x is not None and x.dim() > 0 and x.shape[-1] == K else None
    wide = torch.promote_types(dy.dtype, s.dtype)
    triton_path = dy2.shape[0] > 0 and use_triton(dy, weight, s)
    dx = dw = db = ds = None
    if feedforward:
        if need_x or need_s:
            if triton_path:
                dx, part = launch_ia3_matmul(dy2, weight, s, aux=x2 if need_s else None, scale_n=True,
                                          out_dtype=x2.dtype)
                ds = part.sum(0) if need_s else None
            else:
                g = (dy2 @ weight).to(wide)
                dx = (g * s).to(x2.dtype)
                ds = (g * x2.to(s.dtype)).sum(0) if need_s else None
        if need_w:
            dw = dy2.t() @ (x2.to(s.dtype) * s).to(x2.dtype)
        if need_b:
            db = dy2.sum(0)
    else:
        if need_x:
            if triton_path:
                dx, _ = launch_ia3_matmul(dy2, weight, s, scale_k=True, out_dtype=weight.dtype)
            else:
                dx = (dy2.to(wide) * s).to(weight.dtype) @ weight
        if need_s:
            y2 = y.reshape(-1, N)
            if triton_path:
                _, colsum = launch_ia3_scale_backward(dy2, y2, s, False, False)
            else:
                colsum = (dy2.float() * y2.float()).sum(0)
            ds = torch.where(s == 0, 0.0, colsum / s.float())
        if need_w or need_b:
            dz = (dy2.to(wide) * s).to(weight.dtype)
            dw = dz.t() @ x2 if need_w else None
            db = dz.sum(0) if need_b else None
    dx = dx.view(*dy.shape[:-1], K) if need_x else None
    return dx, dw, db, (None if ds is None else ds.to(s.dtype))


def _linear_op_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                       feedforward: bool, *, hint=None) -> torch.Tensor:
    return _linear_forward(x, weight, bias, scale, feedforward)


def _linear_op_save(args, outputs) -> list:
    """feedforward: x; output scale: y when s needs a gradient, x only when W needs one (module doc)."""
    x, weight, _bias, scale, feedforward = args
    keep_x = feedforward or weight.requires_grad
    keep_y = (not feedforward) and scale.requires_grad
    return [x if keep_x else None, outputs[0] if keep_y else None, weight, scale]


def _linear_op_backward(saved, grads, needs, statics, *, hint=None) -> list:
    """Gradients of (x, W, b, s)."""
    x, y, weight, s = saved
    nx, nw, nb, ns = needs
    dx, dw, db, ds = _linear_backward(grads[0], x, y, weight, s, statics[0], nx, nw, nb, ns)
    return [dx, dw, (db.to(weight.dtype) if db is not None else None), ds]


def _linear_op_fake(x, weight, bias, scale, feedforward):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_op_backward_fake(saved, grads, needs, statics) -> list:
    _x, _y, weight, s = saved
    dy = grads[0]
    shapes = ((*dy.shape[:-1], weight.shape[1]), weight.shape, weight.shape[:1], s.shape)
    dtypes = (dy.dtype, weight.dtype, weight.dtype, s.dtype)
    return [dy.new_empty(sh, dtype=dt) if need else None for sh, dt, need in zip(shapes, dtypes, needs)]


# the op, declared once: peftfast::ia3_linear (+ fake, backward op, autograd) and the eager path
IA3_LINEAR = OpDecl("peftfast::ia3_linear", _linear_op_forward, _linear_op_backward, save=_linear_op_save,
                    fake=_linear_op_fake, backward_fake=_linear_op_backward_fake)


def ia3_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
               feedforward: bool) -> torch.Tensor:
    """IA3 on a linear layer: y = linear(x * scale, W, b) (feedforward) or linear(x, W, b) * scale.

    x: [..., d_in]; weight: [d_out, d_in] (any strides, e.g. a Conv1D weight's .t()), same dtype
    as x; bias: [d_out] or None; scale: d_in (feedforward) or d_out values, any shape, usually
    fp32. Returns [..., d_out] in x's dtype. Gradients to x, scale, and weight/bias when they
    require grad.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [d_out, d_in], got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features but weight is [d_out={d_out}, d_in={d_in}]")
    if x.dtype != weight.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype, as for nn.Linear")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias must be [d_out={d_out}], got {tuple(bias.shape)}")
    want = d_in if feedforward else d_out
    if scale.numel() != want:
        raise ValueError(f"scale must have {want} values ({'d_in' if feedforward else 'd_out'}, "
                         f"feedforward={feedforward}), got shape {tuple(scale.shape)}")
    s = scale.reshape(want).contiguous()
    bias = None if bias is None else bias.contiguous()
    if not use_triton(x, weight, s):  # the reference path: PEFT's two ops under autograd, nothing around them
        return _linear_forward(x, weight, bias, s, bool(feedforward))
    return IA3_LINEAR(x, weight, bias, s, bool(feedforward))


# ----------------------------------------------------------------------------------------------
# Elementwise scaling (base layers that are not plain linears)
# ----------------------------------------------------------------------------------------------
def _scale_forward(x, s, round_to_scale):
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > 0 and use_triton(x, s):
        y2 = launch_ia3_scale(x2, s, round_to_scale)
    else:
        y2 = ((x2.to(s.dtype) if round_to_scale else x2) * s).to(x.dtype)
    return y2.view(x.shape)


def _scale_backward(dy, x, s, round_to_scale, need_x, need_s):
    N = x.shape[-1]
    dy2, x2 = dy.reshape(-1, N), x.reshape(-1, N)
    if dy2.shape[0] > 0 and use_triton(dy, x, s):
        dx, ds = launch_ia3_scale_backward(dy2, x2, s, round_to_scale, need_x)
    else:
        xs = x2.to(s.dtype) if round_to_scale else x2
        dyw = dy2.to(torch.promote_types(dy2.dtype, s.dtype))
        dx = (dyw * s).to(x.dtype) if need_x else None
        ds = (dyw * xs).sum(0)
    return (dx.view(x.shape) if dx is not None else None), (ds.to(s.dtype) if need_s else None)


def _scale_op_forward(x: torch.Tensor, scale: torch.Tensor, round_to_scale: bool, *, hint=None) -> torch.Tensor:
    return _scale_forward(x, scale, round_to_scale)


def _scale_op_backward(saved, grads, needs, statics, *, hint=None) -> list:
    x, s = saved
    return list(_scale_backward(grads[0], x, s, statics[0], needs[0], needs[1]))


def _scale_op_backward_fake(saved, grads, needs, statics) -> list:
    x, s = saved
    return [x.new_empty(x.shape) if needs[0] else None, s.new_empty(s.shape) if needs[1] else None]


IA3_SCALE = OpDecl("peftfast::ia3_scale", _scale_op_forward, _scale_op_backward, save=lambda args, outputs: list(args[:2]),
                   fake=lambda x, scale, round_to_scale: x.new_empty(x.shape), backward_fake=_scale_op_backward_fake)


def _scale(x: torch.Tensor, scale: torch.Tensor, round_to_scale: bool, name: str) -> torch.Tensor:
    n = x.shape[-1] if x.dim() else 1
    if scale.numel() != n:
        raise ValueError(f"{name}: scale must have one value per feature of the last dim ({n}), "
                         f"got shape {tuple(scale.shape)}")
    s = scale.reshape(n).contiguous()
    return IA3_SCALE(x, s, round_to_scale)


def ia3_scale_output(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(y * scale) in y's dtype; y: [..., d_out], scale: d_out values."""
    return _scale(y, scale, False, "ia3_scale_output")


def ia3_scale_input(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(x.to(scale.dtype) * scale) in x's dtype; x: [..., d_in], scale: d_in values."""
    return _scale(x, scale, True, "ia3_scale_input")


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# ----------------------------------------------------------------------------------------------
# (activation/weight dtype, scale dtype): PEFT keeps IA3 vectors in fp32 by default
_DTYPE_PAIRS = ((torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                (torch.float32, torch.float32), (torch.float16, torch.float16),
                (torch.bfloat16, torch.bfloat16))
# (name, SCALE_K, SCALE_N, HAS_BIAS, REDUCE_AUX, unit strides as launched)
_MM_MODES = (
    ("ff_fwd", True, False, False, False, ("stride_pk", "stride_qk")),
    ("ff_fwd_bias", True, False, True, False, ("stride_pk", "stride_qk")),
    ("out_fwd", False, True, False, False, ("stride_pk", "stride_qk")),
    ("out_fwd_bias", False, True, True, False, ("stride_pk", "stride_qk")),
    ("out_bwd_dx", True, False, False, False, ("stride_pk", "stride_qn")),
    ("ff_bwd_dx_ds", False, True, False, True, ("stride_pk", "stride_qn")),
)


def aot_specs() -> list[AotSpec]:
    specs = []
    ebm, ebn, ewarps = _EW_CFG
    for act, sd in _DTYPE_PAIRS:
        a, s = "*" + DTYPE_NAMES[act], "*" + DTYPE_NAMES[sd]
        tag = f"x={DTYPE_NAMES[act]},s={DTYPE_NAMES[sd]}"
        bm, bn, bk, group, warps, stages = _MM_CFG[act]
        for name, sk, sn, hb, ra, unit in _MM_MODES:
            types = {"p_ptr": a, "q_ptr": a, "c_ptr": a, "scale_ptr": s, "bias_ptr": a, "aux_ptr": a,
                     "partial_ptr": "*fp32"}
            consts = {"SCALE_K": sk, "SCALE_N": sn, "HAS_BIAS": hb, "REDUCE_AUX": ra,
                      "DOT_PRECISION": dot_precision(act), "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                      "GROUP_M": group, "stride_cn": 1, "stride_auxn": 1, **{u: 1 for u in unit}}
            specs.append(AotSpec(f"ia3_matmul[{name},{tag},BM={bm},BN={bn},BK={bk}]", _ia3_matmul_kernel,
                                 aot_signature(_ia3_matmul_kernel, types, consts), consts, warps, stages, True))
        for rnd in (False, True):
            types = {"x_ptr": a, "s_ptr": s, "y_ptr": a}
            consts = {"ROUND_TO_SCALE": rnd, "BLOCK_M": ebm, "BLOCK_N": ebn, "stride_xn": 1, "stride_yn": 1}
            specs.append(AotSpec(f"ia3_scale[{tag},round={int(rnd)}]", _ia3_scale_kernel,
                                 aot_signature(_ia3_scale_kernel, types, consts), consts, ewarps, 1, False))
            for wdx in (False, True):
                types = {"dy_ptr": a, "x_ptr": a, "s_ptr": s, "dx_ptr": a, "partial_ptr": "*fp32"}
                consts = {"ROUND_TO_SCALE": rnd, "WRITE_DX": wdx, "BLOCK_M": ebm, "BLOCK_N": ebn,
                          "stride_dyn": 1, "stride_xn": 1, "stride_dxn": 1}
                specs.append(AotSpec(f"ia3_scale_backward[{tag},round={int(rnd)},dx={int(wdx)}]",
                                     _ia3_scale_backward_kernel,
                                     aot_signature(_ia3_scale_backward_kernel, types, consts), consts,
                                     ewarps, 1, False))
    return specs
