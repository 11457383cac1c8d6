"""QLoRA: LoRA adapters fused into the quantised GEMMs of qmatmul.py (4-bit NF4/FP4 or row-wise int8 base).

Math (notation of kernels/lora.py and kernels/lora_fused.py; W = deq(W_packed) cast to x's dtype):

    t   = s' * drop(x) @ A^T                       [M, R]  lora.py's shrink kernel
    y   = x @ W^T + b + t @ B^T                    [M, N]  qmatmul's GEMM with HAS_LORA, one store
    G   = s' * dY @ B,  dB = dY^T @ t              [M, R], [N, R]  lora_fused.py's dY pass
    dX  = dY @ W + sum_i m_i * (G_i @ A_i)         [M, K]  qmatmul's dX GEMM with HAS_LORA,
    dA  = G^T @ drop(x)                            [R, K]  in the same kernel (LORA_DA)

``qlora_linear_fused`` is the same op over a bitsandbytes 4-bit weight (W = deq(W_packed) in x's
dtype, as ``qmatmul.matmul_4bit``) or a row-wise int8 one (``Int8Weight``: W = CB * SCB / 127, as
``qmatmul.matmul_int8``): the y and dX kernels are qmatmul's quantised GEMMs with their HAS_LORA
loop (W dequantised tile by tile in registers, never stored), the dX kernel also computing dA
(LORA_DA; for 4-bit the aligned layout); the forward keeps lora.py's separate shrink launch; the
dY pass is shared with the dense path. Saved: x, t and the packed tensors (already resident).
Modelled (same shape, NF4 blocksize 64, fp32 adapters, dropout 0.1, H100) against the bf16 base
GEMM alone: forward 1.070 (1.078 with 3 us per launch), backward 1.099 (1.107). Its CPU path
dequantises W, runs the dense reference and frees W (recomputed in backward for dX).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import lora as L
from . import lora_fused as LF
from . import qmatmul as Q
from .adapters import adapter_grads, adapter_table, cat_a, cat_b, check_adapters, make_plan
from .aot import AotSpec
from .dropout import check_p, draw_seed
from .quant import Packed4bit, check_int8, check_packed4bit, dequantize_4bit_torch, dequantize_int8_reference
from .runtime import as_2d, dot_precision, use_triton


# Same math with W = deq(W_packed) cast to x's dtype (as matmul_4bit): the shrink, the dY pass and
# dA are lora_fused.py's / lora.py's kernels; the base forward and dX are qmatmul's _matmul_4bit_kernel
# with HAS_LORA, which dequantises W tile by tile and then adds t @ B^T (forward) or the masked
# sum_i G_i @ A_i (dX) into the same fp32 accumulator: y and dX are each stored once, and no
# [N, K] weight is ever materialised. Saved for backward: x, t and the packed tensors.
class Int8Weight(NamedTuple):
    """A bitsandbytes row-wise int8 weight: W = CB * SCB[:, None] / 127 (CB int8 [N, K], SCB fp32 [N])."""

    cb: torch.Tensor
    scb: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.cb.shape)


def _q_gemm(a, p, bias, transpose, lora=None, lora_x=None):
    """The quantised GEMM of qmatmul.py for a 4-bit (Packed4bit) or int8 (Int8Weight) weight."""
    if isinstance(p, Int8Weight):
        return Q.matmul_int8_triton(a, p.cb, p.scb, bias, transpose=transpose, lora=lora, lora_x=lora_x)
    return Q.matmul_4bit_triton(a, p, bias, transpose=transpose, lora=lora, lora_x=lora_x)


def _q_dense(p, dtype):
    """The weight dequantised into ``dtype`` (the CPU path; freed by the caller after use)."""
    if isinstance(p, Int8Weight):
        return dequantize_int8_reference(p.cb, p.scb, dtype)
    return dequantize_4bit_torch(p).to(dtype)


def _q_forward_triton(x2, p, bias, weights_a, weights_b, plan, seed):
    t = L.launch_shrink(x2, cat_a(weights_a), plan, seed, plan.dropout)
    b = cat_b(weights_b)
    lora = (t, b, adapter_table(plan, x2.device), 0, False, dot_precision(x2.dtype, b.dtype))
    return _q_gemm(x2, p, bias, True, lora), t


def _q_backward_triton(dy2, x2, t, p, weights_a, weights_b, plan, seed, need_x, need_a, need_b):
    def grad_x(g, a, xa):  # the quantised dX kernel with the adapter term (and dA)
        lora = (g, a, adapter_table(plan, dy2.device), seed, plan.dropout, dot_precision(dy2.dtype, a.dtype))
        if xa is None:
            return _q_gemm(dy2, p, None, False, lora), None
        return _q_gemm(dy2, p, None, False, lora, xa)

    return LF.adapter_backward_triton(dy2, x2, t, weights_a, weights_b, plan, seed, need_x, need_a, need_b, grad_x)


def _q_forward(x, p, bias, weights_a, weights_b, plan, seed, on_triton):
    """(y [..., N], t [M, R]); bias already in x's dtype."""
    x2 = as_2d(x)
    if on_triton and x2.shape[0] > 0:
        y2, t = _q_forward_triton(x2, p, bias, weights_a, weights_b, plan, seed)
    else:
        y2, t = LF.forward_reference(x2, _q_dense(p, x.dtype), bias, weights_a, weights_b, plan, seed)
    return y2.view(*x.shape[:-1], p.shape[0]), t


def _q_backward(dy, x, t, p, weights_a, weights_b, plan, seed, need_x, need_a, need_b, on_triton):
    dy2, x2, t2 = as_2d(dy), as_2d(x), as_2d(t)
    if on_triton and dy2.shape[0] > 0:
        dx, da, db = _q_backward_triton(dy2, x2, t2, p, weights_a, weights_b, plan, seed, need_x, need_a, need_b)
    else:
        w = _q_dense(p, dy.dtype) if need_x else None  # recomputed, freed on return
        dx, da, db = LF.backward_reference(dy2, x2, t2, w, weights_a, weights_b, plan, seed, need_x, need_a, need_b)
    return (dx.view(x.shape) if dx is not None else None), da, db


class QLoraLinearFusedFunction(torch.autograd.Function):
    """Eager autograd for ``qlora_linear_fused``; saves x, t, the packed weight and the adapter weights."""

    @staticmethod
    def forward(ctx, x, bias, p, plan, seed, on_triton, *weights):
        n = len(plan.ranks)
        y, t = _q_forward(x, p, None if bias is None else bias.to(x.dtype), weights[:n], weights[n:], plan, seed,
                          on_triton)
        ctx.save_for_backward(x, t, *weights)
        ctx.p, ctx.plan, ctx.seed, ctx.on_triton = p, plan, seed, on_triton
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, t, *weights = ctx.saved_tensors
        plan, n = ctx.plan, len(ctx.plan.ranks)
        needs = ctx.needs_input_grad
        need_a, need_b = needs[6:6 + n], needs[6 + n:]
        dx, da, db = _q_backward(dy, x, t, ctx.p, weights[:n], weights[n:], plan, ctx.seed, needs[0], any(need_a),
                                 any(need_b), ctx.on_triton)
        dbias = None
        if ctx.bias_dtype is not None and needs[1]:
            dbias = as_2d(dy).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return (dx, dbias, None, None, None, None, *adapter_grads(plan, da, db, need_a, need_b))


def qlora_linear_fused(x: torch.Tensor, p: Packed4bit | Int8Weight, bias: torch.Tensor | None,
                       weights_a: Sequence[torch.Tensor], weights_b: Sequence[torch.Tensor],
                       scalings: Sequence[float], dropout_ps: Sequence[float], training: bool) -> torch.Tensor:
    """``base(x) + sum_i s_i * drop_i(x as A_i.dtype) @ A_i^T @ B_i^T`` in x's dtype, where base is
    ``matmul_4bit(x, p, bias)`` (p: Packed4bit) or ``matmul_int8(x, p.cb, p.scb, bias)`` (p: Int8Weight).

    x: [..., d_in] fp32/fp16/bf16; p: the quantised weight [d_out, d_in] (a 4-bit one is dequantised to
    p.dtype, then to x's dtype, as matmul_4bit); bias: [d_out] float or None; the adapters as in
    ``lora_linear_fused``. Gradients flow to x, bias and every A_i / B_i that requires grad.
    """
    if isinstance(p, Int8Weight):
        n_out, k = check_int8(p.cb, p.scb)
        data = p.cb
    else:
        data, n_out, k = check_packed4bit(p)
    Q.check_x(x, k, n_out, bias, data, "qlora_linear_fused")

    def base_op():
        return Q.matmul_int8(x, p.cb, p.scb, bias) if isinstance(p, Int8Weight) else Q.matmul_4bit(x, p, bias)

    if len(weights_a) == 0:
        return base_op()
    base_shape = torch.empty((), device="meta").expand(*x.shape[:-1], n_out)
    check_adapters(x, base_shape, weights_a, weights_b, scalings, dropout_ps)
    if len({a.dtype for a in weights_a}) > 1 or torch.compiler.is_compiling():
        # mixed adapter dtypes, or tracing: the quantised op, then lora.py's op on its output
        return L.lora_linear(x, base_op(), weights_a, weights_b, scalings, dropout_ps, training)
    ps = [check_p(p_) if training else 0.0 for p_ in dropout_ps]
    seed = int(draw_seed()) if any(p_ > 0.0 for p_ in ps) else 0
    plan = make_plan([a.shape[0] for a in weights_a], scalings, ps)
    on_triton = use_triton(x, data, *weights_a, *weights_b)
    tensors = (x, *weights_a, *weights_b) + (() if bias is None else (bias,))
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        bias_x = None if bias is None else bias.to(x.dtype)
        return _q_forward(x, p, bias_x, weights_a, weights_b, plan, seed, on_triton)[0]
    return QLoraLinearFusedFunction.apply(x, bias, p, plan, seed, on_triton, *weights_a, *weights_b)


def aot_specs() -> list[AotSpec]:
    """No kernels of its own: qmatmul.py's GEMMs, lora.py's shrink and lora_fused.py's dY pass."""
    return []
