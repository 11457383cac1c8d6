"""Numerics of the kernel tests: a float64 reference and a tolerance derived from plain PyTorch.

A kernel's result ``got`` is compared with the same math run in float64 (``ref``). The allowed
error is not guessed: it is ``k`` times the error of plain PyTorch running that math in the same
dtype as the kernel (``plain``), plus one ulp of the result's largest magnitude (so that an exact
plain result does not demand an exact kernel):

    max|got - ref| <= k * max|plain - ref| + eps(dtype) * max|ref|

A kernel that computes something else (a wrong mask, a missing term) is off by far more than a
few roundings of the same math, so the check can fail; a kernel that rounds once where PyTorch
rounds several times passes with room to spare.

Used by tests/kernels/* and tests/test_conv.py. tests/test_lora_parity.py's ``assert_close`` (a fixed relative
tolerance against PEFT's fp32 model) could derive its bound the same way.
"""
from __future__ import annotations

import torch


def max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref|, computed in float64."""
    return (got.double() - ref.double()).abs().max().item()


def allowed_error(plain: torch.Tensor, ref: torch.Tensor, k: float, dtype: torch.dtype | None = None) -> float:
    """k * max|plain - ref| + eps(dtype) * max|ref|; dtype defaults to plain's."""
    eps = torch.finfo(plain.dtype if dtype is None else dtype).eps
    return k * max_err(plain, ref) + eps * ref.abs().max().item()


def assert_matches_float64(name: str, got: torch.Tensor, plain: torch.Tensor, ref: torch.Tensor, k: float,
                           check_dtype: bool = True) -> None:
    """``got`` within ``allowed_error`` of the float64 ``ref`` (ulp of got's dtype); with
    ``check_dtype`` also the dtype of ``plain`` and the shape of ``ref``."""
    if check_dtype:
        assert got.dtype == plain.dtype and got.shape == ref.shape, name
    err, err_pt = max_err(got, ref), max_err(plain, ref)
    ulp = torch.finfo(got.dtype).eps * ref.double().abs().max().item()
    assert err <= k * err_pt + ulp, (
        f"{name}: error {err:.3e} vs float64 > {k} x plain PyTorch error {err_pt:.3e} + {ulp:.3e}")
