"""LoRA on bitsandbytes 4-bit (``Linear4bit``, NF4/FP4) and 8-bit (``Linear8bitLt``) bases: QLoRA.

    y = lora_linear(x, base(x), A, B, s, p)          base(x) = x @ deq(W_q)^T + b

The base output is computed straight from bitsandbytes' storage by ``matmul_4bit`` /
``matmul_int8`` (on CUDA the weight is dequantised tile by tile inside the matmul; on CPU it is
dequantised, multiplied and freed), so neither forward nor backward keeps an [N, K] weight alive
beyond one op: autograd saves only the packed tensors that already live in the layer. On the
Triton backend (a frozen, hook-free base whose compute dtype is the input's) the adapters run
inside the same quantised GEMM (``qlora_linear_fused``: one store of y; the dX kernel adds the
adapter term and computes dA); otherwise the adapter term is the same op as on a float base. bitsandbytes' own ``forward`` is never
called (unless hooks on the base layer need it), which also keeps its CPU inference repack
(``Linear4bit`` rewriting ``weight.data`` in eval mode without grad) away from the layers
wrapped here.

dtypes follow bitsandbytes: a 4-bit base computes in ``compute_dtype`` (set from the first
input when the layer has none, as bnb does), dequantising the weight straight into that dtype
(one rounding), and returns the input's dtype; an 8-bit base computes in the input's dtype with
the dequantised weight (bitsandbytes' CPU training path; its LLM.int8 outlier decomposition is
not used, so the product is the same in train and eval mode). Adapter weights are created in
the base's compute dtype (fp32 by default, as in PEFT).

Merging is lossy: the weight is dequantised to fp32, the adapters' deltas are added, and the
sum is requantised with bitsandbytes' own quantiser and the layer's settings (4-bit: quant_type,
blocksize, double quantisation, quant_storage, dtype; 8-bit: row-wise absmax of the fp16 weight,
as bitsandbytes quantises on load). Unmerging subtracts the same way, so a merge/unmerge round
trip does not restore the original bits; both warn.

The dispatcher below is registered in ``LoraModel.dispatchers`` when this module is imported. It
picks these layers by the base layer's type, so a model whose ``is_loaded_in_4bit/8bit`` flags
are missing is handled too. bitsandbytes is never imported here: a bnb layer can only exist if it
already is.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks

from ...kernels.backend import use_triton
from ...kernels.lora_fused import Int8Weight, qlora_linear_fused
from ...kernels.qmatmul import matmul_4bit, matmul_int8
from ...kernels.quant import Packed4bit, dequantize_4bit, dequantize_int8
from ...utils.bnb_storage import int8_from_bnb, packed4bit_from_bnb
from ..tuners_utils import BaseTunerLayer
from .layer import Linear, _delta, _dropout_p
from .model import LoraModel

__all__ = ["Linear4bit", "Linear8bitLt", "QuantizedBase4bit", "QuantizedBase8bit", "dispatch_bnb",
           "quantized_kind"]


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


def _runs_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` does more than its class forward (hooks, or a patched forward)."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
           getattr(module, "_backward_pre_hooks", None))
    shared = (_module_hooks._global_forward_hooks, _module_hooks._global_forward_pre_hooks,
              _module_hooks._global_backward_hooks,
              getattr(_module_hooks, "_global_backward_pre_hooks", None))
    return any(bool(h) for h in own + shared) or "forward" in module.__dict__


class _QuantizedBase:
    """What an adapter layer needs from a quantised base: its output, and fp32 weight <-> storage for merging.

    Mixed in before the adapter layer class; relies on ``get_base_layer()``.
    """

    quant_name = ""

    def _adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        # PEFT moves adapters to the base's compute dtype (float32 when it has none)
        base = self.get_base_layer()
        dtype = getattr(base, "compute_dtype", None) or torch.float32
        return base.weight.device, dtype

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The base weight [out, in] in fp32 (a new tensor)."""
        raise NotImplementedError

    def _store_weight(self, weight: torch.Tensor) -> None:
        """Quantise ``weight`` [out, in] into the base layer's storage, with the layer's settings."""
        raise NotImplementedError


def _compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The 4-bit base's compute dtype for ``x``; bnb fixes it on the first call (fp32/bf16 inputs)."""
    if not getattr(base, "compute_type_is_set", True):
        if x.dtype in (torch.float32, torch.bfloat16):
            base.compute_dtype = x.dtype
        base.compute_type_is_set = True
    return base.compute_dtype or x.dtype


class QuantizedBase4bit(_QuantizedBase):
    quant_name = "4-bit"

    def packed_weight(self) -> Packed4bit:
        """The base weight as bitsandbytes stores it (a view, no copy)."""
        base = self.get_base_layer()
        state = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            _restore_standard_layout(base, state)
        return packed4bit_from_bnb(base)

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        p = self.packed_weight()
        if args or kwargs or _runs_hooks(base):
            return _call_without_repack(base, x, *args, **kwargs)
        compute = _compute_dtype(base, x)
        bias = None if base.bias is None else base.bias.to(compute)
        # x: [..., in] -> [..., out]; W is dequantised straight into the compute dtype, as bnb's gemm does
        return matmul_4bit(x.to(compute), p._replace(dtype=compute), bias).to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_4bit(self.packed_weight()._replace(dtype=torch.float32))

    @torch.no_grad()
    def _store_weight(self, weight: torch.Tensor) -> None:
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


class QuantizedBase8bit(_QuantizedBase):
    quant_name = "8-bit"

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if args or kwargs or _runs_hooks(base) or base.state.has_fp16_weights:
            return base(x, *args, **kwargs)
        cb, scb = int8_from_bnb(base)
        bias = None if base.bias is None else base.bias.to(x.dtype)
        return matmul_int8(x, cb, scb, bias)  # x: [..., in] -> [..., out], in x's dtype

    def dequantized_weight(self) -> torch.Tensor:
        cb, scb = int8_from_bnb(self.get_base_layer())
        return dequantize_int8(cb, scb, torch.float32)

    @torch.no_grad()
    def _store_weight(self, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        base = self.get_base_layer()
        # as Int8Params quantises on load: row-wise absmax of the fp16 weight
        weight = weight.to(base.weight.device, torch.float16).contiguous()
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight)
        base.state.reset_grads()
        base.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)


def _rounding_warning(what: str, kind: str) -> None:
    warnings.warn(f"{what} LoRA adapters into a {kind} bitsandbytes weight requantises it: the result "
                  "differs from the exact sum by the quantisation rounding, so outputs (and generations) can "
                  "change slightly", UserWarning, stacklevel=3)


class _QuantLoraLinear(Linear):
    """LoRA over a quantised base; subclasses mix in the base (4-bit or 8-bit) first."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False,
                 init_lora_weights: bool | str = True, use_rslora: bool = False, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         fan_in_fan_out=False, init_lora_weights=init_lora_weights, use_rslora=use_rslora,
                         **kwargs)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B @ A`` [out, in] in fp32 (the quantised weight has no float dtype of its own)."""
        return _delta(self.lora_B[adapter].weight, self.lora_A[adapter].weight, self.scaling[adapter],
                      torch.float32)

    # -- merging ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _summed(self, names: list[str], sign: float, check: bool) -> torch.Tensor:
        """fp32 [out, in]: the dequantised weight plus ``sign`` times the adapters' deltas."""
        weight = self.dequantized_weight()
        for name in names:
            weight += sign * self.get_delta_weight(name).to(weight.device)
            if check and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be "
                                 "broken; the base weights were left unchanged")
        return weight

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        names = [n for n in self._adapters_to_merge(adapter_names) if n in self.lora_A]
        if names:
            self._summed(names, 1.0, check=True)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Dequantise, add the adapters' deltas, requantise (lossy; warns). ``safe_merge`` refuses non-finite
        results and leaves the weight untouched."""
        names = [n for n in self._adapters_to_merge(adapter_names) if n in self.lora_A]
        if not names:
            return
        _rounding_warning("Merging", self.quant_name)
        self._store_weight(self._summed(names, 1.0, check=safe_merge))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Dequantise, subtract the merged deltas, requantise (does not restore the original bits; warns)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning)
            return
        names = [n for n in reversed(self.merged_adapters) if n in self.lora_A]
        if names:
            _rounding_warning("Unmerging", self.quant_name)
            self._store_weight(self._summed(names, -1.0, check=False))
        self.merged_adapters.clear()


class Linear4bit(QuantizedBase4bit, _QuantLoraLinear):
    """LoRA on a bitsandbytes ``Linear4bit`` (NF4 or FP4, any blocksize, nested scales or not, any
    quant_storage)."""

    def _fuses_with_base(self, x: torch.Tensor) -> bool:
        """On the Triton backend a hook-free, frozen base whose compute dtype is x's dtype runs in the
        same 4-bit GEMM that adds the adapters (one store of y, one dX kernel)."""
        base = self.get_base_layer()
        if _runs_hooks(base) or base.weight.requires_grad or not use_triton(x, base.weight):
            return False
        return _compute_dtype(base, x) == x.dtype

    def _fused_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        base = self.get_base_layer()
        p = self.packed_weight()._replace(dtype=x.dtype)  # dequantised straight into the compute dtype
        return qlora_linear_fused(
            x, p, None if base.bias is None else base.bias.to(x.dtype),
            [self.lora_A[n].weight for n in names],
            [self.lora_B[n].weight for n in names],
            [float(self.scaling[n]) for n in names],
            [_dropout_p(self.lora_dropout[n]) for n in names],
            self.training,
        )


class Linear8bitLt(QuantizedBase8bit, _QuantLoraLinear):
    """LoRA on a bitsandbytes ``Linear8bitLt`` (row-wise int8 weight)."""

    def _fuses_with_base(self, x: torch.Tensor) -> bool:
        """On the Triton backend a hook-free, frozen int8 base (CB/SCB, no fp16 weights) runs in the same
        int8 GEMM that adds the adapters (one store of y; the dX kernel also computes dA)."""
        base = self.get_base_layer()
        if _runs_hooks(base) or base.weight.requires_grad or base.state.has_fp16_weights:
            return False
        return use_triton(x, base.weight)

    def _fused_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        base = self.get_base_layer()
        cb, scb = int8_from_bnb(base)
        return qlora_linear_fused(
            x, Int8Weight(cb, scb), None if base.bias is None else base.bias.to(x.dtype),
            [self.lora_A[n].weight for n in names],
            [self.lora_B[n].weight for n in names],
            [float(self.scaling[n]) for n in names],
            [_dropout_p(self.lora_dropout[n]) for n in names],
            self.training,
        )


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


if not any(getattr(d, "__name__", "") == "dispatch_bnb" for d in LoraModel.dispatchers):
    LoraModel.dispatchers.insert(0, dispatch_bnb)
