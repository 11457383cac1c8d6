"""What LoHa and LoKr share: the config base, the layer base, the tuner base, and the one-GEMM linear.

Both methods add a full-size delta built from small factors (a Hadamard product of two rank-r products
for LoHa, a Kronecker product for LoKr). PEFT builds the whole delta every forward and runs a second
matmul with it: ``y = x W^T + b + x D^T``, keeping D ([out, in]) for backward. Over a plain frozen
``nn.Linear`` the layers here call :func:`delta_linear` instead, which computes the same
``y = x (W + sum_i D_i)^T + b`` as one GEMM per block of output rows, generating each block of the
deltas from the factors on the fly:

    for rows R (a block of out):   W_R = W[R] + sum_i D_i[R]          [|R|, in], from the factors
                                   y[:, R] = x @ W_R^T + b[R]
    backward, for the same blocks: W_R again;  dx += dy[:, R] @ W_R
                                   dD_R = dy[:, R]^T @ x   -> the factor gradients of D_i[R] (autograd on the block)

On CUDA (the Triton backend), when one adapter is active, no rank dropout mask is drawn and the adapter is
not merged, the layers call ``kernels/lycoris.py`` instead: the delta tile is generated from the factors
inside the base GEMM's K-loop (forward and dX), and the factor gradients are contracted tile by tile from
dY^T x (no [out, in] tensor at all). Several active adapters or a rank-dropout mask take ``delta_linear``.

Memory: nothing of size [out, in] is saved for backward (x and the factors are), and forward and
backward hold at most one block of W_R, of D_R and of dD_R at a time (blocks of about
``DELTA_BLOCK_ELEMENTS`` elements; a small layer is one block, so one GEMM). Costs per call: the delta
flops of PEFT once in forward and once more in backward (rank-r products, cheap next to the GEMMs when
r << tokens), and one GEMM instead of two in forward.

The rank dropout masks rows of a delta and the module dropout skips an adapter, both drawn from torch's
generator in PEFT's order (per adapter: the module-dropout draw, then the rank-dropout draw), so seeded
runs match PEFT's. Convolutions and other bases keep PEFT's computation (base output plus a second
convolution or matmul with the delta).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, PeftConfig
from ..kernels.backend import use_triton
from ..kernels.lycoris import LYCORIS_LINEAR, loha_layout, lokr_layout
from ..utils.patterns import get_pattern_key
from .adapter_layers import base_is_fusable, creation_device
from .additive import AdditiveAdapterLayer
from .tuners_utils import BaseTuner, BaseTunerLayer

# Elements of one block of delta rows ([rows, in]) in delta_linear: 4M fp32 = 16 MiB.
DELTA_BLOCK_ELEMENTS = 1 << 22

# rows_fn(factors, r0, r1) -> the rows r0:r1 of a delta ([r1 - r0, in], scaling applied)
RowsFn = Callable[[Sequence[torch.Tensor], int, int], torch.Tensor]


class DeltaTerm(NamedTuple):
    """One adapter's delta as ``delta_linear`` takes it."""

    rows: RowsFn
    factors: tuple[torch.Tensor, ...]
    align: int  # blocks of rows start at multiples of this (LoKr: the rows of its second Kronecker factor)
    row_scale: Optional[torch.Tensor]  # [out] rank-dropout mask (already rescaled), or None


def _block_rows(out_features: int, in_features: int, terms: Sequence[DeltaTerm], block: Optional[int]) -> int:
    """Rows per block: about DELTA_BLOCK_ELEMENTS elements, a multiple of every term's alignment (``out``, a
    multiple of each alignment, when one block covers it)."""
    align = 1
    for t in terms:
        align = align * t.align // math.gcd(align, t.align)
    rows = block if block is not None else DELTA_BLOCK_ELEMENTS // max(1, in_features)
    rows = max(align, rows // align * align)
    return min(rows, out_features)


def _delta_rows(terms: Sequence[DeltaTerm], factors: Sequence[Sequence[torch.Tensor]], r0: int, r1: int):
    total = None
    for term, fs in zip(terms, factors):
        d = term.rows(fs, r0, r1)
        if term.row_scale is not None:
            d = d * term.row_scale[r0:r1, None].to(d)
        total = d if total is None else total + d
    return total


class _DeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, terms, block, *flat):
        in_features, out_features = weight.shape[1], weight.shape[0]
        x2 = x.reshape(-1, in_features)
        factors, i = [], 0
        for t in terms:
            factors.append(flat[i:i + len(t.factors)])
            i += len(t.factors)
        rows = _block_rows(out_features, in_features, terms, block)
        out = None
        for r0 in range(0, out_features, rows):
            r1 = min(out_features, r0 + rows)
            w = weight[r0:r1] + _delta_rows(terms, factors, r0, r1)
            y = F.linear(x2, w, None if bias is None else bias[r0:r1])
            if rows >= out_features:
                out = y
            else:
                if out is None:
                    out = x2.new_empty(x2.shape[0], out_features)
                out[:, r0:r1] = y
        ctx.save_for_backward(x, weight, bias, *flat)
        ctx.terms, ctx.rows = terms, rows
        return out.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, *flat = ctx.saved_tensors
        terms, rows = ctx.terms, ctx.rows
        in_features, out_features = weight.shape[1], weight.shape[0]
        x2 = x.reshape(-1, in_features)
        dy2 = dy.reshape(-1, out_features)
        need_x = ctx.needs_input_grad[0]
        need_f = [ctx.needs_input_grad[5 + j] for j in range(len(flat))]
        dx = torch.zeros_like(x2) if need_x else None
        grads: list[Optional[torch.Tensor]] = [None] * len(flat)
        for r0 in range(0, out_features, rows):
            r1 = min(out_features, r0 + rows)
            with torch.enable_grad():
                leaves = [f.detach().requires_grad_(n) for f, n in zip(flat, need_f)]
                factors, i = [], 0
                for t in terms:
                    factors.append(leaves[i:i + len(t.factors)])
                    i += len(t.factors)
                d = _delta_rows(terms, factors, r0, r1)
            g = dy2[:, r0:r1]
            if need_x:
                dx += g @ (weight[r0:r1] + d.detach())
            wanted = [j for j, n in enumerate(need_f) if n]
            if wanted:
                dd = g.t() @ x2  # [rows, in]: the block of the delta's gradient
                got = torch.autograd.grad(d, [leaves[j] for j in wanted], dd, allow_unused=True)
                for j, gj in zip(wanted, got):
                    if gj is not None:
                        grads[j] = gj if grads[j] is None else grads[j] + gj
        for j, n in enumerate(need_f):
            if n and grads[j] is None:
                grads[j] = torch.zeros_like(flat[j])
        db = dy2.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return (dx.view(x.shape) if need_x else None, None, db, None, None, *grads)


def delta_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], terms: Sequence[DeltaTerm],
                 block_rows: Optional[int] = None) -> torch.Tensor:
    """``F.linear(x, weight + sum_i delta_i, bias)`` without materialising a delta or the summed weight.

    x: [..., in]; weight: [out, in] (frozen: no gradient is computed for it); bias: [out] or None; each
    term's ``rows(factors, r0, r1)`` returns rows r0:r1 of its delta (scaled), times ``row_scale`` when given.
    Gradients flow to x, bias and every factor that requires grad. ``block_rows`` overrides the block size
    (tests use it to exercise several blocks on small layers).
    """
    flat = [f for t in terms for f in t.factors]
    return _DeltaLinear.apply(x, weight, bias, tuple(terms), block_rows, *flat)


def cp_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """The CP form of a kernel: ``sum_ij t[i, j, k, l] wa[i, p] wb[j, q]`` -> [p, q, k, l] (t: [r, r, k, l],
    wa: [r, out], wb: [r, in])."""
    return torch.einsum("ijkl,ip,jq->pqkl", t, wa, wb)


def kaiming_init_(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


@dataclass
class LycorisConfig(PeftConfig):
    """Fields every LyCORIS-style config has: per-module ranks and alphas (name regex -> value)."""

    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)

    def _check_common(self, method: str) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set, frozenset)):
                if not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{name} must hold module names (strings), got {sorted(map(repr, value))[:3]}")
                setattr(self, name, set(value))
            elif value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a list of module names, a regex string or None, got "
                                  f"{type(value).__name__}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        if not _finite(self.alpha):
            raise ConfigError(f"alpha must be a finite number, got {self.alpha!r}")
        for name in ("rank_dropout", "module_dropout"):
            value = getattr(self, name)
            if not _finite(value) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
        for key, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if pattern is None:
                continue
            if not isinstance(pattern, dict):
                raise ConfigError(f"{key} must be a dict of module-name pattern -> value, got {type(pattern).__name__}")
            for k, v in pattern.items():
                ok = (isinstance(v, int) and not isinstance(v, bool) and v > 0) if key == "rank_pattern" else _finite(v)
                if not ok:
                    raise ConfigError(f"{key}[{k!r}] must be a positive integer" if key == "rank_pattern"
                                      else f"{key}[{k!r}] must be a finite number" + f", got {v!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("layers_to_transform cannot be used when target_modules is a regex string")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


class LycorisLayer(AdditiveAdapterLayer):
    """Per-adapter bookkeeping and the forward of LoHa and LoKr layers (subclasses: parameters, delta, terms)."""

    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "rank_dropout_scale", "module_dropout")
    method = ""  # "LoHa" / "LoKr"

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        if isinstance(base, (nn.Conv1d, nn.Conv2d)):
            self.in_features, self.out_features = base.in_channels, base.out_channels
        elif isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            raise TypeError(f"{self.method} is not implemented for base layers of type {type(base).__name__}; "
                            "supported: Linear, Conv1d, Conv2d")

    @property
    def _available_adapters(self) -> set[str]:
        return {n for attr in self.adapter_layer_names for n in getattr(self, attr)}

    def _set_common(self, adapter_name: str, r: int, alpha: float, config: Any) -> None:
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r!r}")
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout
        self.rank_dropout_scale[adapter_name] = getattr(config, "rank_dropout_scale", True)

    def _store(self, adapter_name: str, tensors: dict[str, torch.Tensor], config: Any) -> None:
        """Register the adapter's (CPU fp32, initialised) tensors, moved to the base's device and dtype."""
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        # only the new adapter's flags are set: the other adapters keep theirs (a frozen loaded one stays frozen)
        trainable = adapter_name in self.active_adapters and not getattr(config, "inference_mode", False)
        device = creation_device(weight.device)  # meta under low_cpu_mem_usage: the checkpoint fills them in
        for attr, t in tensors.items():
            getattr(self, attr)[adapter_name] = nn.Parameter(t.to(device=device, dtype=dtype),
                                                             requires_grad=trainable)

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self._available_adapters:
            self.scaling[adapter] = scale * self.alpha[adapter] / self.r[adapter]

    def scale_layer(self, scale: float) -> None:
        if scale == 1:
            return
        for name in self.active_adapters:
            if name in self._available_adapters:
                self.scaling[name] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for name in self.active_adapters:
            if name in self._available_adapters:
                if scale is None:
                    self.scaling[name] = self.alpha[name] / self.r[name]
                else:
                    self.scaling[name] /= scale

    # -- subclasses ------------------------------------------------------------------------------------
    def raw_delta(self, adapter: str) -> torch.Tensor:
        """The adapter's delta (scaled), shaped like the base weight."""
        raise NotImplementedError

    def delta_term(self, adapter: str, row_scale: Optional[torch.Tensor]) -> DeltaTerm:
        """The adapter's delta as rows for ``delta_linear`` (nn.Linear bases)."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------------
    def rank_dropout_mask(self, adapter: str, dtype: torch.dtype) -> torch.Tensor:
        """PEFT's rank-dropout row mask ([out]): kept with probability 1 - p, rescaled by its mean (LoKr: only
        with rank_dropout_scale)."""
        drop = (torch.rand(self.out_features) > self.rank_dropout[adapter]).to(dtype)
        if self.rank_dropout_scale[adapter]:
            drop /= drop.mean()
        return drop

    def get_delta_weight(self, adapter: str, *, apply_rank_dropout: bool = False) -> torch.Tensor:
        weight = self.raw_delta(adapter)
        if apply_rank_dropout:
            drop = self.rank_dropout_mask(adapter, weight.dtype).to(weight.device)
            weight = weight * drop.view(-1, *[1] * (weight.dim() - 1))
        return weight

    def delta_output(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The delta applied to ``x`` the way the base layer applies its weight."""
        base = self.get_base_layer()
        x = x.to(delta.dtype) if self.cast_input_dtype_enabled else x
        if isinstance(base, nn.Conv2d):
            return F.conv2d(x, delta, stride=base.stride, padding=base.padding, dilation=base.dilation,
                            groups=base.groups)
        if isinstance(base, nn.Conv1d):
            return F.conv1d(x, delta, stride=base.stride, padding=base.padding, dilation=base.dilation,
                            groups=base.groups)
        return F.linear(x, delta)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if kwargs.get("adapter_names") is not None:
            raise ValueError(f"{self.method} does not support adapter_names (one adapter per sample); use "
                             "set_adapter() instead")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs).to(previous_dtype)
        if self.merged:
            return self.base_layer(x, *args, **kwargs).to(previous_dtype)
        # PEFT's draws, in its order: per active adapter, module dropout then rank dropout (training only)
        chosen: list[tuple[str, Optional[torch.Tensor]]] = []
        for name in self.active_adapters:
            if name not in self._available_adapters:
                continue
            if self.training and not bool(torch.rand(1) > self.module_dropout[name]):
                continue
            apply_rank = self.training and bool(self.rank_dropout[name])
            chosen.append((name, self.rank_dropout_mask(name, self._dtype(name)) if apply_rank else None))
        base = self.base_layer
        if chosen and not args and not kwargs and type(base) is nn.Linear and base_is_fusable(base):
            xk, wk, bk = x, base.weight, base.bias
            amp = torch.is_autocast_enabled(x.device.type)
            if amp:  # autocast (Trainer's bf16 / fp16 on an fp32 model): x, W and b in its dtype, as F.linear's
                cast = torch.get_autocast_dtype(x.device.type)
                xk, wk, bk = x.to(cast), wk.to(cast), None if bk is None else bk.to(cast)
            same = xk.dtype == wk.dtype and all(self._dtype(n) == xk.dtype for n, _ in chosen)
            # fp32 factors on a 16-bit model (PEFT's autocast_adapter_dtype default, or autocast): the kernels too
            # (W + D is rounded to the model's dtype for the GEMMs, the factor gradients computed from the fp32
            # factors); the CPU path keeps PEFT's math below
            wide = xk.dtype == wk.dtype and xk.dtype in (torch.float16, torch.bfloat16) \
                and self.cast_input_dtype_enabled and all(self._dtype(n) == torch.float32 for n, _ in chosen)
            if (same or wide) and len(chosen) == 1 and chosen[0][1] is None and use_triton(xk, wk):
                fused = self._kernel_operands(chosen[0][0])
                if fused is not None:  # the Triton kernels: the delta tile generated inside the GEMMs
                    factors, layout = fused
                    return LYCORIS_LINEAR(xk, wk, bk, factors, layout, float(self.scaling[chosen[0][0]]),
                                          hint=True).to(previous_dtype)
            if same and not amp:  # (under autocast PEFT's op-by-op math below, which autocast casts itself)
                return delta_linear(x, base.weight, base.bias, [self.delta_term(n, m) for n, m in chosen])
        result = self.base_layer(x, *args, **kwargs)
        for name, mask in chosen:
            delta = self.raw_delta(name)
            if mask is not None:
                delta = delta * mask.to(delta.device).view(-1, *[1] * (delta.dim() - 1))
            result = result + self.delta_output(x, delta)
        return result.to(previous_dtype)

    def _kernel_operands(self, adapter: str) -> Optional[tuple[list[torch.Tensor], list[int]]]:
        """(factors, layout) of ``kernels.lycoris`` for the adapter on an nn.Linear base, or None (CP forms)."""
        out, inp = self.out_features, self.in_features
        if self.method == "LoHa":
            if adapter in self.hada_t1:
                return None
            return ([self.hada_w1_a[adapter], self.hada_w1_b[adapter], self.hada_w2_a[adapter],
                     self.hada_w2_b[adapter]], loha_layout(out, inp))
        if self.method == "LoKr":
            if adapter in self.lokr_t2:
                return None
            w1 = [self.lokr_w1[adapter]] if adapter in self.lokr_w1 else [self.lokr_w1_a[adapter],
                                                                            self.lokr_w1_b[adapter]]
            w2 = [self.lokr_w2[adapter]] if adapter in self.lokr_w2 else [self.lokr_w2_a[adapter],
                                                                            self.lokr_w2_b[adapter]]
            a, c, p, q = w1[0].shape[0], w1[-1].shape[1], w2[0].shape[0], w2[-1].shape[1]
            if a * p != out or c * q != inp or w2[0].dim() != 2:
                return None
            return w1 + w2, lokr_layout(len(w1) == 1, len(w2) == 1, p, q, a, c)
        return None

    def _dtype(self, adapter: str) -> torch.dtype:
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter in container:
                return container[adapter].dtype
        return torch.float32


class LycorisTuner(BaseTuner):
    """The tuner of LoHa / LoKr: ``layers_mapping`` (base class -> layer class), rank/alpha patterns."""

    layers_mapping: dict[type, type] = {}
    method = ""

    def _supported_types(self) -> tuple[type, ...]:
        return tuple(self.layers_mapping)

    def _create_and_replace(self, config: Any, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str) -> None:
        r_key = get_pattern_key(list((config.rank_pattern or {}).keys()), current_key)
        alpha_key = get_pattern_key(list((config.alpha_pattern or {}).keys()), current_key)
        r = (config.rank_pattern or {}).get(r_key, config.r)
        alpha = (config.alpha_pattern or {}).get(alpha_key, config.alpha)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, r=r, alpha=alpha, config=config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        for base_cls, layer_cls in self.layers_mapping.items():
            if isinstance(base, base_cls):
                new_module = layer_cls(target, adapter_name, config=config, r=r, alpha=alpha)
                break
        else:
            supported = ", ".join(c.__name__ for c in self.layers_mapping)
            raise TypeError(f"Target module of type {type(target)} not supported, currently only adapters for "
                            f"{supported} are supported")
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        setattr(parent, target_name, new_module)
