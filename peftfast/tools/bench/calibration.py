"""Section 1a: the cost formulas checked against traffic counted at small shapes.

The counts run in a child process with ``TRITON_INTERPRET=1`` (Triton's interpreter must be
switched on before triton is imported, and the parent measures memory meanwhile): eager ops are
counted by a TorchDispatchMode, Triton kernels by the unique addresses each launch touches
(``costmodel.calibration``). The child prints its checks as one JSON line; a section that
cannot be counted is reported by name, never hidden.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

from .. import costmodel as cm
from .tables import table


def run_calibration_child() -> None:
    """Entry point of the child process (``TRITON_INTERPRET=1``): print the checks as JSON."""
    results, errors = [], []
    for name, fn in (("eager PEFT path", cm.calibrate_eager),
                     ("peftfast lora_linear",
                      lambda: cm.calibrate_peftfast() + cm.calibrate_peftfast(t=200, ad=torch.float16)),
                     ("peftfast lora_linear_fused",  # T=1100: two row-block groups (the look-ahead shrink)
                      lambda: cm.calibrate_peftfast_fused() + cm.calibrate_peftfast_fused(
                          t=1100, d_in=150, d_out=130, ad=torch.float16)),
                     ("peftfast qlora_linear_fused", cm.calibrate_qlora_fused),
                     ("4-bit GEMM", cm.calibrate_4bit), ("IA3", cm.calibrate_ia3)):
        try:
            results += [dict(vars(c), ok=c.ok) for c in fn()]
        except Exception as err:  # noqa: BLE001 - a kernel that cannot be counted is reported, not hidden
            errors.append(f"{name}: {type(err).__name__}: {err}")
    print(json.dumps({"checks": results, "errors": errors}))


def start_calibration() -> subprocess.Popen:
    """Start the counting child (``run_calibration_child``); ``finish_calibration`` collects it."""
    env = dict(os.environ, TRITON_INTERPRET="1", PEFTFAST_BACKEND="triton", CUDA_VISIBLE_DEVICES="")
    code = "from peftfast.tools.bench.calibration import run_calibration_child; run_calibration_child()"
    # run outside the working directory, which `-c` puts on sys.path (a checkout has a kernels/ folder)
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return subprocess.Popen([sys.executable, *safe_path, "-c", code], env=env, cwd=tempfile.gettempdir(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_calibration(proc: subprocess.Popen, timeout: float = 600) -> tuple[list[dict], list[str]]:
    """(calibration rows, errors) from the child's last line of output."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return [], [f"calibration did not finish in {timeout:.0f} s"]
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return [], [f"calibration process failed (exit {proc.returncode}): {err.strip()[-800:]}"]
    data = json.loads(lines[-1])
    return [dict(section="calibration", **c) for c in data["checks"]], data["errors"]


def calibration_lines(rows: list[dict], errors: list[str]) -> list[str]:
    out = ["== Calibration: bytes and launches counted at small shapes vs the cost formulas",
           "   (eager ops counted by a TorchDispatchMode; Triton kernels' unique addresses counted in "
           "the interpreter)"]
    body = [[r["name"], r["counted_bytes"], r["modelled_bytes"], r["counted_launches"],
             r["modelled_launches"], "exact" if r["tolerance"] == 0 else f"{r['tolerance']:.0%}",
             "ok" if r["ok"] else "MISMATCH"] for r in rows]
    out += table(["check", "counted B", "modelled B", "launches", "modelled", "tolerance", "result"], body)
    out += [f"NOT COUNTED: {e}" for e in errors]
    good = rows and not errors and all(r["ok"] for r in rows)
    out.append("calibration: " + ("all checks agree" if good else
                                  "FAILED: the modelled tables below are not backed by counts"))
    return out
