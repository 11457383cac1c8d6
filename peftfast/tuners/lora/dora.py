"""DoRA (weight-decomposed low-rank adaptation) for the LoRA layers: ``LoraConfig(use_dora=True)``.

DoRA splits the adapted weight into a magnitude ``m`` (one value per output feature, trained) and a
direction ``W + s B A`` whose per-output-feature norm is treated as a constant (no gradient flows
through it, as in the paper's section 4.3 and in PEFT):

    mns = m / ||W + s B A||_row                     (per output feature o; norm detached)
    y   = mns * (x W^T + s * B A dropout(x)) + bias (eval, or no dropout)

With dropout in training PEFT keeps the base output undropped and rescales the dropped one:

    y   = x W^T + bias + (mns - 1) * dropout(x) W^T + mns * s * B A dropout(x)

and with several active adapters each DoRA adapter rescales the output accumulated so far (bias
excluded): ``y <- mns * (y - bias + s * B A x) + bias``. Both are reproduced exactly.

The norm is computed without forming ``W + s B A`` ([out, in]):

    ||W_o + s (B A)_o||^2 = ||W_o||^2 + 2 s <B_o, (W A^T)_o> + s^2 B_o (A A^T) B_o^T

one [out, r] product ``W A^T`` (reading W once) plus r x r and [out, r] products, in float32 (float64
for float64 inputs). ``||W_o||^2`` of a frozen base is cached and recomputed when the weight tensor
changes (a merge, ``.to()``, a load: keyed on its storage, version counter, dtype and device). Rows
where the expansion cancels (the squared norm below a tenth of its terms' sizes, where float32
rounding would no longer be a few ulps of the result) are recomputed exactly from the materialised
row.

Module tree and files as PEFT's: ``lora_magnitude_vector[adapter]`` is a small module holding
``weight`` ([out] for linear and embedding layers, [1, out, 1, ...] for convolutions).

Caching for inference (``peftfast.helpers.DoraCaching``, PEFT's switch ``ENABLE_DORA_CACHING``): while it is
on and the magnitude module is in eval mode, the norm is kept in its ``_dora_cache`` and reused, so a forward
costs what fused LoRA costs (on the Triton backend the norm kernel, which reads W, is skipped). Unlike PEFT's
cache, an entry is used only while the base weight and the factors are the same tensors at the same version and
the scaling, dtype and path are the same (``tensor_version``): a weight written under no_grad, a merge, a load or
``.to()`` recomputes it. Train mode, or a forward with caching off, empties the cache (as in PEFT).
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Optional

import torch
from torch import nn

# The expansion's squared norm must be at least this fraction of the sum of its terms' magnitudes;
# rows below it are recomputed from the materialised row.
CANCELLATION_LIMIT = 0.1

ENABLE_DORA_CACHING = False
"""Whether DoRA layers in eval mode keep their weight norms between forwards (``peftfast.helpers.DoraCaching``)."""


class DoraMagnitude(nn.Module):
    """The magnitude vector of one DoRA adapter (``lora_magnitude_vector[name].weight``)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=True)
        self._dora_cache: dict[str, Any] = {}  # PEFT's name; (version, value) per key, not in the state dict

    def train(self, mode: bool = True) -> "DoraMagnitude":
        if mode:
            self._dora_cache.clear()
        return super().train(mode)

    def cached(self, key: str, version: Optional[Hashable], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, or the value stored under ``key`` for the same ``version`` while DoRA caching is on and
        this module is in eval mode (None: the inputs cannot be versioned, nothing is cached)."""
        if not ENABLE_DORA_CACHING or self.training:
            self._dora_cache.clear()
            return compute()
        hit = self._dora_cache.get(key)
        if hit is not None and version is not None and hit[0] == version:
            return hit[1]
        value = compute()
        if version is None:
            self._dora_cache.pop(key, None)
        else:
            self._dora_cache[key] = (version, value)
        return value

    def __repr__(self) -> str:
        return "lora.dora." + super().__repr__()


def tensor_version(t: torch.Tensor) -> Optional[tuple]:
    """What identifies ``t``'s current values: its storage, version counter, shape, dtype and device (None for
    tensors that keep no version counter: made under torch.inference_mode)."""
    try:
        version = t._version
    except RuntimeError:
        return None
    return t.data_ptr(), version, tuple(t.shape), t.dtype, t.device


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (norms of half-precision weights are summed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def row_sq_norms(w_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``||W_o||^2`` per row of ``w_rows`` [out, in] in ``dtype``, without a full-size copy for half inputs
    (chunks of rows are upcast one at a time)."""
    out = torch.empty(w_rows.shape[0], device=w_rows.device, dtype=dtype)
    step = max(1, (1 << 24) // max(1, w_rows.shape[1]))
    for i in range(0, w_rows.shape[0], step):
        out[i:i + step] = w_rows[i:i + step].to(dtype).pow(2).sum(1)
    return out


def _w_times_at(w_rows: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W A^T`` [out, r] in ``dtype``. A half-precision W on an accelerator is multiplied in its own dtype
    (fp32 accumulation, one rounding of the [out, r] result); on the CPU chunks of rows are upcast."""
    if w_rows.dtype == dtype:
        return w_rows @ a.to(dtype).T
    if w_rows.device.type != "cpu":
        return (w_rows @ a.to(w_rows.dtype).T).to(dtype)
    a_c = a.to(dtype).T
    step = max(1, (1 << 24) // max(1, w_rows.shape[1]))
    return torch.cat([w_rows[i:i + step].to(dtype) @ a_c for i in range(0, w_rows.shape[0], step)])


@torch.no_grad()
def exact_row_norm(w_rows: torch.Tensor, delta_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``||W_o + delta_o||`` per row from the materialised sum (PEFT's way), in ``dtype``."""
    return (w_rows.to(dtype) + delta_rows.to(dtype)).norm(dim=1)


@torch.no_grad()
def dora_row_norm(w_rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                  w_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``||W_o + s (B A)_o||`` for every output row o, without forming ``W + s B A`` (no gradient).

    w_rows: [out, in] (a view is fine); a: [r, in]; b: [out, r]; w_sq: ``row_sq_norms(w_rows)`` if known.
    Returns [out] in float32 (float64 for float64 inputs). Memory: O(out * r + r^2) besides the inputs.
    """
    dtype = compute_dtype(w_rows, a, b)
    a_c, b_c = a.detach().to(dtype), b.detach().to(dtype)
    if w_sq is None:
        w_sq = row_sq_norms(w_rows, dtype)
    cross = 2.0 * scaling * (b_c * _w_times_at(w_rows, a_c, dtype)).sum(1)   # 2 s <B_o, (W A^T)_o>
    lora_sq = (scaling * scaling) * ((b_c @ (a_c @ a_c.T)) * b_c).sum(1)   # s^2 ||B_o A||^2
    sq = w_sq + cross + lora_sq
    cancelled = sq < CANCELLATION_LIMIT * (w_sq + cross.abs() + lora_sq)
    if bool(cancelled.any()):
        rows = cancelled.nonzero().squeeze(1)
        exact = exact_row_norm(w_rows[rows], scaling * (b_c[rows] @ a_c), dtype)
        sq = sq.index_put((rows,), exact * exact)
    return sq.clamp_min(0).sqrt()


class FrozenNormCache:
    """``||W_o||^2`` of a frozen base weight, recomputed whenever the weight tensor is replaced or written
    (its storage pointer, version counter, shape, dtype or device change)."""

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.value: Optional[torch.Tensor] = None

    def clear(self) -> None:
        self.key = self.value = None

    def get(self, weight: torch.Tensor, w_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, weight.device, dtype)
        if self.key != key:
            self.value = row_sq_norms(w_rows.detach(), dtype)
            self.key = key
        return self.value
