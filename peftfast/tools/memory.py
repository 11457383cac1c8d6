"""Measured activation memory: bytes autograd keeps for backward during one forward pass.

Counts every tensor handed to ``saved_tensors_hooks`` once per storage, skipping parameters and
buffers (they exist whether or not anything is saved). This is the memory a training step holds
between forward and backward beyond the weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class SavedBytes:
    total: int = 0
    tensors: int = 0
    by_dtype: dict[str, int] = field(default_factory=dict)
    bool_bytes: int = 0  # dropout masks show up here

    def as_row(self) -> dict[str, Any]:
        return {"saved_bytes": self.total, "saved_tensors": self.tensors, "bool_bytes": self.bool_bytes,
                "by_dtype": dict(self.by_dtype)}


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def measure_saved_bytes(model: nn.Module, step: Callable[[], torch.Tensor], backward: bool = True) -> SavedBytes:
    """Run ``step()`` (a forward returning a scalar loss) under saved-tensor hooks and sum the saved storages."""
    exclude = {_storage_key(p) for p in model.parameters()} | {_storage_key(b) for b in model.buffers()}
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in exclude and t.device.type != "meta":
            prev = seen.get(key)
            if prev is None or t.untyped_storage().nbytes() > prev.untyped_storage().nbytes():
                seen[key] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    result = SavedBytes()
    for t in seen.values():
        n = t.untyped_storage().nbytes()
        result.total += n
        result.tensors += 1
        name = str(t.dtype).replace("torch.", "")
        result.by_dtype[name] = result.by_dtype.get(name, 0) + n
        if t.dtype == torch.bool:
            result.bool_bytes += n
    if backward:
        loss.backward()
    return result
