"""Mixed batches of LoRA adapters (PEFT's ``adapter_names``) as one grouped op per layer.

A layer keeps its adapters' factors in a stacked store (``AdapterStore``: A [N, R, K], B [N, O, R], the
scalings [N]; R the power-of-two bucket of the largest rank, rows beyond an adapter's rank zero). The store
holds every adapter of the layer, not only those of the current batch, so a batch of other names reuses it.
It is rebuilt when an adapter is added, deleted or replaced, when a factor is written in place (an
optimizer step, ``load_adapter``, ``set_peft_model_state_dict``: torch's version counter of the tensor moves),
when its ``.data`` is replaced (its data pointer moves) or a scaling changes; checking costs one tuple of version
counters and pointers per call, no copy. A LoRA Linear layer checks first, in one loop over its adapters,
whether anything its bundle of factors reads has changed (``Linear._plain_adapters_key``), and skips rebuilding
the bundle and this check when nothing has.

``grouped_delta`` maps each row of the batch to its adapter's slot (``__base__`` and adapters the layer does
not hold: -1) and calls ``peftfast.kernels.lora_grouped.lora_grouped``: rows sorted by adapter on the
device, then one shrink and one expand over blocks of rows (Triton on CUDA; two batched matmuls elsewhere).
Over a plain frozen nn.Linear on the Triton backend, a batch with rows enough to fill 64-row blocks (prefill)
instead runs ``grouped_linear``: the base GEMM, the shrink and the expand in one launch
(``lora_grouped_linear``), x read once and y written once; over a bitsandbytes 4-bit (aligned layout) or int8
base the same, its weight dequantised tile by tile inside that GEMM (``lora_grouped_qlinear``). On a CUDA device
the base layer followed by the grouped kernels runs instead where it was measured faster for the call's key
(``fused_choice``: kernels/autotune.py's measured dispatch, keyed by rows, weight kind and shape, rank tile,
adapters used, dtypes and step; timed once per key).
No Python loop over adapters runs per call. In training, gradients reach each adapter's own A and B from
the rows that used it only; with dropout each row sees its adapter's mask (its probability, its stream),
regenerated inside the op from one seed per call in forward and backward: saved for backward are x (the
caller's tensor), the small h and the plan, never a mask or a dropped copy of x.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

from ...kernels import autotune
from ...kernels.backend import use_triton
from ...kernels.lora_grouped import (MAX_KERNEL_RANK, dropout_tables, fused_plan, fused_worthwhile, kernel_rank,
                                     lora_grouped, lora_grouped_linear, make_plan, rank_bucket)
from ...kernels.lora_grouped_q import QuantWeight, fuses, lora_grouped_qlinear, weight_tensor
from ...kernels.qlora import Int8Weight
from ...kernels.qmatmul import matmul_4bit, matmul_int8
from ...utils.steps import optimizer_steps

BaseWeightArg = Union[torch.Tensor, QuantWeight]  # a float [O, K] weight, or a bitsandbytes one

# the smallest rank every layer's store is padded to (``reserve_mixed_batch_rank``)
_RESERVED_RANK = [1]


def reserve_mixed_batch_rank(rank: int) -> None:
    """Pad every LoRA layer's stacked store (mixed batches) to at least ``rank``, rounded up to a power of two, as a
    multi-adapter server's maximum LoRA rank: the grouped kernels are specialised by the store's rank tile, so
    adapters of any rank up to it can then be added while serving without compiling a new kernel variant, at the
    cost of reading the zero rows that pad smaller adapters (the default, 1: the store follows the largest rank it
    holds, and an adapter of a larger power-of-two bucket compiles the variants of that bucket). Ranks above 64 run
    the PyTorch path. Stores are rebuilt at their next mixed call."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"reserve_mixed_batch_rank takes a positive int rank, got {rank!r}")
    _RESERVED_RANK[0] = rank


def reserved_rank() -> int:
    return _RESERVED_RANK[0]


# the last plan made: every layer of one call with the same adapters and rows reuses it (one sort per call, not
# per layer); a key of plain values, so a later call never sees a stale plan
_LAST_PLAN: dict = {}


def outside_inference_mode():
    """A context in which new tensors are plain ones: under ``torch.inference_mode()`` it leaves that mode (which
    turns gradient recording back on: nest ``torch.no_grad()`` inside it where that matters); elsewhere nothing."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()


class AdapterStore:
    """The stacked factors of one layer's adapters, rebuilt only when they change (see the module doc)."""

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.weights: tuple = ()
        self.names: tuple[str, ...] = ()
        self.slots: dict[str, int] = {}
        self.a: Optional[torch.Tensor] = None
        self.b: Optional[torch.Tensor] = None
        self.scale: Optional[torch.Tensor] = None
        self.drop_scale: Optional[torch.Tensor] = None
        self.thresholds: Optional[torch.Tensor] = None
        self.max_dropout = 0.0
        # the layer's fast check (``Linear._plain_adapters_key``): (key, bundle) of the bundle last synced
        self.bundle: Optional[tuple] = None

    def sync(self, names: list[str], weights_a: list[torch.Tensor], weights_b: list[torch.Tensor],
             scalings: list[float], dropout_ps: list[float]) -> None:
        weights = (*weights_a, *weights_b)
        # data pointers: a factor's ``.data`` replaced (same tensor object, same version counter) is seen too
        # optimizer steps: fused optimizers write the weights without bumping their version counters
        key = (tuple(names), tuple(scalings), tuple(dropout_ps), tuple(w._version for w in weights),
               tuple((w.device, w.dtype, w.shape, w.data_ptr()) for w in weights), optimizer_steps(),
               _RESERVED_RANK[0])
        if key == self.key and len(weights) == len(self.weights) and all(
                w is v for w, v in zip(weights, self.weights)):
            return
        # plain tensors even under torch.inference_mode(): the store outlives the call (an inference tensor has no
        # version counter, is refused by autograd in a later training call and cannot be updated outside that mode)
        with outside_inference_mode(), torch.no_grad():
            dtype = weights_a[0].dtype
            for w in weights:
                dtype = torch.promote_types(dtype, w.dtype)
            device = weights_a[0].device
            n, k, o = len(names), weights_a[0].shape[1], weights_b[0].shape[0]
            r = rank_bucket(max(_RESERVED_RANK[0], *(a.shape[0] for a in weights_a)))
            a_store = torch.zeros(n, r, k, dtype=dtype, device=device)
            # B kept as [N, R, O] (seen as [N, O, R]): unit stride along O for the expand and, as B^T, for the
            # backward's dH shrink (the layouts the compile report builds)
            b_store = torch.zeros(n, r, o, dtype=dtype, device=device).transpose(1, 2)
            for i, (a, b) in enumerate(zip(weights_a, weights_b)):  # on a change only, not per call
                a_store[i, :a.shape[0]].copy_(a)
                b_store[i, :, :b.shape[1]].copy_(b)
            self.a, self.b = a_store, b_store
            self.scale = torch.tensor(scalings, dtype=torch.float32, device=device)
            # training with dropout: s / (1 - p) and the keep thresholds the op regenerates the masks with
            self.drop_scale, self.thresholds = dropout_tables(scalings, dropout_ps, device)
        self.max_dropout = max(dropout_ps)
        self.names = tuple(names)
        self.slots = {name: i for i, name in enumerate(names)}
        self.weights = weights
        # the version counters now (the copies above read, never write, the weights)
        self.key = key


def row_index(slots: dict[str, int], names: list, rows: int, device: torch.device) -> torch.Tensor:
    """The adapter slot of each of ``rows`` rows: ``names`` has one entry per sample (its rows are
    consecutive) or, per token, one list of names per sample; -1 where no adapter of the store applies."""
    if names and isinstance(names[0], (list, tuple)):
        flat = [slots.get(n, -1) for per in names for n in per]
        if len(flat) != rows:
            raise ValueError(f"adapter_names per token gives {len(flat)} names for {rows} rows of this layer's "
                             "input; give one list of names per sample, one name per token")
        return torch.tensor(flat, dtype=torch.int64, device=device)
    per_sample = torch.tensor([slots.get(n, -1) for n in names], dtype=torch.int64, device=device)
    if rows % len(names):
        raise ValueError(f"adapter_names has {len(names)} entries for {rows} rows of this layer's input; give "
                         "one adapter name per sample")
    return per_sample.repeat_interleave(rows // len(names))


def shared_plan(store: AdapterStore, names: list, rows: int, device: torch.device, on_triton: bool | str):
    """(index, plan) for these rows: made once, then reused by the next layers of the call. ``on_triton``:
    "fused" for the plan of ``lora_grouped_linear``'s kernel (``fused_plan``)."""
    # names are all strings (one per sample) or all lists (per token): check_adapter_names_shape
    per_token = bool(names) and isinstance(names[0], (list, tuple))
    key = (store.names, tuple(tuple(n) for n in names) if per_token else tuple(names), rows, device, on_triton)
    hit = _LAST_PLAN.get("entry")  # one (key, value) tuple, replaced whole: no torn read across threads
    if hit is not None and hit[0] == key:
        return hit[1]
    n = len(store.names)
    used = used_adapters(names, store.slots)  # the plan's blocks bound these: grids do not grow with adapters held
    with outside_inference_mode():  # plain tensors: the plan is reused by later calls, in any mode (AdapterStore)
        index = row_index(store.slots, names, rows, device)
        if on_triton == "fused":
            value = (index, fused_plan(index, n, used))
        else:  # one name per sample: its rows (tokens) are a run of rows // len(names) with one adapter (``run_plan``)
            value = (index, make_plan(index, n, on_triton, run=1 if per_token else rows // len(names),
                                      rank=store.a.shape[1], used=used))
    _LAST_PLAN["entry"] = (key, value)
    return value


def grouped_delta(store: AdapterStore, x: torch.Tensor, result: torch.Tensor, names: list,
                  weights_a: list[torch.Tensor], weights_b: list[torch.Tensor], training: bool,
                  owned: bool = False) -> torch.Tensor:
    """``result`` (the base output for x) plus, for each row of x, the adapter its sample (or token) names.
    ``owned``: ``result`` is a fresh tensor no one else holds (updated in place while no gradient is recorded, as
    PEFT's loop does)."""
    rows = x.numel() // x.shape[-1]
    on_triton = use_triton(x, result, store.a, store.b) and store.a.shape[1] <= MAX_KERNEL_RANK
    index, plan = shared_plan(store, names, rows, x.device, on_triton)
    if training and store.max_dropout > 0:  # masks drawn inside the op from one seed: no dropped copy of x
        return lora_grouped(x, result, weights_a, weights_b, store.a, store.b, store.drop_scale, index, plan=plan,
                            thresholds=store.thresholds, update_base_out=owned).view(result.shape)
    return lora_grouped(x, result, weights_a, weights_b, store.a, store.b, store.scale, index, plan=plan,
                        update_base_out=owned).view(result.shape)


def _values(weight: BaseWeightArg) -> torch.Tensor:
    return weight if isinstance(weight, torch.Tensor) else weight_tensor(weight)


def used_adapters(names: list, held) -> int:
    """How many distinct adapters of ``held`` (names, or a mapping keyed by them) the call's ``names`` (one per
    sample, or a list per token) use: what the fused kernel's padding depends on (at most one partly filled block
    per used adapter, and one for the base model's rows), not the count held, so adding or deleting an adapter
    that a batch does not use changes neither the kernels a batch runs nor their measured choice."""
    per_token = bool(names) and isinstance(names[0], (list, tuple))
    used = set(n for per in names for n in per) if per_token else set(names)
    return len(used.intersection(held))


def may_fuse(x: torch.Tensor, weight: BaseWeightArg) -> bool:
    """The cheap part of ``grouped_linear``'s test, before any store is synced and without reading the call's names
    (per token, as many as the rows): the Triton backend and rows enough to fill the fused kernel's blocks with the
    base model's rows alone (``grouped_linear`` then counts the adapters the batch uses)."""
    return use_triton(x, _values(weight)) and fused_worthwhile(x.numel() // max(1, x.shape[-1]), 0)


def grouped_linear(store: AdapterStore, x: torch.Tensor, weight: BaseWeightArg, bias: Optional[torch.Tensor],
                   names: list, weights_a: list[torch.Tensor], weights_b: list[torch.Tensor],
                   training: bool) -> Optional[torch.Tensor]:
    """``F.linear(x, weight, bias)`` plus each row's adapter in one launch (``lora_grouped_linear``: x read once,
    y written once) on the Triton backend when the rows fill the fused kernel's blocks (``fused_worthwhile``:
    prefill, not decode); None otherwise (the caller runs the base layer, then ``grouped_delta``). ``weight``: a
    float [O, K] tensor, or a bitsandbytes weight (``Packed4bit`` / ``Int8Weight``: ``lora_grouped_qlinear``, the
    base GEMM dequantising it in registers; None also for a 4-bit weight in the general layout, ``fuses``)."""
    rows = x.numel() // x.shape[-1]
    if not (use_triton(x, _values(weight), store.a, store.b) and store.a.shape[1] <= MAX_KERNEL_RANK):
        return None
    used = used_adapters(names, store.slots)
    if not fused_worthwhile(rows, used):
        return None
    if not isinstance(weight, torch.Tensor) and not fuses(x, weight, store.a, store.b):
        return None
    if fused_choice(store, x, weight, bias, names, weights_a, weights_b, training, used) == UNFUSED:
        return None
    return _fused_call(store, x, weight, bias, names, weights_a, weights_b, training)


def _fused_call(store, x, weight, bias, names, weights_a, weights_b, training) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    op = lora_grouped_linear if isinstance(weight, torch.Tensor) else lora_grouped_qlinear
    index, plan = shared_plan(store, names, rows, x.device, "fused")
    if training and store.max_dropout > 0:
        return op(x, weight, bias, weights_a, weights_b, store.a, store.b, store.drop_scale, index, plan=plan,
                  thresholds=store.thresholds)
    return op(x, weight, bias, weights_a, weights_b, store.a, store.b, store.scale, index, plan=plan)


# Measured dispatch (kernels/autotune.py) of a prefill: the fused launch, or the base layer + the grouped kernels
FUSED, UNFUSED = "fused", "unfused"  # the default: fused (PEFTFAST_AUTOTUNE=0, CPU, the interpreter, compiling)


def _dtype_tag(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fused_dispatch_key(store: AdapterStore, x: torch.Tensor, weight: BaseWeightArg, used: int, need_x: bool,
                       need_grads: bool, dropout: bool) -> tuple:
    """("lora_grouped_linear", rows rounded up to a power of two, weight kind (dense, 4bit, int8), d_out, d_in,
    the store's rank tile (``kernel_rank``), ``used``: the distinct adapters the batch uses (``used_adapters``, a
    power of two), x dtype, adapter dtype, step): step as ``lora_linear_fused``'s key ("fwd", "fwd+bwd",
    "fwd+bwd-dx", plus "+dropout"). Not the count of adapters held: adding or deleting one while serving measures
    nothing again."""
    step = (("fwd+bwd" if need_x else "fwd+bwd-dx") if need_grads else "fwd") + ("+dropout" if dropout else "")
    kind = "dense" if isinstance(weight, torch.Tensor) else "int8" if isinstance(weight, Int8Weight) else "4bit"
    return ("lora_grouped_linear", autotune.bucket(x.numel() // x.shape[-1]), kind, weight.shape[0], weight.shape[1],
            kernel_rank(store.a.shape[1]), autotune.bucket(max(used, 1)), _dtype_tag(x.dtype),
            _dtype_tag(store.a.dtype), step)


def fused_choice(store: AdapterStore, x: torch.Tensor, weight: BaseWeightArg, bias: Optional[torch.Tensor],
                 names: list, weights_a: list[torch.Tensor], weights_b: list[torch.Tensor], training: bool,
                 used: int) -> str:
    """FUSED or UNFUSED for this prefill (``used``: the distinct adapters ``names`` use): the measured choice for its
    key on a CUDA device (both candidates timed on the first call of the key, see kernels/autotune.py), else
    FUSED."""
    if x.numel() == 0 or not autotune.tunable(x.device):
        return FUSED
    need_x, need_grads = autotune.grad_needs(x, bias, [*weights_a, *weights_b])
    key = fused_dispatch_key(store, x, weight, used, need_x, need_grads, training and store.max_dropout > 0)
    return autotune.measured_choice(x.device, key, lambda: fused_candidates(store, x, weight, bias, names, weights_a,
                                                                            weights_b, training), FUSED)


def fused_candidates(store: AdapterStore, x: torch.Tensor, weight: BaseWeightArg, bias: Optional[torch.Tensor],
                     names: list, weights_a: list[torch.Tensor], weights_b: list[torch.Tensor],
                     training: bool) -> dict:
    """{FUSED: step, UNFUSED: step}: the call's forward (and, where the call will need one, the backward for the
    gradients it needs, with a random dY), fused or as the base output (``base_output``) + ``grouped_delta``, on
    detached views of the caller's tensors (``autotune.detached_step``): no .grad is written, nothing the caller
    holds is changed."""
    n = len(weights_a)
    leaves, backward = autotune.detached_step([x, bias, *weights_a, *weights_b], (*x.shape[:-1], weight.shape[0]), x)
    xl, bl, al, bbl = leaves[0], leaves[1], leaves[2:2 + n], leaves[2 + n:]

    def fused():
        backward(_fused_call(store, xl, weight, bl, names, al, bbl, training))

    def unfused():
        base = base_output(xl, weight, bl)
        backward(grouped_delta(store, xl, base, names, al, bbl, training))

    return {FUSED: fused, UNFUSED: unfused}


def base_output(x: torch.Tensor, weight: BaseWeightArg, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The base layer's output as the unfused path computes it: ``F.linear``, or the quantised matmul."""
    if isinstance(weight, torch.Tensor):
        return torch.nn.functional.linear(x, weight, bias)
    if isinstance(weight, Int8Weight):
        return matmul_int8(x, weight.cb, weight.scb, bias)
    return matmul_4bit(x, weight, bias)


def check_adapter_names_shape(adapter_names: object) -> None:
    """Raise unless ``adapter_names`` is a non-empty list of adapter names (one per sample) or a non-empty list
    of equally long non-empty lists of names (one per token of each sample)."""
    allowed = ("allowed: a list of adapter names, one per sample ('__base__' for none), or a list of lists of "
               "names, one per token of each sample")
    if not isinstance(adapter_names, (list, tuple)) or not adapter_names:
        raise ValueError(f"adapter_names must be a non-empty list, got {type(adapter_names).__name__}; {allowed}")
    if all(isinstance(n, str) for n in adapter_names):
        return
    if all(isinstance(p, (list, tuple)) and p and all(isinstance(n, str) for n in p) for p in adapter_names):
        if len({len(p) for p in adapter_names}) == 1:
            return
        raise ValueError(f"adapter_names per token has lists of lengths {sorted({len(p) for p in adapter_names})}; "
                         "every sample needs one name per token (the same count for all)")
    raise ValueError(f"adapter_names mixes names and other values ({adapter_names!r:.200}); {allowed}")
