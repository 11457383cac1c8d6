"""Section 3b: GPU time measured with ``triton.testing.do_bench`` (CUDA events, L2 flushed).

Only on a CUDA machine: the Triton kernels as ratios to the base matmul alone, forward and
backward (backward = (forward + backward) - forward).
"""
from __future__ import annotations

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


def cuda_time_rows(quick: bool) -> list[dict]:
    """Measured ratios to the base matmul alone, forward and backward (= step - forward)."""
    rows = []
    for comp in cuda_comparisons(quick):
        try:
            with quiet():
                sides = comp.build()
            times = {name: {"fwd": do_bench_ms(s.fwd, quick), "step": do_bench_ms(s.step, quick)}
                     for name, s in sides.items()}
        except Exception as err:  # noqa: BLE001 - one comparison failing must not hide the others
            rows.append({"section": "cuda_time", "key": comp.key, "label": comp.label, "available": False,
                         "reason": f"{type(err).__name__}: {err}"})
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
    return rows


def cuda_time_lines(rows: list[dict], gpu_name: str) -> list[str]:
    out = [f"== Measured GPU time ({gpu_name}, triton.testing.do_bench, median of "
           "CUDA-event timings): ratio to the base matmul alone; bwd = (fwd+bwd) - fwd"]
    body = []
    for r in rows:
        if not r["available"]:
            out.append(f"{r['label']}: not available: {r['reason']}")
            continue
        bwd = "-" if r["bwd_ratio"] is None else f"{r['bwd_ratio']:.3f}"
        body.append([r["label"], r["path"], f"{r['fwd_ms'][0]:.3f}", f"{r['base_fwd_ms'][0]:.3f}",
                     f"{r['fwd_ratio']:.3f}", bwd])
    return out + table(["comparison", "path", "fwd ms", "base fwd ms", "fwd ratio", "bwd ratio"], body)
