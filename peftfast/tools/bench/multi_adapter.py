"""Mixed batches of many LoRA adapters (``adapter_names``): peftfast's grouped path against PEFT's loop.

Two tables:

* CPU wall time (measured): one LoRA ``Linear`` layer holding 16 adapters, a batch whose samples name
  them round-robin, peftfast's layer (one grouped op) against PEFT 0.21's (one index-select, two linears
  and one index-put per distinct adapter); best of repeats, and the adapter part (minus the base layer).
* Modelled GPU traffic (counted from the plan, not timed): per layer, launches and bytes of the grouped
  kernels against PEFT's loop at decode (64 sequences x 1 token) and prefill (64 x 512), d = 4096, r = 16,
  bf16, N = 1, 4, 16, 64 distinct adapters, with modelled H100 / RTX 4090 times (bytes / bandwidth +
  FLOPs / dense throughput + launches x launch overhead, the same simple roofline for both sides). The bytes
  budget is the issue's: base GEMM + every used adapter's A and B once, + 5%. The grouped kernels are not
  fused into the base GEMM, so they read x and read/write y once more than it: within budget at decode,
  not at prefill (where only a fused GEMM could be).

    python -m peftfast.tools.bench.multi_adapter [--quick] [--threads 1]
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


def cpu_rows(n: int = 16, shapes=((1024, 64, 1), (1024, 16, 32), (256, 64, 8)), r: int = 16,
             repeats: int = 30):
    """Per shape (d, batch, seq): best-of-``repeats`` wall time of the layer call with ``adapter_names``
    for peftfast and PEFT, of the base nn.Linear alone, and the ratios of the whole call and of the
    adapter part (call minus base). The best of many runs, since the machine may be shared."""
    rows = []
    for d, batch, seq in shapes:
        ours, theirs, names = _layers(n, d, r)
        base = ours.base_model.model[0].base_layer
        x = torch.randn(batch, seq, d)
        per_sample = [names[i % n] for i in range(batch)]
        with torch.no_grad():
            err = (ours(x, adapter_names=per_sample) - theirs(x, adapter_names=per_sample)).abs().max().item()
            t_ours = _best(lambda: ours(x, adapter_names=per_sample), repeats)
            t_peft = _best(lambda: theirs(x, adapter_names=per_sample), repeats)
            t_base = _best(lambda: base(x), repeats)
        rows.append(dict(adapters=n, d=d, batch=batch, seq=seq, r=r, ours_us=t_ours * 1e6, peft_us=t_peft * 1e6,
                         base_us=t_base * 1e6, ratio=t_ours / t_peft,
                         adapter_part_ratio=(t_ours - t_base) / max(t_peft - t_base, 1e-9), max_abs_diff=err))
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


def traffic(n_used: int, rows: int, d: int = 4096, r: int = 16, elt: int = 2) -> dict:
    """Launches, bytes and FLOPs of one layer (not the first of its call) for the base GEMM, peftfast's grouped
    kernels and PEFT's loop, samples spread evenly over ``n_used`` adapters.

    Grouped (kernels/lora_grouped.py, Triton path, y updated in place): shrink reads each used row of x once
    and its adapter's A once per block of rows, writes h (fp32); expand reads h, B once per block and column
    tile, reads and writes each used row of y; two launches (the plan's are per call, ``plan_launches``).
    PEFT's loop per adapter: index-select of x, lora_A, lora_B, scale, index-select + add + index-put of y
    (7 launches) reading/writing its rows of x and y about 6 times."""
    from ...kernels.lora_grouped import block_rows_for, kernel_rank, num_blocks

    m = rows
    br = block_rows_for(m, n_used, True)
    per = -(-m // n_used)
    blocks = n_used * -(-per // br)
    rk = kernel_rank(r)
    nb = num_blocks(m, n_used, br)
    grouped = dict(launches=2 + 1,  # shrink, expand, the empty h
                   bytes=m * d * elt + blocks * rk * d * elt  # x, A per block
                   + nb * br * rk * 4 * 2 + nb * br * 8 * 2  # h written and read, the plan's table read twice
                   + blocks * rk * d * elt + 2 * m * d * elt,  # B per block, y read and written
                   flops=2 * m * rk * d * 2)
    peft_loop = dict(launches=7 * n_used,
                     bytes=n_used * (2 * r * d * elt) + m * d * elt * 6,
                     flops=2 * m * r * d * 2)
    base = dict(launches=1, bytes=d * d * elt + 2 * m * d * elt, flops=2 * m * d * d)
    return dict(grouped=grouped, peft=peft_loop, base=base, used_adapter_bytes=n_used * r * 2 * d * elt)


def modelled(kind: dict, gpu: str) -> float:
    bw, flops, launch = GPUS[gpu]
    return kind["bytes"] / bw + kind["flops"] / flops + kind["launches"] * launch


def traffic_rows(ns=(1, 4, 16, 64), shapes=(("decode", 64), ("prefill", 64 * 512))):
    out = []
    for label, m in shapes:
        for n in ns:
            t = traffic(n, m)
            base, g, p = t["base"], t["grouped"], t["peft"]
            budget = 1.05 * (base["bytes"] + t["used_adapter_bytes"])
            row = dict(shape=label, rows=m, adapters=n, launches_grouped=g["launches"], launches_peft=p["launches"],
                       MB_base_plus_grouped=(g["bytes"] + base["bytes"]) / 1e6, MB_budget=budget / 1e6,
                       within_budget=g["bytes"] + base["bytes"] <= budget)
            for gpu in GPUS:
                row[f"{gpu}_vs_peft"] = (modelled(g, gpu) + modelled(base, gpu)) / (
                    modelled(p, gpu) + modelled(base, gpu))
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
    print(f"Modelled per-layer traffic, d=4096 r=16 bf16, base GEMM + grouped vs base GEMM + PEFT's loop; plan: "
          f"{plan_launches()} device ops once per call (64 rows, 16 adapters; {plan_launches(64, 64)} with 64)")
    for row in traffic_rows():
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
