"""A process-wide count of optimizer steps, for the caches built from trainable adapter weights.

Such caches (the stacked store of a layer's adapters for mixed batches, ``tuners/lora/grouped.py``) check a tensor's
version counter to see in-place writes, but fused optimizers (``torch.optim.AdamW(fused=True)``, transformers'
default ``adamw_torch_fused``) update the parameters without bumping it. Every ``torch.optim.Optimizer`` step
(fused, foreach or not, and subclasses such as bitsandbytes' optimizers) runs torch's global post-step hooks; the
one registered here counts them, and a cache keyed on the count is rebuilt after any step. Writes through a
parameter's ``.data`` (``p.data.mul_(...)``) bump no counter at all and stay invisible to such caches.
"""
from __future__ import annotations

import threading

from torch.optim.optimizer import register_optimizer_step_post_hook

_COUNT = [0]
_LOCK = threading.Lock()
_HANDLE: list = []


def _count(optimizer, args, kwargs) -> None:
    _COUNT[0] += 1


def optimizer_steps() -> int:
    """The number of optimizer steps taken since the first call (which registers the counting hook)."""
    if not _HANDLE:
        with _LOCK:
            if not _HANDLE:
                _HANDLE.append(register_optimizer_step_post_hook(_count))
    return _COUNT[0]
