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
from .opdecl import OpDecl
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


def q_gemm(a, p, bias, transpose, lora=None, lora_x=None):
    """The quantised GEMM of qmatmul.py for a 4-bit (Packed4bit) or int8 (Int8Weight) weight."""
    if isinstance(p, Int8Weight):
        return Q.matmul_int8_triton(a, p.cb, p.scb, bias, transpose=transpose, lora=lora, lora_x=lora_x)
    return Q.matmul_4bit_triton(a, p, bias, transpose=transpose, lora=lora, lora_x=lora_x)


def q_dense(p, dtype):
    """The weight dequantised into ``dtype`` (the CPU path; freed by the caller after use)."""
    if isinstance(p, Int8Weight):
        return dequantize_int8_reference(p.cb, p.scb, dtype)
    return dequantize_4bit_torch(p).to(dtype)


def _q_forward_triton(x2, p, bias, weights_a, weights_b, plan, seed):
    t = L.launch_shrink(x2, cat_a(weights_a), plan, seed, plan.dropout)
    b = cat_b(weights_b)
    lora = (t, b, adapter_table(plan, x2.device), 0, False, dot_precision(x2.dtype, b.dtype))
    return q_gemm(x2, p, bias, True, lora), t


def _q_backward_triton(dy2, x2, t, p, weights_a, weights_b, plan, seed, need_x, need_a, need_b):
    def grad_x(g, a, xa):  # the quantised dX kernel with the adapter term (and dA)
        lora = (g, a, adapter_table(plan, dy2.device), seed, plan.dropout, dot_precision(dy2.dtype, a.dtype))
        if xa is None:
            return q_gemm(dy2, p, None, False, lora), None
        return q_gemm(dy2, p, None, False, lora, xa)

    return LF.adapter_backward_triton(dy2, x2, t, weights_a, weights_b, plan, seed, need_x, need_a, need_b, grad_x)


def plan_forward(x, p, bias, weights_a, weights_b, plan, seed, on_triton):
    """(y [..., N], t [M, R]); bias already in x's dtype."""
    x2 = as_2d(x)
    if on_triton and x2.shape[0] > 0:
        y2, t = _q_forward_triton(x2, p, bias, weights_a, weights_b, plan, seed)
    else:
        y2, t = LF.forward_reference(x2, q_dense(p, x.dtype), bias, weights_a, weights_b, plan, seed)
    return y2.view(*x.shape[:-1], p.shape[0]), t


def plan_backward(dy, x, t, p, weights_a, weights_b, plan, seed, need_x, need_a, need_b, on_triton):
    dy2, x2, t2 = as_2d(dy), as_2d(x), as_2d(t)
    if on_triton and dy2.shape[0] > 0:
        dx, da, db = _q_backward_triton(dy2, x2, t2, p, weights_a, weights_b, plan, seed, need_x, need_a, need_b)
    else:
        w = q_dense(p, dy.dtype) if need_x else None  # recomputed, freed on return
        dx, da, db = LF.backward_reference(dy2, x2, t2, w, weights_a, weights_b, plan, seed, need_x, need_a, need_b)
    return (dx.view(x.shape) if dx is not None else None), da, db


# ----------------------------------------------------------------------------------------------
# The op, declared once per weight format (the NamedTuple weight travels as its tensor fields)
# ----------------------------------------------------------------------------------------------
def _forward_common(x, p, bias, weights_a, weights_b, scalings, dropout_ps, seed, hint):
    """(y [..., N], t [..., R]); hint (eager): (p, plan, on_triton) as ``qlora_linear_fused`` decided them."""
    if hint is None:
        plan = make_plan([a.shape[0] for a in weights_a], scalings, dropout_ps)
        on_triton = use_triton(x, _data(p), *weights_a, *weights_b)
    else:
        p, plan, on_triton = hint
    y, t = plan_forward(x, p, None if bias is None else bias.to(x.dtype), weights_a, weights_b, plan, int(seed),
                      on_triton)
    return y, (t if x.dim() == 2 else t.view(*x.shape[:-1], t.shape[-1]))


def _backward_common(p, x, t, seed, bias, weights, grads, needs, first, scalings, dropout_ps, hint) -> list:
    """Gradients of the op's tensor leaves: x, the packed tensors (none), bias at ``first - 1``, the
    adapters from ``first`` on, the seed (none)."""
    n = len(weights) // 2
    dy = grads[0]
    if hint is None:
        plan = make_plan([a.shape[0] for a in weights[:n]], scalings, dropout_ps)
        on_triton = use_triton(dy, x, _data(p), *weights)
    else:
        p, plan, on_triton = hint
    need_a, need_b = needs[first:first + n], needs[first + n:first + 2 * n]
    dx, da, db = plan_backward(dy, x, t, p, weights[:n], weights[n:], plan, int(seed), needs[0], any(need_a),
                             any(need_b), on_triton)
    dbias = None
    if bias is not None and needs[first - 1]:
        dbias = as_2d(dy).sum(0, dtype=torch.float32).to(bias.dtype)
    return [dx, *([None] * (first - 2)), dbias, *adapter_grads(plan, da, db, need_a, need_b), None]


def _backward_fake_common(x, bias, weights, needs, first) -> list:
    return [x.new_empty(x.shape) if needs[0] else None, *([None] * (first - 2)),
            bias.new_empty(bias.shape) if bias is not None and needs[first - 1] else None,
            *(w.new_empty(w.shape) if need else None for w, need in zip(weights, needs[first:-1])), None]


def _data(p) -> torch.Tensor:
    return p.cb if isinstance(p, Int8Weight) else p.data


def _forward_4bit(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                  out_features: int, in_features: int, dtype: torch.dtype, nested_absmax: torch.Tensor | None,
                  nested_code: torch.Tensor | None, nested_blocksize: int, offset: float | None,
                  bias: torch.Tensor | None, weights_a: list[torch.Tensor], weights_b: list[torch.Tensor],
                  scalings: list[float], dropout_ps: list[float], seed: torch.Tensor,
                  *, hint=None) -> tuple[torch.Tensor, torch.Tensor]:
    p = None if hint is not None else Packed4bit(data, absmax, code, blocksize, (out_features, in_features), dtype,
                                                 nested_absmax, nested_code, nested_blocksize, offset)
    return _forward_common(x, p, bias, weights_a, weights_b, scalings, dropout_ps, seed, hint)


_FIRST_4BIT = 7  # tensor leaves: x, data, absmax, code, nested_absmax, nested_code, bias, A.., B.., seed


def _save_4bit(args, outputs) -> list:
    x, data, absmax, code, _bs, _n, _k, _dt, nested_absmax, nested_code, _nbs, _off, bias, wa, wb, _s, _ps, seed = args
    return [x, outputs[1], seed, bias, data, absmax, code, nested_absmax, nested_code, *wa, *wb]


def _backward_4bit(saved, grads, needs, statics, *, hint=None) -> list:
    x, t, seed, bias, data, absmax, code, nested_absmax, nested_code, *weights = saved
    blocksize, n_out, k, dtype, nested_blocksize, offset, scalings, dropout_ps = statics
    p = Packed4bit(data, absmax, code, blocksize, (n_out, k), dtype, nested_absmax, nested_code, nested_blocksize,
                   offset)
    return _backward_common(p, x, t, seed, bias, weights, grads, needs, _FIRST_4BIT, scalings, dropout_ps, hint)


def _fake_4bit(x, data, absmax, code, blocksize, out_features, in_features, dtype, nested_absmax, nested_code,
               nested_blocksize, offset, bias, weights_a, weights_b, scalings, dropout_ps, seed):
    rank = sum(a.shape[0] for a in weights_a)
    return (x.new_empty((*x.shape[:-1], out_features)),
            x.new_empty((*x.shape[:-1], rank), dtype=weights_a[0].dtype))


def _backward_fake_4bit(saved, grads, needs, statics) -> list:
    x, _t, _seed, bias, *rest = saved
    return _backward_fake_common(x, bias, rest[5:], needs, _FIRST_4BIT)


QLORA_4BIT = OpDecl("peftfast::qlora_linear_fused_4bit", _forward_4bit, _backward_4bit, save=_save_4bit,
                    fake=_fake_4bit, backward_fake=_backward_fake_4bit, aux_outputs=(1,))


def _forward_int8(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None,
                  weights_a: list[torch.Tensor], weights_b: list[torch.Tensor], scalings: list[float],
                  dropout_ps: list[float], seed: torch.Tensor, *, hint=None) -> tuple[torch.Tensor, torch.Tensor]:
    p = None if hint is not None else Int8Weight(cb, scb)
    return _forward_common(x, p, bias, weights_a, weights_b, scalings, dropout_ps, seed, hint)


_FIRST_INT8 = 4  # tensor leaves: x, cb, scb, bias, A.., B.., seed


def _save_int8(args, outputs) -> list:
    x, cb, scb, bias, wa, wb, _s, _ps, seed = args
    return [x, outputs[1], seed, bias, cb, scb, *wa, *wb]


def _backward_int8(saved, grads, needs, statics, *, hint=None) -> list:
    x, t, seed, bias, cb, scb, *weights = saved
    return _backward_common(Int8Weight(cb, scb), x, t, seed, bias, weights, grads, needs, _FIRST_INT8, *statics,
                            hint)


def _fake_int8(x, cb, scb, bias, weights_a, weights_b, scalings, dropout_ps, seed):
    rank = sum(a.shape[0] for a in weights_a)
    return (x.new_empty((*x.shape[:-1], cb.shape[0])), x.new_empty((*x.shape[:-1], rank), dtype=weights_a[0].dtype))


def _backward_fake_int8(saved, grads, needs, statics) -> list:
    x, _t, _seed, bias, _cb, _scb, *weights = saved
    return _backward_fake_common(x, bias, weights, needs, _FIRST_INT8)


QLORA_INT8 = OpDecl("peftfast::qlora_linear_fused_int8", _forward_int8, _backward_int8, save=_save_int8,
                    fake=_fake_int8, backward_fake=_backward_fake_int8, aux_outputs=(1,))


def qlora_linear_fused(x: torch.Tensor, p: Packed4bit | Int8Weight, bias: torch.Tensor | None,
                       weights_a: Sequence[torch.Tensor], weights_b: Sequence[torch.Tensor],
                       scalings: Sequence[float], dropout_ps: Sequence[float], training: bool) -> torch.Tensor:
    """``base(x) + sum_i s_i * drop_i(x as A_i.dtype) @ A_i^T @ B_i^T`` in x's dtype, where base is
    ``matmul_4bit(x, p, bias)`` (p: Packed4bit) or ``matmul_int8(x, p.cb, p.scb, bias)`` (p: Int8Weight).

    x: [..., d_in] fp32/fp16/bf16; p: the quantised weight [d_out, d_in] (a 4-bit one is dequantised to
    p.dtype, then to x's dtype, as matmul_4bit); bias: [d_out] float or None; the adapters as in
    ``lora_linear_fused``. Gradients flow to x, bias and every A_i / B_i that requires grad.
    Under torch.compile one custom op (``peftfast::qlora_linear_fused_4bit`` / ``_int8``). The op
    picks the backend: on the Triton backend the fused kernels; elsewhere the quantised matmul, then
    ``lora_linear`` (the same math, reference path).
    """
    if isinstance(p, Int8Weight):
        n_out, k = check_int8(p.cb, p.scb)
        data = p.cb
    else:
        data, n_out, k = check_packed4bit(p)
    Q.check_x(x, k, n_out, bias, data, "qlora_linear_fused")
    if len(weights_a) == 0:
        return Q.matmul_int8(x, p.cb, p.scb, bias) if isinstance(p, Int8Weight) else Q.matmul_4bit(x, p, bias)
    if not torch.compiler.is_compiling() and not use_triton(x, data):
        # the reference backend: the quantised matmul, then lora.py's op on its output (which checks the adapters)
        base = Q.matmul_int8(x, p.cb, p.scb, bias) if isinstance(p, Int8Weight) else Q.matmul_4bit(x, p, bias)
        return L.lora_linear(x, base, weights_a, weights_b, scalings, dropout_ps, training)
    base_shape = torch.empty((), device="meta").expand(*x.shape[:-1], n_out)
    check_adapters(x, base_shape, weights_a, weights_b, scalings, dropout_ps)
    if len({a.dtype for a in weights_a}) > 1:
        # mixed adapter dtypes: the quantised op, then lora.py's op (one call per run of equal dtype)
        base = Q.matmul_int8(x, p.cb, p.scb, bias) if isinstance(p, Int8Weight) else Q.matmul_4bit(x, p, bias)
        return L.lora_linear(x, base, weights_a, weights_b, scalings, dropout_ps, training)
    ps = [check_p(p_) if training else 0.0 for p_ in dropout_ps]
    dropout = any(p_ > 0.0 for p_ in ps)
    hint = None
    if torch.compiler.is_compiling():
        seed = draw_seed() if dropout else torch.zeros((), dtype=torch.int64)
        scalings = [float(s) for s in scalings]
    else:
        seed = int(draw_seed()) if dropout else 0
        hint = (p, make_plan([a.shape[0] for a in weights_a], scalings, ps), use_triton(x, data, *weights_a, *weights_b))
    if isinstance(p, Int8Weight):
        return QLORA_INT8(x, p.cb, p.scb, bias, list(weights_a), list(weights_b), scalings, ps, seed, hint=hint)[0]
    offset = None if p.offset is None else float(p.offset)
    return QLORA_4BIT(x, data, p.absmax, p.code, int(p.blocksize), n_out, k, p.dtype, p.nested_absmax, p.nested_code,
                      int(p.nested_blocksize), offset, bias, list(weights_a), list(weights_b), scalings, ps, seed,
                      hint=hint)[0]


def aot_specs() -> list[AotSpec]:
    """No kernels of its own: qmatmul.py's GEMMs, lora.py's shrink and lora_fused.py's dY pass."""
    return []
