"""IA3: a learned scale on the base linear's input (feedforward) or output (attention).

peftfast multiplies it inside the base GEMM (kernels/ia3.py: prologue on the X tile or epilogue
on the Y tile), so the only extra traffic is the scale vector; PEFT's eager path adds
elementwise passes over the activations, each counted op for op.
"""
from __future__ import annotations

import torch

from ..specs import Kernel, nbytes
from .eager import base_linear_forward, elementwise


def ia3_fused_matmul(t: int, d_in: int, d_out: int, act: torch.dtype, scale: torch.dtype,
                     feedforward: bool) -> Kernel:
    """The IA3 scale inside the base GEMM: a prologue multiply of the X tile (feedforward, scale
    [d_in]) or an epilogue multiply of the Y tile (scale [d_out]); the only extra traffic is
    the scale vector."""
    base = base_linear_forward(t, d_in, d_out, act)[0]
    n = d_in if feedforward else d_out
    return Kernel("IA3 GEMM (scale fused)", base.bytes_read + n * nbytes(scale), base.bytes_written,
                  base.flops + t * n, True)


def peft_ia3_forward(t: int, d_in: int, d_out: int, act: torch.dtype, scale: torch.dtype,
                     feedforward: bool) -> list[Kernel]:
    """PEFT ``ia3.Linear.forward`` (one adapter): ``ia3_scaling = 1 * l`` (a tiny mul), then
    feedforward: ``(x.to(scale dtype) * l).to(act)`` before the base GEMM; otherwise
    ``(base(x) * l).to(act)`` after it. Casts only where the dtypes differ."""
    n = d_in if feedforward else d_out
    big = t * n
    prod = torch.promote_types(act, scale)
    ks = [elementwise("peft: 1 * ia3_l", [(n, scale)], [(n, scale)])]
    base = base_linear_forward(t, d_in, d_out, act)
    if not feedforward:
        ks += base
    src = act
    if feedforward and scale != act:
        ks.append(elementwise("peft: x.to(ia3 dtype)", [(big, act)], [(big, scale)]))
        src = scale
    ks.append(elementwise("peft: * ia3_l", [(big, src), (n, scale)], [(big, torch.promote_types(src, scale))]))
    if torch.promote_types(src, scale) != act:
        ks.append(elementwise("peft: .to(act)", [(big, prod)], [(big, act)]))
    if feedforward:
        ks += base
    return ks

