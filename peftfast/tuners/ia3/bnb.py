"""(IA)^3 on bitsandbytes 4-bit (``Linear4bit``) and 8-bit (``Linear8bitLt``) bases.

    feed-forward module:  y = base(l * x)          other modules:  y = l * base(x)

``base`` comes from the quantised-base mixins of ``peftfast.tuners.quantized``, shared with LoRA
(computed from bitsandbytes' storage by ``matmul_4bit`` / ``matmul_int8``: no [N, K] weight kept for
backward, bitsandbytes' CPU repack never triggered, bnb's dtype rules), and ``l`` is applied by the
elementwise (IA)^3 ops. The result keeps the input's dtype (PEFT's bnb layers return float32 for
half-precision inputs; the values are the same).

As in PEFT, (IA)^3 adapters cannot be merged into a quantised weight (the model-level
``merge_and_unload`` refuses too); ``unload()`` removes them. ``dispatch_bnb`` picks these layers by
the base layer's type; ``IA3Model.dispatchers`` lists it first.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ...kernels.ia3 import ia3_scale_input, ia3_scale_output
from ..quantized import QuantizedBase4bit, QuantizedBase8bit, quantized_kind
from ..tuners_utils import BaseTunerLayer
from .layer import IA3Layer

__all__ = ["Linear4bit", "Linear8bitLt", "dispatch_bnb"]


class _QuantIA3Linear(nn.Module, IA3Layer):
    """(IA)^3 over a quantised base; subclasses mix in the base (4-bit or 8-bit) first."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, is_feedforward: bool = False,
                 **kwargs: Any) -> None:
        super().__init__()
        IA3Layer.__init__(self, base_layer, is_feedforward=is_feedforward)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _refuse_merge(self) -> None:
        raise ValueError(f"(IA)^3 adapters cannot be merged into a {self.quant_name} bitsandbytes weight; "
                         "use unload() to remove them, or load the base model in float precision to merge")

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        if self.merge_names(adapter_names, warn=False):
            self._refuse_merge()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if self.merge_names(adapter_names):
            self._refuse_merge()

    def unmerge(self) -> None:
        warnings.warn("Already unmerged. Nothing to do.", UserWarning)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        scale = None if self.disable_adapters else self.active_scale()
        if scale is None:
            return self.base_forward(x, *args, **kwargs)
        if self.is_feedforward:  # x: [..., in], scale: [in]
            return self.base_forward(ia3_scale_input(x, scale), *args, **kwargs)
        return ia3_scale_output(self.base_forward(x, *args, **kwargs), scale)  # scale: [out]

    def __repr__(self) -> str:
        return "ia3." + super().__repr__()


class Linear4bit(QuantizedBase4bit, _QuantIA3Linear):
    """(IA)^3 on a bitsandbytes ``Linear4bit``."""


class Linear8bitLt(QuantizedBase8bit, _QuantIA3Linear):
    """(IA)^3 on a bitsandbytes ``Linear8bitLt``."""


def dispatch_bnb(target: nn.Module, adapter_name: str, ia3_config: Any = None, is_feedforward: bool = False,
                 **kwargs: Any) -> nn.Module | None:
    """The (IA)^3 layer for a bitsandbytes 4-bit / 8-bit linear (chosen by layer type), else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    kind = quantized_kind(base)
    if kind is None:
        return None
    if ia3_config is not None and ia3_config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is set to True but the target module is a bitsandbytes linear layer "
                      "(weight stored [out, in]). Setting fan_in_fan_out to False.", UserWarning)
        ia3_config.fan_in_fan_out = False
    cls = Linear4bit if kind == "4bit" else Linear8bitLt
    return cls(target, adapter_name, config=ia3_config, is_feedforward=is_feedforward)
