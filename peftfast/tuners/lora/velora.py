"""VeLoRA (PEFT's ``LoraConfig(velora_config=VeloraConfig(...))``): LoRA whose lora_A keeps a compressed input.

Training a plain LoRA layer keeps the input ``x`` [N, in] alive until backward, for lora_A's gradient
``dA = g^T x`` (g = dL/d(x A^T), [N, r]). VeLoRA (arxiv.org/abs/2405.17991) keeps one number per group of
input features instead: the features are split into ``G = num_groups`` groups of ``D = ceil(in / G)``
(the last ones padded with zeros), and each group is projected on one shared unit vector ``e`` [D]:

    c[n, g]   = sum_d x[n, g*D + d] * e[d]                     saved: [N, G] instead of [N, in]
    x^[n, i]  = scale * c[n, i // D] * e[i % D]                the rank-1 reconstruction backward uses
    dA        = g^T x^                                         (approximate by design; dx and dB are exact)

``dA`` is computed without forming ``x^`` [N, in]: ``M = g^T c`` [r, G], then
``dA[:, g*D + d] = scale * M[:, g] * e[d]``, an [r, G*D] outer product cut to ``in`` columns.

``e`` (``lora_velora_embed[adapter]``, a persistent buffer saved with the adapter, as PEFT does) is set by
``init_type``: ``'random'`` draws it once when the adapter is created; ``'batch_average'`` sets it from every
training forward to the normalised mean of that batch's (dropped-out) input groups; ``'batch_average_once'``
only from the first one. Where no gradient is recorded (eval, ``torch.no_grad``) or the adapters are merged a
VeLoRA adapter is plain LoRA, and runs on the fused paths. In training the layer takes the PyTorch path for its
VeLoRA adapters (below): the fused Triton kernels keep ``x`` for ``dA``, which is what VeLoRA avoids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from ...utils.errors import ConfigError

INIT_TYPES = ("batch_average_once", "batch_average", "random")


@dataclass
class VeloraConfig:
    """PEFT's ``VeloraConfig``: ``num_groups`` (groups the input features are split into; more groups, a closer
    reconstruction and more memory), ``scale`` (factor on the reconstructed input), ``init_type``
    (``'batch_average'``, ``'batch_average_once'`` or ``'random'``: how the projection vector is set)."""

    num_groups: int = field(default=64)
    scale: float = field(default=1.0)
    init_type: Literal["batch_average", "batch_average_once", "random"] = field(default="batch_average")

    def __post_init__(self) -> None:
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int):
            raise ConfigError(f"`num_groups` should be a positive integer, got {self.num_groups!r}.")
        if self.num_groups <= 0:
            raise ConfigError(f"`num_groups` should be positive, got {self.num_groups}.")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ConfigError(f"`scale` should be a positive finite number, got {self.scale!r}.")
        if self.scale <= 0:
            raise ConfigError(f"`scale` should be positive, got {self.scale}.")
        if self.init_type not in INIT_TYPES:
            raise ConfigError(f"Unsupported `init_type` {self.init_type!r}. Supported values are "
                              "'batch_average_once', 'batch_average', and 'random'.")


def group_dim(in_features: int, num_groups: int) -> int:
    """Features per group: ``ceil(in_features / num_groups)``."""
    return -(-in_features // num_groups)


def unit_projection(v: torch.Tensor) -> torch.Tensor:
    """``v / ||v||`` in float32; a zero vector gives the normalised all-ones vector."""
    v = v.float()
    norm = torch.linalg.vector_norm(v)
    if norm == 0:
        v = torch.ones_like(v)
        norm = torch.linalg.vector_norm(v)
    return v / norm


def batch_average_projection(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The normalised mean of the groups of every row of ``x`` [..., in] (zero padding included): [D] float32."""
    x2 = x.detach().reshape(-1, x.shape[-1])
    d = group_dim(x2.shape[1], num_groups)
    total = x2.sum(0, dtype=torch.float64 if x2.dtype == torch.float64 else torch.float32)  # [in]
    padded = torch.nn.functional.pad(total, (0, num_groups * d - total.shape[0]))
    mean = padded.view(num_groups, d).sum(0) / max(1, x2.shape[0] * num_groups)
    return unit_projection(mean)


def compress(x2: torch.Tensor, embed: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``c`` [N, G]: each group of ``x2`` [N, in] projected on ``embed`` [D] (in x2's dtype), without a padded
    copy of x2: full groups are a strided view, the partial one is a short product, empty ones are zeros."""
    n, k = x2.shape
    d = embed.shape[0]
    full, rem = divmod(k, d)
    parts = []
    if full:
        parts.append(x2[:, :full * d].reshape(n, full, d) @ embed)
    if rem:
        parts.append(x2[:, full * d:] @ embed[:rem].unsqueeze(1))
    empty = num_groups - full - (1 if rem else 0)
    if empty:
        parts.append(x2.new_zeros(n, empty))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def reconstructed_weight_grad(g2: torch.Tensor, compressed: torch.Tensor, embed: torch.Tensor, in_features: int,
                              scale: float) -> torch.Tensor:
    """``g2^T x^`` [r, in] for the reconstruction ``x^`` of ``compressed`` (see the module docstring), from
    ``g2^T c`` [r, G]: no [N, in] tensor is formed."""
    m = g2.transpose(0, 1) @ compressed                           # [r, G]
    outer = (m.unsqueeze(-1) * embed).reshape(m.shape[0], -1)     # [r, G*D]
    return outer[:, :in_features] * scale


class VeloraProjection(torch.autograd.Function):
    """``x @ A^T`` whose backward has the exact ``dx`` and VeLoRA's ``dA`` (from the compressed input).

    Saves ``c`` [N, G] (x's dtype), ``embed`` and, when x needs a gradient, ``A``; never ``x``. Backward computes
    ``dx`` in the incoming gradient's dtype (as PEFT), ``dA`` in at least float32, and returns each gradient in its
    input's dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, embed: torch.Tensor, num_groups: int,
                scale: float) -> torch.Tensor:
        out = torch.nn.functional.linear(x, weight)
        x2 = x.reshape(-1, x.shape[-1])
        compressed = compress(x2, embed.to(x.dtype), num_groups)
        # A is needed for dx only (dA's shape and dtype are kept as plain attributes)
        ctx.save_for_backward(compressed, weight if ctx.needs_input_grad[0] else None, embed)
        ctx.x_shape, ctx.x_dtype, ctx.scale = x.shape, x.dtype, scale
        ctx.w_in, ctx.w_dtype = weight.shape[1], weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        compressed, weight, embed = ctx.saved_tensors
        dtype = grad_out.dtype
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ weight.to(dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            # at least float32: g2^T c is only [r, G] (half-precision gradients under autocast are summed in fp32)
            acc = torch.promote_types(dtype, torch.float32)
            grad_w = reconstructed_weight_grad(g2.to(acc), compressed.to(acc), embed.to(acc), ctx.w_in,
                                               ctx.scale).to(ctx.w_dtype)
        return grad_x, grad_w, None, None, None
