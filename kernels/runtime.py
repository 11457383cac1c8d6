"""What every launcher shares: the backend choice, launching on the input's device, dtype names,
the dot precision rule and the ahead-of-time signature builder.

Backend: ``backend.use_triton`` (CUDA tensors + Triton -> the kernels, else the PyTorch
reference; ``PEFTFAST_BACKEND`` overrides), re-exported here.

Launch on the input's device: Triton launches on the *current* CUDA device, which is not
necessarily the device of the tensors (a model split over two GPUs). ``launch(kernel, grid, ...)``
makes the first tensor argument's device current for the launch; on CPU tensors (the
interpreter) it launches directly. Cost: one device switch per launch on CUDA, nothing on CPU.

Dot precision (``dot_precision(act, operand)``): 16-bit operands use the tensor cores natively
(the precision argument is ignored for them); fp32 operands of an fp32 model use 3xTF32 (~fp32
accuracy, as torch's default fp32 matmul); fp32 operands next to a 16-bit model (PEFT's fp32
adapters) use plain TF32 (10 mantissa bits, finer than the 16-bit result).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from .backend import backend_name, interpreting, triton_available, use_triton

__all__ = ["DTYPE_NAMES", "aot_signature", "as_2d", "backend_name", "dot_precision", "interpreting", "launch",
           "on_device", "triton_available", "use_triton"]

# Triton's names of the activation / adapter dtypes (AOT signatures and spec names)
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dot_precision(act: torch.dtype, operand: torch.dtype | None = None) -> str:
    """``input_precision`` of a ``tl.dot`` on ``operand``-dtype operands in a model of dtype ``act``
    (operand defaults to act): "tf32x3" when both are fp32, else "tf32" (see the module doc)."""
    operand = act if operand is None else operand
    return "tf32x3" if act == operand == torch.float32 else "tf32"


def aot_signature(fn, types: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    """Every argument of the jitted ``fn`` in order: "constexpr" for those in ``constexprs``, the
    given type (pointers: "*fp16", ...; scalars: "i64", "fp32") or "i32" (sizes and strides)."""
    return {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}


def as_2d(t: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [rows, d] (a view when possible; the tensor itself when already 2-D)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def on_device(t: torch.Tensor):
    """A context making ``t``'s CUDA device current (a no-op context for CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` under the device of the first tensor argument."""
    t = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if t is not None and t.is_cuda:
        with torch.cuda.device(t.device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)
