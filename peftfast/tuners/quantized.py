"""What an adapter layer needs from a bitsandbytes 4-bit (``Linear4bit``) or 8-bit (``Linear8bitLt``) base.

LoRA and IA3 both wrap such bases; they mix :class:`QuantizedBase4bit` or :class:`QuantizedBase8bit`
in front of their layer class and get:

* ``base_forward(x)``: the base output straight from bitsandbytes' storage, by ``matmul_4bit`` /
  ``matmul_int8`` (on CUDA the weight is dequantised tile by tile inside the matmul; on CPU it is
  dequantised, multiplied and freed), so neither forward nor backward keeps an [N, K] weight alive
  beyond one op. bitsandbytes' own ``forward`` runs only when the base must be called
  (:func:`~peftfast.tuners.adapter_layers.base_is_fusable` says no, or extra arguments are given),
  and then without its CPU inference repack (``Linear4bit`` rewriting ``weight.data`` in eval mode
  without grad).
* the storage as the fused ops take it: ``packed_weight()`` (4-bit, a view) and ``int8_weight()``
  (8-bit CB/SCB);
* ``dequantized_weight()`` (fp32 [out, in], a new tensor) and ``store_weight(w)`` (requantise with
  bitsandbytes' own quantiser and the layer's settings: 4-bit quant_type, blocksize, double
  quantisation, quant_storage, dtype; 8-bit row-wise absmax of the fp16 weight, as bitsandbytes
  quantises on load), for merging;
* ``adapter_device_dtype()``: adapters live in the base's compute dtype (fp32 when it has none), as
  in PEFT.

dtypes follow bitsandbytes: a 4-bit base computes in ``compute_dtype`` (set from the first input
when the layer has none, as bnb does: :func:`compute_dtype`), dequantising the weight straight into
that dtype (one rounding), and returns the input's dtype; an 8-bit base computes in the input's
dtype with the dequantised weight (bitsandbytes' CPU training path; its LLM.int8 outlier
decomposition is not used, so the product is the same in train and eval mode).

:func:`quantized_kind` recognises these bases by type, so a model whose ``is_loaded_in_4bit/8bit``
flags are missing is handled too. bitsandbytes is never imported just to look: a bnb layer can
only exist if it already is.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import nn

from ..kernels.qmatmul import matmul_4bit, matmul_int8
from ..kernels.quant import Packed4bit, dequantize_4bit, dequantize_int8
from ..utils.bnb_storage import int8_from_bnb, packed4bit_from_bnb
from .adapter_layers import base_is_fusable, creation_device

__all__ = ["QuantizedBase", "QuantizedBase4bit", "QuantizedBase8bit", "compute_dtype", "quantized_kind",
           "rounding_warning"]


def quantized_kind(module: nn.Module) -> str | None:
    """'4bit' for a bitsandbytes Linear4bit, '8bit' for a Linear8bitLt, None otherwise."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The 4-bit base's compute dtype for ``x``; bnb fixes it on the first call (fp32/bf16 inputs)."""
    if not getattr(base, "compute_type_is_set", True):
        if x.dtype in (torch.float32, torch.bfloat16):
            base.compute_dtype = x.dtype
        base.compute_type_is_set = True
    return base.compute_dtype or x.dtype


def rounding_warning(what: str, kind: str, stacklevel: int = 3) -> None:
    """Warn that ``what`` ('Merging' / 'Unmerging') adapters into a ``kind`` weight requantises it."""
    warnings.warn(f"{what} LoRA adapters into a {kind} bitsandbytes weight requantises it: the result "
                  "differs from the exact sum by the quantisation rounding, so outputs (and generations) can "
                  "change slightly", UserWarning, stacklevel=stacklevel)


class QuantizedBase:
    """A quantised base seen from the adapter layer: its output, and fp32 weight <-> storage for merging.

    Mixed in before the adapter layer class; relies on ``get_base_layer()``.
    """

    quant_name = ""

    def adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        # PEFT moves adapters to the base's compute dtype (float32 when it has none)
        base = self.get_base_layer()
        dtype = getattr(base, "compute_dtype", None) or torch.float32
        return creation_device(base.weight.device), dtype

    def base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The base weight [out, in] in fp32 (a new tensor)."""
        raise NotImplementedError

    def store_weight(self, weight: torch.Tensor) -> None:
        """Quantise ``weight`` [out, in] into the base layer's storage, with the layer's settings."""
        raise NotImplementedError


class QuantizedBase4bit(QuantizedBase):
    quant_name = "4-bit"

    def packed_weight(self) -> Packed4bit:
        """The base weight as bitsandbytes stores it (a view, no copy)."""
        base = self.get_base_layer()
        state = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            _restore_standard_layout(base, state)
        return packed4bit_from_bnb(base)

    def base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        p = self.packed_weight()
        if args or kwargs or not base_is_fusable(base):
            return _call_without_repack(base, x, *args, **kwargs)
        compute = compute_dtype(base, x)
        bias = None if base.bias is None else base.bias.to(compute)
        # x: [..., in] -> [..., out]; W is dequantised straight into the compute dtype, as bnb's gemm does
        return matmul_4bit(x.to(compute), p._replace(dtype=compute), bias).to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_4bit(self.packed_weight()._replace(dtype=torch.float32))

    @torch.no_grad()
    def store_weight(self, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        p = self.packed_weight()  # first: it may put the storage back into the standard layout
        base = self.get_base_layer()
        old = base.weight
        state = old.quant_state
        nested = bool(getattr(old, "compress_statistics", state.nested))
        storage = old.dtype
        data, new_state = bnb.functional.quantize_4bit(
            weight.to(device=old.device, dtype=p.dtype).contiguous(), blocksize=p.blocksize,
            compress_statistics=nested, quant_type=state.quant_type, quant_storage=storage)
        _set_4bit_weight(base, data, new_state, nested)


def _set_4bit_weight(base: nn.Module, data: torch.Tensor, state: Any, nested: bool) -> None:
    import bitsandbytes as bnb

    base.weight = bnb.nn.Params4bit(
        data, requires_grad=False, quant_state=state, blocksize=state.blocksize, compress_statistics=nested,
        quant_type=state.quant_type, quant_storage=data.dtype, module=base, bnb_quantized=True)
    base.quant_state = state


def _restore_standard_layout(base: nn.Module, state: Any) -> None:
    """Undo bitsandbytes' CPU inference repack in place (standard packed bytes, fp32 block scales).

    The scales stay the bf16-rounded ones bitsandbytes switched to (``packed4bit_from_bnb`` warns);
    the double quantisation setting is kept for later requantisation (merging).
    """
    import bitsandbytes as bnb

    p = packed4bit_from_bnb(base)
    storage = getattr(state, "original_storage_type", None) or torch.uint8
    data = p.data.view(storage).reshape(-1, 1)
    flat = bnb.functional.QuantState(absmax=p.absmax.contiguous(), shape=torch.Size(p.shape), code=p.code,
                                     blocksize=p.blocksize, quant_type=state.quant_type, dtype=p.dtype)
    _set_4bit_weight(base, data, flat, bool(getattr(state, "original_nested", False)))


def _call_without_repack(base: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Run the base module itself (its hooks need it), without letting bnb rewrite its storage."""
    flag = getattr(base, "support_avx512bf16_for_cpu", None)
    if flag is None:
        return base(x, *args, **kwargs)
    base.support_avx512bf16_for_cpu = False
    try:
        return base(x, *args, **kwargs)
    finally:
        base.support_avx512bf16_for_cpu = flag


class QuantizedBase8bit(QuantizedBase):
    quant_name = "8-bit"

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(CB int8 [out, in], SCB fp32 [out]) wherever bitsandbytes keeps them now (views, no copy)."""
        return int8_from_bnb(self.get_base_layer())

    def base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if args or kwargs or not base_is_fusable(base) or base.state.has_fp16_weights:
            return base(x, *args, **kwargs)
        cb, scb = self.int8_weight()
        bias = None if base.bias is None else base.bias.to(x.dtype)
        return matmul_int8(x, cb, scb, bias)  # x: [..., in] -> [..., out], in x's dtype

    def dequantized_weight(self) -> torch.Tensor:
        cb, scb = self.int8_weight()
        return dequantize_int8(cb, scb, torch.float32)

    @torch.no_grad()
    def store_weight(self, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        base = self.get_base_layer()
        # as Int8Params quantises on load: row-wise absmax of the fp16 weight
        weight = weight.to(base.weight.device, torch.float16).contiguous()
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight)
        base.state.reset_grads()
        base.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
