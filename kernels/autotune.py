"""Measured dispatch: which implementation of an op runs for a shape is timed once, not assumed.

An op with several implementations of the same math (``lora_linear_fused``: the base GEMM and the
adapters in one Triton kernel, or torch's base matmul followed by lora.py's adapter kernels) asks
``TUNER.choose(device, key, candidates, default)``. The first time a key is seen on a CUDA device,
each candidate runs ``WARMUP`` times (compiling its kernels), then ``REPEATS`` times between CUDA
events; the one with the smallest median wins, except that another candidate must beat the default
by more than ``MARGIN`` (timing noise does not flip a choice). The decision is kept in memory and
written to a JSON file per GPU name and package version, so a later process reuses it.

Key: (op, shape, dtypes, mode) as the op builds it, e.g. ``lora_linear_fused``'s (tokens rounded up
to a power of two, d_out, d_in, total rank, adapters), (x dtype, adapter dtype), and whether a
backward (with or without dX) and dropout are part of the step. The device name is the file's.

Never measured (the default runs, nothing is timed or written):

* ``PEFTFAST_AUTOTUNE=0`` (a deterministic choice; ``1`` or unset: measure);
* anything but a CUDA device: CPU tensors, Triton's interpreter;
* while a CUDA stream is being captured into a graph, or under ``torch.compile`` tracing
  (a decision already made for the key is still used during a capture).

A candidate that raises is recorded as failed (``inf``) and never chosen; when every candidate fails
the default is used (the real call then reports its own error) and the decision is kept in memory only
(a later process measures again). Timing runs on the current stream
with the caller's tensors (read only) and synchronises once per measured key.

Cache file: ``$PEFTFAST_CACHE_DIR`` or ``~/.cache/peftfast``, named ``dispatch-<gpu>-<version>.json``,
holding the GPU name, peftfast, torch and triton versions and one entry per key (choice and the
measured ms of every candidate). A file that cannot be read, is not JSON, is larger than
``MAX_FILE_BYTES`` or was written for another GPU or other versions is ignored (and replaced on the
next write); entries of the wrong form are skipped one by one. Writes go to a temporary file in the
same folder, then ``os.replace``: a reader never sees half a file. A folder that cannot be written
keeps the decisions in memory only (one warning).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import re
import statistics
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from .backend import interpreting

ENV_AUTOTUNE = "PEFTFAST_AUTOTUNE"
ENV_CACHE_DIR = "PEFTFAST_CACHE_DIR"
FORMAT = 1
FILE_KIND = "peftfast-dispatch"
MAX_FILE_BYTES = 4 << 20
WARMUP = 3  # runs before timing: the first compiles the candidate's kernels
REPEATS = 10  # timed runs; the median counts
MARGIN = 0.02  # another candidate must be > 2% faster than the default to replace it

__all__ = ["Decision", "ENV_AUTOTUNE", "ENV_CACHE_DIR", "Timer", "Tuner", "TUNER", "autotune_enabled",
           "bucket", "cache_dir", "cuda_event_timer", "device_name", "may_measure", "package_version", "tunable"]


def autotune_enabled() -> bool:
    """``PEFTFAST_AUTOTUNE``: unset, empty or ``1`` -> measure; ``0`` -> the default of each op."""
    value = os.environ.get(ENV_AUTOTUNE, "1").strip()
    if value in ("", "1"):
        return True
    if value == "0":
        return False
    raise ValueError(f"{ENV_AUTOTUNE}={value!r} is not allowed: use 1 (measure the candidate paths, the default) "
                     "or 0 (always the default path)")


def tunable(device: torch.device) -> bool:
    """Whether ops on ``device`` follow measured decisions: a CUDA device with ``PEFTFAST_AUTOTUNE`` not 0."""
    return device.type == "cuda" and autotune_enabled()


def may_measure(device: torch.device) -> bool:
    """Whether candidates may be timed on ``device`` now: a CUDA device outside Triton's interpreter, not
    during a CUDA graph capture, not under torch.compile tracing."""
    return (device.type == "cuda" and not interpreting() and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def bucket(n: int) -> int:
    """The smallest power of two >= n (0 for 0): keys group token counts, which vary from call to call."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def detached_step(tensors: list, out_shape: tuple, like: torch.Tensor) -> tuple[list, Callable[[Any], None]]:
    """What a candidate runs on: ``tensors`` (None allowed) as fresh leaves, detached from the caller's, requiring
    grad where theirs do (with grad mode on), and ``backward(y)``, the gradients of those leaves for one random dY
    of ``out_shape`` (``like``'s dtype and device, seed 0; nothing without such leaves). No .grad is written and
    nothing the caller holds changes."""
    grad = torch.is_grad_enabled()
    leaves = [None if t is None else t.detach().requires_grad_(grad and t.requires_grad) for t in tensors]
    needed = [t for t in leaves if t is not None and t.requires_grad]
    dy = None
    if needed:
        gen = torch.Generator(device=like.device).manual_seed(0)
        dy = torch.randn(*out_shape, dtype=like.dtype, device=like.device, generator=gen)

    def backward(y) -> None:
        if needed:
            torch.autograd.grad(y, needed, dy)

    return leaves, backward


def grad_needs(x: torch.Tensor, bias: Optional[torch.Tensor], weights: list) -> tuple[bool, bool]:
    """(x needs a gradient, the step needs a backward at all) for a call of an op on x, bias and adapter weights,
    under the current grad mode: the step part of a dispatch key."""
    grad = torch.is_grad_enabled()
    need_x = grad and x.requires_grad
    need_params = grad and (any(t.requires_grad for t in weights) or (bias is not None and bias.requires_grad))
    return need_x, need_x or need_params


def measured_choice(device: torch.device, key: tuple, candidates: Callable[[], Mapping[str, Callable[[], object]]],
                    default: str) -> str:
    """The choice for ``key`` on ``device`` (a tunable one): the decision already made, else ``default`` where
    nothing may be timed now (``may_measure``), else the candidates (made by ``candidates()``) timed by ``TUNER``
    with the caller's RNG state left as it was (their dropout seeds)."""
    name = device_name(device)
    known = TUNER.lookup(name, key)
    if known is not None:
        return known.choice
    if not may_measure(device):
        return default
    with torch.random.fork_rng(devices=[]):
        return TUNER.choose(name, key, candidates(), default).choice


_NAMES: dict[Any, str] = {}


def device_name(device: torch.device) -> str:
    """The GPU's name (``torch.cuda.get_device_name``); the device type for anything else."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = _NAMES.get(index)
    if name is None:
        name = _NAMES[index] = torch.cuda.get_device_name(index)
    return name


def package_version() -> str:
    try:
        return importlib.metadata.version("peftfast")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _triton_version() -> str:
    try:
        import triton
    except Exception:  # noqa: BLE001 - no triton: nothing is measured anyway
        return "none"
    return str(getattr(triton, "__version__", "unknown"))


def cache_dir() -> Path:
    value = os.environ.get(ENV_CACHE_DIR, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "peftfast"


class Timer(Protocol):
    def __call__(self, fn: Callable[[], object], warmup: int, repeats: int) -> float:
        """Milliseconds one call of ``fn`` takes (after ``warmup`` untimed calls)."""


def cuda_event_timer(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """The median of ``repeats`` CUDA-event timings of ``fn`` on the current stream, in ms."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    events[-1][1].synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


@dataclass(frozen=True)
class Decision:
    choice: str
    ms: Mapping[str, float] = field(default_factory=dict)  # per candidate; inf: it failed
    source: str = "measured"  # "measured" (this process) or "cache file"


def _key_text(key: tuple) -> str:
    return json.dumps(list(key), separators=(",", ":"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unnamed"


class Tuner:
    """Decisions per (device name, key): in memory, and in one JSON file per device name under ``directory``
    (default: ``cache_dir()`` when first needed). ``timer`` measures one candidate (default:
    ``cuda_event_timer``)."""

    def __init__(self, timer: Optional[Timer] = None, directory: Optional[Path] = None,
                 version: Optional[str] = None, warmup: int = WARMUP, repeats: int = REPEATS,
                 margin: float = MARGIN):
        self.timer, self.warmup, self.repeats, self.margin = timer, warmup, repeats, margin
        self._directory = None if directory is None else Path(directory)
        self._version = version
        self._lock = threading.RLock()
        # device -> key -> decision, for the keys this process decided or looked up (in that order)
        self._memory: dict[str, dict[tuple, Decision]] = {}
        self._files: dict[str, dict[str, Decision]] = {}  # device -> key text -> decision read from its file
        self._warned = False

    # -- files ---------------------------------------------------------------------------------
    @property
    def version(self) -> str:
        if self._version is None:
            self._version = package_version()
        return self._version

    def path(self, device: str) -> Path:
        directory = self._directory if self._directory is not None else cache_dir()
        return directory / f"dispatch-{_slug(device)}-{_slug(self.version)}.json"

    def _header(self, device: str) -> dict:
        return {"kind": FILE_KIND, "format": FORMAT, "device": device, "peftfast": self.version,
                "torch": torch.__version__, "triton": _triton_version()}

    def _read(self, device: str) -> dict[str, Decision]:
        """The file's decisions for ``device``; {} for a missing, unreadable, corrupt or foreign file."""
        path = self.path(device)
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                return {}
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or any(data.get(k) != v for k, v in self._header(device).items()):
            return {}
        entries = data.get("entries")
        out = {}
        for text, entry in (entries.items() if isinstance(entries, dict) else ()):
            if not (isinstance(entry, dict) and isinstance(entry.get("choice"), str)
                    and isinstance(entry.get("ms"), dict)):
                continue
            ms = {k: float(v) if isinstance(v, (int, float)) else math.inf for k, v in entry["ms"].items()
                  if isinstance(k, str) and (isinstance(v, (int, float)) or v is None)}
            if entry["choice"] in ms:
                out[text] = Decision(entry["choice"], ms, "cache file")
        return out

    def _write(self, device: str) -> None:
        """Merge this process's decisions for ``device`` into its file (atomic replace)."""
        path = self.path(device)
        entries = {**self._read(device), **{_key_text(k): d for k, d in self._memory.get(device, {}).items()}}
        data = {**self._header(device), "entries": {
            text: {"choice": d.choice, "ms": {k: (v if math.isfinite(v) else None) for k, v in d.ms.items()}}
            for text, d in entries.items()}}
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
            tmp = None
        except OSError as err:
            if not self._warned:
                self._warned = True
                warnings.warn(f"peftfast could not write its dispatch cache {path} ({err}); the measured choices "
                              f"are kept for this process only (set {ENV_CACHE_DIR} to a writable folder)",
                              RuntimeWarning, stacklevel=3)
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    # -- decisions -----------------------------------------------------------------------------
    def lookup(self, device: str, key: tuple) -> Optional[Decision]:
        """The decision for ``key`` on ``device`` (reading the device's file the first time), or None."""
        known = self._memory.get(device, {}).get(key)  # the per-call path: one dict lookup
        if known is not None:
            return known
        with self._lock:
            if device not in self._files:
                self._files[device] = self._read(device)
            decision = self._files[device].get(_key_text(key))
            if decision is not None:
                self._memory.setdefault(device, {})[key] = decision
            return decision

    def choose(self, device: str, key: tuple, candidates: Mapping[str, Callable[[], object]],
               default: str) -> Decision:
        """The decision for ``key``: the stored one when it names a candidate, else each candidate timed
        (``timer``) and the fastest kept (``pick``), in memory and in the device's file."""
        if default not in candidates:
            raise ValueError(f"the default {default!r} is not one of the candidates {sorted(candidates)}")
        with self._lock:
            known = self.lookup(device, key)
            if known is not None and known.choice in candidates:
                return known
            ms = {}
            for name, fn in candidates.items():
                try:
                    ms[name] = float((self.timer or cuda_event_timer)(fn, self.warmup, self.repeats))
                except Exception:  # noqa: BLE001 - a candidate that cannot run is never chosen
                    ms[name] = math.inf
                if not ms[name] == ms[name]:  # NaN
                    ms[name] = math.inf
            decision = Decision(self.pick(ms, default), ms, "measured")
            self._memory.setdefault(device, {})[key] = decision
            if any(math.isfinite(v) for v in ms.values()):  # all failed (e.g. out of memory): not kept on disk
                self._write(device)
            return decision

    def pick(self, ms: Mapping[str, float], default: str) -> str:
        """The fastest candidate; the default unless another beats it by more than the margin; the default
        when all failed."""
        best = min(ms, key=lambda name: (ms[name], name != default))
        if not math.isfinite(ms[best]):
            return default
        if best != default and ms[best] * (1 + self.margin) >= ms.get(default, math.inf):
            return default
        return best

    def decisions(self) -> list[tuple[str, tuple, Decision]]:
        """(device, key, decision) for every key this process decided or looked up, in first-use order."""
        with self._lock:
            return [(device, key, d) for device, keys in self._memory.items() for key, d in keys.items()]

    def clear(self) -> None:
        """Forget the in-memory decisions (the files stay)."""
        with self._lock:
            self._memory.clear()
            self._files.clear()


TUNER = Tuner()  # the process's decisions (ops look them up here)
