"""What the cost model computes with: named GPUs, one ``Kernel`` record per launch, and path totals.

A kernel's modelled time is ``max(bytes / bandwidth, flops / peak) + launch_overhead``; a path's
is the sum over its launches. Nothing here is measured: the GPU figures are spec-sheet peaks and
the bytes come from the formulas (``formulas/``), which calibration checks against counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Gpu:
    """Peak figures of one GPU (dense, no sparsity).

    ``tensor_flops``: fp16/bf16 tensor-core FLOP/s with fp32 accumulation (the bf16 matmuls);
    ``fp32_flops``: plain fp32 FLOP/s (fp32 matmuls with TF32 off, PyTorch's default, and
    elementwise ops).
    """

    name: str
    bandwidth: float  # B/s
    tensor_flops: float
    fp32_flops: float


# H100: the DESIGN's round figures (SXM spec sheet: 3.35 TB/s, 989 TFLOP/s bf16 dense);
# fp32 non-tensor 67 TFLOP/s (SXM). RTX 4090: 1008 GB/s, 165 TFLOP/s fp16/bf16 with fp32
# accumulation, 82.6 TFLOP/s fp32.
H100 = Gpu("H100", 3.0e12, 800e12, 67e12)
RTX4090 = Gpu("RTX 4090", 1.0e12, 165e12, 82.6e12)
GPUS = {"h100": H100, "rtx4090": RTX4090}

# Fixed cost per kernel launch (launch latency plus ramp-up/tail of a short kernel on a busy
# stream). Ratios are shown with 0 and with this value.
LAUNCH_OVERHEAD_S = 3e-6


@dataclass(frozen=True)
class Kernel:
    name: str
    bytes_read: int
    bytes_written: int
    flops: int
    tensor_core: bool = False  # True: FLOPs run at the tensor-core peak

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def time(self, gpu: Gpu, launch_overhead: float = 0.0) -> float:
        peak = gpu.tensor_flops if self.tensor_core else gpu.fp32_flops
        return max(self.bytes / gpu.bandwidth, self.flops / peak) + launch_overhead


def path_time(kernels: list[Kernel], gpu: Gpu, launch_overhead: float = 0.0) -> float:
    return sum(k.time(gpu, launch_overhead) for k in kernels)


def path_bytes(kernels: list[Kernel]) -> int:
    return sum(k.bytes for k in kernels)


def nbytes(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return dtype.itemsize


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
