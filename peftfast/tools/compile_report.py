"""Ahead-of-time compile report: every kernel's AotSpec built for real GPUs, on any machine.

For each kernel module in ``peftfast.kernels`` that defines ``aot_specs()`` and each spec x
architecture (sm_80, sm_86, sm_89, sm_90), the kernel is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` (PTX by LLVM, cubin by
the ``ptxas`` bundled with Triton; no GPU needed) and checked:

- registers per thread and spill stores/loads from ``ptxas -v``: any spill fails; so does a
  block needing more than the 64 Ki 32-bit registers of an SM (allocated per warp in units of
  256);
- shared memory (Triton's allocation, ``metadata.shared``) against the largest block that
  architecture can opt in to (CUDA C++ Programming Guide, "Technical Specifications per
  Compute Capability", maximum shared memory per thread block): sm_80 (A100) 163 KiB,
  sm_86 and sm_89 (GA10x, AD10x) 99 KiB, sm_90 (H100) 227 KiB;
- for specs with ``uses_dot``: tensor-core instructions in the PTX, ``mma.sync`` (sm_8x) or
  ``wgmma.mma_async`` (sm_90; the table shows which, as Triton falls back to ``mma.sync`` on
  sm_90 for tiles too small for wgmma). ``ptxas`` lowers these one-to-one to HMMA/IMMA and
  HGMMA/IGMMA/QGMMA; ``--sass`` also disassembles the cubin (bundled ``cuobjdump``) and
  requires them there (about a third more time per matmul kernel).

Compiles run in a pool of 2 fresh processes with ``TRITON_INTERPRET=0``, a throwaway Triton
cache directory and ``TRITON_ALWAYS_COMPILE=1``: every figure is measured on each run.
A progress bar (tqdm, on stderr when it is a terminal) counts the spec sources listed and the
compiles done, with an ETA. Exit status is non-zero on any failure (a module that does not
import, a spec that does not compile, spills, shared memory over the limit, missing
tensor-core instructions).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

# compute capability -> largest shared memory one block can opt in to, bytes
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
ARCHS = tuple(SHARED_LIMIT)
REGISTERS_PER_SM = 64 * 1024
SKIP_MODULES = {"aot", "backend"}

_SASS_TC = re.compile(r"\b(HGMMA|IGMMA|QGMMA|HMMA|IMMA|QMMA)\b")
_PTX_TC = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\b")


@dataclass(frozen=True)
class SpecSource:
    """Where specs come from: a module name, or a Python file (for specs outside the package),
    and the name of the function returning ``list[AotSpec]``."""

    module: str | None = None
    path: str | None = None
    factory: str = "aot_specs"

    @property
    def label(self) -> str:
        return self.module or Path(self.path or "?").stem


@dataclass
class Row:
    source: str
    spec: str
    arch: int
    num_warps: int = 0
    num_stages: int = 0
    uses_dot: bool = False
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    shared_limit: int = 0
    tensor_cores_ptx: str = ""  # "mma" (mma.sync), "wgmma" (wgmma.mma_async)
    tensor_cores_sass: str = ""  # only filled with sass=True
    compile_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class Report:
    rows: list[Row]
    problems: list[str]  # failures that are not tied to one compile (imports, duplicate names)
    notes: list[str]
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.rows) and all(r.ok for r in self.rows)


# ----------------------------------------------------------------------------------------------
# worker side (runs in the pool's processes)

_WORKER_SPECS: dict[SpecSource, list] = {}


def _load_specs(source: SpecSource) -> list:
    if source not in _WORKER_SPECS:
        if source.module is not None:
            mod = importlib.import_module(source.module)
        else:
            name = f"_aot_specs_{abs(hash(source.path))}"
            spec = importlib.util.spec_from_file_location(name, source.path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        factory = getattr(mod, source.factory, None)
        _WORKER_SPECS[source] = None if factory is None else list(factory())
    return _WORKER_SPECS[source]


def _list_source(source: SpecSource) -> dict:
    """Names of a source's specs, or why there are none."""
    try:
        specs = _load_specs(source)
    except Exception as err:  # noqa: BLE001 - a module that does not import is reported as a failure
        return {"error": f"{source.label}: cannot load specs: {type(err).__name__}: {_short(str(err))}"}
    from triton.runtime.jit import KernelInterface

    mod = sys.modules.get(source.module or "")
    jitted = [k for k, v in vars(mod).items() if isinstance(v, KernelInterface)] if mod else []
    if specs is None:
        return {"specs": None, "jitted": jitted}
    covered = {getattr(s.fn, "__name__", "") for s in specs}
    return {"specs": [s.name for s in specs], "uncovered": [k for k in jitted if k not in covered]}


def _short(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compile_spec(spec, arch: int, source_label: str = "", sass: bool = False) -> Row:
    """Compile one AotSpec for one compute capability and check it (needs a JIT function, i.e.
    a process where ``TRITON_INTERPRET`` was off when the kernel module was imported)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    row = Row(source_label, spec.name, arch, spec.num_warps, spec.num_stages, spec.uses_dot,
              shared_limit=SHARED_LIMIT[arch])
    triton.knobs.nvidia.dump_ptxas_log = True
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                ASTSource(spec.fn, spec.signature, spec.constexprs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
            )
    except Exception as err:  # noqa: BLE001 - any compile error is a reported failure
        row.compile_s = time.perf_counter() - start
        row.errors.append(f"compile failed: {type(err).__name__}: {_short(str(err))}")
        return row
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        row.errors.append("ptxas resource usage not found in its log")
    else:
        row.registers = int(regs.group(1))
        row.spill_stores, row.spill_loads = int(spills.group(1)), int(spills.group(2))
        if row.spill_stores or row.spill_loads:
            row.errors.append(f"register spills: {row.spill_stores} B stored, {row.spill_loads} B loaded")
        per_block = -(-row.registers // 8) * 8 * 32 * spec.num_warps
        if per_block > REGISTERS_PER_SM:
            row.errors.append(f"{per_block} registers per block > {REGISTERS_PER_SM}")
    row.shared = int(kernel.metadata.shared)
    if row.shared > row.shared_limit:
        row.errors.append(f"shared memory {row.shared} B > sm_{arch} limit {row.shared_limit} B")
    if spec.uses_dot:
        row.tensor_cores_ptx = ",".join(sorted({m.split(".")[0] for m in _PTX_TC.findall(kernel.asm["ptx"])}))
        if not row.tensor_cores_ptx:
            row.errors.append("uses_dot but no tensor-core instruction (mma.sync / wgmma) in the PTX")
        if sass:
            row.tensor_cores_sass = ",".join(sorted(set(_SASS_TC.findall(_sass(kernel.asm["cubin"])))))
            if not row.tensor_cores_sass:
                row.errors.append("uses_dot but no tensor-core instruction in the SASS")
    row.compile_s = time.perf_counter() - start
    return row


def _sass(cubin: bytes) -> str:
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", f.name], check=True,
                              capture_output=True, text=True).stdout


def _compile_task(task: tuple[SpecSource, int, str, int, bool]) -> Row:
    source, index, name, arch, sass = task
    try:
        specs = _load_specs(source)
        spec = specs[index] if specs is not None and index < len(specs) else None
        if spec is None or spec.name != name:
            return Row(source.label, name, arch, errors=["the module's spec list changed during the run"])
        return compile_spec(spec, arch, source.label, sass)
    except Exception as err:  # noqa: BLE001 - a crash in loading or checking is a reported failure
        return Row(source.label, name, arch, errors=[f"report error: {type(err).__name__}: {_short(str(err))}"])


# ----------------------------------------------------------------------------------------------
# parent side


def discover_sources() -> list[SpecSource]:
    """Every submodule of peftfast.kernels (except the plumbing); modules that do not exist yet
    are simply not listed."""
    import peftfast.kernels as pkg

    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in SKIP_MODULES)
    return [SpecSource(module=f"{pkg.__name__}.{n}") for n in names]


@contextlib.contextmanager
def _env(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _map_with_progress(pool: ProcessPoolExecutor, fn, items: list, desc: str, unit: str,
                       progress: bool | None) -> list:
    """``list(pool.map(fn, items))`` with a tqdm bar (ETA) advancing as results arrive, in any
    order. ``progress=None``: shown only when stderr is a terminal."""
    from tqdm.auto import tqdm

    futures = [pool.submit(fn, item) for item in items]
    with tqdm(total=len(futures), desc=desc, unit=unit, file=sys.stderr, leave=False,
              disable=None if progress is None else not progress) as bar:
        for _ in as_completed(futures):
            bar.update()
    return [f.result() for f in futures]


def run_report(sources: list[SpecSource] | None = None, archs: tuple[int, ...] = ARCHS,
               workers: int = 2, sass: bool = False, progress: bool | None = None) -> Report:
    """Compile every spec of ``sources`` (default: all kernel modules) for every arch.
    ``progress``: a progress bar on stderr (None: only when stderr is a terminal)."""
    for arch in archs:
        if arch not in SHARED_LIMIT:
            raise ValueError(f"arch {arch} not supported; allowed: {', '.join(map(str, SHARED_LIMIT))}")
    start = time.perf_counter()
    sources = discover_sources() if sources is None else list(sources)
    problems: list[str] = []
    notes: list[str] = []
    rows: list[Row] = []
    cache = tempfile.mkdtemp(prefix="peftfast-aot-")
    # Workers are spawned with this environment (only this function runs while it is set): the
    # kernel modules they import get real JIT functions even when this process interprets.
    env = {"TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": cache, "TRITON_ALWAYS_COMPILE": "1", "TRITON_DUMP_PTXAS_LOG": "1"}
    try:
        with _env(**env), ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            tasks = []
            seen: dict[str, str] = {}
            listings = _map_with_progress(pool, _list_source, sources, "listing spec sources", "source",
                                          progress)
            for source, listing in zip(sources, listings):
                if "error" in listing:
                    problems.append(listing["error"])
                    continue
                if listing["specs"] is None:
                    if listing["jitted"]:
                        problems.append(f"{source.label} defines Triton kernels ({', '.join(listing['jitted'])}) "
                                        "but no aot_specs()")
                    else:
                        notes.append(f"{source.label}: no Triton kernels")
                    continue
                if listing["uncovered"]:
                    notes.append(f"{source.label}: jitted functions in no spec (device helpers?): "
                                 f"{', '.join(listing['uncovered'])}")
                for index, name in enumerate(listing["specs"]):
                    if name in seen:
                        problems.append(f"spec name {name!r} used by {seen[name]} and {source.label}")
                    seen[name] = source.label
                    tasks += [(source, index, name, arch, sass) for arch in archs]
            rows = _map_with_progress(pool, _compile_task, tasks, "compiling", "compile", progress)
    except BrokenProcessPool as err:
        problems.append(f"a compile worker died ({err}); check that `import peftfast` works")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if not rows and not problems:
        problems.append("no AotSpec found: no kernel module defines aot_specs()")
    return Report(rows, problems, notes, time.perf_counter() - start)


def format_report(report: Report) -> str:
    w = max([4] + [len(r.spec) for r in report.rows])
    head = (f"{'spec':<{w}} {'arch':>5} {'warps':>5} {'stg':>3} {'regs':>4} {'spill':>5} "
            f"{'smem KiB':>8} {'limit':>5} {'tensor cores':<14} {'s':>5}  status")
    lines = [head, "-" * len(head)]
    for r in report.rows:
        spill = "-" if r.spill_stores is None else str(r.spill_stores + r.spill_loads)
        smem = "-" if r.shared is None else f"{r.shared / 1024:.1f}"
        tc = "/".join(x for x in (r.tensor_cores_ptx, r.tensor_cores_sass) if x) or "none" if r.uses_dot else ""
        status = "ok" if r.ok else "FAIL: " + "; ".join(r.errors)
        lines.append(f"{r.spec:<{w}} sm_{r.arch:<2} {r.num_warps:>5} {r.num_stages:>3} "
                     f"{r.registers if r.registers is not None else '-':>4} {spill:>5} {smem:>8} "
                     f"{r.shared_limit // 1024:>5} {tc:<14} {r.compile_s:>5.2f}  {status}")
    lines += [f"note: {n}" for n in report.notes]
    lines += [f"FAIL: {p}" for p in report.problems]
    failed = sum(not r.ok for r in report.rows)
    lines.append(f"{len(report.rows)} compiles, {failed} failed, {len(report.problems)} other problems, "
                 f"{report.elapsed_s:.1f} s")
    return "\n".join(lines)


def _git_sha() -> tuple[str, bool | None]:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None


def report_json(report: Report) -> dict:
    import torch
    import triton

    sha, dirty = _git_sha()
    return {
        "triton": triton.__version__, "torch": torch.__version__, "git_sha": sha, "git_dirty": dirty,
        "elapsed_s": report.elapsed_s, "ok": report.ok, "problems": report.problems, "notes": report.notes,
        "rows": [dict(asdict(r), ok=r.ok) for r in report.rows],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftfast compile-report", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS,
                        help="compute capability to build for (repeatable; default: all)")
    parser.add_argument("--module", action="append", metavar="NAME",
                        help="only this kernel module of peftfast.kernels, e.g. lycoris (repeatable; default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows, versions and git sha as JSON")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sass", action="store_true", help="also require tensor-core instructions in the SASS")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar with ETA on stderr (default: when stderr is a terminal)")
    args = parser.parse_args(argv)
    sources = None if not args.module else [SpecSource(module=f"peftfast.kernels.{m}") for m in args.module]
    report = run_report(sources, archs=tuple(args.arch or ARCHS), workers=args.workers, sass=args.sass,
                        progress=args.progress)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report_json(report), indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
