"""Ahead-of-time compile report: every kernel's AotSpec built for real GPUs, on any machine.

For each kernel module in ``peftfast.kernels`` that defines ``aot_specs()`` and each spec x
architecture (sm_80, sm_86, sm_89, sm_90; a spec naming its architectures: those only), the kernel
is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` (PTX by
LLVM, cubin by the ``ptxas`` bundled with Triton; no GPU needed) and checked. Two kinds of specs:

- hand-written, per module: every config a launcher can pick x dtype x flag, with no run-time
  specialisation (no argument known divisible by 16);
- launched (kernels/launch_specs.py, module ``launch_specs``): the launches the launchers make
  for representative shapes (a 4096 x 4096 layer, rank 16, T = 1, 7, 16, 128, 8192; fp16/bf16
  activations, fp16/bf16/fp32 adapters; dense fused LoRA and its unfused alternative, NF4 QLoRA
  plain and double-quantised, int8 QLoRA, the quantised matmuls without adapters) as planned on
  each architecture's reference GPU, each compiled exactly as Triton would at run time
  (constants for arguments equal to 1, ``tt.divisibility`` 16 on aligned pointers and sizes, the
  launch's compile options) for that architecture only. About 2800 compiles (an hour on 2 cores);
  the test suite compiles the hand-written specs and ``launch_specs.ci_specs`` (``ci_sources``).

Checks:

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
import functools
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
LAUNCHED_MODULE = "launch_specs"  # specs recorded from launches (kernels/launch_specs.py)

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
    return {"specs": [s.name for s in specs], "uncovered": [k for k in jitted if k not in covered],
            "index_keys": [index_key(s) for s in specs], "archs": [list(s.archs) for s in specs]}


def index_key(spec) -> str:
    """What a spec's index arithmetic depends on: the kernel and its constexprs except dot precisions
    (pointer dtypes and precisions change the values computed, not the offsets). Specs with one key
    share their int32-offset result, so ``offset_report(one_per_key=True)`` builds one TTIR per key."""
    consts = sorted((k, repr(v)) for k, v in spec.constexprs.items() if "PRECISION" not in k)
    return f"{getattr(spec.fn, '__name__', '?')}{consts}"


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
    # a constexpr parameter left out of the spec's constexprs (one with a default, say) would be compiled as a
    # runtime argument: another kernel than the one launched, its ``if`` on it a branch in the code
    runtime = [p.name for p in getattr(spec.fn, "params", ())
               if p.is_constexpr and spec.signature.get(p.name) != "constexpr"]
    if runtime:
        row.errors.append(f"constexpr parameters compiled as runtime arguments: {', '.join(runtime)} (give their "
                          "values in the spec's constexprs)")
    triton.knobs.nvidia.dump_ptxas_log = True
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs()),
                                    target=GPUTarget("cuda", arch, 32), options=spec.compile_options())
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
            row.tensor_cores_sass = ",".join(sorted(set(_SASS_TC.findall(sass_listing(kernel.asm["cubin"])))))
            if not row.tensor_cores_sass:
                row.errors.append("uses_dot but no tensor-core instruction in the SASS")
    row.compile_s = time.perf_counter() - start
    return row


def sass_listing(cubin: bytes) -> str:
    """The SASS of ``cubin`` (the bundled ``cuobjdump -sass``)."""
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
# 32-bit address offsets (TTIR analysis)
#
# Triton computes a pointer offset in the integer type of its operands: an index in int32 times a
# stride in int32 is int32, and wraps silently once index * stride >= 2**31 elements (a GPU then
# reads or writes the wrong address; the interpreter does not show it). The check walks each
# ``tt.addptr`` offset of the kernel's TTIR back through the values it is computed from (through
# extensions to int64, broadcasts, loop variables) and flags every 32-bit multiplication on that
# path that can reach 2**31 for a large tensor:
#   * a product whose operand comes from a program id or an atomic (a ticket): block number times
#     block size or stride, in int32 (cast program ids and tickets to int64 first), or
#   * a product of two run-time values (an index times a stride, an index times a size), unless one
#     of them is tile-local: computed from ``tl.arange``, constants and loop variables between
#     constants only, i.e. below a constexpr block size B. Such a product (a tile's row offsets times a stride) wraps only for a stride or
#     row length of at least 2**31 / B elements (8 Mi for B = 256), which this check does not cover.
# A product of a run-time value with a constant (``i * 4`` on a table row, a hash multiplier) is not
# flagged. Values read from memory end the walk (their pointer is checked at its own ``tt.addptr``).
# Exempt: the tile-number arithmetic of ``kernels/tiles.py`` (``TILE_NUMBER_HELPERS``: grouped_tile,
# lookahead_work), which runs on tile numbers and tickets below the grid size (< 2**31, checked by
# ``runtime.check_grid``); callers turn its row blocks into int64 before addressing.
# Pointers a kernel declares small (``kernels.runtime.int32_operands``: every offset into them is
# below 2**31, which ``launch`` checks on each call) are not walked.

_TTIR_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)? = ([\w.]+)(.*)$")
_TTIR_FOR = re.compile(r"scf\.for (%[\w.$-]+) = (%[\w.$-]+) to (%[\w.$-]+) step (%[\w.$-]+)"
                       r"(?: iter_args\((.*?)\))?")
_TTIR_VAL = re.compile(r"%[\w.$-]+")
_TTIR_LOC = re.compile(r"\s*loc\((#loc\d*)\)\s*(\{.*)?$")
_TTIR_LOCDEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$")
_TTIR_FILELOC = re.compile(r'"([^"]+)":(\d+):(\d+)')
_TTIR_PASS_THROUGH_STOP = {"tt.load", "arith.constant", "tt.make_range"}


def ttir_text(spec, arch: int = 90) -> str:
    """The kernel's TTIR (Triton's first IR, after its own simplifications; no GPU, no ptxas) for
    ``arch``: what ``triton.compile`` builds before lowering to the GPU dialect."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton._C.libtriton import ir

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    src = ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs())
    options = backend.parse_options({**spec.compile_options(), **src.parse_options()})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    return str(stages["ttir"](module, {}))


@functools.lru_cache(maxsize=1)
def _exempt_lines() -> frozenset[str]:
    """'tiles.py:N' for every line of ``tiles.TILE_NUMBER_HELPERS`` (tile-number arithmetic, see above)."""
    import inspect

    from peftfast.kernels import tiles

    out = set()
    for helper in tiles.TILE_NUMBER_HELPERS:
        fn = getattr(helper, "fn", helper)
        lines, first = inspect.getsourcelines(fn)
        out.update(f"{Path(inspect.getsourcefile(fn)).name}:{first + i}" for i in range(len(lines)))
    return frozenset(out)


def _is_i32(ty: str) -> bool:
    return re.search(r"(?:^|x|<)i32>?$", ty.strip()) is not None


def _loc_source(loc: str | None, locs: dict[str, str], depth: int = 0) -> str:
    """'file.py:line' of a TTIR location (following named and nested locations)."""
    if loc is None or depth > 20:
        return "?"
    text = locs.get(loc, "")
    m = _TTIR_FILELOC.search(text)
    if m:
        return f"{Path(m.group(1)).name}:{m.group(2)}"
    inner = re.search(r"(#loc\d*)", text)
    return _loc_source(inner.group(1), locs, depth + 1) if inner else "?"


def int32_offsets(ttir: str, small: tuple[str, ...] = ()) -> list[str]:
    """Each 32-bit multiplication that feeds a pointer offset and can wrap (see the rules above), as
    'name (file:line) = a * b in int32, an offset of <pointer> (file:line)'; empty when there is none.
    ``small``: pointer arguments whose offsets are known to stay below 2**31 (not walked)."""
    lines = ttir.splitlines()
    locs = {m.group(1): m.group(2) for m in map(_TTIR_LOCDEF.match, lines) if m}
    defs: dict[str, tuple[str, list[str], str, str | None]] = {}
    addptrs = []
    for line in lines:
        lm = _TTIR_LOC.search(line)
        loc = lm.group(1) if lm else None
        body = line[:lm.start()] if lm else line
        f = _TTIR_FOR.search(body)
        if f:
            iv, lb, ub, step, iters = f.groups()
            defs[iv] = ("scf.for.iv", [lb, ub, step], "", loc)
            for pair in (iters or "").split(","):
                if "=" in pair:
                    name, init = (p.strip() for p in pair.split("=", 1))
                    defs[name] = ("scf.for.iter", [init], "", loc)
        m = _TTIR_DEF.match(body)
        if not m or m.group(2) == "scf.for":
            continue
        name, op, rest = m.groups()
        args, sep, ty = rest.rpartition(" : ")
        if not sep:
            args, ty = rest, ""
        defs[name] = (op, _TTIR_VAL.findall(args), ty, loc)
        if op == "tt.addptr":
            addptrs.append(name)

    origin_cache: dict[str, bool] = {}

    def from_index(v: str, seen: set) -> bool:  # computed from a program id or an atomic's result
        if v in origin_cache:
            return origin_cache[v]
        if v in seen or v not in defs:
            return False
        seen.add(v)
        op, operands, _ty, _loc = defs[v]
        if op in ("tt.get_program_id", "tt.atomic_rmw", "tt.atomic_cas"):
            out = True
        elif op in _TTIR_PASS_THROUGH_STOP:
            out = False
        else:
            out = any(from_index(o, seen) for o in operands)
        origin_cache[v] = out
        return out

    local_cache: dict[str, bool] = {}

    def tile_local(v: str, seen: set) -> bool:  # from tl.arange and constants only
        if v in local_cache:
            return local_cache[v]
        if v in seen or v not in defs:
            return False
        seen.add(v)
        op, operands, _ty, _loc = defs[v]
        if op in ("tt.make_range", "arith.constant"):
            out = True
        elif op == "scf.for.iv":  # a loop variable between two constants (the bound is not walked)
            out = all(defs.get(o, ("",))[0] == "arith.constant" for o in operands[:2])
        elif op in ("tt.load", "scf.for.iter") or op.startswith(("tt.get_", "tt.atomic")):
            out = False
        else:
            out = bool(operands) and all(tile_local(o, seen) for o in operands)
        local_cache[v] = out
        return out

    found: dict[str, str] = {}
    for ptr in addptrs:
        _op, operands, ty, ptr_loc = defs[ptr]
        types = ty.split(", ")
        if len(operands) != 2 or len(types) != 2:
            continue
        base = operands[0]
        while base in defs and defs[base][0] in ("tt.addptr", "tt.splat", "tt.broadcast", "tt.expand_dims",
                                                 "scf.for.iter"):
            base = defs[base][1][0]
        if base.lstrip("%") in small:
            continue
        stack, seen = [operands[1]], set()
        while stack:
            v = stack.pop()
            if v in seen or v not in defs:
                continue
            seen.add(v)
            op, args, vty, vloc = defs[v]
            if op in _TTIR_PASS_THROUGH_STOP or "ptr" in vty:
                continue
            if op == "arith.muli" and _is_i32(vty) and len(args) == 2 and \
                    _loc_source(vloc, locs) not in _exempt_lines():
                consts = [defs.get(a, ("",))[0] == "arith.constant" for a in args]
                local = [tile_local(a, set()) for a in args]
                if any(from_index(a, set()) for a in args) or not (any(consts) or any(local)):
                    found.setdefault(v, f"{v} ({_loc_source(vloc, locs)}) = {args[0]} * {args[1]} in int32, "
                                        f"an offset of {base} ({_loc_source(ptr_loc, locs)})")
            stack.extend(args)
    return list(found.values())


def _offsets_task(task: tuple[SpecSource, int, str]) -> tuple[str, list[str] | str]:
    source, index, name = task
    try:
        specs = _load_specs(source)
        spec = specs[index] if specs is not None and index < len(specs) else None
        if spec is None or spec.name != name:
            return name, "the module's spec list changed during the run"
        from peftfast.kernels.runtime import int32_operands

        return name, int32_offsets(ttir_text(spec), int32_operands(spec.fn))
    except Exception as err:  # noqa: BLE001 - reported
        return name, f"{type(err).__name__}: {_short(str(err))}"


def offset_report(sources: list[SpecSource] | None = None, select=None, workers: int = 2,
                  progress: bool | None = None, one_per_key: bool = False) -> dict[str, list[str] | str]:
    """spec name -> its 32-bit offsets that can wrap (``int32_offsets``; a string: why the TTIR
    could not be built), for every spec of ``sources`` (default: all kernel modules) that
    ``select(name)`` keeps (default: all); ``one_per_key``: only the first spec of each ``index_key``
    (the same offsets in another dtype). TTIR only, no LLVM/ptxas: about 0.1-0.3 s per spec. The
    launched specs (kernels/launch_specs.py) are left out by default: the same kernels, some integer
    arguments turned into constants, no offset arithmetic of their own."""
    sources = discover_sources(launched=False) if sources is None else list(sources)
    env = {"TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")}
    out: dict[str, list[str] | str] = {}
    with _env(**env), ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        listings = list(pool.map(_list_source, sources))
        tasks = []
        for source, listing in zip(sources, listings):
            if "error" in listing:
                out[source.label] = listing["error"]
                continue
            keys_seen: set[str] = set()
            for index, (name, key) in enumerate(zip(listing.get("specs") or [], listing.get("index_keys") or [])):
                if (select is None or select(name)) and not (one_per_key and key in keys_seen):
                    tasks.append((source, index, name))
                keys_seen.add(key)
        for name, result in _map_with_progress(pool, _offsets_task, tasks, "TTIR offsets", "spec", progress):
            out[name] = result
    return out


# ----------------------------------------------------------------------------------------------
# parent side


def discover_sources(launched: bool = True) -> list[SpecSource]:
    """Every submodule of peftfast.kernels (except the plumbing); modules that do not exist yet
    are simply not listed. ``launched``: also ``LAUNCHED_MODULE`` (the specs recorded from the
    launchers at representative shapes per architecture, kernels/launch_specs.py)."""
    import peftfast.kernels as pkg

    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in SKIP_MODULES)
    return [SpecSource(module=f"{pkg.__name__}.{n}") for n in names if launched or n != LAUNCHED_MODULE]


def ci_sources() -> list[SpecSource]:
    """What the test suite compiles: every hand-written spec, and of the launched ones the subset of
    ``launch_specs.ci_specs`` (the whole list takes about an hour: the manual ``peftfast compile-report``)."""
    return discover_sources(launched=False) + [SpecSource(module=f"peftfast.kernels.{LAUNCHED_MODULE}",
                                                          factory="ci_specs")]


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
               workers: int = 2, sass: bool = False, progress: bool | None = None,
               only: str | None = None) -> Report:
    """Compile every spec of ``sources`` (default: all kernel modules) for every arch.
    ``progress``: a progress bar on stderr (None: only when stderr is a terminal).
    ``only``: a regular expression; only specs whose name it matches (``re.search``) are compiled
    (to check a few configs in seconds instead of the whole report)."""
    keep = None if only is None else re.compile(only)
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
                for index, (name, spec_archs) in enumerate(zip(listing["specs"], listing["archs"])):
                    if keep is not None and not keep.search(name):
                        continue
                    if name in seen:
                        problems.append(f"spec name {name!r} used by {seen[name]} and {source.label}")
                    seen[name] = source.label
                    # a spec naming its architectures (a launch recorded for one GPU) is built for those only
                    tasks += [(source, index, name, arch, sass) for arch in archs
                              if not spec_archs or arch in spec_archs]
            rows = _map_with_progress(pool, _compile_task, tasks, "compiling", "compile", progress)
    except BrokenProcessPool as err:
        problems.append(f"a compile worker died ({err}); check that `import peftfast` works")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if not rows and not problems:
        problems.append("no AotSpec found: no kernel module defines aot_specs()" if keep is None
                        else f"no spec name matches --only {only!r}")
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
                        help="only this kernel module of peftfast.kernels, e.g. lycoris, or launch_specs (the "
                             "launches of representative shapes per architecture; repeatable; default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows, versions and git sha as JSON")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", metavar="REGEX",
                        help="compile only the specs whose name matches this regular expression (re.search)")
    parser.add_argument("--sass", action="store_true", help="also require tensor-core instructions in the SASS")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar with ETA on stderr (default: when stderr is a terminal)")
    args = parser.parse_args(argv)
    sources = None if not args.module else [SpecSource(module=f"peftfast.kernels.{m}") for m in args.module]
    report = run_report(sources, archs=tuple(args.arch or ARCHS), workers=args.workers, sass=args.sass,
                        progress=args.progress, only=args.only)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report_json(report), indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
