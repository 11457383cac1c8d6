"""peftfast's unfused LoRA op (kernels/lora.py, ``lora_linear``): shrink + expand, and its backward.

The base layer runs on its own (``eager.base_linear_*``); these kernels take its output as an
input. Bytes are the unique bytes each Triton launch touches (what ``traffic.count_triton``
counts in the interpreter), plus the torch ops between launches (partial sums, casts). The
number of fp32 partials of the split weight-gradient reductions is the launcher's choice and
comes from ``plans.lora_grad_splits``.
"""
from __future__ import annotations

import torch

from ..plans import lora_grad_splits
from ..specs import Kernel, nbytes
from .eager import elementwise


def peftfast_lora_forward(
    t: int, d_in: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype,
    out: torch.dtype | None = None,
) -> list[Kernel]:
    """``lora_linear`` (kernels/lora.py) as the op contract defines it (the base output is an
    input), all adapters in one pass (R = sum of ranks), operands in the adapter dtype:

    shrink: t = s' * drop(X) @ A^T for every adapter; reads X once, the stacked A [R, K] and
    the per-rank scale (R fp32), writes t [T, R] in the adapter dtype (saved for backward);
    the dropout mask is regenerated from a seed, so it costs no bytes.
    expand: Y = base_out + t @ B^T; reads base_out, t and B, writes Y (in place over base_out
    when autograd allows). Both on tensor cores with fp32 accumulation. The small int64 tables
    of rank tiles (32 B per tile) are left out.
    """
    out = out or act
    big_r = sum(ranks)
    return [
        Kernel("peftfast: shrink", t * d_in * nbytes(act) + big_r * d_in * nbytes(ad) + big_r * 4,
               t * big_r * nbytes(ad), 2 * t * d_in * big_r, True),
        Kernel("peftfast: expand (+ base_out)",
               t * d_out * nbytes(out) + t * big_r * nbytes(ad) + d_out * big_r * nbytes(ad),
               t * d_out * nbytes(out), 2 * t * d_out * big_r + t * d_out, True),
    ]




def peftfast_lora_backward(
    t: int, d_in: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype,
    out: torch.dtype | None = None, splits_db: int = 1, splits_da: int = 1,
) -> list[Kernel]:
    """Backward of ``lora_linear`` (kernels/lora.py). With G = s' * dY @ B ([T, R]):
    dB = dY^T @ t, dA = G^T @ drop(X), dX = mask * (G @ A), d base_out = dY (no kernel).

    dB: reads t and dY, writes fp32 partials [splits_db, N, R]; G: the shrink kernel on
    (dY, B^T), reads dY and B, writes G in the adapter dtype; dA: reads G and X (mask
    regenerated), writes fp32 partials [splits_da, R, K]; dX: reads G and A, writes dX_lora.
    When a reduction is split, one torch ``sum`` of the partials follows; when the adapter
    dtype is not fp32, one cast of the fp32 gradient. dY is read twice (dB, G), X once. The add
    of dX_lora into the base layer's dX is autograd's, see ``lora_layer``.
    """
    out = out or act
    big_r = sum(ranks)
    f32 = torch.float32
    ks = [Kernel("peftfast bwd: dB = t^T @ dY", t * big_r * nbytes(ad) + t * d_out * nbytes(out),
                 splits_db * d_out * big_r * 4, 2 * t * d_out * big_r, True)]
    if splits_db > 1:
        ks.append(elementwise("torch: sum dB partials", [(splits_db * d_out * big_r, f32)], [(d_out * big_r, f32)]))
    if ad != f32:
        ks.append(elementwise("torch: dB.to(adapter dtype)", [(d_out * big_r, f32)], [(d_out * big_r, ad)]))
    ks.append(Kernel("peftfast bwd: G = s' dY @ B", t * d_out * nbytes(out) + d_out * big_r * nbytes(ad) + big_r * 4,
                     t * big_r * nbytes(ad), 2 * t * d_out * big_r, True))
    ks.append(Kernel("peftfast bwd: dA = G^T @ drop(X)", t * big_r * nbytes(ad) + t * d_in * nbytes(act),
                     splits_da * big_r * d_in * 4, 2 * t * d_in * big_r, True))
    if splits_da > 1:
        ks.append(elementwise("torch: sum dA partials", [(splits_da * big_r * d_in, f32)], [(big_r * d_in, f32)]))
    if ad != f32:
        ks.append(elementwise("torch: dA.to(adapter dtype)", [(big_r * d_in, f32)], [(big_r * d_in, ad)]))
    ks.append(Kernel("peftfast bwd: dX = mask * (G @ A)", t * big_r * nbytes(ad) + big_r * d_in * nbytes(ad),
                     t * d_in * nbytes(act), 2 * t * d_in * big_r, True))
    return ks



def planned_lora_backward(t: int, d_in: int, d_out: int, r: int, act: torch.dtype, ad: torch.dtype,
                          dropout: bool) -> list[Kernel]:
    """``peftfast_lora_backward`` of one adapter of rank r, with the launcher's split counts
    (``plans.lora_grad_splits``): dB's rank tiles cover the stacked ranks; dA's are per adapter
    when dropout is on (each adapter has its own mask)."""
    s_b = lora_grad_splits(t, d_out, [r], ad, by_adapter=False)
    s_a = lora_grad_splits(t, d_in, [r], ad, by_adapter=dropout)
    return peftfast_lora_backward(t, d_in, d_out, [r], act, ad, splits_db=s_b, splits_da=s_a)
