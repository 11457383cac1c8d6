"""Whole layers: every kernel of one LoRA linear (dense or NF4 base), base included.

The ratio of a layer's path to ``impl="base"`` (the base GEMM alone, or its dX GEMM in the
backward) is the whole overhead of the adapter; the report's tables and the design targets are
stated in these ratios.
"""
from __future__ import annotations

import torch

from ..specs import Kernel
from .eager import base_linear_backward, base_linear_forward, dx_accumulate, peft_lora_backward, peft_lora_forward
from .fused import peftfast_fused_backward, peftfast_fused_forward
from .lora import peftfast_lora_forward, planned_lora_backward
from .quant import dequant_4bit_then_matmul, matmul_4bit_fused, qlora_fused_backward, qlora_fused_forward

LORA_IMPLS = ("base", "peft", "peftfast", "peftfast-fused")


def lora_layer(impl: str, backward: bool, t: int, d_in: int, d_out: int, r: int, act: torch.dtype,
               ad: torch.dtype, dropout_p: float = 0.0, dropout_impl: str = "cuda") -> list[Kernel]:
    """Every kernel of one LoRA linear (training mode), including the base layer's own GEMM
    (forward) or its dX GEMM (backward, frozen weight), so the ratio to ``impl="base"`` is the
    whole overhead of the adapter."""
    if impl not in LORA_IMPLS:
        raise ValueError(f"impl={impl!r}; allowed: {', '.join(LORA_IMPLS)}")
    if impl == "peftfast-fused":
        if not backward:
            return peftfast_fused_forward(t, d_in, d_out, [r], act, ad)
        return peftfast_fused_backward(t, d_in, d_out, [r], act, ad)
    base = (base_linear_backward if backward else base_linear_forward)(t, d_in, d_out, act)
    if impl == "base":
        return base
    if impl == "peft":
        fn = peft_lora_backward if backward else peft_lora_forward
        return base + fn(t, d_in, d_out, r, act, ad, dropout_p, True, dropout_impl)
    if not backward:
        return base + peftfast_lora_forward(t, d_in, d_out, [r], act, ad)
    return base + planned_lora_backward(t, d_in, d_out, r, act, ad, dropout_p > 0) + [dx_accumulate(t, d_in, act)]


def qlora_layer(impl: str, backward: bool, t: int, d_in: int, d_out: int, r: int, act: torch.dtype,
                ad: torch.dtype, dropout_p: float = 0.0, blocksize: int = 64, nested: bool = False) -> list[Kernel]:
    """A LoRA linear on an NF4 base. ``impl="peftfast"``: fused 4-bit GEMM + the lora_linear
    kernels (+ autograd's dX add); ``"peftfast-fused"``: the adapter inside the 4-bit GEMMs
    (``qlora_linear_fused``); ``"peft"``: bitsandbytes dequantise + GEMM, then PEFT's adapter ops."""
    if impl == "peftfast-fused":
        if not backward:
            return qlora_fused_forward(t, d_in, d_out, [r], act, ad, blocksize=blocksize, nested=nested)
        return qlora_fused_backward(t, d_in, d_out, [r], act, ad, blocksize=blocksize, nested=nested)
    if impl == "peftfast":
        ks = [matmul_4bit_fused(t, d_in, d_out, act, backward, blocksize, nested)]
        if not backward:
            return ks + peftfast_lora_forward(t, d_in, d_out, [r], act, ad)
        return ks + planned_lora_backward(t, d_in, d_out, r, act, ad, dropout_p > 0) + [dx_accumulate(t, d_in, act)]
    if impl == "peft":
        ks = dequant_4bit_then_matmul(t, d_in, d_out, act, backward, blocksize, nested)
        fn = peft_lora_backward if backward else peft_lora_forward
        return ks + fn(t, d_in, d_out, r, act, ad, dropout_p)
    raise ValueError(f"impl={impl!r}; allowed: 'peftfast', 'peftfast-fused', 'peft'")

