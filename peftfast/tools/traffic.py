"""Count kernel launches and bytes moved by an op, on CPU.

Two counters, usable alone or nested:

``count_torch()``
    A ``TorchDispatchMode`` that sees every aten op a PyTorch path runs (forward, and backward
    when ``.backward()`` is called inside the block). Each op that would be a kernel on a GPU
    counts as one launch, reading the bytes of its tensor inputs and writing the bytes of its
    tensor outputs. Views and metadata ops (``view``, ``t``, ``transpose``, ``expand``,
    ``as_strided``, ``detach``, ``_unsafe_view``, allocations such as ``empty``, ...) count zero
    bytes and zero launches. A tensor's bytes are its distinct elements (a broadcast dimension
    of stride 0 counts once) times the element size. This is the traffic of an eager GPU run in
    which every op streams its operands through DRAM once, the right model at the large shapes
    the cost model predicts (activations much larger than L2).

``count_triton()``
    Instruments Triton's interpreter (``TRITON_INTERPRET=1``): every grid launch counts once,
    and every ``tl.load`` / ``tl.store`` (plus atomics and tensor-descriptor accesses, which
    go through the same builder calls) adds the bytes of its *masked-in* elements. Two figures
    are kept per launch: ``bytes_read`` / ``bytes_written`` are what the program instances
    requested (a tile re-read by several programs counts each time; on a GPU most of those
    re-reads hit L2), and ``unique_bytes_read`` / ``unique_bytes_written`` are the distinct
    addresses touched, i.e. the compulsory DRAM traffic of the launch. The cost model is
    checked against the unique figures.

While a Triton kernel runs under the interpreter, the torch ops the interpreter itself issues
(host copies of the arguments) are not counted by ``count_torch``, so nesting both counters
around a Triton path gives its launches and the torch ops between them.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# aten ops that only create views, change metadata or allocate: no kernel runs on a GPU.
_FREE_OPS = frozenset([
    "alias", "as_strided", "detach", "expand", "lift_fresh", "narrow", "permute", "select", "slice",
    "split", "split_with_sizes", "squeeze", "t", "transpose", "unbind", "unflatten", "unsqueeze",
    "view", "view_as", "_unsafe_view", "_reshape_alias", "diagonal", "movedim", "unfold", "real",
    "imag", "view_as_real", "view_as_complex", "_conj", "_neg_view", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_", "_local_scalar_dense",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "prim_layout",
])

# In-place ops that overwrite ``self`` without reading it.
_WRITE_ONLY_SELF = frozenset([
    "copy_", "fill_", "zero_", "uniform_", "normal_", "bernoulli_", "random_", "exponential_",
    "geometric_", "cauchy_", "log_normal_",
])


@dataclass
class KernelTraffic:
    """Totals for one kernel (Triton) or one aten op overload (PyTorch)."""

    launches: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    unique_bytes_read: int = 0
    unique_bytes_written: int = 0

    def add(self, other: KernelTraffic | Launch) -> None:
        self.launches += 1 if isinstance(other, Launch) else other.launches
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written
        self.unique_bytes_read += other.unique_bytes_read
        self.unique_bytes_written += other.unique_bytes_written


@dataclass
class Launch:
    """One kernel launch (Triton grid launch or one aten op), in execution order."""

    name: str
    bytes_read: int = 0
    bytes_written: int = 0
    unique_bytes_read: int = 0  # torch ops: equal to bytes_read
    unique_bytes_written: int = 0
    grid: tuple[int, int, int] | None = None  # Triton only
    scalar_only: bool = False  # torch op on 0-dim tensors only (e.g. a seed drawn on the host)


@dataclass
class Traffic:
    """What a ``count_torch()`` / ``count_triton()`` block saw."""

    kind: str  # "torch" or "triton"
    launch_log: list[Launch] = field(default_factory=list)

    @property
    def launches(self) -> int:
        return len(self.launch_log)

    @property
    def bytes_read(self) -> int:
        return sum(x.bytes_read for x in self.launch_log)

    @property
    def bytes_written(self) -> int:
        return sum(x.bytes_written for x in self.launch_log)

    @property
    def unique_bytes_read(self) -> int:
        return sum(x.unique_bytes_read for x in self.launch_log)

    @property
    def unique_bytes_written(self) -> int:
        return sum(x.unique_bytes_written for x in self.launch_log)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def unique_bytes(self) -> int:
        return self.unique_bytes_read + self.unique_bytes_written

    @property
    def per_kernel(self) -> dict[str, KernelTraffic]:
        out: dict[str, KernelTraffic] = {}
        for launch in self.launch_log:
            out.setdefault(launch.name, KernelTraffic()).add(launch)
        return out

    def table(self) -> str:
        """Per-kernel breakdown as fixed-width text."""
        head = f"{'kernel':<44} {'launches':>8} {'read B':>12} {'written B':>12} {'uniq read':>12} {'uniq wr':>12}"
        lines = [head, "-" * len(head)]
        for name, k in self.per_kernel.items():
            lines.append(
                f"{name:<44} {k.launches:>8} {k.bytes_read:>12} {k.bytes_written:>12} "
                f"{k.unique_bytes_read:>12} {k.unique_bytes_written:>12}"
            )
        lines.append(
            f"{'total':<44} {self.launches:>8} {self.bytes_read:>12} {self.bytes_written:>12} "
            f"{self.unique_bytes_read:>12} {self.unique_bytes_written:>12}"
        )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# PyTorch: dispatch-mode counter


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t``: broadcast (stride-0) dimensions count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
        elif size == 0:
            n = 0
    return n * t.element_size()


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


class _TorchTrafficMode(TorchDispatchMode):
    def __init__(self, result: Traffic) -> None:
        super().__init__()
        self.result = result

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _STATE.interpreting_kernel > 0:
            return out
        name = func.overloadpacket.__name__
        if getattr(func, "is_view", False) or name in _FREE_OPS:
            return out
        read_args = list(args)
        if name in _WRITE_ONLY_SELF and read_args:
            read_args = read_args[1:]
        read_kwargs = {k: v for k, v in kwargs.items() if k != "out"}
        inputs, outputs = _tensors((read_args, read_kwargs)), _tensors(out)
        read = sum(tensor_bytes(t) for t in inputs)
        written = sum(tensor_bytes(t) for t in outputs)
        scalar = all(t.dim() == 0 for t in inputs + outputs)
        self.result.launch_log.append(Launch(str(func), read, written, read, written, scalar_only=scalar))
        return out


@contextlib.contextmanager
def count_torch() -> Iterator[Traffic]:
    """Count the aten ops run inside the block (wrap ``loss.backward()`` too for the backward)."""
    result = Traffic("torch")
    with _interpreter_patched(), _TorchTrafficMode(result):
        yield result


# ----------------------------------------------------------------------------------------------
# Triton: interpreter instrumentation


class _State(threading.local):
    def __init__(self) -> None:
        self.interpreting_kernel = 0
        self.launch: _OpenLaunch | None = None


class _OpenLaunch:
    """Accumulates one grid launch while it runs."""

    def __init__(self, name: str) -> None:
        self.launch = Launch(name)
        self.read_addrs: dict[int, list[np.ndarray]] = {}  # element size -> masked-in addresses
        self.write_addrs: dict[int, list[np.ndarray]] = {}

    def access(self, ptrs: np.ndarray, mask: np.ndarray, itemsize: int, write: bool) -> None:
        mask = np.broadcast_to(np.asarray(mask, dtype=bool), ptrs.shape)
        addrs = np.asarray(ptrs)[mask]
        nbytes = int(addrs.size) * itemsize
        if write:
            self.launch.bytes_written += nbytes
            self.write_addrs.setdefault(itemsize, []).append(addrs.ravel())
        else:
            self.launch.bytes_read += nbytes
            self.read_addrs.setdefault(itemsize, []).append(addrs.ravel())

    def close(self) -> Launch:
        def unique(groups: dict[int, list[np.ndarray]]) -> int:
            return sum(int(np.unique(np.concatenate(v)).size) * size for size, v in groups.items() if v)

        self.launch.unique_bytes_read = unique(self.read_addrs)
        self.launch.unique_bytes_written = unique(self.write_addrs)
        return self.launch


_STATE = _State()
_TRITON_RESULTS: list[Traffic] = []  # open count_triton() blocks (any thread)
_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = 0
_ORIGINALS: dict[str, object] = {}


def _itemsize(ptrs) -> int:
    from triton.runtime.interpreter import _get_np_dtype

    return np.dtype(_get_np_dtype(ptrs.get_element_ty())).itemsize


def _install() -> None:
    from triton.runtime import interpreter as interp

    builder_cls = interp.InterpreterBuilder
    grid_cls = interp.GridExecutor
    _ORIGINALS.update(
        call=grid_cls.__call__,
        load=builder_cls.create_masked_load,
        store=builder_cls.create_masked_store,
        rmw=builder_cls.create_atomic_rmw,
        cas=builder_cls.create_atomic_cas,
        set_grid_dim=builder_cls.set_grid_dim,
    )

    def call(self, *args, **kwargs):
        outer = _STATE.launch
        _STATE.launch = _OpenLaunch(getattr(self.fn, "__name__", "triton_kernel"))
        _STATE.interpreting_kernel += 1
        try:
            return _ORIGINALS["call"](self, *args, **kwargs)
        finally:
            _STATE.interpreting_kernel -= 1
            launch = _STATE.launch.close()
            _STATE.launch = outer
            for result in _TRITON_RESULTS:
                result.launch_log.append(launch)

    def set_grid_dim(self, nx, ny, nz):
        if _STATE.launch is not None:
            _STATE.launch.launch.grid = (int(nx), int(ny), int(nz))
        return _ORIGINALS["set_grid_dim"](self, nx, ny, nz)

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        if _STATE.launch is not None:
            _STATE.launch.access(ptrs.data, mask.data, _itemsize(ptrs), write=False)
        return _ORIGINALS["load"](self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        if _STATE.launch is not None:
            _STATE.launch.access(ptrs.data, mask.data, _itemsize(ptrs), write=True)
        return _ORIGINALS["store"](self, ptrs, value, mask, cache_policy)

    def rmw(self, rmwOp, ptr, val, mask, sem, scope):
        if _STATE.launch is not None:
            _STATE.launch.access(ptr.data, mask.data, _itemsize(ptr), write=False)
            _STATE.launch.access(ptr.data, mask.data, _itemsize(ptr), write=True)
        return _ORIGINALS["rmw"](self, rmwOp, ptr, val, mask, sem, scope)

    def cas(self, ptr, cmp, val, sem, scope):
        if _STATE.launch is not None:
            every = np.ones(np.shape(ptr.data), dtype=bool)
            _STATE.launch.access(ptr.data, every, _itemsize(ptr), write=False)
            _STATE.launch.access(ptr.data, every, _itemsize(ptr), write=True)
        return _ORIGINALS["cas"](self, ptr, cmp, val, sem, scope)

    grid_cls.__call__ = call
    builder_cls.create_masked_load = load
    builder_cls.create_masked_store = store
    builder_cls.create_atomic_rmw = rmw
    builder_cls.create_atomic_cas = cas
    builder_cls.set_grid_dim = set_grid_dim


def _uninstall() -> None:
    from triton.runtime import interpreter as interp

    interp.GridExecutor.__call__ = _ORIGINALS["call"]
    interp.InterpreterBuilder.create_masked_load = _ORIGINALS["load"]
    interp.InterpreterBuilder.create_masked_store = _ORIGINALS["store"]
    interp.InterpreterBuilder.create_atomic_rmw = _ORIGINALS["rmw"]
    interp.InterpreterBuilder.create_atomic_cas = _ORIGINALS["cas"]
    interp.InterpreterBuilder.set_grid_dim = _ORIGINALS["set_grid_dim"]
    _ORIGINALS.clear()


@contextlib.contextmanager
def _interpreter_patched() -> Iterator[None]:
    """Install the interpreter hooks for the duration of the block (reference counted)."""
    global _PATCH_DEPTH
    try:
        import triton.runtime.interpreter  # noqa: F401
    except ImportError:  # no triton: nothing to instrument, torch counting still works
        yield
        return
    with _PATCH_LOCK:
        if _PATCH_DEPTH == 0:
            _install()
        _PATCH_DEPTH += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _PATCH_DEPTH -= 1
            if _PATCH_DEPTH == 0:
                _uninstall()


@contextlib.contextmanager
def count_triton() -> Iterator[Traffic]:
    """Count Triton grid launches and their masked-in loads/stores inside the block.

    Only kernels run by the interpreter are seen: set ``TRITON_INTERPRET=1`` before the kernel
    modules are imported. Launches compiled for a GPU are invisible here.
    """
    result = Traffic("triton")
    with _interpreter_patched():
        _TRITON_RESULTS.append(result)
        try:
            yield result
        finally:
            _TRITON_RESULTS.remove(result)
