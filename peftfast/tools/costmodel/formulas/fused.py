"""peftfast's fused LoRA linear (kernels/lora_fused.py, ``lora_linear_fused``): the adapter inside
the base GEMM, forward and backward, base included.

Bytes are per launch, as built; fp32 partial sums are counted as written and read back. Their
sizes follow the launchers' plans (``plans.fused_shrink_items``, ``plans.fused_dy_splits``,
``plans.fused_dx_block_m``); calibration counts the kernels in Triton's interpreter against
these formulas.
"""
from __future__ import annotations

import torch

from ..plans import fused_dx_block_m, fused_dy_splits, fused_shrink_items
from ..specs import LOW_PRECISION, Kernel, cdiv, nbytes
from .eager import elementwise
from .lora import peftfast_lora_forward


def peftfast_fused_forward(t: int, d_in: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype,
                           bias: bool = False) -> list[Kernel]:
    """``lora_linear_fused`` (kernels/lora_fused.py) forward, as built. The base GEMM is included
    (this replaces both the base layer and the adapter).

    16-bit activations: ONE kernel. Its output tiles compute Y = X @ W^T + t @ B^T + b with fp32
    accumulation and one store; the shrink t = s' drop(X) @ A^T runs inside the same launch as
    K slices (``plans.fused_shrink_items`` per row block), done by the tiles of the previous row-block group (the first
    group's by slices that precede every tile): X is read a second time for them (counted here as
    DRAM traffic; it is the same addresses, so a count of unique bytes sees it once), fp32 slice
    partials [slices, T, R] are written and read back, t is written once (saved for backward) and
    read by the tiles. fp32 activations: lora.py's shrink kernel, then the GEMM reading t."""
    big_r = sum(ranks)
    f32 = torch.float32
    tr = t * big_r
    gemm_read = t * d_in * nbytes(act) + d_out * d_in * nbytes(act) + tr * nbytes(ad) \
        + d_out * big_r * nbytes(ad) + (d_out * nbytes(act) if bias else 0)
    gemm_flops = 2 * t * d_in * d_out + 2 * t * d_out * big_r
    if act == f32:
        shrink = peftfast_lora_forward(t, d_in, d_out, ranks, act, ad)[0]
        return [shrink, Kernel("peftfast: X @ W^T + t @ B^T (+ b), one store", gemm_read, t * d_out * nbytes(act),
                               gemm_flops, False)]
    partials = fused_shrink_items(d_in, d_out, act) * tr * 4
    return [Kernel("peftfast: X @ W^T + t @ B^T (+ b), shrink inside",
                   gemm_read + t * d_in * nbytes(act) + big_r * d_in * nbytes(ad) + big_r * 4 + partials,
                   t * d_out * nbytes(act) + tr * nbytes(ad) + partials, gemm_flops + 2 * t * d_in * big_r, True)]


def fused_forward_reread(t: int, d_in: int, act: torch.dtype) -> int:
    """Bytes of X that ``peftfast_fused_forward`` counts twice (the look-ahead shrink slices and the
    tiles read the same X); a count of unique addresses per launch sees them once."""
    return 0 if act == torch.float32 else t * d_in * nbytes(act)


def peftfast_fused_backward(t: int, d_in: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype,
                            bias: bool = False, block_m_dx: int | None = None) -> list[Kernel]:
    """``lora_linear_fused`` backward, as built (adapters trainable, x needs a gradient): two kernels.

    dY pass: ONE kernel reads dY once (plus t, B and the per-rank scale) for both reductions,
    G = s' dY @ B and dB = dY^T @ t, writing fp32 partials (G per block of columns of dY,
    [n_blocks, T, R]; dB per split of T, [splits, N, R]; both counts from
    ``plans.fused_dy_splits``); the last program to finish each piece reads its partials back
    and writes G and dB once in the adapter dtype.
    dX + dA: ONE kernel reads dY, W, G, A and X and writes dX once (dX = dY @ W + mask * (G @ A))
    and dA = G^T @ mask(X): fp32 partials per row block of ``block_m_dx`` rows ([T/block_m, R, K];
    default ``plans.fused_dx_block_m``), summed by the last row block of each column block and
    written once in the adapter dtype. The
    base dX GEMM is included; X is read by this compute-bound kernel instead of a separate pass.
    A trainable bias adds torch's sum over tokens of dY (fp32) and, for 16-bit activations, its cast.
    The epoch counters of both kernels live in one reused buffer (no per-launch memset).
    """
    big_r = sum(ranks)
    f32 = torch.float32
    n_blocks, splits_db = fused_dy_splits(t, d_out, ranks, act, ad)
    tr, nr, rk = t * big_r, d_out * big_r, big_r * d_in
    gp, dbp = n_blocks * tr * 4, splits_db * nr * 4
    ks = [Kernel("peftfast bwd: dY pass (G and dB, partials summed in-kernel)",
                 t * d_out * nbytes(act) + tr * nbytes(ad) + nr * nbytes(ad) + big_r * 4 + gp + dbp,
                 gp + dbp + tr * nbytes(ad) + nr * nbytes(ad), 4 * t * d_out * big_r, True)]
    if block_m_dx is None:
        block_m_dx = fused_dx_block_m(act, ad)
    dap = cdiv(t, block_m_dx) * rk * 4
    ks.append(Kernel("peftfast bwd: dX = dY @ W + mask * (G @ A), dA = G^T @ mask(X)",
                     t * d_out * nbytes(act) + d_out * d_in * nbytes(act) + tr * nbytes(ad) + rk * nbytes(ad)
                     + t * d_in * nbytes(act) + dap,
                     t * d_in * nbytes(act) + dap + rk * nbytes(ad), 2 * t * d_out * d_in + 4 * t * d_in * big_r,
                     act in LOW_PRECISION))
    if bias:
        ks.append(elementwise("torch: dbias = sum_T dY", [(t * d_out, act)], [(d_out, f32)]))
        if act != f32:
            ks.append(elementwise("torch: dbias.to(act)", [(d_out, f32)], [(d_out, act)]))
    return ks

