"""Launch plans: how the launchers tile, split and size their grids, as the cost model needs them.

Some of the bytes a kernel moves depend on its launcher's choices, not on the math: a reduction
over T split k ways writes k fp32 partial sums; a kernel with one program per row block of m rows
writes T/m partials. The formulas (``formulas/``) never restate such a number: they call this
module, the only place in the cost model that knows a tile size, a split count or a program count.

Each plan is the kernel package's own rule when ``peftfast.kernels`` exports it
(``grad_w_splits``, ``shrink_items``, ``dy_plan``, ``fused_dx_block_m``, ``qlora_dx_block_m``,
``arrival_counters``), so the model follows the launchers when they change. Until the kernel
package exports a rule, a copy of the launcher's current rule (the ``_copy_*`` functions) stands
in; calibration (counted traffic vs the formulas) catches a copy that drifts. Once every rule is
exported, the copies and the ``or`` in each plan can be deleted.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .specs import cdiv


def kernel_rule(name: str) -> Callable[..., Any] | None:
    """``peftfast.kernels.<name>`` when the kernel package exports it, else None."""
    try:
        import peftfast.kernels as kernels
    except ImportError:
        return None
    return getattr(kernels, name, None)


# ----------------------------------------------------------------------------------------------
# kernels/lora.py


def lora_grad_splits(t: int, n: int, ranks: list[int], ad: torch.dtype, by_adapter: bool) -> int:
    """How many ways kernels/lora.py splits the reduction over T of a weight gradient [R, n]
    (``peftfast.kernels.grad_w_splits``): each split writes fp32 partials [R, n]."""
    rule = kernel_rule("grad_w_splits") or _copy_grad_w_splits
    return rule(t, n, ranks, ad, by_adapter)


def _copy_grad_w_splits(t: int, n: int, ranks: list[int], ad: torch.dtype, by_adapter: bool) -> int:
    """The launcher's rule: rank tiles of 16/64/128 covering the largest rank (per adapter when
    dropout masks differ, ``by_adapter``) or R; column blocks of 64; row blocks of 32 for fp32
    operands, 64 otherwise; enough programs for ~4 waves on 132 SMs (528), at most one split
    per row block."""
    extent = max(ranks) if by_adapter else sum(ranks)
    block_r = next((b for b in (16, 64, 128) if b >= extent), 128)
    tiles = sum(cdiv(r, block_r) for r in ranks) if by_adapter else cdiv(sum(ranks), block_r)
    block_m = 32 if ad == torch.float32 else 64
    splits = max(1, min(cdiv(528, tiles * cdiv(n, 64)), cdiv(t, block_m)))
    rows = cdiv(cdiv(t, splits), block_m) * block_m
    return cdiv(t, rows)


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """The kernels' shared arrival-counter buffer (``peftfast.kernels.arrival_counters``): one per
    device and stream, zeroed once when first allocated and reused by every later launch."""
    rule = kernel_rule("arrival_counters")
    if rule is None:
        from peftfast.kernels import lora

        rule = lora._arrival_counters  # the kernel package before it exported the name
    return rule(device, n)


# ----------------------------------------------------------------------------------------------
# kernels/lora_fused.py


def fused_shrink_items(d_in: int, d_out: int, act: torch.dtype) -> int:
    """K slices per row block of the look-ahead shrink inside the fused forward GEMM (16-bit
    activations; ``peftfast.kernels.shrink_items``): each slice writes fp32 partials [T, R]."""
    rule = kernel_rule("shrink_items") or _copy_shrink_items
    return rule(d_in, d_out, act)


def _copy_shrink_items(d_in: int, d_out: int, act: torch.dtype) -> int:
    """The launcher's rule: min(4, column blocks of 64, K blocks of 64), rounded to whole K blocks."""
    k_blocks, n_blocks = cdiv(d_in, 64), cdiv(d_out, 64)
    k_per_item = cdiv(k_blocks, min(4, n_blocks, k_blocks)) * 64
    return cdiv(d_in, k_per_item)


def fused_dy_splits(t: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype) -> tuple[int, int]:
    """(N blocks, splits of T) of the fused backward's dY pass (``peftfast.kernels.dy_plan``):
    G's fp32 partials are [N blocks, T, R], dB's are [splits, N, R]."""
    rule = kernel_rule("dy_plan") or _copy_dy_plan
    return tuple(rule(t, d_out, ranks, act, ad))


def _copy_dy_plan(t: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype) -> tuple[int, int]:
    """The launcher's rule: rank tiles of 16 (R <= 16, 16-bit adapters) or 32; N blocks of 256 and
    row blocks of 16 (fp32 adapters on a 16-bit model: 32; fp32 model: N blocks of 128, rows of
    16); ~264 programs."""
    big_r = sum(ranks)
    f32 = torch.float32
    tiles = cdiv(big_r, 16 if big_r <= 16 and ad != f32 else 32)
    block_n, block_m = (128, 16) if act == ad == f32 else (256, 32) if ad == f32 else (256, 16)
    n_blocks = cdiv(d_out, block_n)
    splits = max(1, min(cdiv(264, tiles * n_blocks), cdiv(t, block_m)))
    rows = cdiv(cdiv(t, splits), block_m) * block_m
    return n_blocks, cdiv(t, rows)


def fused_dx_block_m(act: torch.dtype) -> int:
    """Rows per program of the fused backward's dX + dA kernel (dense weight;
    ``peftfast.kernels.fused_dx_block_m``): dA's fp32 partials are [T / rows, R, K]."""
    rule = kernel_rule("fused_dx_block_m") or _copy_fused_dx_block_m
    return rule(act)


def _copy_fused_dx_block_m(act: torch.dtype) -> int:
    """The launcher's rule: 64 rows for fp32 activations, 128 otherwise."""
    return 64 if act == torch.float32 else 128


# ----------------------------------------------------------------------------------------------
# kernels/qmatmul.py


def qlora_dx_block_m(t: int, act: torch.dtype) -> int:
    """Rows per program of the adapter-carrying 4-bit dX kernel (``peftfast.kernels.qlora_dx_block_m``)."""
    rule = kernel_rule("qlora_dx_block_m") or _copy_qlora_dx_block_m
    return rule(t, act)


def _copy_qlora_dx_block_m(t: int, act: torch.dtype) -> int:
    """The launcher's rule: the decode tile (16 rows) for T <= 16, else the medium tile (64 rows)."""
    return 16 if t <= 16 else 64


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors qmatmul's launcher plans for on ``device`` (its default on a CPU)."""
    from peftfast.kernels import qmatmul

    rule = getattr(qmatmul, "sm_count", None)
    if rule is None:
        rule = qmatmul._sm_count  # the kernel package before it exported the name
    return rule(device)


def decode_split(t: int, n: int, k: int, sms: int, act: torch.dtype = torch.bfloat16) -> int:
    """Reduction split of the 4-bit decode GEMM (T <= 16) for a GPU with ``sms`` SMs, as the
    launcher in ``kernels/qmatmul.py`` picks it (asked of qmatmul's own ``pick_config`` and
    ``split_reduction``)."""
    from peftfast.kernels import qmatmul

    name, split = qmatmul.pick_config(t, n, k, True, torch.device("cpu"), sms=sms)
    return qmatmul.split_reduction(k, qmatmul.resolve_config(name, True, act).block_r, split)[0]
