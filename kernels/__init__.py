"""Triton kernels, their launchers, autograd Functions and PyTorch references.

Installed as ``peftfast.kernels``. Imports torch and triton only, never ``peftfast``.
"""
from .backend import backend_name, triton_available, use_triton

__all__ = ["backend_name", "triton_available", "use_triton"]
