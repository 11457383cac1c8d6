"""The closing list: every target the tables report, met or MISSED, modelled or measured, in one place."""
from __future__ import annotations

from .constants import DECODE_TARGET, GPUS
from .tables import verdict_word


def summary_lines(rows: list[dict]) -> list[str]:
    """Every target the tables report, met or missed, in one place."""
    out = ["== Targets (DESIGN): met / MISSED"]
    for r in rows:
        if r["section"] == "modelled":
            parts = [f"{k} {r[f'{k}_ratio_ovh']:.3f} (<= {r[f'{k}_target']} {verdict_word(r[f'{k}_met'])})"
                     for k in ("fwd", "bwd") if f"{k}_met" in r]
            if parts:
                out.append(f"modelled {r['gpu']}, {r['op']}, {r['path']}: " + ", ".join(parts))
    for gpu in GPUS:
        dec = [r for r in rows if r["section"] == "decode" and r["gpu"] == gpu.name]
        if dec:
            missed = [r["T"] for r in dec if not r["met"]]
            worst, worst_gemm = max(r["total_ratio"] for r in dec), max(r["gemm_ratio"] for r in dec)
            verdict = (f"MISSED at T={missed[0]}..{missed[-1]} (worst {worst:.3f}: the split-reduction "
                       "partials)" if missed else "met")
            out.append(f"modelled {gpu.name}, NF4 decode T=1..16, all launches within "
                       f"{DECODE_TARGET - 1:.0%} "
                       f"of packed + absmax: {verdict}; the GEMM alone: worst {worst_gemm:.3f} "
                       f"{verdict_word(worst_gemm <= DECODE_TARGET)}")
    saved = {(r["path"], r["dropout"]): r["saved_bytes"] for r in rows
             if r.get("what") == "saved_activations" and "saved_bytes" in r}
    if ("peftfast", 0.1) in saved and ("peft", 0.0) in saved:
        ratio = saved["peftfast", 0.1] / saved["peft", 0.0]
        out.append(f"measured: saved activations, peftfast with dropout 0.1 / PEFT without dropout: "
                   f"{ratio:.3f} <= 1 {verdict_word(ratio <= 1)}")
    for r in rows:
        if r["section"] == "cpu_time" and r.get("available"):
            out.append(f"measured CPU: {r['label']}: peftfast / PEFT {r['ratio_median']:.3f} "
                       f"[{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}] <= 1 {verdict_word(r['ratio_median'] <= 1)}")
        elif r["section"] in ("cpu_time", "cuda_time", "memory") and r.get("available") is False:
            out.append(f"not available: {r.get('label') or r.get('what')}: {r['reason']}")
    return out
