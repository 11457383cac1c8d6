"""The one place that decides which implementation of an op runs.

CUDA tensors and an importable Triton -> the Triton kernel; anything else -> the PyTorch
reference. ``PEFTFAST_BACKEND=torch|triton|auto`` overrides (``triton`` on CPU tensors only
works under ``TRITON_INTERPRET=1``, which is how the kernel tests run).
"""
from __future__ import annotations

import functools
import os

import torch

_CHOICES = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on a platform without a driver
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_name() -> str:
    value = os.environ.get("PEFTFAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"PEFTFAST_BACKEND={value!r} is not one of {', '.join(_CHOICES)}")
    return value


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels should run on ``tensors``."""
    choice = backend_name()
    if choice == "torch":
        return False
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("PEFTFAST_BACKEND=triton but triton cannot be imported")
        on_cuda = all(t.is_cuda for t in tensors)
        if not on_cuda and not interpreting():
            raise RuntimeError(
                "PEFTFAST_BACKEND=triton needs CUDA tensors, or TRITON_INTERPRET=1 to run the "
                "kernels in Triton's interpreter on CPU tensors"
            )
        return True
    return triton_available() and len(tensors) > 0 and all(t.is_cuda for t in tensors)
