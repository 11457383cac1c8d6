"""Which quantization library a tuner layer's base layer comes from (PEFT's ``peft.utils.quantization_utils``).

``get_layer_status`` / ``get_model_status`` report a layer's ``quantization_backend`` attribute by its
``backend_name`` (None when unset, which is what PEFT 0.21's own bitsandbytes layers report too).
:func:`resolve_quantization_backend` names the backend of a base layer. peftfast's quantized paths are in
``peftfast.tuners.quantized``; these objects only name the backend.
"""
from __future__ import annotations

from typing import Optional

from torch import nn


class QuantizationBackend:
    """A quantization library, by the name the status reports show (``backend_name``)."""

    backend_name: str = ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend_name={self.backend_name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuantizationBackend) and other.backend_name == self.backend_name

    def __hash__(self) -> int:
        return hash(self.backend_name)


class Bnb8bitBackend(QuantizationBackend):
    """bitsandbytes ``Linear8bitLt``."""

    backend_name = "bnb 8bit"


class Bnb4bitBackend(QuantizationBackend):
    """bitsandbytes ``Linear4bit`` (NF4 / FP4)."""

    backend_name = "bnb 4bit"


def resolve_quantization_backend(base_layer: nn.Module) -> Optional[QuantizationBackend]:
    """The backend of ``base_layer`` (by its class, without importing bitsandbytes), or None."""
    for cls in type(base_layer).__mro__:
        if cls.__module__.startswith("bitsandbytes"):
            if cls.__name__ == "Linear8bitLt":
                return Bnb8bitBackend()
            if cls.__name__ == "Linear4bit":
                return Bnb4bitBackend()
    return None
