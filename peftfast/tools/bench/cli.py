"""``peftfast bench``: run every section, print its tables, write the rows (and the plot).

Calibration runs in a child process while memory is measured here; then the modelled tables,
the CPU timings and, on a CUDA machine, the GPU timings. The JSON is written first, the PNG
after it (skipped, with a note, when matplotlib is missing). Exit status 1 when calibration did
not agree with the formulas: the modelled figures are then not backed by counted traffic.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .builders import libs
from .calibration import calibration_lines, finish_calibration, start_calibration
from .cpu_time import cpu_time_lines, cpu_time_rows
from .cuda_time import cuda_time_lines, cuda_time_rows
from .memory import measure_memory, memory_lines
from .modelled import modelled_lines, modelled_rows
from .plot import plotting_available, write_plot
from .results import default_out, environment, write_rows
from .summary import summary_lines
from .tables import threads_label

DESCRIPTION = "``peftfast bench``: what each kernel costs against PEFT, three ways, each labelled where printed."


def write_outputs(out_path: Path, meta: dict, rows: list[dict], model_rows: list[dict], plot: bool) -> str:
    """Write the rows (``meta["plot"]`` set), then the PNG next to them; return the note for the last
    line of output. The rows come first: a plot that cannot be drawn must not cost the results."""
    plot_path = out_path.with_suffix(".png") if plot else None
    skipped = None
    if plot_path and not plotting_available():
        plot_path, skipped = None, "matplotlib is not installed"
    write_rows(out_path, {**meta, "plot": str(plot_path) if plot_path else None}, rows)
    if plot_path:
        try:
            write_plot(model_rows, plot_path)
        except ImportError as err:  # matplotlib present but unusable (e.g. a missing backend dependency)
            plot_path, skipped = None, f"{type(err).__name__}: {err}"
            write_rows(out_path, {**meta, "plot": None}, rows)
    if plot_path:
        return f"; plot: {plot_path}"
    return f"; plot skipped: {skipped}" if skipped else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftfast bench", description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true",
                        help="few repeats and smaller models (tests, CI; < 60 s)")
    parser.add_argument("--out", type=Path,
                        help="JSON file for the rows (default: bench/results/bench-<git sha>.json)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG next to the JSON")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the CPU timings (default 1: on a shared or busy machine more "
                             "threads time the scheduler rather than the ops)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    env = environment()
    out_path = args.out or default_out(env)
    print(f"peftfast bench{' --quick' if args.quick else ''}: {env['cpu']} ({env['cpu_count']} CPUs, "
          f"{threads_label(env['torch_threads'])}), GPU: {env['gpu'] or 'none'}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
          + f"; git {env['git_sha'][:12]}{' (dirty)' if env['git_dirty'] else ''}")
    if "peft" not in dict(libs()):
        print("PEFT is not installed: the comparisons against it are skipped (pip install peftfast[test])")
    print(flush=True)

    sections: dict[str, float] = {}
    t0 = time.perf_counter()
    calib = start_calibration()  # counts in Triton's interpreter while the memory is measured here
    try:
        mem_rows, mem_errors = measure_memory()
        sections["memory"] = time.perf_counter() - t0
        cal_rows, cal_errors = finish_calibration(calib)
        sections["calibration, alongside memory"] = time.perf_counter() - t0
    finally:
        if calib.poll() is None:
            calib.kill()
            calib.communicate()
    calibrated = bool(cal_rows) and not cal_errors and all(r["ok"] for r in cal_rows)
    model_rows = modelled_rows()
    for lines in (calibration_lines(cal_rows, cal_errors), modelled_lines(model_rows),
                  memory_lines(mem_rows, mem_errors)):
        print("\n".join(lines) + "\n", flush=True)
    t0 = time.perf_counter()
    time_rows = cpu_time_rows(args.quick)
    sections["cpu timing"] = time.perf_counter() - t0
    print("\n".join(cpu_time_lines(time_rows)))
    gpu_rows = []
    if torch.cuda.is_available():
        t0 = time.perf_counter()
        gpu_rows = cuda_time_rows(args.quick)
        sections["gpu timing"] = time.perf_counter() - t0
        print("\n" + "\n".join(cuda_time_lines(gpu_rows, env["gpu"])))
    rows = cal_rows + model_rows + mem_rows + time_rows + gpu_rows
    rows += [{"section": "memory", "what": key, "available": False, "reason": why}
             for key, why in mem_errors.items()]
    rows += [{"section": "calibration", "name": e, "ok": False, "error": True} for e in cal_errors]
    print("\n" + "\n".join(summary_lines(rows)))

    elapsed = time.perf_counter() - started
    meta = {**env, "quick": args.quick, "elapsed_s": elapsed, "section_s": sections, "calibrated": calibrated}
    note = write_outputs(out_path, meta, rows, model_rows, plot=not args.no_plot)
    print(f"\nrows: {out_path}" + note + f"; {elapsed:.1f} s")
    if not calibrated:
        print("calibration FAILED: the modelled figures are not backed by counted traffic", file=sys.stderr)
    return 0 if calibrated else 1
