"""LoKr layers: PEFT's module tree (lokr_w1, lokr_w1_a, lokr_w1_b, lokr_w2, lokr_w2_a, lokr_w2_b, lokr_t2).

Per adapter, with s = alpha / r and the base weight's dimensions factored as out = a * b, in = c * d
(``factorization``, balanced or by ``decompose_factor``):

    delta = kron(w1, w2) * s,   w1: [a, c] = lokr_w1, or lokr_w1_a @ lokr_w1_b (decompose_both and r small)
                                w2: [b, d(, *kernel)] = lokr_w2 (r large), or lokr_w2_a @ lokr_w2_b,
                                    or the CP form t2 x_0 w2_a^T x_1 w2_b^T (use_effective_conv2d)

reshaped to the base weight. Rows i*b .. (i+1)*b of the delta are ``kron(w1[i], w2) * s``, so over a plain
frozen nn.Linear ``lycoris_utils.delta_linear`` builds it in blocks of whole multiples of b rows (one GEMM with
W + delta, nothing [out, in] saved for backward); elsewhere PEFT's computation (base output + the delta
applied to x). Merging comes from ``AdditiveAdapterLayer``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..lycoris_utils import DeltaTerm, LycorisLayer, cp_rebuild, kaiming_init_


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension`` and ``m <= n``: ``(factor, dimension // factor)`` when ``factor`` divides
    it, otherwise the divisor pair reached by walking up the divisors of ``dimension`` while the smaller one stays
    below the larger and at most ``factor`` (-1: no bound, so the pair nearest the square root)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        nxt = m + 1
        while dimension % nxt:
            nxt += 1
        if nxt > bound:
            break
        m, n = nxt, dimension // nxt
    return (m, n) if m <= n else (n, m)


class LoKrLayer(nn.Module, LycorisLayer):
    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    method = "LoKr"
    forward = LycorisLayer.forward  # nn.Module's placeholder comes first in the MRO

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        LycorisLayer.__init__(self, base_layer)
        self.lokr_w1 = nn.ParameterDict({})
        self.lokr_w1_a = nn.ParameterDict({})
        self.lokr_w1_b = nn.ParameterDict({})
        self.lokr_w2 = nn.ParameterDict({})
        self.lokr_w2_a = nn.ParameterDict({})
        self.lokr_w2_b = nn.ParameterDict({})
        self.lokr_t2 = nn.ParameterDict({})

    def update_layer(self, adapter_name: str, r: int, alpha: float, config: Any, **kwargs: Any) -> None:
        self._set_common(adapter_name, r, alpha, config)
        self.rank_dropout_scale[adapter_name] = config.rank_dropout_scale
        base = self.get_base_layer()
        factor = config.decompose_factor
        if isinstance(base, nn.Linear):
            in_dim, kernel = self.in_features, ()
        else:
            in_dim, kernel = base.in_channels // base.groups, tuple(base.kernel_size)
        a, b = factorization(self.out_features, factor)
        c, d = factorization(in_dim, factor)
        use_w1 = not (config.decompose_both and r < max(a, c) / 2)
        use_w2 = r >= max(b, d) / 2
        effective = bool(kernel) and config.use_effective_conv2d and any(k != 1 for k in kernel)
        t: dict[str, torch.Tensor] = {}
        if use_w1:
            t["lokr_w1"] = torch.empty(a, c)
        else:
            t["lokr_w1_a"], t["lokr_w1_b"] = torch.empty(a, r), torch.empty(r, c)
        kernel_elems = 1
        for k in kernel:
            kernel_elems *= k
        if use_w2:
            t["lokr_w2"] = torch.empty(b, d, *kernel)
        elif effective:
            t["lokr_t2"] = torch.empty(r, r, *(kernel if len(kernel) == 2 else (kernel[0], 1)))
            t["lokr_w2_a"], t["lokr_w2_b"] = torch.empty(r, b), torch.empty(r, d)
        else:
            t["lokr_w2_a"], t["lokr_w2_b"] = torch.empty(b, r), torch.empty(r, d * kernel_elems)
        self._init(t, config.init_weights)
        self._store(adapter_name, t, config)

    @staticmethod
    def _init(t: dict[str, torch.Tensor], init_weights: Any) -> None:
        """PEFT's three initialisations, drawing in its order (True: w1 zero; 'lycoris': w2 zero; False: random)."""
        first = ["lokr_w1"] if "lokr_w1" in t else ["lokr_w1_a", "lokr_w1_b"]
        second = ["lokr_w2"] if "lokr_w2" in t else ["lokr_w2_a", "lokr_w2_b"]
        zero: set[str] = set()
        if init_weights == "lycoris":
            zero = {"lokr_w2"} if "lokr_w2" in t else {"lokr_w2_b"}
            if "lokr_w2_b" in zero:
                second = ["lokr_w2_b", "lokr_w2_a"]
        elif init_weights:
            zero = {"lokr_w1"} if "lokr_w1" in t else {"lokr_w1_a"}
        for name in first + second + (["lokr_t2"] if "lokr_t2" in t else []):
            if name in zero:
                nn.init.zeros_(t[name])
            else:
                kaiming_init_(t[name])

    def w2_rows(self, adapter: str) -> int:
        """Rows of the second Kronecker factor (b, with out = a * b), read from the adapter's parameters."""
        if adapter in self.lokr_w2:
            return self.lokr_w2[adapter].shape[0]
        return self.lokr_w2_a[adapter].shape[1 if adapter in self.lokr_t2 else 0]

    def _w1(self, adapter: str) -> torch.Tensor:
        if adapter in self.lokr_w1:
            return self.lokr_w1[adapter]
        return self.lokr_w1_a[adapter] @ self.lokr_w1_b[adapter]

    def _w2(self, adapter: str) -> torch.Tensor:
        if adapter in self.lokr_w2:
            return self.lokr_w2[adapter]
        if adapter in self.lokr_t2:
            return cp_rebuild(self.lokr_t2[adapter], self.lokr_w2_a[adapter], self.lokr_w2_b[adapter])
        return self.lokr_w2_a[adapter] @ self.lokr_w2_b[adapter]

    def raw_delta(self, adapter: str) -> torch.Tensor:
        w1, w2 = self._w1(adapter), self._w2(adapter)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        w = torch.kron(w1, w2.contiguous()) * self.scaling[adapter]
        return w.reshape(self.get_base_layer().weight.shape)

    def delta_term(self, adapter: str, row_scale: Optional[torch.Tensor]) -> DeltaTerm:
        s = self.scaling[adapter]
        b = self.w2_rows(adapter)
        split_w1 = adapter not in self.lokr_w1
        split_w2 = adapter not in self.lokr_w2
        factors = ((self.lokr_w1_a[adapter], self.lokr_w1_b[adapter]) if split_w1 else (self.lokr_w1[adapter],)) \
            + ((self.lokr_w2_a[adapter], self.lokr_w2_b[adapter]) if split_w2 else (self.lokr_w2[adapter],))

        def rows(fs: Sequence[torch.Tensor], r0: int, r1: int) -> torch.Tensor:
            i0, i1 = r0 // b, r1 // b
            w1 = fs[0][i0:i1] @ fs[1] if split_w1 else fs[0][i0:i1]
            rest = fs[2:] if split_w1 else fs[1:]
            w2 = rest[0] @ rest[1] if split_w2 else rest[0]
            return torch.kron(w1, w2.contiguous()) * s

        return DeltaTerm(rows, factors, b, row_scale)


class Linear(LoKrLayer):
    """LoKr on nn.Linear."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, alpha: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, alpha, config=config)

    def __repr__(self) -> str:
        return "lokr." + super().__repr__()


class Conv2d(Linear):
    """LoKr on nn.Conv2d."""


class Conv1d(Linear):
    """LoKr on nn.Conv1d."""
