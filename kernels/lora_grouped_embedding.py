"""Grouped LoRA on an embedding: each row (token) of a batch uses its own adapter, in one op, no loop over adapters.

Math (one nn.Embedding of V rows and width D; token t(m) of row m, adapter slot a(m), -1 for none; PEFT's
``E[x] + s * A^T[x] @ B^T`` with A [r, V], B [D, r]):

    h[m] = s_a * A_a[:, t(m)]                          [M, R]   (a gather: no matmul)
    y[m] = base_out[m] + h[m] @ B_a^T                  (a(m) >= 0; y[m] = base_out[m] otherwise)

Adapters live in the stacked store of ``kernels/lora_grouped.py`` (A [N, R, V], B [N, D, R], scale [N] fp32,
rank rows beyond an adapter's rank zero): the gather reads each row's R entries of its adapter's A with one
indexing op, the expand runs over the same plan of blocks as ``lora_grouped`` (``make_plan``: rows sorted by
adapter, one adapter per block) as one batched matmul, added into y with one ``index_add``.

Backward (G = dY): dH[m] = s_a * G[m] @ B_a (a batched matmul over the blocks, scattered back to rows);
dA_a[:, t] = sum of dH[m] over a's rows with token t (one ``index_put`` with accumulation into the store's
shape, rows of ``padding_idx`` left out as F.embedding does); dB_a = sum over a's blocks of G^T @ h. Each
adapter's A and B receive views of their rank rows / columns. No Triton kernel: PyTorch ops on every backend
(a gather and two batched matmuls), a fixed number of ops whatever the number of adapters.

Saved for backward: the token ids, h [M, R] and the plan; nothing that grows with the number of adapters.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from .lora_grouped import make_plan
from .opdecl import OpDecl


def _gather_h(tokens, index, a_store, scale):
    """h [M, R] in the store's dtype: s_a * A_a[:, t(m)] (zero for rows without an adapter)."""
    n = a_store.shape[0]
    live = index >= 0
    slot = index.clamp(0, n - 1)
    h = a_store[slot, :, tokens]  # [M, R]
    return h * (scale[slot] * live).to(a_store.dtype)[:, None]


def _blocks(b_store, badapter):
    """Each block's B [nb, D, R] (gathered: a plan's blocks need not be the adapters in order, e.g. one block per
    sample) and its liveness [nb] (0 for unused blocks)."""
    n = b_store.shape[0]
    return b_store[badapter.clamp(max=n - 1)], (badapter < n)


def _rows_of_blocks(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[nb, rows, C]: row table[b, i] of ``t`` [M, C] (zeros for empty slots, index M)."""
    return torch.cat([t, t.new_zeros(1, t.shape[1])])[table]


def _op_forward(tokens: torch.Tensor, base_out: torch.Tensor, weights_a: list[torch.Tensor],
                weights_b: list[torch.Tensor], a_store: torch.Tensor, b_store: torch.Tensor, scale: torch.Tensor,
                index: torch.Tensor, table: torch.Tensor, block_adapter: torch.Tensor, padding_idx: int,
                *, hint=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y shaped like base_out, h [M, R]); ``padding_idx`` -1 for none (it only affects the backward)."""
    m = index.shape[0]
    base2 = base_out.reshape(m, -1)
    h = _gather_h(tokens.reshape(-1), index, a_store, scale)
    bb, live = _blocks(b_store, block_adapter)
    yb = torch.bmm(_rows_of_blocks(h, table), bb.transpose(1, 2)) * live.to(h.dtype)[:, None, None]  # [nb, rows, D]
    acc = torch.cat([base2.to(a_store.dtype), base2.new_zeros(1, base2.shape[1], dtype=a_store.dtype)])
    acc.index_add_(0, table.reshape(-1), yb.reshape(-1, yb.shape[-1]))
    return acc[:m].to(base_out.dtype).view(base_out.shape), h


def _op_save(args, outputs) -> list:
    tokens, _base, weights_a, weights_b, a_store, b_store, scale, index, table, badapter, _pad = args
    return [tokens, outputs[1], a_store, b_store, scale, index, table, badapter, *weights_a, *weights_b]


def _op_backward(saved, grads, needs, statics, *, hint=None) -> list:
    """Gradients of (tokens, base_out, A_1..A_n, B_1..B_n, stores, scale, index, table, block_adapter)."""
    tokens, h, a_store, b_store, scale, index, table, badapter, *weights = saved
    (padding_idx,) = statics
    n = len(weights) // 2
    need_a, need_b = needs[2:2 + n], needs[2 + n:2 + 2 * n]
    dy = grads[0]
    m = index.shape[0]
    g = _rows_of_blocks(dy.reshape(m, -1).to(a_store.dtype), table)  # [nb, rows, D]
    bb, live = _blocks(b_store, badapter)
    grads_a = [None] * n
    grads_b = [None] * n
    if any(need_a):
        dh_b = torch.bmm(g, bb) * live.to(g.dtype)[:, None, None]  # [nb, rows, R]
        dh = h.new_zeros(m + 1, h.shape[1]).index_add_(0, table.reshape(-1), dh_b.reshape(-1, dh_b.shape[-1]))[:m]
        slot = index.clamp(0, n - 1)
        tok = tokens.reshape(-1)
        keep = (index >= 0) & (tok != padding_idx)
        dh = dh * (scale[slot] * keep).to(dh.dtype)[:, None]
        da = torch.zeros(n, a_store.shape[2], a_store.shape[1], dtype=a_store.dtype, device=a_store.device)
        da.index_put_((slot, tok), dh, accumulate=True)  # [N, V, R]: rows of other adapters add zeros
        da = da.transpose(1, 2)
        grads_a = [da[i, :w.shape[0]].to(w.dtype) if need else None
                   for i, (w, need) in enumerate(zip(weights[:n], need_a))]
    if any(need_b):
        db = torch.bmm(g.transpose(1, 2), _rows_of_blocks(h, table))  # [nb, D, R], summed into each adapter's
        db = torch.zeros_like(b_store).index_add_(0, badapter.clamp(max=n - 1), db * live.to(db.dtype)[:, None, None])
        grads_b = [db[i, :, :w.shape[1]].to(w.dtype) if need else None
                   for i, (w, need) in enumerate(zip(weights[n:], need_b))]
    return [None, None, *grads_a, *grads_b, None, None, None, None, None, None]


def _op_fake(tokens, base_out, weights_a, weights_b, a_store, b_store, scale, index, table, block_adapter,
             padding_idx):
    return base_out.new_empty(base_out.shape), base_out.new_empty((index.shape[0], a_store.shape[1]),
                                                                   dtype=a_store.dtype)


def _op_backward_fake(saved, grads, needs, statics) -> list:
    _t, _h, _a, _b, _s, _i, _ta, _ba, *weights = saved
    n = len(weights) // 2
    return [None, None, *(w.new_empty(w.shape) if need else None for w, need in zip(weights, needs[2:2 + 2 * n])),
            None, None, None, None, None, None]


LORA_GROUPED_EMBEDDING = OpDecl("peftfast::lora_grouped_embedding", _op_forward, _op_backward, save=_op_save,
                                fake=_op_fake, backward_fake=_op_backward_fake, passthrough={"base_out": 0},
                                aux_outputs=(1,))


def lora_grouped_embedding(tokens: torch.Tensor, base_out: torch.Tensor, weights_a: Sequence[torch.Tensor],
                           weights_b: Sequence[torch.Tensor], a_store: torch.Tensor, b_store: torch.Tensor,
                           scale: torch.Tensor, index: torch.Tensor,
                           plan: tuple[torch.Tensor, torch.Tensor] | None = None,
                           padding_idx: Optional[int] = None) -> torch.Tensor:
    """``base_out`` (the embedding's output for ``tokens``) plus, for each token m, adapter ``index[m]``'s
    ``s * A^T[t] @ B^T`` (index [M] int64, -1: none). The stores ([N, R, V], [N, D, R], scale [N] fp32) hold
    ``weights_a`` / ``weights_b`` ([r_i, V] / [D, r_i], zero-padded to R); gradients go to base_out and the
    weights (none to the rows of ``padding_idx``, as F.embedding). ``plan``: ``make_plan(index, N, False)``."""
    n, r, v = a_store.shape
    m = index.shape[0]
    if len(weights_a) != n or len(weights_b) != n or b_store.shape[0] != n or b_store.shape[2] != r:
        raise ValueError(f"lora_grouped_embedding: stores of {n} adapters (A {tuple(a_store.shape)}, B "
                         f"{tuple(b_store.shape)}) for {len(weights_a)} A and {len(weights_b)} B weights")
    if tokens.numel() != m or base_out.numel() != m * b_store.shape[1]:
        raise ValueError(f"lora_grouped_embedding: tokens {tuple(tokens.shape)} / base_out {tuple(base_out.shape)} "
                         f"do not match {m} rows of index and stores with D={b_store.shape[1]}")
    table, badapter = make_plan(index, n, False) if plan is None else plan
    pad = -1 if padding_idx is None else int(padding_idx) % v
    return LORA_GROUPED_EMBEDDING(tokens, base_out, list(weights_a), list(weights_b), a_store, b_store, scale, index,
                                  table, badapter, pad)[0]
