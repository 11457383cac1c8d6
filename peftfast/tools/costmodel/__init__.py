"""Per-kernel cost model: bytes moved, FLOPs, launches, and modelled time on named GPUs.

Every formula returns a list of ``Kernel`` records (one per launch) for a path; a path's time on
a GPU is the sum over its kernels of ``max(bytes / bandwidth, flops / peak) + launch_overhead``.
Bytes are the compulsory DRAM traffic of each launch: every operand read once and every result
written once (tiles re-read by several programs are assumed to hit L2). The eager PyTorch
formulas reproduce, op for op, what ``traffic.count_torch`` counts on the same path at small
shapes; the peftfast formulas are what ``traffic.count_triton`` counts as unique bytes per
launch of the Triton kernels (tests check both). Times at real sizes are therefore
*modelled from counted traffic*, not measured.

Notation: T tokens, K = d_in, N = d_out, r (or R = sum of ranks over adapters), ``act`` the
activation dtype, ``ad`` the adapter weight dtype. Unless stated otherwise: nothing is fused
beyond what is listed, the base weight is frozen (no dW), the adapters are trainable, the layer
input needs a gradient, and linears have no bias (a bias adds d_out elements, negligible).

The package, in reading order:

- ``specs``: the GPUs, the ``Kernel`` record, path totals;
- ``plans``: the launchers' tiles, splits and program counts (asked of ``peftfast.kernels``);
- ``formulas``: one module per op family (eager/PEFT, lora, fused, quant, ia3, whole layers);
- ``calibration``: counted traffic at small shapes against the formulas (``Check``);
- ``report``: the tables, the design targets and their verdicts; ``cli``: ``main``.
"""
from .calibration import (KERNEL_BYTES_TOLERANCE, Check, adapter_weights, calibrate_4bit, calibrate_eager,
                          calibrate_ia3, calibrate_peftfast, calibrate_peftfast_fused, calibrate_qlora_fused,
                          count_device, count_triton_forward_backward, op_checks, peft_like_forward,
                          require_interpreter)
from .cli import main
from .formulas import (LORA_IMPLS, base_linear_backward, base_linear_forward, decode_reads,
                       dequant_4bit_then_matmul, dequant_int8_then_matmul, dx_accumulate, elementwise,
                       fused_forward_reread, ia3_fused_matmul, lora_layer, matmul, matmul_4bit_fused,
                       matmul_int8_fused, nf4_weight_bytes, packed_gemm, peft_ia3_forward, peft_lora_backward,
                       peft_lora_forward, peftfast_fused_backward, peftfast_fused_forward,
                       peftfast_lora_backward, peftfast_lora_forward, planned_lora_backward,
                       qlora_fused_backward, qlora_fused_forward, qlora_layer)
from .plans import (decode_split, epoch_counters, fused_dx_block_m, fused_dy_splits, fused_shrink_items,
                    lora_grad_splits, qlora_dx_block_m, sm_count)
from .report import (LORA_TARGETS, QLORA_TARGETS, build_report, kernel_lines, lora_rows, ratio_table,
                     render_report, verdict)
from .specs import (GPUS, H100, LAUNCH_OVERHEAD_S, LOW_PRECISION, RTX4090, Gpu, Kernel, cdiv, dtype_name,
                    nbytes, path_bytes, path_time)

__all__ = [
    "GPUS", "H100", "KERNEL_BYTES_TOLERANCE", "LAUNCH_OVERHEAD_S", "LORA_IMPLS", "LORA_TARGETS", "LOW_PRECISION",
    "QLORA_TARGETS", "RTX4090", "Check", "Gpu", "Kernel", "adapter_weights", "epoch_counters",
    "base_linear_backward", "base_linear_forward", "build_report", "calibrate_4bit", "calibrate_eager",
    "calibrate_ia3", "calibrate_peftfast", "calibrate_peftfast_fused", "calibrate_qlora_fused", "cdiv",
    "count_device", "count_triton_forward_backward", "decode_reads", "decode_split", "dequant_4bit_then_matmul",
    "dequant_int8_then_matmul", "dtype_name", "dx_accumulate", "elementwise", "fused_dx_block_m",
    "fused_dy_splits", "fused_forward_reread", "fused_shrink_items", "ia3_fused_matmul", "kernel_lines",
    "lora_grad_splits", "lora_layer", "lora_rows", "main", "matmul", "matmul_4bit_fused", "matmul_int8_fused",
    "nbytes", "nf4_weight_bytes", "op_checks", "packed_gemm", "path_bytes", "path_time", "peft_ia3_forward",
    "peft_like_forward", "peft_lora_backward", "peft_lora_forward", "peftfast_fused_backward",
    "peftfast_fused_forward", "peftfast_lora_backward", "peftfast_lora_forward", "planned_lora_backward",
    "qlora_dx_block_m", "qlora_fused_backward", "qlora_fused_forward", "qlora_layer", "ratio_table",
    "render_report", "require_interpreter", "sm_count", "verdict",
]
