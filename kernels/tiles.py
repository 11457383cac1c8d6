"""Tile helpers shared by the matmul kernels (lora.py, lora_fused.py, qmatmul.py).

* ``grouped_tile``: output tile number -> (row block, column block) in grouped order: GROUP_M row
  blocks walk the same column blocks while those columns of the right operand sit in L2.
* ``tile_offsets``: the row/column offsets and bounds masks of one output tile.
* Epoch counters (``epoch_counters``, ``epoch_arrival``, ``last_epoch_arrival``): every kernel
  that counts arrivals (a program that WAITS on others, as in the ticketed look-ahead forward of
  kernels/lora_fused.py, or the LAST program to arrive summing the fp32 partials the others wrote,
  as in the backward kernels). Each launch gets a new epoch E (host-side, per device and stream) and
  passes ``E << 32`` as its base; an int64 counter holds ``base + arrivals`` of the latest launch
  that touched it, and a flag holds the base of the launch that raised it. A program first lifts
  the counter to at least its base (atomic max: a counter of an older launch, finished or not, is
  below it), then adds 1: its arrival number is the old value minus the base. Nothing is reset, so
  a launch that died midway (counters left partially advanced, flags left raised) cannot make a
  later launch skip tickets, pick the wrong last arriver, mistake a stale flag for its own, or wait
  for an arrival that never comes.
* ``sum_slices``: the last arriver's fp32 sum of n partial slices, in order (deterministic).

Memory: the epoch counter buffer is 16 KiB per device and stream (2048 int64, grown on demand).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import AotSpec
from .runtime import check_not_capturing, launch_stream

# (device, stream) -> (int64 epoch counter buffer, epoch of its latest launch)
EPOCH_COUNTERS: dict = {}
EPOCH_SHIFT = 32  # a launch's base is epoch << 32: arrivals per counter stay below 2**32 (grids < 2**31)
EPOCH_LIMIT = 2**31 - 1  # bases stay below 2**63; past this a fresh zeroed buffer restarts at epoch 1
# the base a launch passes where its kernel counts nothing (a flag turns the counting off): any
# value of the int64 type a real base has, so the compiled signature is the same
NO_EPOCH = 1 << EPOCH_SHIFT


@triton.jit
def grouped_tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of output tile number ``tile`` in grouped order: GROUP_M row
    blocks walk the same column blocks while those columns of the weight sit in L2. The index math
    runs in ``tile``'s integer type (callers pick the one their kernel's registers allow); the block
    indices come back as int64 for the address arithmetic."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return (first_m + (tile % group) % size_m).to(tl.int64), ((tile % group) // size_m).to(tl.int64)


@triton.jit
def lookahead_work(ticket, num_m, num_n, n_items, GROUP_M: tl.constexpr):
    """The work of ``ticket`` in a ticketed look-ahead kernel (kernels/lora_fused.py): tickets
    0..n_first-1 are the first group's slices (row block ticket // n_items, slice ticket % n_items),
    then output tile number ``tile`` in grouped order, which also takes slice next_item of row block
    next_block when has_next. Returns (n_first, tile, next_block, next_item, has_next). Tile-number
    arithmetic in the ticket's int32: every value is below the number of tickets (the grid size)."""
    n_first = tl.minimum(GROUP_M, num_m) * n_items
    tile = ticket - n_first
    local = tile % (GROUP_M * num_n)
    next_m = (tile // (GROUP_M * num_n) + 1) * GROUP_M  # first row block of the next group
    has_next = local < tl.minimum(num_m - next_m, GROUP_M) * n_items
    return n_first, tile, next_m + local // n_items, local % n_items, has_next


# helpers whose int32 arithmetic is on tile numbers (below the grid size, < 2**31): the compile
# report's int32-offset check does not flag it
TILE_NUMBER_HELPERS = (grouped_tile, lookahead_work)


@triton.jit
def tile_offsets(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(row offsets, column offsets, row mask, column mask) of output tile (pid_m, pid_n)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def epoch_arrival(count_ptr, base):
    """This program's arrival number (0, 1, ...) at the int64 epoch counter ``count_ptr`` in the
    launch whose base is ``base`` (``epoch_counters``): whatever an older launch left there (done or
    died midway) is below ``base`` and is replaced by it on the launch's first arrival. The counter
    is ordered acquire-release (see ``last_epoch_arrival``'s notes on what is visible)."""
    tl.atomic_max(count_ptr, base, sem="relaxed")
    return tl.atomic_add(count_ptr, 1, sem="acq_rel") - base


@triton.jit
def last_epoch_arrival(count_ptr, base, expected):
    """True in exactly one of the ``expected`` programs of the launch whose base is ``base`` that
    call this on one epoch counter: the last to arrive. Everything the callers stored before the
    call is visible to that program (the barrier orders the CTA's stores before the release; the
    acquire orders the winner's later loads). Nothing is reset: an older launch's count, finished
    or died midway, is below ``base`` (``epoch_arrival``).
    Read what other programs stored with ``cache_modifier=".cg"`` (L1 is not coherent)."""
    tl.debug_barrier()
    return epoch_arrival(count_ptr, base) == expected - 1


@triton.jit
def sum_slices(ptrs, n, stride, mask, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """fp32 sum of n [BLOCK_A, BLOCK_B] partial slices ``stride`` apart, in order (deterministic),
    read through L2: other programs wrote them (see ``last_epoch_arrival``)."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for _ in range(0, n):
        acc += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        ptrs += stride
    return acc


def epoch_counters(device: torch.device, n: int) -> tuple[torch.Tensor, int]:
    """(int64 counters, at least n, for ``epoch_arrival`` and epoch flags; this launch's base
    ``epoch << 32``). One buffer per device and stream; each call is one launch and takes the next
    epoch, so counters and flags never need resetting (see the module doc)."""
    check_not_capturing(device)  # the epoch advances on the host: a graph replay would reuse one epoch
    if device.type == "meta":  # shape-only launches (nothing runs): nothing to reuse, nothing to keep
        return torch.zeros(max(n, 2048), dtype=torch.int64, device=device), 1 << EPOCH_SHIFT
    key = (device, launch_stream(device))
    buf, epoch = EPOCH_COUNTERS.get(key, (None, 0))
    if buf is None or buf.numel() < n or epoch >= EPOCH_LIMIT:
        buf, epoch = torch.zeros(max(n, 2048), dtype=torch.int64, device=device), 0
    epoch += 1
    EPOCH_COUNTERS[key] = (buf, epoch)
    return buf, epoch << EPOCH_SHIFT


def aot_specs() -> list[AotSpec]:
    """Device helpers only: they are compiled inside the kernels that call them."""
    return []
