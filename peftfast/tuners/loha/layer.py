"""LoHa layers: PEFT's module tree (hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, hada_t1, hada_t2).

Per adapter, with s = alpha / r:

    nn.Linear [out, in]:          delta = ((w1_a @ w1_b) * (w2_a @ w2_b)) * s      w*_a: [out, r], w*_b: [r, in]
    conv, plain:                  the same with in -> in/groups * prod(kernel), reshaped to the kernel
    conv, use_effective_conv2d:   delta = (t1 x_0 w1_a^T x_1 w1_b^T) * (t2 x_0 w2_a^T x_1 w2_b^T) * s
                                  (t*: [r, r, *kernel]; w*_a: [r, out]; w*_b: [r, in/groups]; CP form)

Over a plain frozen nn.Linear the forward is ``lycoris_utils.delta_linear`` (one GEMM with W + delta, the delta
built block by block, nothing [out, in] saved); elsewhere PEFT's computation (base output + the delta applied
to x). Merging comes from ``AdditiveAdapterLayer``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..lycoris_utils import DeltaTerm, LycorisLayer, cp_rebuild, kaiming_init_


class LoHaLayer(nn.Module, LycorisLayer):
    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    method = "LoHa"
    forward = LycorisLayer.forward  # nn.Module's placeholder comes first in the MRO

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        LycorisLayer.__init__(self, base_layer)
        self.hada_w1_a = nn.ParameterDict({})
        self.hada_w1_b = nn.ParameterDict({})
        self.hada_w2_a = nn.ParameterDict({})
        self.hada_w2_b = nn.ParameterDict({})
        self.hada_t1 = nn.ParameterDict({})
        self.hada_t2 = nn.ParameterDict({})

    def _shape(self, use_effective_conv2d: bool) -> tuple[tuple[int, ...], bool]:
        """(delta shape the factors are built for, whether the CP form is used)."""
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            return (self.out_features, self.in_features), False
        kernel = tuple(base.kernel_size)
        in_channels = base.in_channels // base.groups
        effective = use_effective_conv2d and any(k != 1 for k in kernel)
        if effective:
            return (self.out_features, in_channels, *kernel), True
        size = in_channels
        for k in kernel:
            size *= k
        return (self.out_features, size), False

    def update_layer(self, adapter_name: str, r: int, alpha: float, config: Any, **kwargs: Any) -> None:
        self._set_common(adapter_name, r, alpha, config)
        shape, effective = self._shape(config.use_effective_conv2d)
        out = shape[0]
        if effective:
            kernel = shape[2:] if len(shape) == 4 else (shape[2], 1)
            t = {"hada_t1": torch.empty(r, r, *kernel), "hada_w1_a": torch.empty(r, out),
                 "hada_w1_b": torch.empty(r, shape[1]), "hada_t2": torch.empty(r, r, *kernel),
                 "hada_w2_a": torch.empty(r, out), "hada_w2_b": torch.empty(r, shape[1])}
        else:
            t = {"hada_w1_a": torch.empty(out, r), "hada_w1_b": torch.empty(r, shape[1]),
                 "hada_w2_a": torch.empty(out, r), "hada_w2_b": torch.empty(r, shape[1])}
        # PEFT's init, in its order (a seeded run draws the same numbers): w2_b zero unless init_weights=False
        kaiming_init_(t["hada_w1_a"])
        kaiming_init_(t["hada_w1_b"])
        kaiming_init_(t["hada_w2_a"])
        if config.init_weights:
            nn.init.zeros_(t["hada_w2_b"])
        else:
            kaiming_init_(t["hada_w2_b"])
        if effective:
            kaiming_init_(t["hada_t1"])
            kaiming_init_(t["hada_t2"])
        self._store(adapter_name, t, config)

    def raw_delta(self, adapter: str) -> torch.Tensor:
        s = self.scaling[adapter]
        if adapter in self.hada_t1:
            w = cp_rebuild(self.hada_t1[adapter], self.hada_w1_a[adapter], self.hada_w1_b[adapter]) \
                * cp_rebuild(self.hada_t2[adapter], self.hada_w2_a[adapter], self.hada_w2_b[adapter]) * s
        else:
            w = (self.hada_w1_a[adapter] @ self.hada_w1_b[adapter]) \
                * (self.hada_w2_a[adapter] @ self.hada_w2_b[adapter]) * s
        return w.reshape(self.get_base_layer().weight.shape)

    def delta_term(self, adapter: str, row_scale: Optional[torch.Tensor]) -> DeltaTerm:
        s = self.scaling[adapter]

        def rows(fs: Sequence[torch.Tensor], r0: int, r1: int) -> torch.Tensor:
            w1a, w1b, w2a, w2b = fs
            return (w1a[r0:r1] @ w1b) * (w2a[r0:r1] @ w2b) * s

        factors = (self.hada_w1_a[adapter], self.hada_w1_b[adapter], self.hada_w2_a[adapter],
                   self.hada_w2_b[adapter])
        return DeltaTerm(rows, factors, 1, row_scale)


class Linear(LoHaLayer):
    """LoHa on nn.Linear."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, alpha: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, alpha, config=config)

    def __repr__(self) -> str:
        return "loha." + super().__repr__()


class Conv2d(Linear):
    """LoHa on nn.Conv2d."""


class Conv1d(Linear):
    """LoHa on nn.Conv1d."""
