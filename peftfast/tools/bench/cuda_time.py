"""Section 3b: GPU time measured with ``triton.testing.do_bench`` (CUDA events, L2 flushed).

Only on a CUDA machine: the Triton kernels as ratios to the base matmul alone, forward and
backward (backward = (forward + backward) - forward), and which path the measured dispatch
(kernels/autotune.py) chose for each key the comparisons ran.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .builders import cuda_comparisons, quiet
from .tables import table


def do_bench_ms(fn: Callable[[], Any], quick: bool) -> tuple[float, float, float]:
    """(median, q1, q3) in ms from ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls)."""
    from triton.testing import do_bench

    ms = do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 200, quantiles=[0.5, 0.25, 0.75])
    return tuple(ms)


def _decided() -> set:
    from peftfast.kernels import autotune

    return {(device, key) for device, key, _ in autotune.TUNER.decisions()}


def dispatch_rows(comp, before: set) -> list[dict]:
    """The dispatch decisions (kernels/autotune.py) first used while ``comp`` ran: which path won for each
    key, with the measured ms of every candidate (``source``: measured now, or read from the cache file)."""
    from peftfast.kernels import autotune
    from peftfast.kernels.lora_fused import describe_key

    rows = []
    for device, key, d in autotune.TUNER.decisions():
        if (device, key) in before:
            continue
        rows.append({"section": "dispatch", "key": comp.key, "label": comp.label, "device": device, "op": key[0],
                     "shape": describe_key(key) if key[0] == "lora_linear_fused" else " ".join(map(str, key[1:])),
                     "choice": d.choice, "source": d.source,
                     "ms": {n: (v if math.isfinite(v) else None) for n, v in d.ms.items()}})  # None: it failed
    return rows


def cuda_time_rows(quick: bool) -> list[dict]:
    """Measured ratios to the base matmul alone, forward and backward (= step - forward), then the path
    the dispatch chose for each key the comparisons ran (section "dispatch")."""
    rows = []
    for comp in cuda_comparisons(quick):
        before = _decided()
        try:
            with quiet():
                sides = comp.build()
            times = {name: {"fwd": do_bench_ms(s.fwd, quick), "step": do_bench_ms(s.step, quick)}
                     for name, s in sides.items()}
        except Exception as err:  # noqa: BLE001 - one comparison failing must not hide the others
            rows.append({"section": "cuda_time", "key": comp.key, "label": comp.label, "available": False,
                         "reason": f"{type(err).__name__}: {err}"})
            rows += dispatch_rows(comp, before)
            continue
        base = times.pop("base")
        base_bwd = base["step"][0] - base["fwd"][0]
        for name, tm in times.items():
            bwd = tm["step"][0] - tm["fwd"][0]
            rows.append({"section": "cuda_time", "key": comp.key, "label": comp.label, "path": name,
                         "available": True, "fwd_ms": tm["fwd"], "step_ms": tm["step"],
                         "base_fwd_ms": base["fwd"], "base_step_ms": base["step"],
                         "fwd_ratio": tm["fwd"][0] / base["fwd"][0],
                         "bwd_ratio": bwd / base_bwd if base_bwd > 0 else None})
        del sides
        torch.cuda.empty_cache()
        rows += dispatch_rows(comp, before)
    return rows


def cuda_time_lines(rows: list[dict], gpu_name: str) -> list[str]:
    out = [f"== Measured GPU time ({gpu_name}, triton.testing.do_bench, median of "
           "CUDA-event timings): ratio to the base matmul alone; bwd = (fwd+bwd) - fwd"]
    body = []
    for r in rows:
        if r["section"] != "cuda_time":
            continue
        if not r["available"]:
            out.append(f"{r['label']}: not available: {r['reason']}")
            continue
        bwd = "-" if r["bwd_ratio"] is None else f"{r['bwd_ratio']:.3f}"
        body.append([r["label"], r["path"], f"{r['fwd_ms'][0]:.3f}", f"{r['base_fwd_ms'][0]:.3f}",
                     f"{r['fwd_ratio']:.3f}", bwd])
    return out + table(["comparison", "path", "fwd ms", "base fwd ms", "fwd ratio", "bwd ratio"], body) \
        + dispatch_lines(rows)


def dispatch_lines(rows: list[dict]) -> list[str]:
    """Which path won per key (the "dispatch" rows); nothing when no key was decided."""
    from peftfast.kernels import autotune

    picked = [r for r in rows if r["section"] == "dispatch"]
    if not autotune.autotune_enabled():
        return ["", f"dispatch: {autotune.ENV_AUTOTUNE}=0: the fused paths ran, nothing was measured"]
    if not picked:
        return []
    names = sorted({n for r in picked for n in r["ms"]})
    body = [[r["label"], r["shape"], r["choice"], *(_ms(r["ms"], n) for n in names), r["source"]]
            for r in picked]
    return ["", f"== Dispatch: the path that won per key (CUDA events, median of {autotune.REPEATS} after "
                f"{autotune.WARMUP} warm-up runs; {autotune.ENV_AUTOTUNE}=0 always runs the fused path)"] + \
        table(["comparison", "key", "won", *(f"{n} ms" for n in names), "source"], body)


def _ms(ms: dict, name: str) -> str:
    if name not in ms:
        return "-"
    return "failed" if ms[name] is None else f"{ms[name]:.3f}"
