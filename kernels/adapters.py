"""Adapter plumbing shared by every op that carries LoRA adapters (lora.py, lora_fused.py, qlora.py,
and the adapter term of qmatmul.py's quantised GEMMs).

Notation (as kernels/lora.py): adapters i = 1..n with ranks r_i, A_i [r_i, K], B_i [N, r_i];
stacked A = [A_1; ...; A_n] [R, K], B = [B_1 ... B_n] [N, R], R = sum r_i; s'_i = s_i / (1 - p_i).

Host side:
* ``Plan`` (``make_plan``, cached): ranks, s'_i and active dropout probabilities of one call.
* Device tables read by the kernels: ``adapter_table`` ([n, 4] int64: rank start, rank end,
  stream, keep threshold), ``rank_tiles`` (the same per rank tile), ``rank_scale`` (s' per rank
  column, fp32 [R]); each cached per (plan, device): a few hundred bytes, built once.
* ``cat_a`` / ``cat_b`` stack the adapters (no copy for one adapter); ``split_grads`` /
  ``adapter_grads`` cut stacked gradients back into per-adapter ones; ``grad_a_operands``
  allocates dA's fp32 partials [row blocks, R, K] for ``lora_grad_a_tile``.
* ``check_adapters`` validates the adapter arguments of a public op.

Device side (``@triton.jit`` epilogues, compiled inside the kernels that call them):
* ``adapter_ranks``: adapter i's rank segment and dropout key.
* ``accumulate_lora_y``: acc += t @ B^T (forward epilogue).
* ``accumulate_lora_dx``: acc += sum_i m_i * (G_i @ A_i) (dX epilogue, masks regenerated).
* ``lora_grad_a_tile``: dA = G^T @ (m_i * x) inside a dX kernel, fp32 partials per row block summed
  in order by the last row block to arrive (``tiles.last_epoch_arrival``): deterministic.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .aot import AotSpec
from .dropout import keep_mask, stream_key, threshold
from .tiles import NO_EPOCH, epoch_counters, last_epoch_arrival, sum_slices


@triton.jit
def accumulate_lora_y(acc, t_ptr, b_ptr, R, offs_m, offs_n, mask_m, mask_n, stride_tm, stride_tr, stride_bn,
                       stride_br, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """acc += t[rows] @ B[cols]^T, a short reduction over the ranks (t in B's dtype). Shared by the
    expand kernel and the fused forward GEMMs. t is read through L2 (``.cg``): in the look-ahead
    forward another program has just written it."""
    offs_r = tl.arange(0, BLOCK_R)
    t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
    b_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn  # B^T tile [BR, BN]
    for r0 in range(0, R, BLOCK_R):
        mask_r = offs_r + r0 < R
        t = tl.load(t_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0, cache_modifier=".cg")
        b = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(t.to(b_ptr.dtype.element_ty), b, acc, input_precision=PRECISION)
        t_ptrs += BLOCK_R * stride_tr
        b_ptrs += BLOCK_R * stride_br
    return acc


@triton.jit
def accumulate_lora_dx(acc, g_ptr, a_ptr, adapters_ptr, n_adapters, R, seed, offs_m, offs_k, mask_m, mask_k,
                        stride_gm, stride_gr, stride_ar, stride_ak,
                        HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """acc += (G @ A) for the rows offs_m and input features offs_k, with each adapter's dropout mask applied
    to its own rank segment (regenerated from the seed: the forward's mask). Shared by the dX kernels."""
    if HAS_DROPOUT:
        # masks differ per adapter: one partial product per adapter, masked once
        for i in range(n_adapters):
            r_start, r_end, key, thresh = adapter_ranks(adapters_ptr, i, R, seed, HAS_DROPOUT)
            part = tl.zeros_like(acc)
            for r0 in range(r_start, r_end, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                mask_r = offs_r < r_end
                g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                            mask=mask_m[:, None] & mask_r[None, :], other=0.0)
                a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                            mask=mask_r[:, None] & mask_k[None, :], other=0.0)
                part = tl.dot(g, a, part, input_precision=PRECISION)
            acc += tl.where(keep_mask(key, offs_m, offs_k, thresh), part, 0.0)
    else:
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)  # 64-bit offsets
            mask_r = offs_r < R
            g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(g, a, acc, input_precision=PRECISION)
    return acc


@triton.jit
def adapter_ranks(adapters_ptr, i, R, seed, HAS_DROPOUT: tl.constexpr):
    """(rank start, rank end, mask key, keep threshold) of adapter i of the [n, 4] adapter table;
    without dropout a single segment [0, R) (key and threshold unused)."""
    if HAS_DROPOUT:
        r_start = tl.load(adapters_ptr + i * 4)
        r_end = tl.load(adapters_ptr + i * 4 + 1)
        key = stream_key(seed, tl.load(adapters_ptr + i * 4 + 2))
        thresh = tl.load(adapters_ptr + i * 4 + 3).to(tl.uint32)
    else:
        r_start = 0
        r_end = R
        key = 0
        thresh = 0
    return r_start, r_end, key, thresh


@triton.jit
def lora_grad_a_tile(x_ptr, g_ptr, dap_ptr, da_ptr, count_ptr, count_base, adapters_ptr, n_adapters, R, seed,
                      pid_m, num_m, M, offs_k, mask_k,
                      stride_xm, stride_xk, stride_gm, stride_gr, stride_dps, stride_dpr, stride_dpk,
                      stride_dar, stride_dak,
                      HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, SUB_M: tl.constexpr, BLOCK_R: tl.constexpr,
                      PRECISION: tl.constexpr):
    """dA = G^T @ (m_i * x) for the input features offs_k, inside a dX kernel whose program owns
    row block pid_m (of num_m, BLOCK_M rows). This block's share, G[rows]^T @ mask(x[rows, k]),
    is stored as an fp32 partial dap[pid_m] (x read SUB_M rows at a time, to keep registers
    free); the last row block of this launch (epoch base count_base) to arrive at the epoch
    counter count_ptr sums the num_m partials in order
    (deterministic) and stores dA [R, k] in da's dtype. Shared by the dense and the 4-bit fused
    dX kernels: x is read here, by a compute-bound kernel, instead of by a separate memory-bound
    dA pass."""
    dap_ptr += pid_m * stride_dps
    for i in range(n_adapters if HAS_DROPOUT else 1):  # with dropout, each adapter's ranks see its own mask
        r_start, r_end, key, thresh = adapter_ranks(adapters_ptr, i, R, seed, HAS_DROPOUT)
        for r0 in range(r_start, r_end, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)  # 64-bit offsets
            mask_r = offs_r < r_end
            part = tl.zeros((BLOCK_R, offs_k.shape[0]), dtype=tl.float32)
            for h in tl.static_range(0, BLOCK_M, SUB_M):
                offs_m = pid_m * BLOCK_M + h + tl.arange(0, SUB_M)
                mask_m = offs_m < M
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(g_ptr.dtype.element_ty)
                if HAS_DROPOUT:
                    x = tl.where(keep_mask(key, offs_m, offs_k, thresh), x, 0.0)
                g_t = tl.load(g_ptr + offs_r[:, None] * stride_gr + offs_m[None, :] * stride_gm,
                              mask=mask_r[:, None] & mask_m[None, :], other=0.0)  # [BLOCK_R, SUB_M] = G^T
                part = tl.dot(g_t, x, part, input_precision=PRECISION)
            tl.store(dap_ptr + offs_r[:, None] * stride_dpr + offs_k[None, :] * stride_dpk, part,
                     mask=mask_r[:, None] & mask_k[None, :])
    if last_epoch_arrival(count_ptr, count_base, num_m):
        dap_ptr -= pid_m * stride_dps
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)  # 64-bit offsets
            mask = (offs_r < R)[:, None] & mask_k[None, :]
            acc = sum_slices(dap_ptr + offs_r[:, None] * stride_dpr + offs_k[None, :] * stride_dpk, num_m,
                              stride_dps, mask, BLOCK_R, offs_k.shape[0])
            tl.store(da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak,
                     acc.to(da_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Plan:
    ranks: tuple[int, ...]
    scales: tuple[float, ...]  # s_i / (1 - p_i)
    ps: tuple[float, ...]  # active dropout probabilities (0.0 where dropout is off)

    @functools.cached_property
    def total_rank(self) -> int:
        return sum(self.ranks)

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for r in self.ranks:
            out.append(acc)
            acc += r
        return tuple(out)

    @functools.cached_property
    def dropout(self) -> bool:
        return any(p > 0.0 for p in self.ps)

    @functools.cached_property
    def single_scale(self) -> bool:
        return len(set(self.scales)) == 1


@functools.lru_cache(maxsize=1024)
def cached_plan(ranks: tuple, scalings: tuple, ps: tuple) -> Plan:
    return Plan(ranks, tuple(float(s) / (1.0 - p) for s, p in zip(scalings, ps)), ps)


def make_plan(ranks, scalings, ps) -> Plan:
    return cached_plan(tuple(int(r) for r in ranks), tuple(float(s) for s in scalings), tuple(float(p) for p in ps))


@functools.lru_cache(maxsize=512)
def rank_tiles(plan: Plan, by_adapter: bool, block_r: int, device: torch.device) -> torch.Tensor:
    """[n_tiles, 4] int64 rows (rank start, rank end, stream, threshold); with ``by_adapter`` no
    tile straddles two adapters (each carries its adapter's mask), else tiles cover [0, R)."""
    rows = []
    if by_adapter:
        for i, (r0, r, p) in enumerate(zip(plan.offsets, plan.ranks, plan.ps)):
            rows += [(s, min(s + block_r, r0 + r), i, threshold(p)) for s in range(r0, r0 + r, block_r)]
    else:
        rows = [(s, min(s + block_r, plan.total_rank), 0, 0) for s in range(0, plan.total_rank, block_r)]
    return torch.tensor(rows, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=512)
def adapter_table(plan: Plan, device: torch.device) -> torch.Tensor:
    rows = [(r0, r0 + r, i, threshold(p))
            for i, (r0, r, p) in enumerate(zip(plan.offsets, plan.ranks, plan.ps))]
    return torch.tensor(rows, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=512)
def rank_scale(plan: Plan, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    vals = [s for s, r in zip(plan.scales, plan.ranks) for _ in range(r)]
    return torch.tensor(vals, dtype=dtype, device=device)


def grad_a_operands(x2: torch.Tensor | None, a: torch.Tensor, num_m: int, block_k: int):
    """(dA or None, pointers, strides) for ``lora_grad_a_tile`` inside a dX kernel with row blocks
    num_m and column blocks of block_k: x2, fp32 partials [num_m, R, K], dA [R, K] in A's dtype, the
    epoch counters and this launch's base (``tiles.epoch_counters``: one call per launch). Without x2
    (no dA wanted) the pointers and the base are placeholders."""
    if x2 is None:
        return None, (a, a, a, a, NO_EPOCH), (0,) * 7
    R, K = a.shape
    dap = torch.empty(num_m, R, K, dtype=torch.float32, device=a.device)
    da = torch.empty(R, K, dtype=a.dtype, device=a.device)
    count, base = epoch_counters(a.device, triton.cdiv(K, block_k))
    return da, (x2, dap, da, count, base), (x2.stride(0), x2.stride(1), *dap.stride(), *da.stride())


def cat_a(weights_a):
    return weights_a[0] if len(weights_a) == 1 else torch.cat(list(weights_a), 0)


def cat_b(weights_b):
    return weights_b[0] if len(weights_b) == 1 else torch.cat(list(weights_b), 1)


def split_grads(plan, da, db):
    """Per-adapter views of the stacked gradients (lists of None where not computed)."""
    n = len(plan.ranks)
    if n == 1:  # whole tensors, not views: autograd can take them as .grad without a copy
        return [da], [db]
    das = [None] * n if da is None else [da[r0:r0 + r] for r0, r in zip(plan.offsets, plan.ranks)]
    if db is None:
        dbs = [None] * n
    else:
        dbs = [db[:, r0:r0 + r].contiguous() for r0, r in zip(plan.offsets, plan.ranks)]
    return das, dbs


def adapter_grads(plan, da, db, need_a, need_b) -> list:
    """[dA_1 .. dA_n, dB_1 .. dB_n] for an autograd backward to return: per-adapter pieces of the
    stacked gradients (``split_grads``), None for each adapter weight that needs no gradient."""
    das, dbs = split_grads(plan, da, db)
    return [g if need else None for g, need in zip(das, need_a)] + \
        [g if need else None for g, need in zip(dbs, need_b)]


def check_adapters(x, base_out, weights_a, weights_b, scalings, dropout_ps):
    n = len(weights_a)
    if not (len(weights_b) == len(scalings) == len(dropout_ps) == n):
        raise ValueError(f"lora_linear needs one A, B, scaling and dropout p per adapter; got {n} A, "
                         f"{len(weights_b)} B, {len(scalings)} scalings, {len(dropout_ps)} dropout_ps")
    if x.dim() < 1 or tuple(x.shape)[:-1] != tuple(base_out.shape)[:-1]:
        raise ValueError(f"x [..., d_in] and base_out [..., d_out] must share leading dims; got "
                         f"{tuple(x.shape)} and {tuple(base_out.shape)}")
    d_in, d_out = x.shape[-1], base_out.shape[-1]
    for i, (a, b) in enumerate(zip(weights_a, weights_b)):
        if a.dim() != 2 or a.shape[1] != d_in or a.shape[0] < 1:
            raise ValueError(f"adapter {i}: A must be [r, d_in={d_in}] with r >= 1, got {tuple(a.shape)}")
        if b.dim() != 2 or tuple(b.shape) != (d_out, a.shape[0]):
            raise ValueError(f"adapter {i}: B must be [d_out={d_out}, r={a.shape[0]}], got {tuple(b.shape)}")
        if a.dtype != b.dtype or not a.dtype.is_floating_point:
            raise ValueError(f"adapter {i}: A and B must share one floating dtype, "
                             f"got {a.dtype} and {b.dtype}")
    for t, name in ((x, "x"), (base_out, "base_out")):
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point (fp32, fp16 or bf16), got {t.dtype}")


def aot_specs() -> list[AotSpec]:
    """Device helpers only: they are compiled inside the kernels that call them."""
    return []
