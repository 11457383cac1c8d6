"""``BufferDict``: PEFT's dict of buffers keyed by adapter name (``peft.tuners._buffer_dict``).

An ``nn.ParameterDict`` for tensors that are state but not trained (VeRA-style shared projections): the
entries are registered buffers, so ``.to()``, ``state_dict()`` (when ``persistent``) and ``named_buffers()``
see them.
"""
from __future__ import annotations

import collections.abc
from collections import OrderedDict
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn


class BufferDict(nn.Module):
    """A dict of buffers (same behaviour and constructor as PEFT's ``BufferDict``)."""

    def __init__(self, buffers: Optional[Any] = None, persistent: bool = False) -> None:
        super().__init__()
        self.persistent = persistent
        if buffers is not None:
            self.update(buffers)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, buffer: torch.Tensor) -> None:
        self.register_buffer(key, buffer, persistent=self.persistent)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def clear(self) -> None:
        self._buffers.clear()

    def pop(self, key: str) -> torch.Tensor:
        value = self[key]
        del self[key]
        return value

    def keys(self) -> Iterable[str]:
        return self._buffers.keys()

    def items(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self._buffers.items()

    def values(self) -> Iterable[torch.Tensor]:
        return self._buffers.values()

    def update(self, buffers: Any) -> None:
        """Add or overwrite entries from a mapping or an iterable of (key, tensor) pairs. Ordered inputs keep their
        order; a plain mapping is added in sorted key order (as PEFT)."""
        if not isinstance(buffers, collections.abc.Iterable):
            raise TypeError("BuffersDict.update should be called with an iterable of key/value pairs, but got "
                            + type(buffers).__name__)
        if isinstance(buffers, (OrderedDict, BufferDict)):
            pairs = list(buffers.items())
        elif isinstance(buffers, collections.abc.Mapping):
            pairs = sorted(buffers.items())
        else:
            pairs = []
            for j, p in enumerate(buffers):
                if not isinstance(p, collections.abc.Iterable):
                    raise TypeError(f"BufferDict update sequence element #{j} should be Iterable; is "
                                    f"{type(p).__name__}")
                if len(p) != 2:
                    raise ValueError(f"BufferDict update sequence element #{j} has length {len(p)}; 2 is required")
                pairs.append((p[0], p[1]))
        for key, buffer in pairs:
            self[key] = buffer

    def extra_repr(self) -> str:
        lines = []
        for k, p in self._buffers.items():
            size = "x".join(str(s) for s in p.size())
            device = "" if p.device.type == "cpu" else f" ({p.device.type.upper()} {p.get_device()})"
            lines.append(f"  ({k}): Buffer containing: [{torch.typename(p)} of size {size}{device}]")
        return "\n".join(lines)
