"""The cost formulas, one module per op family; each returns a list of ``Kernel`` (one per launch).

- ``eager``: building blocks (``matmul``, ``elementwise``), the base linear, PEFT's LoRA path;
- ``lora``: peftfast's unfused ``lora_linear`` (shrink + expand, and its backward);
- ``fused``: ``lora_linear_fused``, the adapter inside the base GEMM;
- ``quant``: 4-bit / int8 bases (fused dequantisation vs dequantise-then-GEMM), fused QLoRA, decode;
- ``ia3``: the IA3 scale, fused vs PEFT's eager ops;
- ``dora``: one DoRA linear, PEFT's eager path vs the fused kernels;
- ``layers``: one whole LoRA / QLoRA linear, base included.

Numbers that mirror a launcher (tiles, splits, program counts) come from ``..plans`` only.
"""
from .eager import (base_linear_backward, base_linear_forward, dx_accumulate, elementwise, matmul,
                    peft_lora_backward, peft_lora_forward)
from .dora import DORA_IMPLS, dora_layer, peft_dora_backward, peft_dora_forward, peftfast_dora_backward, \
    peftfast_dora_forward, peftfast_dora_norm
from .fused import fused_forward_reread, peftfast_fused_backward, peftfast_fused_forward
from .ia3 import ia3_fused_matmul, peft_ia3_forward
from .layers import LORA_IMPLS, lora_layer, qlora_layer
from .lora import peftfast_lora_backward, peftfast_lora_forward, planned_lora_backward
from .quant import (decode_reads, dequant_4bit_then_matmul, dequant_int8_then_matmul, matmul_4bit_fused,
                    matmul_int8_fused, nf4_weight_bytes, packed_gemm, qlora_fused_backward, qlora_fused_forward)

__all__ = [
    "DORA_IMPLS", "dora_layer", "peft_dora_backward", "peft_dora_forward", "peftfast_dora_backward",
    "peftfast_dora_forward", "peftfast_dora_norm",
    "LORA_IMPLS", "base_linear_backward", "base_linear_forward", "decode_reads", "dequant_4bit_then_matmul",
    "dequant_int8_then_matmul", "dx_accumulate", "elementwise", "fused_forward_reread", "ia3_fused_matmul",
    "lora_layer", "matmul", "matmul_4bit_fused", "matmul_int8_fused", "nf4_weight_bytes", "packed_gemm",
    "peft_ia3_forward", "peft_lora_backward", "peft_lora_forward", "peftfast_fused_backward",
    "peftfast_fused_forward", "peftfast_lora_backward", "peftfast_lora_forward", "planned_lora_backward",
    "qlora_fused_backward", "qlora_fused_forward", "qlora_layer",
]
