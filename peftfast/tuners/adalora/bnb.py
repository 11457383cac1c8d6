"""AdaLoRA on bitsandbytes 4-bit (``Linear4bit``) and 8-bit (``Linear8bitLt``) bases.

The base output comes from the quantised-base mixins of ``peftfast.tuners.quantized`` (computed from
the packed storage); the adapter is LoRA's with ``A' = A * E`` and the scale ``scaling / (ranknum +
1e-5)``, so on the Triton backend a fusable base runs it inside the quantised GEMM
(``qlora_linear_fused``) and elsewhere adds it with ``lora_linear``. Adapter weights live in the base's
compute dtype. Merging dequantises to fp32, adds the deltas and requantises (``QuantizedAdditiveLayer``;
lossy, warns), where PEFT's AdaLoRA quantised layers cannot merge at all.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ...kernels.lora import lora_linear
from ...kernels.qlora import Int8Weight, qlora_linear_fused
from ..additive import QuantizedAdditiveLayer
from ..adapter_layers import base_is_fusable
from ..quantized import QuantizedBase4bit, QuantizedBase8bit, compute_dtype, quantized_kind
from ..tuners_utils import BaseTunerLayer
from .layer import SVDLinear


class QuantSVDLinear(QuantizedAdditiveLayer, SVDLinear):
    """AdaLoRA over a quantised base; subclasses mix in the base (4-bit or 8-bit) first."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: float = 1,
                 **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, fan_in_fan_out=False)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``B @ (A * E) * scaling / (ranknum + 1e-5)`` [out, in] in fp32 (the storage has no float dtype)."""
        return self.delta_matrix(adapter).float()

    def fused(self, x: torch.Tensor) -> Optional[tuple[Any, Optional[torch.Tensor]]]:
        """(weight as qlora_linear_fused takes it, bias) when the base may be fused for ``x``, else None."""
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        special = self.disabled_forward(x, args, kwargs)
        if special is not None:
            return special
        names = self.active_names()
        fused = self.fused(x) if names and not args and not kwargs else None
        if fused is not None:
            return qlora_linear_fused(x, fused[0], fused[1], *self.adapter_bundle(names), self.training)
        result = self.base_forward(x, *args, **kwargs)
        return lora_linear(x, result, *self.adapter_bundle(names), self.training) if names else result


class SVDLinear4bit(QuantizedBase4bit, QuantSVDLinear):
    """AdaLoRA on a bitsandbytes ``Linear4bit`` (NF4 or FP4)."""

    def fused(self, x: torch.Tensor) -> Optional[tuple[Any, Optional[torch.Tensor]]]:
        base = self.get_base_layer()
        if not (base_is_fusable(base) and compute_dtype(base, x) == x.dtype):
            return None
        bias = None if base.bias is None else base.bias.to(x.dtype)
        return self.packed_weight()._replace(dtype=x.dtype), bias


class SVDLinear8bitLt(QuantizedBase8bit, QuantSVDLinear):
    """AdaLoRA on a bitsandbytes ``Linear8bitLt`` (row-wise int8 weight)."""

    def fused(self, x: torch.Tensor) -> Optional[tuple[Any, Optional[torch.Tensor]]]:
        base = self.get_base_layer()
        if not (base_is_fusable(base) and not base.state.has_fp16_weights):
            return None
        bias = None if base.bias is None else base.bias.to(x.dtype)
        return Int8Weight(*self.int8_weight()), bias


def dispatch_bnb(target: nn.Module, adapter_name: str, lora_config: Any = None, **kwargs: Any) -> nn.Module | None:
    """The AdaLoRA layer for a bitsandbytes 4-bit / 8-bit linear (chosen by layer type), else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    kind = quantized_kind(base)
    if kind is None:
        return None
    cls = SVDLinear4bit if kind == "4bit" else SVDLinear8bitLt
    return cls(target, adapter_name, config=lora_config, **kwargs)
