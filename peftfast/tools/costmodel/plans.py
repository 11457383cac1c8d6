"""Launch plans: how the launchers tile, split and size their grids, as the cost model needs them.

Some of the bytes a kernel moves depend on its launcher's choices, not on the math: a reduction
over T split k ways writes k fp32 partial sums; a kernel with one program per row block of m rows
writes T/m partials. The formulas (``formulas/``) never restate such a number: they call this
module, which asks the kernel package for the rule its launchers call themselves
(``peftfast.kernels.grad_w_splits``, ``shrink_items``, ``dy_plan``, ``fused_dx_block_m``,
``qlora_dx_block_m``; qmatmul's ``pick_config``/``split_reduction``/``sm_count``), so the model
follows the launchers when they change.
"""
from __future__ import annotations

import torch

import peftfast.kernels as kernels
from peftfast.kernels import qmatmul


# ----------------------------------------------------------------------------------------------
# kernels/lora.py


def lora_grad_splits(t: int, n: int, ranks: list[int], ad: torch.dtype, by_adapter: bool) -> int:
    """How many ways kernels/lora.py splits the reduction over T of a weight gradient [R, n]
    (``peftfast.kernels.grad_w_splits``): each split writes fp32 partials [R, n]."""
    return kernels.grad_w_splits(t, n, ranks, ad, by_adapter)


def epoch_counters(device: torch.device, n: int) -> torch.Tensor:
    """The kernels' epoch-counter buffer (``peftfast.kernels.epoch_counters``): one per device
    and stream, zeroed once when first allocated; each launch takes a new epoch, no per-launch memset."""
    return kernels.epoch_counters(device, n)[0]


# ----------------------------------------------------------------------------------------------
# kernels/lora_fused.py


def fused_shrink_items(d_in: int, d_out: int, act: torch.dtype) -> int:
    """K slices per row block of the look-ahead shrink inside the fused forward GEMM (16-bit
    activations; ``peftfast.kernels.shrink_items``): each slice writes fp32 partials [T, R]."""
    return kernels.shrink_items(d_in, d_out, act)


def fused_dy_splits(t: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype) -> tuple[int, int]:
    """(N blocks, splits of T) of the fused backward's dY pass (``peftfast.kernels.dy_plan``):
    G's fp32 partials are [N blocks, T, R], dB's are [splits, N, R]."""
    return tuple(kernels.dy_plan(t, d_out, ranks, act, ad))


def fused_dx_block_m(act: torch.dtype, ad: torch.dtype | None = None) -> int:
    """Rows per program of the fused backward's dX + dA kernel (dense weight;
    ``peftfast.kernels.fused_dx_block_m``): dA's fp32 partials are [T / rows, R, K]."""
    return kernels.fused_dx_block_m(act, ad)


# ----------------------------------------------------------------------------------------------
# kernels/qmatmul.py


def qlora_dx_block_m(t: int, act: torch.dtype) -> int:
    """Rows per program of the adapter-carrying 4-bit dX kernel (``peftfast.kernels.qlora_dx_block_m``)."""
    return kernels.qlora_dx_block_m(t, act)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors qmatmul's launcher plans for on ``device`` (its default on a CPU)."""
    return qmatmul.sm_count(device)


def decode_split(t: int, n: int, k: int, sms: int, act: torch.dtype = torch.bfloat16) -> int:
    """Reduction split of the 4-bit decode GEMM (T <= 16) for a GPU with ``sms`` SMs, as the
    launcher in ``kernels/qmatmul.py`` picks it (asked of qmatmul's own ``pick_config`` and
    ``split_reduction``)."""
    name, split = qmatmul.pick_config(t, n, k, True, torch.device("cpu"), sms=sms)
    return qmatmul.split_reduction(k, qmatmul.resolve_config(name, True, act).block_r, split)[0]
