"""Read bitsandbytes' quantised weights in place, for the peftfast quantised-base kernels.

``packed4bit_from_bnb`` turns a ``Linear4bit`` / ``Params4bit`` (+ ``QuantState``) into a
:class:`~peftfast.kernels.quant.Packed4bit` that views the same tensors (no copy, no
dequantisation); ``int8_from_bnb`` returns the ``(CB, SCB)`` pair of a ``Linear8bitLt`` /
``Int8Params`` wherever bitsandbytes currently keeps it.

Two bitsandbytes behaviours matter here:

* On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode without grad rewrites
  ``weight.data`` into a CPU-specific layout (``quant_state.packing_format_for_cpu``) and rounds
  the block scales to bf16. Such a weight is decoded back to the standard layout here (a copy,
  with a warning: its scales are the bf16-rounded ones bitsandbytes now uses).
  :func:`prevent_cpu_repack` stops bitsandbytes from doing this in the first place.
  Saving (``state_dict()``) or moving such a weight to a GPU converts it back to the standard layout
  (``_convert_weight_packed_for_cpu_inverse``): with double quantisation the scales are quantised
  again (uint8 codes, fine as is); without it they stay bf16 in the CPU layout's transposed
  [K / blocksize, N] order. :func:`block_scales` reads them back in block order, as fp32.
* ``Linear8bitLt`` keeps CB/SCB on ``weight`` until its first forward, then moves them to
  ``module.state`` (and ``weight.data`` is CB again after the forward).

bitsandbytes is imported lazily, only when one of these functions is called.
"""
from __future__ import annotations

import warnings
import torch

from ..kernels.quant import Packed4bit, check_packed4bit, packed_bytes

_CPU_BLOCK_N = 32  # row-block size of bitsandbytes' CPU layout (_convert_weight_packed_for_cpu)


def prevent_cpu_repack(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from rewriting 4-bit weights into its CPU layout; returns #layers touched."""
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _unpack_cpu_layout(weight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """bnb's CPU layout [N, K/2] -> standard packed bytes (element 2j in the high nibble of byte j)."""
    packed = weight.contiguous().view(torch.uint8).reshape(-1, _CPU_BLOCK_N)
    # each row of 32 bytes holds 64 indices of a (32 rows x 2 columns) tile: low nibbles are the
    # first 32 (rows 0..15), high nibbles the last 32 (rows 16..31), each as (row, column-pair)
    indices = torch.cat((packed & 15, packed >> 4), dim=1)
    indices = indices.reshape(n // _CPU_BLOCK_N, k // 2, _CPU_BLOCK_N, 2).transpose(1, 2).reshape(-1)
    return (indices[0::2] << 4) | indices[1::2]


def _from_cpu_layout(weight: torch.Tensor, qs, n: int, k: int) -> Packed4bit:
    warnings.warn(
        "this bitsandbytes Linear4bit weight was rewritten into bitsandbytes' AVX512-BF16 CPU layout "
        "(an eval-mode forward without grad on CPU); it is decoded back to the standard layout with the "
        "bf16-rounded block scales bitsandbytes now uses, so values differ slightly from the checkpoint. "
        "Call peftfast.utils.bnb_storage.prevent_cpu_repack(model) before running the model to keep "
        "the original storage.",
        stacklevel=3,
    )
    if n % _CPU_BLOCK_N or k % 2 or k % qs.blocksize:
        raise ValueError(
            f"unexpected bitsandbytes CPU layout for a {n}x{k} weight (blocksize {qs.blocksize})")
    data = _unpack_cpu_layout(weight, n, k)
    absmax = qs.absmax.t().reshape(-1).float()  # [K/bs, N] bf16 -> block order of the flat weight
    dtype = getattr(qs, "original_dtype", qs.dtype)
    return Packed4bit(data, absmax, qs.code.float(), int(qs.blocksize), (n, k), dtype)


def block_scales(absmax: torch.Tensor, n: int, k: int, blocksize: int) -> torch.Tensor:
    """fp32 [n_blocks] scales in the flat weight's block order, from a non-nested ``absmax`` as bitsandbytes
    may leave it: fp32 [n_blocks] (returned as is), another float dtype, or the bf16 [K / blocksize, N] of
    a weight brought back from its AVX512-BF16 CPU layout (transposed, one row per column block).

    bitsandbytes' own dequantisation reads that transposed tensor in memory order, i.e. with the wrong
    block scales whenever K > blocksize; the scales here are the ones the quantisation produced (rounded
    to bf16 by the CPU repack)."""
    n_blocks = -(-n * k // blocksize)
    if absmax.dtype == torch.float32 and absmax.dim() == 1:
        return absmax
    if not absmax.is_floating_point():
        raise ValueError(f"4-bit absmax without double quantisation must be a float tensor, got {absmax.dtype}")
    if absmax.dim() == 2 and k % blocksize == 0 and tuple(absmax.shape) == (k // blocksize, n):
        return absmax.t().reshape(-1).float()
    if absmax.numel() != n_blocks:
        raise ValueError(f"4-bit absmax has shape {tuple(absmax.shape)}; a {n}x{k} weight in blocks of {blocksize} "
                         f"needs {n_blocks} scales ([{n_blocks}], or [{k // blocksize}, {n}] after bitsandbytes' "
                         "CPU repack)")
    return absmax.reshape(-1).float()


def packed4bit_from_bnb(obj, quant_state=None) -> Packed4bit:
    """Packed4bit view of a bitsandbytes 4-bit weight.

    obj: a ``bnb.nn.Linear4bit`` (any subclass), a ``bnb.nn.Params4bit``, or the packed tensor
    itself together with ``quant_state``.
    """
    import bitsandbytes as bnb

    weight = obj
    if isinstance(obj, bnb.nn.Linear4bit):
        weight = obj.weight
        quant_state = quant_state or getattr(weight, "quant_state", None) or getattr(obj, "quant_state", None)
    elif isinstance(obj, bnb.nn.Params4bit):
        quant_state = quant_state or obj.quant_state
    elif not isinstance(obj, torch.Tensor):
        raise TypeError(
            f"expected a bitsandbytes Linear4bit, Params4bit or packed tensor, got {type(obj).__name__}")
    if quant_state is None:
        raise ValueError(
            "this 4-bit weight has no quant_state: it is not quantised yet (move the layer to a device, "
            "e.g. .to('cuda'), or load a quantised checkpoint), or pass quant_state explicitly"
        )
    qs = quant_state
    shape = tuple(qs.shape) if qs.shape is not None else ()
    if len(shape) != 2:
        raise ValueError(f"only 2-D (linear) 4-bit weights are supported, got quant_state.shape={shape}")
    if qs.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {qs.quant_type!r}")
    n, k = shape
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    if getattr(qs, "packing_format_for_cpu", False):
        return _from_cpu_layout(data, qs, n, k)
    nested = {}
    if qs.nested:
        offset = qs.offset.item() if isinstance(qs.offset, torch.Tensor) else float(qs.offset)
        nested = dict(nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
                      nested_blocksize=int(qs.state2.blocksize), offset=offset)
    absmax = qs.absmax if qs.nested else block_scales(qs.absmax, n, k, int(qs.blocksize))
    p = Packed4bit(packed_bytes(data), absmax, qs.code, int(qs.blocksize), (n, k), qs.dtype, **nested)
    check_packed4bit(p)
    return p


def int8_from_bnb(obj) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 [N, K], SCB fp32 [N]) of a ``bnb.nn.Linear8bitLt`` or ``bnb.nn.Int8Params``."""
    import bitsandbytes as bnb

    if isinstance(obj, bnb.nn.Linear8bitLt):
        if obj.state.has_fp16_weights:
            raise ValueError("this Linear8bitLt keeps fp16 weights (has_fp16_weights=True); there is no int8 "
                             "storage to read: use its weight as a regular linear layer")
        weight = obj.weight
        cb = getattr(weight, "CB", None)
        scb = getattr(weight, "SCB", None)
        if cb is None or scb is None:  # after the first forward bnb keeps them in module.state
            cb, scb = obj.state.CB, obj.state.SCB
    elif isinstance(obj, bnb.nn.Int8Params):
        weight = obj
        cb, scb = obj.CB, obj.SCB
    else:
        raise TypeError(f"expected a bitsandbytes Linear8bitLt or Int8Params, got {type(obj).__name__}")
    if cb is None and weight.data.dtype == torch.int8:
        cb = weight.data
    if cb is None or scb is None:
        raise ValueError("this 8-bit weight is not quantised yet (no CB/SCB): move the layer to a device "
                         "(e.g. .to('cuda') or .to('cpu')) or load a quantised checkpoint")
    if cb.dtype != torch.int8 or cb.dim() != 2:
        raise ValueError(f"expected CB int8 [out_features, in_features], got {cb.dtype} {tuple(cb.shape)}")
    if scb.dtype != torch.float32 or scb.numel() != cb.shape[0]:
        raise ValueError(f"expected SCB fp32 [{cb.shape[0]}], got {scb.dtype} {tuple(scb.shape)}")
    return cb, scb.reshape(-1)
