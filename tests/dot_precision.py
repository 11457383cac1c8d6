"""Triton's interpreter with ``tl.dot``'s ``input_precision`` honoured, as a GPU computes it.

The interpreter multiplies fp32 operands in full fp32 whatever ``input_precision`` says; a GPU's
tensor cores do not. ``enable()`` patches the interpreter's dot so that the kernel tests see what a
GPU computes:

* ``"tf32"``: each fp32 operand rounded to TF32 (10 explicit mantissa bits, round to nearest with
  ties away from zero, as ``cvt.rna.tf32.f32``), products accumulated in fp32;
* ``"tf32x3"``: each fp32 operand split into big = tf32(a) and small = tf32(a - big), and
  big @ big + big @ small + small @ big accumulated in fp32 (Triton's 3xTF32: small @ small is
  dropped);
* ``"ieee"`` and 16-bit or 8-bit operands: unchanged (the interpreter's plain matmul).
"""
from __future__ import annotations

import numpy as np

_PATCHED = {}


def round_tf32(a: np.ndarray) -> np.ndarray:
    """fp32 -> the nearest TF32 value (ties away from zero), still stored as fp32; inf/nan unchanged."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    bits = a.view(np.uint32)
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).astype(np.uint32)
    return np.where(finite, rounded, bits).astype(np.uint32).view(np.float32)


def _precision_name(p) -> str:
    name = getattr(p, "name", None) or str(p)
    return name.rsplit(".", 1)[-1].upper()


def tf32_matmul(a: np.ndarray, b: np.ndarray, precision: str) -> np.ndarray:
    """fp32 a @ b as a GPU computes it with ``input_precision=precision`` (see the module doc)."""
    if precision == "TF32":
        return np.matmul(round_tf32(a), round_tf32(b), dtype=np.float32)
    if precision == "TF32X3":
        a_big, b_big = round_tf32(a), round_tf32(b)
        a_small, b_small = round_tf32(a - a_big), round_tf32(b - b_big)
        return (np.matmul(a_big, b_small, dtype=np.float32) + np.matmul(a_small, b_big, dtype=np.float32)
                + np.matmul(a_big, b_big, dtype=np.float32))
    return np.matmul(a, b, dtype=np.float32)


def enable() -> None:
    """Patch the interpreter (idempotent)."""
    from triton.runtime import interpreter as itp

    if "create_dot" in _PATCHED:
        return
    original = itp.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        precision = _precision_name(input_precision)
        if a.data.dtype == np.float32 and b.data.dtype == np.float32 and precision in ("TF32", "TF32X3"):
            out = tf32_matmul(a.data, b.data, precision).astype(d.data.dtype) + d.data
            return itp.TensorHandle(out, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    _PATCHED["create_dot"] = original
    itp.InterpreterBuilder.create_dot = create_dot


def enabled() -> bool:
    return "create_dot" in _PATCHED


def disable() -> None:
    from triton.runtime import interpreter as itp

    original = _PATCHED.pop("create_dot", None)
    if original is not None:
        itp.InterpreterBuilder.create_dot = original
