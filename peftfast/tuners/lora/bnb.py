"""LoRA on bitsandbytes 4-bit (``Linear4bit``, NF4/FP4) and 8-bit (``Linear8bitLt``) bases: QLoRA.

    y = lora_linear(x, base(x), A, B, s, p)          base(x) = x @ deq(W_q)^T + b

The base output and everything else read from bitsandbytes' storage come from the quantised-base
mixins of ``peftfast.tuners.quantized`` (shared with IA3): ``base(x)`` is computed straight from the
packed weight, so neither forward nor backward keeps an [N, K] weight alive beyond one op. On the
Triton backend (a base that ``base_is_fusable`` allows, whose compute dtype is the input's) the
adapters run inside the same quantised GEMM (``qlora_linear_fused``: one store of y; the dX kernel
adds the adapter term and computes dA); otherwise the adapter term is the same op as on a float
base. A mixed batch (``adapter_names``) at prefill runs the same way on the Triton backend: one launch
of the grouped kernel with the weight dequantised inside its base GEMM (``lora_grouped_qlinear``; a
4-bit weight in the aligned layout, or int8), else bitsandbytes' matmul then the grouped kernels.
Adapter weights are created in the base's compute dtype (fp32 by default, as in PEFT).

Merging is ``QuantizedAdditiveLayer``'s: the weight is dequantised to fp32, the adapters' deltas
are added, and the sum is requantised with bitsandbytes' own quantiser and the layer's settings.
Unmerging subtracts the same way, so a merge/unmerge round trip does not restore the original
bits; both warn.

``dispatch_bnb`` picks these layers by the base layer's type; ``LoraModel.dispatchers`` lists it
first.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ...kernels.qlora import Int8Weight, qlora_linear_fused
from ...kernels.quant import Packed4bit
from ..additive import QuantizedAdditiveLayer, low_rank_delta
from ..adapter_layers import base_is_fusable
from ..quantized import QuantizedBase4bit, QuantizedBase8bit, compute_dtype, quantized_kind
from ..tuners_utils import BaseTunerLayer
from .layer import Linear

__all__ = ["Linear4bit", "Linear8bitLt", "QuantLoraLinear", "QuantizedBase4bit", "QuantizedBase8bit",
           "dispatch_bnb", "quantized_kind"]


class QuantLoraLinear(QuantizedAdditiveLayer, Linear):
    """LoRA over a quantised base; subclasses mix in the base (4-bit or 8-bit) first."""

    supports_bd_lora = False  # PEFT has no BD-LoRA variant for quantised layers either
    supports_velora = False  # nor VeLoRA

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False,
                 init_lora_weights: bool | str = True, use_rslora: bool = False, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         fan_in_fan_out=False, init_lora_weights=init_lora_weights, use_rslora=use_rslora,
                         **kwargs)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B @ A`` [out, in] in fp32 (the quantised weight has no float dtype of its own)."""
        return low_rank_delta(self.lora_B[adapter].weight, self.lora_A[adapter].weight, self.scaling[adapter],
                              torch.float32)

    def dora_base_weight(self) -> torch.Tensor:
        """DoRA's norm reads the dequantised weight (fp32 [out, in], a new tensor each call, as in PEFT)."""
        return self.dequantized_weight()

    def _grouped_base_weight(self, x: torch.Tensor) -> Packed4bit | Int8Weight | None:
        """A mixed batch's prefill fuses the base GEMM with each row's adapter (``lora_grouped_qlinear``: the weight
        dequantised tile by tile in that GEMM) where ``_fuses_with_base`` allows it (frozen base without hooks,
        the compute dtype rules of the single-adapter path); a 4-bit weight in the general layout is not fused
        (``grouped_linear`` says None: bitsandbytes' matmul, then the grouped kernels)."""
        return self._quant_weight(x) if self._fuses_with_base(x) else None

    def _grouped_base_args(self, x: torch.Tensor, weight: Packed4bit | Int8Weight) -> tuple:
        bias = self.get_base_layer().bias
        return x, weight, None if bias is None else bias.to(x.dtype)


_QuantLoraLinear = QuantLoraLinear  # the name this class had before it was public


class Linear4bit(QuantizedBase4bit, QuantLoraLinear):
    """LoRA on a bitsandbytes ``Linear4bit`` (NF4 or FP4, any blocksize, nested scales or not, any
    quant_storage)."""

    def _fuses_with_base(self, x: torch.Tensor) -> bool:
        """A base that may be fused (``base_is_fusable``) and whose compute dtype is x's dtype is handed to
        ``qlora_linear_fused`` with the adapters: on the Triton backend the same 4-bit GEMM adds them (one
        store of y, one dX kernel); elsewhere the op runs the 4-bit matmul, then ``lora_linear`` (the op
        picks the backend)."""
        base = self.get_base_layer()
        return base_is_fusable(base) and compute_dtype(base, x) == x.dtype

    def _quant_weight(self, x: torch.Tensor) -> Packed4bit:
        return self.packed_weight()._replace(dtype=x.dtype)  # dequantised straight into the compute dtype

    def _fused_forward(self, x: torch.Tensor, names: list[str], with_bias: bool = True) -> torch.Tensor:
        base = self.get_base_layer()
        bias = None if base.bias is None or not with_bias else base.bias.to(x.dtype)
        return qlora_linear_fused(x, self._quant_weight(x), bias, *self.adapter_bundle(names), self.training)


class Linear8bitLt(QuantizedBase8bit, QuantLoraLinear):
    """LoRA on a bitsandbytes ``Linear8bitLt`` (row-wise int8 weight)."""

    def _fuses_with_base(self, x: torch.Tensor) -> bool:
        """A base that may be fused (``base_is_fusable``) holding int8 storage (CB/SCB, no fp16 weights) is
        handed to ``qlora_linear_fused`` with the adapters: on the Triton backend the same int8 GEMM adds them
        (one store of y; the dX kernel also computes dA); elsewhere the op runs the int8 matmul, then
        ``lora_linear`` (the op picks the backend)."""
        base = self.get_base_layer()
        return base_is_fusable(base) and not base.state.has_fp16_weights

    def _quant_weight(self, x: torch.Tensor) -> Int8Weight:
        return Int8Weight(*self.int8_weight())

    def _fused_forward(self, x: torch.Tensor, names: list[str], with_bias: bool = True) -> torch.Tensor:
        base = self.get_base_layer()
        bias = None if base.bias is None or not with_bias else base.bias.to(x.dtype)
        return qlora_linear_fused(x, self._quant_weight(x), bias, *self.adapter_bundle(names), self.training)


def dispatch_bnb(target: nn.Module, adapter_name: str, lora_config: Any = None, **kwargs: Any
                 ) -> nn.Module | None:
    """The LoRA layer for a bitsandbytes 4-bit / 8-bit linear (chosen by layer type), else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    kind = quantized_kind(base)
    if kind is None:
        return None
    if kwargs.get("fan_in_fan_out"):
        warnings.warn("fan_in_fan_out is set to True but the target module is a bitsandbytes linear layer "
                      "(weight stored [out, in]). Setting fan_in_fan_out to False.", UserWarning)
        kwargs["fan_in_fan_out"] = False
        if lora_config is not None:
            lora_config.fan_in_fan_out = False
    cls = Linear4bit if kind == "4bit" else Linear8bitLt
    return cls(target, adapter_name, **kwargs)
