"""Mixed batches of many LoRA adapters (``adapter_names``): peftfast's grouped path against PEFT's loop.

Two tables:

* CPU wall time (measured): one LoRA ``Linear`` layer holding N adapters, a batch whose samples name
  them round-robin, peftfast's layer (one grouped op) against PEFT 0.21's (one index-select, two linears
  and one index-put per distinct adapter); interleaved pairs, the median of peftfast / PEFT.
* Modelled GPU traffic (counted from the plan, not timed): per layer, launches and bytes of the grouped
  kernels against PEFT's loop at decode (64 sequences x 1 token) and prefill (64 x 512), d = 4096, r = 16,
  bf16, N = 1, 4, 16, 64 distinct adapters, with modelled H100 / RTX 4090 times (bytes / bandwidth +
  FLOPs / dense throughput + launches x launch overhead, the same simple roofline for both sides).

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


def traffic(n_used: int, rows: int, d: int = 4096, r: int = 16, elt: int = 2, block_rows: int = 64) -> dict:
    """Launches, bytes and FLOPs of one layer's adapter term: peftfast's grouped kernels and PEFT's loop.

    Grouped (kernels/lora_grouped.py): a plan of ~10 small torch ops on [M] int64 rows (argsort, bincount,
    cumsum x2, scatter, searchsorted, ...), one shrink (reads x once, each used adapter's A once per block,
    writes h fp32), one expand (reads h, each used adapter's B once per block and column tile, reads and
    writes y once). PEFT's loop per adapter: index-select of x and of the base output, two GEMMs, a scale,
    an add and an index-put (8 launches), reading its rows of x and y two or three times."""
    m = rows
    per = -(-m // n_used)
    blocks = sum(-(-per // block_rows) for _ in range(n_used))
    plan_ops = 10
    plan_bytes = m * 8 * 12
    adapters = n_used * r * 2 * d * elt
    # A read once per block of its rows, B once per block (h is tiny)
    a_reads = blocks * r * d * elt
    b_reads = blocks * r * d * elt
    grouped = dict(launches=plan_ops + 2 + 1,  # + the clone of the base output the expand adds into
                   bytes=plan_bytes + m * d * elt + a_reads + blocks * block_rows * r * 4 * 2 + b_reads
                   + 3 * m * d * elt,
                   flops=2 * m * r * d * 2)
    peft_loop = dict(launches=8 * n_used + 1,
                     bytes=n_used * (2 * r * d * elt) + m * d * elt * 7,
                     flops=2 * m * r * d * 2)
    base = dict(launches=1, bytes=2 * d * d * 0 + d * d * elt + 2 * m * d * elt, flops=2 * m * d * d)
    return dict(grouped=grouped, peft=peft_loop, base=base, used_adapter_bytes=adapters)


def modelled(kind: dict, gpu: str) -> float:
    bw, flops, launch = GPUS[gpu]
    return kind["bytes"] / bw + kind["flops"] / flops + kind["launches"] * launch


def traffic_rows(ns=(1, 4, 16, 64), shapes=(("decode", 64), ("prefill", 64 * 512))):
    out = []
    for label, m in shapes:
        for n in ns:
            t = traffic(n, m)
            base, g, p = t["base"], t["grouped"], t["peft"]
            budget = base["bytes"] + t["used_adapter_bytes"] + 2 * m * 4096 * 2  # + reading/writing y once
            row = dict(shape=label, rows=m, adapters=n, launches_grouped=g["launches"], launches_peft=p["launches"],
                       bytes_grouped_plus_base=g["bytes"] + base["bytes"], bytes_budget_105=1.05 * budget)
            for gpu in GPUS:
                row[f"{gpu}_ratio_vs_peft"] = (modelled(g, gpu) + modelled(base, gpu)) / (
                    modelled(p, gpu) + modelled(base, gpu))
            out.append(row)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("CPU wall time, one LoRA Linear with 16 adapters, peftfast / PEFT (median of interleaved pairs)")
    for row in cpu_rows(repeats=10 if args.quick else 30):
        print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print("Modelled per-layer traffic (counted from the plan), d=4096 r=16 bf16; grouped vs PEFT's loop")
    for row in traffic_rows():
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
