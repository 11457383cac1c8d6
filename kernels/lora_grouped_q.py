"""Grouped LoRA fused with a bitsandbytes 4-bit (NF4/FP4) or int8 base GEMM: a mixed batch's prefill in one launch.

Math (one layer; x: [M, K]; W = deq(W_q) [O, K] cast to x's dtype, as ``qmatmul.matmul_4bit`` / ``matmul_int8``;
adapter slot a(m) of row m, -1 for the base model):

    y[m] = x[m] @ W^T + bias + s_a * (m_a(x[m]) @ A_a^T) @ B_a^T       (a = a(m) >= 0; the term is 0 for a = -1)

This is ``lora_grouped.lora_grouped_linear`` over a quantised base: the same kernel (``_grouped_linear_kernel``
with WEIGHT "4bit" or "int8"), plan (``fused_plan``), stores, dropout and epilogue. The W^T tile of each K step is
dequantised in registers from bitsandbytes' storage as qmatmul.py's GEMMs do it, never stored:

* 4-bit, the ALIGNED layout only (K % blocksize == 0 and blocksize >= the K tile, as in every transformers
  checkpoint): each packed byte loaded once and split into its two indices, looked up in the code table (NF4 or
  FP4, read from the weight), times one block scale per column of the tile (the nested absmax decoded per
  column); rounded through the weight's dtype when it is not x's (``quant.weight_rounding``);
* int8: CB * SCB / 127 per row of W (the LLM.int8 outlier threshold is not used, as on bitsandbytes' CPU path).

The general 4-bit layout (odd K, blocks spanning rows) is not fused: ``fuses`` says no, and the layer keeps
bitsandbytes' matmul followed by the grouped kernels. Launched without fp contraction, so the nested scales
round as bitsandbytes' do.

Bytes (forward): x, the packed weight (N * K / 2 bytes + scales, or the int8 CB + SCB) and every used adapter's A
and B read once, y written once, h and the plan; padded rows cost GEMM work, not bytes.

Backward (W frozen: no weight gradient), when x needs a gradient: one launch for dX and dH
(``lora_grouped._grouped_linear_dx_kernel`` with the same WEIGHT kind: dY @ deq(W) with each W tile dequantised in
registers, and each block's dH = s_a dY B_a on the same dY tile, the masked dH A_a added in the epilogue), then the
dA and dB kernels (``lora_grouped.backward_fused_triton``). That needs the dX kernel's K tile (the forward's O tile,
32 or 64 columns) inside one 4-bit block (``aligned(..., dx=True)``); a narrower block (blocksize 32 under a 64-column
tile) takes qmatmul's quantised dX GEMM (Triton) or the weight dequantised and freed (PyTorch), then the grouped
backward over the same plan, its dX expand adding into that dX (``lora_grouped.fused_base_backward``), which is
also all that runs (dA and dB) when x needs no gradient. The bias gradient is the fp32 sum of dY's rows. Saved: x,
h, the plan and references to the (resident) packed tensors, stores and adapters.

The CPU / PyTorch path: the quantised reference matmul (``qmatmul.matmul_4bit_reference`` /
``matmul_int8_reference``), then ``lora_grouped.forward_reference`` on its output. Declared once per weight format
as ``OpDecl``s (``peftfast::lora_grouped_qlinear_4bit`` / ``_int8``), so torch.compile(fullgraph=True) traces them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from .aot import AotSpec
from .dropout import draw_seed
from .lora_grouped import (DTYPE_PAIRS, MAX_KERNEL_RANK, BaseWeight, backward_fused_triton, check_fused_plan,
                           check_stores, forward_reference, fused_base_backward, fused_config, fused_dx_config,
                           fused_dx_specs, fused_dx_supported, fused_plan, fused_specs, kernel_rank,
                           launch_grouped_linear, make_plan, split_grads)
from .opdecl import OpDecl
from .qlora import Int8Weight, q_dense, q_gemm
from .qmatmul import check_x, matmul_4bit_reference, matmul_int8_reference
from .quant import Packed4bit, check_int8, check_packed4bit, log2_exact, nested_args, packed_bytes, weight_rounding
from .runtime import use_triton

QuantWeight = Packed4bit | Int8Weight


def quantised_base(p: QuantWeight, act: torch.dtype) -> BaseWeight:
    """``p`` as ``_grouped_linear_kernel`` reads it, for ``act`` activations."""
    if isinstance(p, Int8Weight):
        scb = p.scb.reshape(-1)
        return BaseWeight("int8", p.cb, p.cb.stride(0), p.cb.stride(1), scb, scb, scb, scb, 0.0, 0, 0, 0)
    nested_absmax, nested_code, offset, log2_nbs = nested_args(p)
    return BaseWeight("4bit", packed_bytes(p.data), 0, 0, p.absmax.contiguous(), p.code.contiguous(),
                      nested_absmax.contiguous(), nested_code.contiguous(), offset,
                      log2_exact(p.blocksize, "blocksize"), log2_nbs, weight_rounding(p.dtype, act), p.nested)


def aligned(p: QuantWeight, act: torch.dtype, adapter: torch.dtype, rank: int, dx: bool = False) -> bool:
    """Whether the fused kernel (``dx``: the backward's dX kernel, whose K tile is the forward's O tile) reads
    ``p`` (int8: always; 4-bit: ``tiles_in_blocks``)."""
    return isinstance(p, Int8Weight) or tiles_in_blocks(p.shape[1], p.blocksize, act, adapter, rank, dx)


def tiles_in_blocks(k: int, blocksize: int, act: torch.dtype, adapter: torch.dtype, rank: int,
                    dx: bool = False) -> bool:
    """Whether a 4-bit weight of ``k`` input features and ``blocksize`` is in the aligned layout for the fused kernel
    (``dx``: the dX kernel): K % blocksize == 0, with the kernel's K tile inside one block."""
    config = fused_dx_config if dx else fused_config
    return k % blocksize == 0 and blocksize >= config(act, adapter, kernel_rank(rank))["BLOCK_K"]


def weight_tensor(p: QuantWeight) -> torch.Tensor:
    """The tensor holding ``p``'s values (the int8 CB or the packed 4-bit bytes): its device picks the backend."""
    return p.cb if isinstance(p, Int8Weight) else p.data


def fuses(x: torch.Tensor, p: QuantWeight, a_store: torch.Tensor, b_store: torch.Tensor) -> bool:
    """Whether ``lora_grouped_qlinear`` runs the fused kernel here: the Triton backend, a store rank the kernel
    takes, and a weight it reads (``aligned``)."""
    return (use_triton(x, weight_tensor(p), a_store, b_store) and a_store.shape[1] <= MAX_KERNEL_RANK
            and aligned(p, x.dtype, a_store.dtype, a_store.shape[1]))


def _base_matmul(x2: torch.Tensor, p: QuantWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The PyTorch path's base output: qmatmul's quantised reference matmul (the weight lives during the call)."""
    if isinstance(p, Int8Weight):
        return matmul_int8_reference(x2, p.cb, p.scb, bias)
    return matmul_4bit_reference(x2, p, bias)


def _forward(x, p, bias, a_store, b_store, scale, table, badapter, thresholds, seed, hint):
    """(y [..., O] in x's dtype, h); hint: the backend the caller chose (True: the fused kernel)."""
    x2 = x.reshape(-1, x.shape[-1])
    on_triton = fuses(x, p, a_store, b_store) if hint is None else hint
    if on_triton:
        y, h = launch_grouped_linear(x2, quantised_base(p, x.dtype), bias, a_store, b_store, scale, table, badapter,
                                     thresholds, int(seed))
    else:
        y, h = forward_reference(x2, _base_matmul(x2, p, bias), a_store, b_store, scale, table, badapter, thresholds,
                                 int(seed))
    return y.view(*x.shape[:-1], p.shape[0]), h


def _backward(p, x, h, bias, stores, weights, grads, needs, first, hint) -> list:
    """Gradients of the op's tensor leaves: x; the weight's tensors (``first - 2`` of them: none); bias (at
    ``first - 1``); A_1..A_n, B_1..B_n (from ``first``); the stores, scale, plan, thresholds and seed (none)."""
    a, b, scale, table, badapter, thresholds, seed = stores
    n = len(weights) // 2
    dy2 = grads[0].reshape(-1, grads[0].shape[-1])
    on_triton = fuses(dy2, p, a, b) if hint is None else hint
    x2 = x.reshape(-1, x.shape[-1])
    need_a, need_b = needs[first:first + n], needs[first + n:first + 2 * n]
    if (on_triton and needs[0] and fused_dx_supported(table, a.shape[1])
            and aligned(p, dy2.dtype, a.dtype, a.shape[1], dx=True)):
        # dX (dY @ deq(W), W dequantised in registers, and the adapters' terms) and dH in one launch, then dA, dB
        dx, da, db = backward_fused_triton(dy2, x2, h, quantised_base(p, dy2.dtype), a, b, scale, table, badapter,
                                           any(need_a) or any(need_b), thresholds, int(seed))
        ga, gb = split_grads(da, weights[:n], need_a, 0), split_grads(db, weights[n:], need_b, 1)
    else:
        base_dx = None
        if needs[0]:  # dX = dY @ deq(W): qmatmul's dX GEMM, or the weight dequantised and freed on return
            base_dx = q_gemm(dy2, p, None, False) if on_triton else dy2 @ q_dense(p, dy2.dtype)
        dx, ga, gb = fused_base_backward(dy2, x2, h, a, b, scale, table, badapter, thresholds, int(seed), weights,
                                         needs[0], need_a, need_b, base_dx, on_triton)
    dbias = None
    if bias is not None and needs[first - 1]:
        dbias = dy2.sum(0, dtype=torch.float32).to(bias.dtype)
    return [None if dx is None else dx.view(x.shape), *([None] * (first - 2)), dbias, *ga, *gb, *([None] * 7)]


def _fake(x, out_features, a_store, table):
    return (x.new_empty((*x.shape[:-1], out_features)),
            x.new_empty((table.shape[0], table.shape[1], kernel_rank(a_store.shape[1])), dtype=a_store.dtype))


def _backward_fake(x, bias, weights, needs, first) -> list:
    return [x.new_empty(x.shape) if needs[0] else None, *([None] * (first - 2)),
            bias.new_empty(bias.shape) if bias is not None and needs[first - 1] else None,
            *(w.new_empty(w.shape) if need else None for w, need in zip(weights, needs[first:])), *([None] * 7)]


# ----------------------------------------------------------------------------------------------
# The ops, one per weight format (the weight travels as its tensor fields)
# ----------------------------------------------------------------------------------------------
_FIRST_4BIT = 7  # tensor leaves: x, data, absmax, code, nested_absmax, nested_code, bias, A.., B.., stores..


def _forward_4bit(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                  out_features: int, in_features: int, dtype: torch.dtype, nested_absmax: Optional[torch.Tensor],
                  nested_code: Optional[torch.Tensor], nested_blocksize: int, offset: Optional[float],
                  bias: Optional[torch.Tensor], weights_a: list[torch.Tensor], weights_b: list[torch.Tensor],
                  a_store: torch.Tensor, b_store: torch.Tensor, scale: torch.Tensor, table: torch.Tensor,
                  block_adapter: torch.Tensor, thresholds: Optional[torch.Tensor], seed: torch.Tensor, *,
                  hint=None) -> tuple[torch.Tensor, torch.Tensor]:
    p = Packed4bit(data, absmax, code, blocksize, (out_features, in_features), dtype, nested_absmax, nested_code,
                   nested_blocksize, offset)
    return _forward(x, p, bias, a_store, b_store, scale, table, block_adapter, thresholds, seed, hint)


def _save_4bit(args, outputs) -> list:
    (x, data, absmax, code, _bs, _n, _k, _dt, nested_absmax, nested_code, _nbs, _off, bias, wa, wb, *stores) = args
    return [x, outputs[1], data, absmax, code, nested_absmax, nested_code, bias, *stores, *wa, *wb]


def _backward_4bit(saved, grads, needs, statics, *, hint=None) -> list:
    x, h, data, absmax, code, nested_absmax, nested_code, bias, *rest = saved
    blocksize, n_out, k, dtype, nested_blocksize, offset = statics
    p = Packed4bit(data, absmax, code, blocksize, (n_out, k), dtype, nested_absmax, nested_code, nested_blocksize,
                   offset)
    return _backward(p, x, h, bias, rest[:7], rest[7:], grads, needs, _FIRST_4BIT, hint)


LORA_GROUPED_QLINEAR_4BIT = OpDecl(
    "peftfast::lora_grouped_qlinear_4bit", _forward_4bit, _backward_4bit, save=_save_4bit,
    fake=lambda x, data, absmax, code, bs, n_out, *rest: _fake(x, n_out, rest[9], rest[12]),
    backward_fake=lambda saved, grads, needs, statics: _backward_fake(saved[0], saved[7], saved[15:], needs,
                                                                      _FIRST_4BIT),
    aux_outputs=(1,))

_FIRST_INT8 = 4  # tensor leaves: x, cb, scb, bias, A.., B.., stores..


def _forward_int8(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor],
                  weights_a: list[torch.Tensor], weights_b: list[torch.Tensor], a_store: torch.Tensor,
                  b_store: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, block_adapter: torch.Tensor,
                  thresholds: Optional[torch.Tensor], seed: torch.Tensor, *,
                  hint=None) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, Int8Weight(cb, scb), bias, a_store, b_store, scale, table, block_adapter, thresholds, seed,
                    hint)


def _save_int8(args, outputs) -> list:
    x, cb, scb, bias, wa, wb, *stores = args
    return [x, outputs[1], cb, scb, bias, *stores, *wa, *wb]


def _backward_int8(saved, grads, needs, statics, *, hint=None) -> list:
    x, h, cb, scb, bias, *rest = saved
    return _backward(Int8Weight(cb, scb), x, h, bias, rest[:7], rest[7:], grads, needs, _FIRST_INT8, hint)


LORA_GROUPED_QLINEAR_INT8 = OpDecl(
    "peftfast::lora_grouped_qlinear_int8", _forward_int8, _backward_int8, save=_save_int8,
    fake=lambda x, cb, scb, bias, wa, wb, a_store, b_store, scale, table, *rest: _fake(x, cb.shape[0], a_store, table),
    backward_fake=lambda saved, grads, needs, statics: _backward_fake(saved[0], saved[4], saved[12:], needs,
                                                                      _FIRST_INT8),
    aux_outputs=(1,))


def lora_grouped_qlinear(x: torch.Tensor, p: QuantWeight, bias: torch.Tensor | None,
                         weights_a: Sequence[torch.Tensor], weights_b: Sequence[torch.Tensor], a_store: torch.Tensor,
                         b_store: torch.Tensor, scale: torch.Tensor, index: torch.Tensor,
                         plan: tuple[torch.Tensor, torch.Tensor] | None = None,
                         thresholds: torch.Tensor | None = None, seed: int | None = None) -> torch.Tensor:
    """``matmul_4bit(x, p, bias)`` (p: Packed4bit) or ``matmul_int8(x, p.cb, p.scb, bias)`` (p: Int8Weight) plus, for
    each row m of x ([..., K] fp32/fp16/bf16), adapter ``index[m]``'s term, as ``lora_grouped_linear`` (same stores,
    index, plan, dropout and seed); on the Triton backend one launch (module docstring). ``bias``: [O] in x's
    dtype or None. Gradients reach x, the bias and the adapters' own tensors. ``plan``: ``fused_plan(index, N)``
    where ``fuses`` says yes, else ``make_plan(index, N, False)`` (made when None). A 4-bit weight in the general
    layout (``aligned`` says no) is not fused: on the Triton backend a ValueError (use ``matmul_4bit`` then
    ``lora_grouped``)."""
    n, r, k = check_stores(x, weights_a, weights_b, a_store, b_store, index, thresholds)
    if isinstance(p, Int8Weight):
        n_out, k_w = check_int8(p.cb, p.scb)
        data = p.cb
    else:
        data, n_out, k_w = check_packed4bit(p)
    check_x(x, k_w, n_out, bias, data, "lora_grouped_qlinear")
    if k_w != k or b_store.shape[1] != n_out:
        raise ValueError(f"lora_grouped_qlinear: a [{n_out}, {k_w}] base weight for stores with K={k}, "
                         f"O={b_store.shape[1]}; give the base layer's own weight")
    on_triton = use_triton(x, data, a_store, b_store) and r <= MAX_KERNEL_RANK
    if on_triton and not aligned(p, x.dtype, a_store.dtype, r):
        raise ValueError(f"lora_grouped_qlinear: the 4-bit weight [{n_out}, {k_w}] with blocksize {p.blocksize} is in "
                         "the general layout (in_features % blocksize != 0, or blocks smaller than the kernel's K "
                         "tile), which the fused kernel does not read; use matmul_4bit, then lora_grouped")
    if plan is None:
        plan = fused_plan(index, n) if on_triton else make_plan(index, n, False)
    check_fused_plan(plan, on_triton, "lora_grouped_qlinear")
    table, badapter = plan
    stores = (list(weights_a), list(weights_b), a_store, b_store, scale, table, badapter, thresholds)
    if torch.compiler.is_compiling():
        seed = draw_seed() if thresholds is not None and seed is None else torch.tensor(int(seed or 0))
        hint = None
    else:
        seed = int(draw_seed()) if thresholds is not None and seed is None else int(seed or 0)
        hint = on_triton
    if isinstance(p, Int8Weight):
        return LORA_GROUPED_QLINEAR_INT8(x, p.cb, p.scb.reshape(-1), bias, *stores, seed, hint=hint)[0]
    offset = None if p.offset is None else float(p.offset)
    return LORA_GROUPED_QLINEAR_4BIT(x, data, p.absmax, p.code, int(p.blocksize), n_out, k_w, p.dtype, p.nested_absmax,
                                     p.nested_code, int(p.nested_blocksize), offset, bias, *stores, seed,
                                     hint=hint)[0]


def aot_specs() -> list[AotSpec]:
    """The fused kernel over a quantised base (``lora_grouped.fused_specs``): per dtype pair (``DTYPE_PAIRS``),
    rank tile 16 / 32 / 64, with bias or not and dropout or not; 4-bit with plain or nested absmax, and int8."""
    specs = []
    for act, ad in DTYPE_PAIRS:
        for kind, nested in (("4bit", False), ("4bit", True), ("int8", False)):
            specs += fused_specs(act, ad, kind, nested) + fused_dx_specs(act, ad, kind, nested)
    return specs
