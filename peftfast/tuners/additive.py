"""The shared base of additive adapters (LoRA today; AdaLoRA, LoHa, LoKr, DoRA fit the same mould).

An additive adapter changes a layer's weight by a delta, ``W' = W + sum_i delta_i``, so a layer only
says what its delta is (``get_delta_weight(adapter)``: a tensor shaped and laid out like the merge
target) and :class:`AdditiveAdapterLayer` derives the rest from it:

    check_merge:  sum into a copy, raising on the first adapter that makes it non-finite
    merge:        safe_merge -> sum into a copy, checked, then swapped in; else add in place
    unmerge:      subtract the merged adapters in place, last merged first

Where the sum is built and where it goes are two hooks, ``merge_start`` / ``merge_commit``. A float
base sums into its weight (or a copy of it). :class:`QuantizedAdditiveLayer` dequantises the base
to fp32, sums there, and requantises with the layer's settings (lossy: a merge/unmerge round trip
does not restore the original bits; both warn).

Also here, for the low-rank adapters (``delta = scaling * B @ A``): :func:`low_rank_delta`, and
:class:`LowRankAdapters`, the active adapters of a layer bundled the way the fused ops take them
(one list per argument; unpack it into the call).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
from torch import nn

from .adapter_layers import AdapterLayer, raise_if_not_finite
from .quantized import rounding_warning


def low_rank_delta(b: torch.Tensor, a: torch.Tensor, scaling: float, out_dtype: torch.dtype) -> torch.Tensor:
    """``scaling * b @ a`` computed in fp32 (half-precision matmuls on CPU are slow and lossy).

    b: [out, r]; a: [r, in] -> [out, in] in ``out_dtype``.
    """
    compute = torch.float32 if b.dtype in (torch.float16, torch.bfloat16) else b.dtype
    return ((b.to(compute) @ a.to(compute)) * scaling).to(out_dtype)


def dropout_p(module: nn.Module) -> float:
    """The drop probability of an adapter's dropout module (0 for ``nn.Identity``)."""
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


class LowRankAdapters(NamedTuple):
    """Adapters ``i`` of one layer as the LoRA ops take them: ``op(x, ..., *bundle, training)``."""

    weights_a: list[torch.Tensor]  # [r_i, in]
    weights_b: list[torch.Tensor]  # [out, r_i]
    scalings: list[float]
    dropout_ps: list[float]

    def under_autocast(self) -> "LowRankAdapters":
        """The bundle as ``torch.autocast`` would compute it, when autocast is on for the adapters' device: the
        factors cast to autocast's dtype (as ``F.linear`` casts PEFT's lora_A/lora_B weights; gradients reach the
        float32 parameters through the cast). Unchanged when autocast is off."""
        dtype = autocast_dtype(self.weights_a[0]) if self.weights_a else None
        if dtype is None:
            return self
        return LowRankAdapters([a.to(dtype) for a in self.weights_a], [b.to(dtype) for b in self.weights_b],
                               self.scalings, self.dropout_ps)


def autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` computes matmuls in on ``t``'s device when it is on there, else None."""
    kind = t.device.type
    if kind in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def autocast_base(x: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``x``, a dense base weight and bias as ``F.linear`` under ``torch.autocast`` takes them (all in autocast's
    dtype) when autocast is on for x's device, so a fused op computes what the base module would; unchanged
    otherwise."""
    dtype = autocast_dtype(x)
    if dtype is None:
        return x, weight, bias
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


class AdditiveAdapterLayer(AdapterLayer):
    """Merging for adapters that add a delta to the base weight; subclasses define ``get_delta_weight``."""

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError

    def merge_target(self) -> torch.Tensor:
        """The parameter the deltas are merged into."""
        return self.get_base_layer().weight

    def merge_start(self, copy: bool, what: Optional[str] = None) -> torch.Tensor:
        """The tensor the deltas are summed into: the merge target's data itself, or a copy of it. ``what``
        ('Merging' / 'Unmerging') is given when the sum will be committed, None for a check."""
        data = self.merge_target().data
        return data.clone() if copy else data

    def merge_commit(self, summed: torch.Tensor) -> None:
        """Make ``summed`` (from ``merge_start``) the base weight."""
        self.merge_target().data = summed

    @torch.no_grad()
    def add_deltas(self, weight: torch.Tensor, names: list[str], subtract: bool = False,
                   check: bool = False) -> torch.Tensor:
        """``weight`` plus (or minus) the deltas of ``names``, in place, one adapter at a time. With
        ``check``, raises naming the first adapter after which the sum holds NaN or inf."""
        for name in names:
            delta = self.get_delta_weight(name).to(device=weight.device, dtype=weight.dtype)
            if subtract:
                weight -= delta
            else:
                weight += delta
            if check:
                raise_if_not_finite(weight, name)
        return weight

    def check_merge(self, adapter_names: Optional[list[str]] = None) -> None:
        """Raise if merging ``adapter_names`` would put NaN or inf into the base weight (left untouched)."""
        names = self.merge_names(adapter_names, warn=False)
        if names:
            self.add_deltas(self.merge_start(copy=True), names, check=True)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the adapters' deltas into the base weight. With ``safe_merge`` the sum is built in a copy and
        refused (weights untouched) if it holds NaN or inf."""
        names = self.merge_names(adapter_names)
        if not names:
            return
        start = self.merge_start(copy=safe_merge, what="Merging")
        self.merge_commit(self.add_deltas(start, names, check=safe_merge))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Subtract the merged adapters' deltas from the base weight, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning)
            return
        names = [n for n in reversed(self.merged_adapters) if self.holds(n)]
        if names:
            start = self.merge_start(copy=False, what="Unmerging")
            self.merge_commit(self.add_deltas(start, names, subtract=True))
        self.merged_adapters.clear()


class QuantizedAdditiveLayer(AdditiveAdapterLayer):
    """Merging into a quantised base: dequantise to fp32, add, requantise (lossy; warns).

    Relies on ``dequantized_weight()`` / ``store_weight()`` / ``quant_name`` of a
    ``peftfast.tuners.quantized.QuantizedBase`` mixed in before it.
    """

    def merge_start(self, copy: bool, what: Optional[str] = None) -> torch.Tensor:
        if what is not None:  # warned before summing, so a refused safe merge has warned too
            rounding_warning(what, self.quant_name, stacklevel=4)
        return self.dequantized_weight()  # always a new fp32 tensor: the storage is only written by commit

    def merge_commit(self, summed: torch.Tensor) -> None:
        self.store_weight(summed)
