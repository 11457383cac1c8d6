"""DoRA on one linear (``LoraConfig(use_dora=True)``, one adapter, no dropout, no bias), base included.

``impl="peft"``: PEFT 0.21's ``lora.Linear.forward`` with ``DoraLinearVariant`` and autograd's
backward of it, op for op as PEFT runs them (checked launch for launch and byte for byte against PEFT's
real layer counted with ``traffic.count_torch``). Every forward
materialises the adapter's dense delta (``lora_B(lora_A(eye(d_in)))``, [d_in, d_out] in the adapter
dtype), casts W to the adapter dtype, forms ``W + s * delta`` and takes its row norms: several full
[d_out, d_in] passes in fp32; then the adapter's two GEMMs and five [T, d_out] elementwise ops in fp32.

``impl="peftfast-fused"``: the fused path of kernels/lora_fused.py (``dora_row_norm_fused`` then
``dora_linear_fused``), as built: the row norm in one kernel (W read once), the fused LoRA GEMM forming
mns = m / norm in its epilogue; backward: the fused LoRA backward with mns formed by both kernels, the dX
kernel also reading the forward's output y for dL/dmns (per-row-block partials), and one kernel for dL/dm.
tests/tools/test_costmodel_dora.py counts the kernels in the interpreter against these lists.
"""
from __future__ import annotations

import torch

from ..plans import fused_dx_block_m
from ..specs import Kernel, cdiv, nbytes
from .eager import base_linear_backward, base_linear_forward, elementwise, matmul
from .fused import peftfast_fused_backward, peftfast_fused_forward


def peft_dora_forward(t: int, d_in: int, d_out: int, r: int, act: torch.dtype, ad: torch.dtype) -> list[Kernel]:
    """PEFT's forward, base GEMM included (fp32 magnitude)."""
    f32 = torch.float32
    tk, tn, kn, n = t * d_in, t * d_out, d_in * d_out, d_out
    ks = base_linear_forward(t, d_in, d_out, act)
    if ad != act:
        ks.append(elementwise("peft: x.to(adapter dtype)", [(tk, act)], [(tk, ad)]))
    ks.append(Kernel("peft dora: eye(d_in)", 0, d_in * d_in * nbytes(ad), d_in * d_in))
    ks.append(matmul("peft dora: lora_A(eye)", d_in, d_in, r, ad, ad, ad))
    ks.append(matmul("peft dora: lora_B(.) = delta^T", d_in, r, d_out, ad, ad, ad))
    if ad != act:
        ks.append(elementwise("peft dora: W.to(x.dtype)", [(kn, act)], [(kn, ad)]))
    ks.append(elementwise("peft dora: scaling * delta", [(kn, ad)], [(kn, ad)]))
    ks.append(elementwise("peft dora: W + s * delta", [(kn, ad), (kn, ad)], [(kn, ad)]))
    ks.append(Kernel("peft dora: linalg.norm(dim=1)", kn * nbytes(ad), n * nbytes(ad), 2 * kn))
    ks.append(elementwise("peft dora: m / norm", [(n, f32), (n, ad)], [(n, f32)]))
    ks.append(matmul("peft dora: lora_A(x)", t, d_in, r, ad, ad, ad))
    ks.append(matmul("peft dora: lora_B(.)", t, r, d_out, ad, ad, ad))
    ks.append(elementwise("peft dora: mns - 1", [(n, f32)], [(n, f32)]))
    scaled = torch.promote_types(f32, act)
    ks.append(elementwise("peft dora: (mns - 1) * base", [(n, f32), (tn, act)], [(tn, scaled)]))
    ks.append(elementwise("peft dora: mns * lora", [(n, f32), (tn, ad)], [(tn, torch.promote_types(f32, ad))]))
    ks.append(elementwise("peft dora: * scaling", [(tn, f32)], [(tn, f32)]))
    ks.append(elementwise("peft dora: sum of the two", [(tn, scaled), (tn, f32)], [(tn, f32)]))
    ks.append(elementwise("peft: result + dora", [(tn, act), (tn, f32)], [(tn, torch.promote_types(act, f32))]))
    if torch.promote_types(act, f32) != act:
        ks.append(elementwise("peft: result.to(act)", [(tn, f32)], [(tn, act)]))
    return ks


def peft_dora_backward(t: int, d_in: int, d_out: int, r: int, act: torch.dtype, ad: torch.dtype) -> list[Kernel]:
    """Autograd's backward of ``peft_dora_forward`` (x needs a gradient; A, B, m trainable), base dX
    included. The norm is detached: nothing flows through the [d_out, d_in] ops."""
    f32 = torch.float32
    tk, tn, n = t * d_in, t * d_out, d_out
    out = torch.promote_types(act, f32)
    ks = []
    if out != act:
        ks.append(elementwise("peft bwd: dY.to(fp32)", [(tn, act)], [(tn, f32)]))
        ks.append(elementwise("peft bwd: dY.to(act) for the base output", [(tn, f32)], [(tn, act)]))
    ks.append(elementwise("peft bwd: * scaling", [(tn, f32)], [(tn, f32)]))
    ks.append(elementwise("peft bwd: d lora = g * mns", [(n, f32), (tn, f32)], [(tn, f32)]))
    ks.append(elementwise("peft bwd: g * lora", [(tn, f32), (tn, f32)], [(tn, f32)]))
    ks.append(Kernel("peft bwd: sum over T", tn * 4, n * 4, tn))
    ks.append(elementwise("peft bwd: d base = dY * (mns - 1)", [(n, f32), (tn, f32)], [(tn, f32)]))
    ks.append(elementwise("peft bwd: dY * base", [(tn, f32), (tn, act)], [(tn, f32)]))
    ks.append(Kernel("peft bwd: sum over T", tn * 4, n * 4, tn))
    if out != act:
        ks.append(elementwise("peft bwd: d base.to(act)", [(tn, f32)], [(tn, act)]))
    ks.append(elementwise("peft bwd: d result accumulated", [(tn, act), (tn, act)], [(tn, act)]))
    ks.append(elementwise("peft bwd: d mns accumulated", [(n, f32), (n, f32)], [(n, f32)]))
    ks.append(matmul("peft bwd: dB = g^T @ H", d_out, t, r, ad, ad, ad))
    ks.append(matmul("peft bwd: dH = g @ B", t, d_out, r, ad, ad, ad))
    ks.append(matmul("peft bwd: dA = dH^T @ x", r, t, d_in, ad, ad, ad))
    ks.append(matmul("peft bwd: dX_lora = dH @ A", t, r, d_in, ad, ad, ad))
    ks.append(elementwise("peft bwd: dm = d mns / norm", [(n, f32), (n, f32)], [(n, f32)]))
    if ad != act:
        ks.append(elementwise("peft bwd: dX_lora.to(act)", [(tk, ad)], [(tk, act)]))
    ks += base_linear_backward(t, d_in, d_out, act)
    ks.append(elementwise("autograd: dX_base + dX_lora", [(tk, act), (tk, act)], [(tk, act)]))
    return ks


def peftfast_dora_norm(d_in: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype) -> Kernel:
    """``dora_row_norm_fused``: one kernel reads W, A, B and the per-rank scale once and writes the norm
    [d_out] fp32; the delta tile's 3xTF32 products are counted as three tensor-core products."""
    big_r = sum(ranks)
    return Kernel("peftfast: ||W + s B A||_row, one kernel",
                  d_out * d_in * nbytes(act) + big_r * d_in * nbytes(ad) + d_out * big_r * nbytes(ad) + big_r * 4,
                  d_out * 4, 3 * 2 * d_out * d_in * big_r + 3 * d_out * d_in, True)


def peftfast_dora_forward(t: int, d_in: int, d_out: int, ranks: list[int], act: torch.dtype,
                          ad: torch.dtype) -> list[Kernel]:
    """The norm kernel, then the fused LoRA GEMM reading m and the norm [d_out] fp32 each and applying
    mns = m / norm in its epilogue: two launches."""
    fused = peftfast_fused_forward(t, d_in, d_out, ranks, act, ad)
    last = fused[-1]
    fused[-1] = Kernel(last.name + ", * m / norm", last.bytes_read + 2 * d_out * 4, last.bytes_written,
                       last.flops + 2 * t * d_out, last.tensor_core)
    return [peftfast_dora_norm(d_in, d_out, ranks, act, ad)] + fused


def peftfast_dora_backward(t: int, d_in: int, d_out: int, ranks: list[int], act: torch.dtype,
                           ad: torch.dtype) -> list[Kernel]:
    """The fused LoRA backward with DoRA's extras: the dY pass reads m and the norm (dY * mns for G and
    dB); the compute-bound dX kernel reads them too, and the forward's output y [T, d_out] (y_pre =
    y / mns) and writes fp32 partials of sum dY * y_pre per row block [T / block_m, d_out]; one more
    kernel sums them in order and divides by the norm (dL/dm; columns with m == 0 would be recomputed
    there: none here). Three launches."""
    block_m = fused_dx_block_m(act, torch.float32)  # DoRA's dX kernel: the fp32-adapter tiles for any adapters
    ks = peftfast_fused_backward(t, d_in, d_out, ranks, act, ad, block_m_dx=block_m)
    dy, dx = ks[0], ks[1]
    dmp = cdiv(t, block_m) * d_out * 4
    ks[0] = Kernel(dy.name + " (dY * mns)", dy.bytes_read + 2 * d_out * 4, dy.bytes_written,
                   dy.flops + 2 * t * d_out, dy.tensor_core)
    ks[1] = Kernel(dx.name + " (dY * mns), dL/dmns partials from y",
                   dx.bytes_read + 2 * d_out * 4 + t * d_out * nbytes(act), dx.bytes_written + dmp,
                   dx.flops + 4 * t * d_out, dx.tensor_core)
    ks.insert(2, Kernel("peftfast: dL/dm = sum of partials / norm", dmp + 2 * d_out * 4, d_out * 4, dmp // 4))
    return ks


DORA_IMPLS = ("base", "peft", "peftfast-fused")


def dora_layer(impl: str, backward: bool, t: int, d_in: int, d_out: int, r: int, act: torch.dtype,
               ad: torch.dtype) -> list[Kernel]:
    """Every kernel of one DoRA linear (training, no dropout, no bias), base GEMM (or its dX) included."""
    if impl == "base":
        return (base_linear_backward if backward else base_linear_forward)(t, d_in, d_out, act)
    if impl == "peft":
        return (peft_dora_backward if backward else peft_dora_forward)(t, d_in, d_out, r, act, ad)
    if impl == "peftfast-fused":
        return (peftfast_dora_backward if backward else peftfast_dora_forward)(t, d_in, d_out, [r], act, ad)
    raise ValueError(f"impl={impl!r}; allowed: {', '.join(DORA_IMPLS)}")
