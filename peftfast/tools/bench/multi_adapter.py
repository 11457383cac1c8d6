"""Mixed batches of many LoRA adapters (``adapter_names``): peftfast's grouped path against PEFT's loop.

Two tables:

* CPU wall time (measured): one LoRA ``Linear`` layer holding 16 adapters, a batch whose samples name
  them round-robin, peftfast's layer (one grouped op) against PEFT 0.21's (one index-select, two linears
  and one index-put per distinct adapter); best of repeats (calls back to back, in five rounds), and the
  adapter part (minus the base layer). Measured on a shared 2-core machine, 1 thread, r = 16, fp32,
  runs of ``cpu_rows(repeats=30)`` (see below): adapter_part_ratio (peftfast / PEFT, target <= 0.5)
  0.28-0.40 at d=1024 64x1, 0.23-0.68 at d=1024 16x32, 0.24-0.33 at d=256 64x8 (ten runs, five of them alternated
  with a run of the code before, which gave 0.40-0.59, 0.52-0.65, 0.34-0.36). Where the time goes (d=1024, measured):
  at 64x1 the two batched matmuls, ~100 us (reading every adapter's A and B, 2 MB, once), about as much
  Python per call (routing, the store check, the op's glue), and the gather of x and the add into y; at 16x32 the
  two batched matmuls (~33 MFLOP, ~0.45 ms at this core's ~75-90 GFLOP/s, the FLOPs of PEFT's own lora_A /
  lora_B matmuls), the samples' tokens used in place (``run_plan``). The target is met at 64x1 and 256 64x8
  in all ten runs; at 16x32 the adapter part (~0.55-1.5 ms) is a few percent of the base layer's ~11 ms, and the
  run-to-run spread of the two subtracted base-layer times on the shared machine moves the ratio by +-0.2: it
  met 0.5 in five of ten runs. The first reference (padded copies, x gathered by advanced indexing, a
  per-call walk of every module): 0.58-0.70, 0.72-0.91, 0.49-0.58, measured the same way. Per call the layer
  reuses its adapters' bundle while no factor, scaling or dropout changed (``Linear._plain_adapters_key``),
  and without autograd adds into its plain nn.Linear base's fresh output (``update_base_out``: no copy of y),
  as PEFT's loop does. A second estimate, ``paired_part_ratio`` (``_paired_parts``: each call's time minus the
  mean of the base calls just before and after it, calls interleaved, the median of 150), times every call
  after a base call has run through the caches (closer to one layer among many): 0.44-0.55 at d=1024 64x1,
  0.51-0.55 at 16x32, 0.40-0.46 at d=256 64x8 (four runs), both sides then reading their adapters' weights
  from memory. A third, ``in_call_part_ratio`` (``_in_call_parts``: each call's time minus its own base GEMM's,
  timed inside it, the two sides alternated, the median of 150; PEFT's side also pays a wrapped ``F.linear`` for
  each of its 32 lora_A / lora_B calls): 0.48-0.60 at 64x1, 0.44-0.52 at 16x32, 0.40-0.50 at d=256 64x8 (seven
  runs). There, at 16x32, the batched matmuls take ~1 ms of ours ~1.3-1.4 ms (x and y read from beyond the
  caches after the other side's call), the store check (``_synced_store``, 32 factors' identities, versions and
  pointers) ~0.15-0.27 ms: the target is about met, with no margin, at d=1024.
* Modelled GPU traffic (formulas, not timed): per layer, launches and bytes of ours -- the base GEMM then
  the grouped kernels (``grouped_launches``, one entry per launch), or at prefill the one fused launch of
  ``lora_grouped_linear`` (``fused_launch``) -- against the base GEMM + PEFT's loop at decode (64 sequences
  x 1 token), prefill (64 x 512) and the prefill's backward, d = 4096, r = 16, bf16, N = 1, 4, 16, 64
  distinct adapters, with modelled H100 / RTX 4090 times (bytes / bandwidth + FLOPs / dense throughput +
  launches x launch overhead, the same simple roofline for both sides). The bytes budget is the target's:
  base GEMM + every used adapter's A and B once (twice in backward), + 5%. Separate grouped kernels read x
  and read/write y once more than the base GEMM: within budget at decode, about 2x it at prefill, where the
  fused launch reads x and writes y once (within budget). The backward is over it either way: the grouped
  kernels read dY, x and dX again; the fused backward (``fused_backward_launches``: dX and dH in one launch)
  still reads x (dA) and dY (dB) again. ``calibrate`` checks the formulas against the bytes and
  launches counted from the kernels in Triton's interpreter (tests/test_multi_adapter_kernels.py: equal,
  forward and backward, with and without dropout, grouped and fused). Over a bitsandbytes base the fused launch
  reads the stored weight instead (``qfused_launches``, checked the same way by ``calibrate_quant``;
  ``quant_prefill_rows``: the NF4 prefill forward, one launch against bitsandbytes' dequantise + GEMM + PEFT's loop).

    python -m peftfast.tools.bench.multi_adapter [--quick] [--threads 1]    # the CPU table: cpu_rows(repeats=30)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

# roofline constants of the modelled GPUs: (bytes/s, dense bf16 FLOP/s, seconds per launch)
GPUS = {"H100": (3.35e12, 989e12, 4e-6), "RTX4090": (1.0e12, 165e12, 4e-6)}


def _layers(n: int, d: int, r: int):
    import peft

    import peftfast as fast

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(d, d))
    names = [f"a{i}" for i in range(n)]
    ours = theirs = None
    for name in names:
        cfg_o = fast.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"])
        cfg_t = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"])
        if ours is None:
            ours = fast.get_peft_model(nn.Sequential(nn.Linear(d, d)), cfg_o, adapter_name=name)
            theirs = peft.get_peft_model(base, cfg_t, adapter_name=name)
        else:
            ours.add_adapter(name, cfg_o)
            theirs.add_adapter(name, cfg_t)
    ours.load_state_dict(theirs.state_dict(), strict=False)
    with torch.no_grad():
        for (_, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
            p.copy_(torch.randn_like(p) * 0.02)
            q.copy_(p)
    return ours.eval(), theirs.eval(), names


def _best(f, repeats: int) -> float:
    for _ in range(3):
        f()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def _best_each(fs, repeats: int, rounds: int = 5) -> list[float]:
    """``_best`` of each of ``fs`` (``repeats`` calls in a row, after 3 warm-up calls), taken ``rounds`` times in
    turns (f1's block, f2's, ..., then again) and the best kept: on a shared machine a busy spell then spoils one
    block of one of them, not its result. Calls of one function stay back to back (what is timed is unchanged)."""
    best = [float("inf")] * len(fs)
    for _ in range(rounds):
        for i, f in enumerate(fs):
            best[i] = min(best[i], _best(f, repeats))
    return best


def _paired_parts(fs, base, calls: int) -> list[float]:
    """Per f of ``fs``: the median over ``calls`` calls of (f's time minus the mean of the two ``base`` calls timed
    just before and just after it), the calls of every f interleaved with base calls. Each difference is taken
    within a few milliseconds, so a slow spell of the shared machine moves both terms; the best-of times of
    ``_best_each`` subtract a base time taken at another moment."""
    def timed(f) -> float:
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    for f in (*fs, base):
        for _ in range(3):
            f()
    parts: list[list[float]] = [[] for _ in fs]
    before = timed(base)
    for _ in range(calls):
        for i, f in enumerate(fs):
            t = timed(f)
            after = timed(base)
            parts[i].append(t - (before + after) / 2)
            before = after
    return [statistics.median(p) for p in parts]


def _in_call_parts(fs, weights, calls: int) -> tuple[list[float], list[float]]:
    """Per f of ``fs``: the median over ``calls`` calls of (the call's time minus the time of the base layer's
    ``F.linear`` inside that same call), the calls of every f alternated; and the ``F.linear`` calls per call that are
    not the base's. The base GEMM is timed where it runs, so the difference does not subtract a base time taken at
    another moment (``_best_each``) or interpolated (``_paired_parts``). ``torch.nn.functional.linear`` is wrapped
    for the measurement (the base is found by its ``weight``, one of ``weights``): every other ``F.linear`` call
    (PEFT's lora_A / lora_B modules) goes through the wrapper too, a Python call more each, which that side's time
    includes (the second list counts them)."""
    import torch.nn.functional as F

    linear = F.linear
    inner = [0.0, 0]

    def timed_linear(inp, weight, bias=None):
        if any(weight is w for w in weights):
            t0 = time.perf_counter()
            out = linear(inp, weight, bias)
            inner[0] = time.perf_counter() - t0
            return out
        inner[1] += 1
        return linear(inp, weight, bias)

    F.linear = timed_linear
    try:
        for f in fs:
            for _ in range(3):
                f()
        parts: list[list[float]] = [[] for _ in fs]
        others = [0] * len(fs)
        for _ in range(calls):
            for i, f in enumerate(fs):
                inner[:] = [0.0, 0]
                t0 = time.perf_counter()
                f()
                t = time.perf_counter() - t0
                parts[i].append(t - inner[0])
                others[i] = inner[1]
    finally:
        F.linear = linear
    return [statistics.median(p) for p in parts], others


def cpu_rows(n: int = 16, shapes=((1024, 64, 1), (1024, 16, 32), (256, 64, 8)), r: int = 16,
             repeats: int = 30):
    """Per shape (d, batch, seq): best-of-``repeats`` wall time of the layer call with ``adapter_names``
    for peftfast and PEFT, of the base nn.Linear alone, and the ratios of the whole call and of the
    adapter part (call minus base). The best of many runs, in rounds (``_best_each``), since the machine may be
    shared."""
    rows = []
    for d, batch, seq in shapes:
        ours, theirs, names = _layers(n, d, r)
        base = ours.base_model.model[0].base_layer
        x = torch.randn(batch, seq, d)
        per_sample = [names[i % n] for i in range(batch)]
        with torch.no_grad():
            err = (ours(x, adapter_names=per_sample) - theirs(x, adapter_names=per_sample)).abs().max().item()
            t_ours, t_peft, t_base = _best_each([lambda: ours(x, adapter_names=per_sample),
                                                 lambda: theirs(x, adapter_names=per_sample), lambda: base(x)],
                                                repeats)
            p_ours, p_peft = _paired_parts([lambda: ours(x, adapter_names=per_sample),
                                            lambda: theirs(x, adapter_names=per_sample)], lambda: base(x),
                                           5 * repeats)
            (c_ours, c_peft), (o_ours, o_peft) = _in_call_parts(
                [lambda: ours(x, adapter_names=per_sample), lambda: theirs(x, adapter_names=per_sample)],
                (base.weight, theirs.base_model.model[0].base_layer.weight), 5 * repeats)
        rows.append(dict(adapters=n, d=d, batch=batch, seq=seq, r=r, ours_us=t_ours * 1e6, peft_us=t_peft * 1e6,
                         base_us=t_base * 1e6, ratio=t_ours / t_peft,
                         adapter_part_ratio=(t_ours - t_base) / max(t_peft - t_base, 1e-9),
                         paired_part_ratio=p_ours / max(p_peft, 1e-9), ours_part_us=p_ours * 1e6,
                         peft_part_us=p_peft * 1e6, in_call_part_ratio=c_ours / max(c_peft, 1e-9),
                         ours_in_call_us=c_ours * 1e6, peft_in_call_us=c_peft * 1e6,
                         other_linears=f"{o_ours}/{o_peft}", max_abs_diff=err))
    return rows


def plan_launches(rows: int = 64, adapters: int = 16) -> int:
    """Device ops of one plan (``group_plan``), counted through a TorchDispatchMode (views excluded): made
    once per call and shared by every layer with the same rows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ...kernels.lora_grouped import block_rows_for, group_plan

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if not any(v in name for v in ("view", "slice", "select", "alias", "expand")):
                self.ops += 1
            return func(*args, **(kwargs or {}))

    index = torch.randint(-1, adapters, (rows,))
    with Count() as c:
        group_plan(index, adapters, block_rows_for(rows, adapters, True))
    return c.ops + 1  # + the host-to-device copy of the row -> adapter table


def grouped_launches(m: int, k: int, o: int, counts, rank: int, act_elt: int, ad_elt: int, backward: bool = False,
                     dropout: bool = False, fused_plan: bool = False) -> list[dict]:
    """The launches of one grouped layer on the Triton path (kernels/lora_grouped.py), each with the bytes it
    must move (distinct addresses) and its FLOPs: ``m`` rows of which ``counts[a]`` use adapter a (the rest the
    base model), K = ``k`` -> O = ``o``, store rank ``rank_bucket(rank)``, y updated in place. Forward: shrink,
    expand. Backward: dH shrink, zero-filled dX and the dX expand, the adapters' block bounds (two small ops),
    dA and dB weight-gradient kernels (+ a sum of split partials when split, + one cast to the adapter dtype
    when it is not fp32). Not counted: the plan (once per call, ``plan_launches``) and autograd's copy of an
    adapter's gradient that is a strided view (rank below the store's). ``fused_plan``: the backward of
    ``lora_grouped_linear`` (its plan: 64-row blocks, the base rows in blocks of their own; the dX expand adds
    into the base dX instead of a zero-filled one)."""
    from ...kernels.lora_grouped import FUSED_BLOCK_ROWS, block_rows_for, grad_w_splits, kernel_rank, \
        launch_config, num_blocks, rank_bucket

    n = len(counts)
    used = [c for c in counts if c > 0]
    nu, mu = len(used), sum(used)
    br = FUSED_BLOCK_ROWS if fused_plan else block_rows_for(m, n, True)
    nb = num_blocks(m, nu + 1, br) if fused_plan else num_blocks(m, nu, br)  # the plan bounds the used adapters
    ub = sum(-(-c // br) for c in used)  # blocks holding rows
    r = rank_bucket(rank)
    rt = kernel_rank(r)
    plan_bytes = nb * 8 + ub * br * 8  # block adapters (every program) and the used blocks' row tables
    drop = nu * 8 if dropout else 0

    def shrink(cols, name):  # reads rows x cols, each used adapter's [r, cols] factor; writes every block of h
        return dict(name=name, bytes=mu * cols * act_elt + nu * r * cols * ad_elt + nu * 4 + plan_bytes
                    + ub * br * rt * ad_elt + (nb - ub) * br * rt * ad_elt, flops=2 * ub * br * rt * cols)

    def expand(cols, name, read_out):  # reads the used blocks of h and each used adapter's factor
        return dict(name=name, bytes=plan_bytes + ub * br * rt * ad_elt + nu * cols * r * ad_elt
                    + mu * cols * act_elt * (2 if read_out else 1), flops=2 * ub * br * rt * cols)

    if not backward:
        return [dict(shrink(k, "shrink"), bytes=shrink(k, "shrink")["bytes"] + drop), expand(o, "expand", True)]
    dx_first = ([dict(name="dX = dY @ W", bytes=(m * o + o * k + m * k) * act_elt, flops=2 * m * o * k)] if fused_plan
                else [dict(name="dX zeros", bytes=m * k * act_elt, flops=0)])
    out = [shrink(o, "dH shrink"), *dx_first,
           dict(expand(k, "dX expand", fused_plan), bytes=expand(k, "", fused_plan)["bytes"] + drop),
           dict(name="bounds arange", bytes=(n + 1) * 8, flops=0),
           dict(name="bounds searchsorted", bytes=nb * 8 + 2 * (n + 1) * 8, flops=0)]
    for what, cols, extra in (("dA", k, n * 8 if dropout else 0), ("dB", o, 0)):
        block_c = launch_config("grad_w", br, rt, torch.float32 if ad_elt == 4 else torch.float16)[0]
        splits = grad_w_splits(nb, n, cols, block_c)
        grad = n * r * cols * 4
        out.append(dict(name=f"{what} grad_w", bytes=(n + 1) * 8 + ub * br * r * ad_elt + mu * cols * act_elt
                        + ub * br * 8 + extra + splits * grad, flops=2 * ub * br * r * cols))
        if splits > 1:
            out.append(dict(name=f"{what} sum of {splits} splits", bytes=splits * grad + grad, flops=0))
        if ad_elt != 4:
            out.append(dict(name=f"{what} cast", bytes=grad + n * r * cols * ad_elt, flops=0))
    return out


def fused_launch(m: int, k: int, o: int, counts, rank: int, act_elt: int, ad_elt: int, bias: bool = False,
                 dropout: bool = False) -> dict:
    """The one launch of ``lora_grouped_linear``'s forward (``_grouped_linear_kernel``) with the bytes it must move
    (distinct addresses) and its FLOPs: x, W and the used adapters' A and B read once, y written once, h written
    for every block holding rows (base blocks' h is zero), the plan (every block's slot, the row tables of
    blocks holding rows) and each touched slot's scale (and keep threshold); padded rows cost FLOPs, not bytes."""
    from ...kernels.lora_grouped import FUSED_BLOCK_ROWS, kernel_rank, num_blocks, rank_bucket

    n = len(counts)
    br = FUSED_BLOCK_ROWS
    base_rows = m - sum(counts)
    used = [i for i, c in enumerate(counts) if c > 0]
    nb = num_blocks(m, len(used) + 1, br)  # the layer's plan bounds the used adapters (``fused_plan(.., used)``)
    blocks = sum(-(-c // br) for c in counts if c > 0) + -(-base_rows // br)
    r = rank_bucket(rank)
    rt = kernel_rank(r)
    touched = len(set(used) | ({n - 1} if base_rows else set()))  # base blocks read the last slot's scale, masked
    return dict(name="grouped linear", bytes=nb * 8 + blocks * br * 8 + (m * k + o * k + m * o) * act_elt
                + len(used) * r * (k + o) * ad_elt + touched * (4 + (8 if dropout else 0))
                + (o * act_elt if bias else 0) + blocks * br * rt * ad_elt,
                flops=2 * blocks * br * (k * o + rt * (k + o)))


def fused_backward_launches(m: int, k: int, o: int, counts, rank: int, act_elt: int, ad_elt: int,
                            dropout: bool = False) -> list[dict]:
    """The launches of ``lora_grouped_linear``'s backward on the Triton path when dX is needed: the one dX launch
    (``_grouped_linear_dx_kernel``: dY, W and the used adapters' B and A read once, dX written once, dH written
    for every block holding rows, the plan and each touched slot's scale and keep threshold -- the forward's
    launch with K and O swapped, no bias), then the adapters' block bounds and the dA and dB weight-gradient
    launches (with their split sums and casts) of ``grouped_launches``."""
    dx = dict(fused_launch(m, o, k, counts, rank, act_elt, ad_elt, dropout=dropout), name="grouped linear dX")
    replaced = {"dH shrink", "dX = dY @ W", "dX expand"}
    rest = grouped_launches(m, k, o, counts, rank, act_elt, ad_elt, True, dropout, fused_plan=True)
    return [dx, *(x for x in rest if x["name"] not in replaced)]


def traffic(n_used: int, rows: int, d: int = 4096, r: int = 16, elt: int = 2, backward: bool = False) -> dict:
    """Launches, bytes and FLOPs of one layer (not the first of its call) for the base GEMM, peftfast's grouped
    kernels (``grouped_launches``) and PEFT's loop, samples spread evenly over ``n_used`` adapters.

    PEFT's loop per adapter, forward: index-select of x, lora_A, lora_B, scale, index-select + add + index-put
    of y (7 launches) reading/writing its rows of x and y about 6 times. Backward (PEFT refuses adapter_names
    in training; the same loop under autograd): per adapter the backward of each of those ops, ~9 launches
    (index-put, add, scale, lora_B's dX and dB, lora_A's dX and dA, the index-select's scatter into dX)
    moving its rows of dY and dX about 8 times plus its A and B twice. Base backward: dX = dY @ W only (W
    frozen).

    ``ours``: the base GEMM plus the grouped kernels, or, where the layer fuses them (``fused_worthwhile``: a
    plain nn.Linear with rows enough to fill 64-row blocks, i.e. prefill), ``lora_grouped_linear``'s one launch
    (forward) and its backward (``fused_backward_launches``)."""
    from ...kernels.lora_grouped import fused_worthwhile

    m = rows
    per = -(-m // n_used)
    counts = [min(per, m - i * per) for i in range(n_used)]
    base = dict(launches=1, bytes=d * d * elt + 2 * m * d * elt, flops=2 * m * d * d)
    fused = fused_worthwhile(m, n_used)
    if fused:
        launches = (fused_backward_launches(m, d, d, counts, r, elt, elt) if backward
                    else [fused_launch(m, d, d, counts, r, elt, elt)])
        ours = dict(launches=len(launches), bytes=sum(x["bytes"] for x in launches),
                    flops=sum(x["flops"] for x in launches))
    else:
        launches = grouped_launches(m, d, d, counts, r, elt, elt, backward)
        ours = dict(launches=len(launches) + (0 if backward else 1) + 1,  # forward: + the allocation of h
                    bytes=sum(x["bytes"] for x in launches) + base["bytes"],
                    flops=sum(x["flops"] for x in launches) + base["flops"])
    if backward:
        peft_loop = dict(launches=9 * n_used, bytes=n_used * (4 * r * d * elt) + m * d * elt * 8,
                         flops=4 * m * r * d * 2)
    else:
        peft_loop = dict(launches=7 * n_used, bytes=n_used * (2 * r * d * elt) + m * d * elt * 6,
                         flops=2 * m * r * d * 2)
    factor = 2 if backward else 1  # the adapters' A and B read, their gradients written
    return dict(ours=ours, fused=fused, peft=peft_loop, base=base,
                used_adapter_bytes=factor * n_used * r * 2 * d * elt)


def calibrate(m: int = 96, k: int = 40, o: int = 56, dtype: torch.dtype = torch.float16, dropout: bool = True,
              fused: bool = False):
    """Forward and backward of ``lora_grouped`` (``fused``: ``lora_grouped_linear`` with a bias) on the Triton
    kernels in the interpreter (TRITON_INTERPRET=1), bytes and launches counted
    (``costmodel.calibration.count_device``), against ``grouped_launches`` / ``fused_launch`` (its backward:
    ``fused_backward_launches``): rows (counted, modelled) per direction. Three adapters of the store's rank (one
    unused), base rows too."""
    from ...kernels.lora_grouped import dropout_tables, fused_plan, lora_grouped, lora_grouped_linear, make_plan
    from ..costmodel.calibration import count_triton_forward_backward, require_interpreter

    require_interpreter()
    gen = torch.Generator().manual_seed(0)
    counts, r = [40, 0, 30], 8
    n = len(counts)
    a = [torch.randn(r, k, generator=gen).to(dtype).requires_grad_() for _ in counts]
    b = [torch.randn(o, r, generator=gen).to(dtype).requires_grad_() for _ in counts]
    st_a = torch.stack([w.detach() for w in a])
    st_b = torch.stack([w.detach().t() for w in b]).transpose(1, 2)  # the store's [N, R, O] layout
    scale, thresholds = dropout_tables([1.5] * n, [0.1 if dropout else 0.0] * n, "cpu")
    index = torch.tensor(sum(([i] * c for i, c in enumerate(counts)), []) + [-1] * (m - sum(counts)))
    index = index[torch.randperm(m, generator=gen)]
    used = sum(c > 0 for c in counts)  # as a layer's plan (``shared_plan``) bounds its blocks
    plan = fused_plan(index, n, used) if fused else make_plan(index, n, True, used=used)
    x = torch.randn(m, k, generator=gen).to(dtype).requires_grad_()
    base = torch.randn(m, o, generator=gen).to(dtype)
    dy = torch.randn(m, o, generator=gen).to(dtype)
    weight, bias = torch.randn(o, k, generator=gen).to(dtype), torch.randn(o, generator=gen).to(dtype)

    def forward():
        if fused:
            return lora_grouped_linear(x, weight, bias, a, b, st_a, st_b, scale, index, plan=plan,
                                       thresholds=thresholds if dropout else None, seed=7)
        return lora_grouped(x, base.clone(), a, b, st_a, st_b, scale, index, plan=plan,
                            thresholds=thresholds if dropout else None, seed=7)

    fwd, bwd = count_triton_forward_backward(forward, dy)
    elt = torch.finfo(dtype).bits // 8
    rows = []
    for what, counted, back in (("forward", fwd, False), ("backward", bwd, True)):
        if fused:
            model = (fused_backward_launches(m, k, o, counts, r, elt, elt, dropout) if back
                     else [fused_launch(m, k, o, counts, r, elt, elt, bias=True, dropout=dropout)])
        else:
            model = grouped_launches(m, k, o, counts, r, elt, elt, back, dropout)
        if not back and not fused:  # the clone of the base output in forward() above (a real layer hands a fresh one)
            model.append(dict(name="clone", bytes=2 * m * o * elt, flops=0))
        rows.append(dict(direction=what, counted_bytes=counted[0], modelled_bytes=sum(x["bytes"] for x in model),
                         counted_launches=counted[1], modelled_launches=len(model), counted_names=counted[2]))
    return rows


# ----------------------------------------------------------------------------------------------
# over a bitsandbytes 4-bit / int8 base: lora_grouped_qlinear (kernels/lora_grouped_q.py)
# ----------------------------------------------------------------------------------------------
def quant_weight_bytes(o: int, k: int, kind: str, blocksize: int = 64, nested: bool = False) -> int:
    """Bytes of a bitsandbytes base weight [o, k] as stored: ``kind`` "4bit" (packed data, absmax, code table;
    nested absmax as ``costmodel.formulas.quant.nf4_weight_bytes``) or "int8" (CB and the fp32 SCB)."""
    from ..costmodel.formulas.quant import nf4_weight_bytes

    return nf4_weight_bytes(o, k, blocksize, nested) if kind == "4bit" else o * k + 4 * o


def qfused_launches(m: int, k: int, o: int, counts, rank: int, act_elt: int, ad_elt: int, kind: str,
                    backward: bool = False, bias: bool = False, dropout: bool = False, blocksize: int = 64,
                    nested: bool = False) -> list[dict]:
    """The launches of ``lora_grouped_qlinear`` on the Triton path with their bytes (distinct addresses) and FLOPs:
    forward, the one launch of ``fused_launch`` reading the stored weight (``quant_weight_bytes``) instead of a
    dense one; backward with dX, ``fused_backward_launches`` (dX and dH in one launch, then dA and dB) with the
    stored weight read in the dX launch -- where the dX kernel's K tile lies inside one 4-bit block
    (``lora_grouped_q.tiles_in_blocks(..., dx=True)``; int8 always); else ``grouped_launches``' fused-plan backward
    whose dX GEMM is the quantised one (dY and the stored weight read, dX written)."""
    from ...kernels.lora_grouped import rank_bucket
    from ...kernels.lora_grouped_q import tiles_in_blocks

    dense_w, w = o * k * act_elt, quant_weight_bytes(o, k, kind, blocksize, nested)
    if not backward:
        one = fused_launch(m, k, o, counts, rank, act_elt, ad_elt, bias=bias, dropout=dropout)
        return [dict(one, name=f"grouped {kind} linear", bytes=one["bytes"] - dense_w + w)]
    dtype = {2: torch.float16, 4: torch.float32}  # bf16 takes fp16's tiles
    if kind == "int8" or tiles_in_blocks(k, blocksize, dtype[act_elt], dtype[ad_elt], rank_bucket(rank), dx=True):
        return [dict(x, name=f"grouped {kind} linear dX", bytes=x["bytes"] - dense_w + w)
                if x["name"] == "grouped linear dX" else x
                for x in fused_backward_launches(m, k, o, counts, rank, act_elt, ad_elt, dropout)]
    return [dict(x, name=f"dX = dY @ deq(W) ({kind})", bytes=x["bytes"] - dense_w + w) if x["name"] == "dX = dY @ W"
            else x for x in grouped_launches(m, k, o, counts, rank, act_elt, ad_elt, True, dropout, fused_plan=True)]


def calibrate_quant(kind: str = "4bit", m: int = 150, k: int = 64, o: int = 56, dtype: torch.dtype = torch.float16,
                    dropout: bool = True):
    """``calibrate(fused=True)`` for ``lora_grouped_qlinear`` over a random 4-bit weight (blocksize 64, fp32
    absmax, a 16-entry code table) or int8 weight: bytes and launches counted in the interpreter against
    ``qfused_launches``, forward and backward; three adapters of the store's rank (one unused), base rows, a
    bias that needs no gradient."""
    from ...kernels.lora_grouped import dropout_tables, fused_plan
    from ...kernels.lora_grouped_q import lora_grouped_qlinear
    from ...kernels.qlora import Int8Weight
    from ...kernels.quant import Packed4bit
    from ..costmodel.calibration import count_triton_forward_backward, require_interpreter

    require_interpreter()
    gen = torch.Generator().manual_seed(0)
    counts, r, n = [40, 0, 30], 8, 3
    index = torch.tensor(sum(([i] * c for i, c in enumerate(counts)), []) + [-1] * (m - sum(counts)))
    index = index[torch.randperm(m, generator=gen)]
    a = [torch.randn(r, k, generator=gen).to(dtype).requires_grad_() for _ in counts]
    b = [torch.randn(o, r, generator=gen).to(dtype).requires_grad_() for _ in counts]
    stores = (torch.stack([w.detach() for w in a]), torch.stack([w.detach().t() for w in b]).transpose(1, 2))
    scale, thresholds = dropout_tables([1.5] * n, [0.1 if dropout else 0.0] * n, "cpu")
    if kind == "4bit":
        p = Packed4bit(torch.randint(0, 256, (o * k // 2,), dtype=torch.uint8, generator=gen),
                       torch.rand(o * k // 64, generator=gen) + 0.5, torch.linspace(-1.0, 1.0, 16), 64, (o, k), dtype)
    else:
        p = Int8Weight(torch.randint(-127, 128, (o, k), dtype=torch.int8, generator=gen), torch.rand(o, generator=gen))
    x = torch.randn(m, k, generator=gen).to(dtype).requires_grad_()
    bias, dy = torch.randn(o, generator=gen).to(dtype), torch.randn(m, o, generator=gen).to(dtype)
    # once per call, shared by the layers (not counted, as in ``calibrate``); the used count as a layer passes it
    plan = fused_plan(index, n, sum(c > 0 for c in counts))
    fwd, bwd = count_triton_forward_backward(
        lambda: lora_grouped_qlinear(x, p, bias, a, b, *stores, scale, index, plan=plan,
                                     thresholds=thresholds if dropout else None, seed=7), dy)
    elt = torch.finfo(dtype).bits // 8
    rows = []
    for what, counted, back in (("forward", fwd, False), ("backward", bwd, True)):
        model = qfused_launches(m, k, o, counts, r, elt, elt, kind, back, bias=True, dropout=dropout)
        rows.append(dict(direction=what, counted_bytes=counted[0], modelled_bytes=sum(x["bytes"] for x in model),
                         counted_launches=counted[1], modelled_launches=len(model), counted_names=counted[2]))
    return rows


def quant_prefill_rows(ns=(1, 4, 16, 64), rows: int = 64 * 512, d: int = 4096, r: int = 16, elt: int = 2,
                       blocksize: int = 64) -> list[dict]:
    """Modelled prefill forward over an NF4 base (blocksize 64, fp32 absmax), d x d, rank r, bf16, samples spread
    evenly over N adapters: our one launch (``qfused_launches``) against the budget (the packed weight + x + y +
    the used adapters' A and B, + 5%), and its launches against bitsandbytes' base (dequantise W, then the GEMM: 2
    launches) + PEFT's loop (7 per adapter, ``traffic``)."""
    from ...kernels.lora_grouped import fused_worthwhile

    out = []
    for n in ns:
        per = -(-rows // n)
        counts = [min(per, rows - i * per) for i in range(n)]
        ours = qfused_launches(rows, d, d, counts, r, elt, elt, "4bit", blocksize=blocksize)
        exact = quant_weight_bytes(d, d, "4bit", blocksize) + 2 * rows * d * elt + n * r * 2 * d * elt
        mb = sum(x["bytes"] for x in ours)
        out.append(dict(shape="prefill NF4", rows=rows, adapters=n, fused=fused_worthwhile(rows, n),
                        launches_ours=len(ours), launches_bnb_peft=2 + 7 * n, MB_ours=mb / 1e6,
                        MB_budget=1.05 * exact / 1e6, within_budget=mb <= 1.05 * exact,
                        overhead=mb / exact - 1))
    return out


def modelled(kind: dict, gpu: str) -> float:
    bw, flops, launch = GPUS[gpu]
    return kind["bytes"] / bw + kind["flops"] / flops + kind["launches"] * launch


def traffic_rows(ns=(1, 4, 16, 64), shapes=(("decode", 64, False), ("prefill", 64 * 512, False),
                                             ("prefill backward", 64 * 512, True))):
    out = []
    for label, m, backward in shapes:
        for n in ns:
            t = traffic(n, m, backward=backward)
            base, ours, p = t["base"], t["ours"], t["peft"]
            budget = 1.05 * (base["bytes"] + t["used_adapter_bytes"])
            row = dict(shape=label, rows=m, adapters=n, fused=t["fused"], launches_ours=ours["launches"],
                       launches_peft=p["launches"] + base["launches"], MB_ours=ours["bytes"] / 1e6,
                       MB_budget=budget / 1e6, within_budget=ours["bytes"] <= budget)
            for gpu in GPUS:
                row[f"{gpu}_vs_peft"] = modelled(ours, gpu) / (modelled(p, gpu) + modelled(base, gpu))
            out.append(row)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("CPU wall time, one LoRA Linear with 16 adapters, peftfast / PEFT (best of repeats)")
    for row in cpu_rows(repeats=10 if args.quick else 30):
        print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(f"Modelled per-layer traffic, d=4096 r=16 bf16, ours (fused, or base GEMM + grouped) vs base GEMM + PEFT's "
          f"loop, launches including the base GEMM; plan: "
          f"{plan_launches()} device ops once per call (64 rows, 16 adapters; {plan_launches(64, 64)} with 64)")
    for row in traffic_rows():
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print("Modelled prefill forward over an NF4 base (64 x 512 rows, 4096 x 4096, r=16, bf16, blocksize 64): one launch "
          "vs bitsandbytes' dequantise + GEMM + PEFT's loop")
    for row in quant_prefill_rows():
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
