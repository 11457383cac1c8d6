"""The cost model's own command (``python -m peftfast.tools.costmodel``): print ``build_report``.

Exit status 1 when a calibration check that ran disagreed with its formula, else 0.
"""
from __future__ import annotations

import argparse

import torch

from .report import build_report
from .specs import GPUS, LAUNCH_OVERHEAD_S

DESCRIPTION = "Per-kernel cost model: bytes moved, FLOPs, launches, and modelled time on named GPUs."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftfast traffic", description=DESCRIPTION)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-in", type=int, default=4096)
    parser.add_argument("--d-out", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--gpu", choices=sorted(GPUS), action="append", help="default: all")
    parser.add_argument("--launch-overhead-us", type=float, default=LAUNCH_OVERHEAD_S * 1e6)
    parser.add_argument("--no-calibrate", action="store_true", help="skip counting at small shapes")
    args = parser.parse_args(argv)
    gpus = tuple(GPUS[g] for g in (args.gpu or sorted(GPUS)))
    text, ok = build_report(args.tokens, args.d_in, args.d_out, args.rank, torch.bfloat16, gpus,
                            args.launch_overhead_us * 1e-6, not args.no_calibrate)
    print(text)
    return 0 if ok else 1
