"""Section 3a: wall time measured on this machine's CPU, the PyTorch path against PEFT.

Both libraries run in the same process on the same inputs and adapter weights, timed in
interleaved pairs (order alternating, garbage collector off), and reported as quantiles of the
per-pair ratio peftfast / PEFT. The design target: never slower (median <= 1).
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .builders import cpu_comparisons, quiet
from .tables import table, threads_label, verdict_word


def paired_times(fast: Callable[[], Any], ref: Callable[[], Any], repeats: int, target_s: float) -> dict:
    """Time ``fast`` and ``ref`` in interleaved pairs (order alternating, garbage collector off
    while timing); each sample runs ``inner`` calls, sized to about ``target_s``."""
    for fn in (fast, ref, fast, ref):
        fn()
    t0 = time.perf_counter()
    fast()
    inner = max(1, round(target_s / max(time.perf_counter() - t0, 1e-7)))
    fast_s, ref_s = [], []
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for i in range(repeats):
            order = [(fast, fast_s), (ref, ref_s)]
            for fn, acc in (order if i % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                acc.append((time.perf_counter() - t0) / inner)
    finally:
        if enabled:
            gc.enable()
    ratios = [a / b for a, b in zip(fast_s, ref_s)]
    q1, med, q3 = (float(v) for v in np.percentile(ratios, [25, 50, 75]))
    return {"ratio_samples": ratios, "ratio_median": med, "ratio_q1": q1, "ratio_q3": q3,
            "peftfast_median_s": float(np.median(fast_s)), "peft_median_s": float(np.median(ref_s)),
            "repeats": repeats, "inner": inner}


def cpu_time_rows(quick: bool) -> list[dict]:
    repeats, target = (9, 0.01) if quick else (31, 0.05)
    rows = []
    for comp in cpu_comparisons(quick):
        row: dict[str, Any] = {"section": "cpu_time", "key": comp.key, "label": comp.label,
                               "threads": torch.get_num_threads()}
        try:
            with quiet():
                sides = comp.build()
            if "peft" not in sides:
                raise RuntimeError("PEFT is not installed (pip install peftfast[test])")
            row.update(paired_times(sides["peftfast"].step, sides["peft"].step, repeats, target))
            row["available"] = True
        except Exception as err:  # noqa: BLE001 - one comparison failing must not hide the others
            row.update(available=False, reason=f"{type(err).__name__}: {err}")
        rows.append(row)
        gc.collect()
    return rows


def cpu_time_lines(rows: list[dict]) -> list[str]:
    threads = rows[0]["threads"] if rows else torch.get_num_threads()
    out = [f"== Measured CPU wall time (this machine, {threads_label(threads)}): the PyTorch path vs PEFT, "
           "same process, same inputs and adapter weights",
           "   ratio = peftfast / PEFT per interleaved pair of timings; median [IQR]; target: never slower "
           "(median <= 1)"]
    body = []
    for r in rows:
        if not r["available"]:
            out.append(f"{r['label']}: not available: {r['reason']}")
            continue
        spans = r["ratio_median"] > 1.0 >= r["ratio_q1"]
        verdict = verdict_word(r["ratio_median"] <= 1.0) + (" (IQR spans 1)" if spans else "")
        body.append([r["label"], f"{r['ratio_median']:.3f}", f"[{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}]",
                     f"{r['peftfast_median_s'] * 1e3:.2f}", f"{r['peft_median_s'] * 1e3:.2f}",
                     f"{r['repeats']}x{r['inner']}", verdict])
    head = ["comparison", "ratio", "IQR", "peftfast ms", "PEFT ms", "pairs x calls", "target"]
    return out + table(head, body)
