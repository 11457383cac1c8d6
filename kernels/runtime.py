"""What every launcher shares: the backend choice, launching on the input's device, dtype names,
the dot precision rule and the ahead-of-time signature builder.

Backend: ``backend.use_triton`` (CUDA tensors + Triton -> the kernels, else the PyTorch
reference; ``PEFTFAST_BACKEND`` overrides), re-exported here.

Launch on the input's device: Triton launches on the *current* CUDA device, which is not
necessarily the device of the tensors (a model split over two GPUs). ``launch(kernel, grid, ...)``
makes the first tensor argument's device current for the launch; on CPU tensors (the
interpreter) it launches directly. Cost: one device switch per launch on CUDA, nothing on CPU.

Target GPU (``gpu_target(device)``): the compute capability and SM count a launcher may choose a
config by (``torch.cuda`` for a CUDA device; else the reference GPU of ``REFERENCE_GPUS``, sm_90, or
the one ``recording_launches`` pretends). Recording (``recording_launches(arch)``): inside the block
``launch`` records each launch instead of running it, on any tensors (meta ones too), as if on the
reference GPU of ``arch``; the compile report derives the configs it compiles from these records
(kernels/launch_specs.py).

Dot precision (``dot_precision(act, operand)``): 16-bit operands use the tensor cores natively
(the precision argument is ignored for them); fp32 operands use 3xTF32 (~fp32 accuracy, as torch's
default fp32 matmul), in an fp32 model and next to a 16-bit one alike (PEFT's fp32 adapters: PEFT
computes them in full fp32, and plain TF32 put their gradients ~100-300x past the float64 bound the
tests hold the kernels to). The adapter dots are a small share of a layer's work.
"""
from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch

from .backend import backend_name, interpreting, triton_available, use_triton

__all__ = ["DTYPE_NAMES", "INT32_LIMIT", "REFERENCE_GPUS", "GpuTarget", "Launch", "aot_signature", "as_2d",
           "backend_name", "check_grid", "check_not_capturing",
           "declare_int32_operands", "dot_precision", "gpu_target", "int32_operands", "interpreting", "kernel_name",
           "launch", "launch_stream", "recording_launches",
           "on_device", "records_weight_grad", "triton_available", "use_triton"]

INT32_LIMIT = 2**31  # offsets into a declared-small operand stay below this (elements)
# kernel name -> pointer arguments whose offsets the kernel computes in int32 (see declare_int32_operands)
_INT32_OPERANDS: dict[str, tuple[str, ...]] = {}

def records_weight_grad(weight: torch.Tensor) -> bool:
    """Whether autograd would want ``weight``'s gradient from an op called now: it requires grad and autograd
    records (not under ``no_grad`` / ``inference_mode``). The fused ops compute no weight gradient, so they refuse
    such a weight; under ``no_grad`` they take one (FSDP's views of a flat parameter require grad even for a
    frozen weight)."""
    return weight.requires_grad and torch.is_grad_enabled()


# Triton's names of the activation / adapter dtypes (AOT signatures and spec names)
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dot_precision(act: torch.dtype, operand: torch.dtype | None = None) -> str:
    """``input_precision`` of a ``tl.dot`` on ``operand``-dtype operands in a model of dtype ``act``
    (operand defaults to act): "tf32x3" for fp32 operands, else "tf32", which 16-bit operands ignore
    (see the module doc)."""
    operand = act if operand is None else operand
    if operand != torch.float32:
        return "tf32"  # 16-bit operands: ignored (native tensor-core products)
    return "tf32x3"


def aot_signature(fn, types: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    """Every argument of the jitted ``fn`` in order: "constexpr" for those in ``constexprs``, the
    given type (pointers: "*fp16", ...; scalars: "i64", "fp32") or "i32" (sizes and strides)."""
    return {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}


def as_2d(t: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [rows, d] (a view when possible; the tensor itself when already 2-D)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def on_device(t: torch.Tensor):
    """A context making ``t``'s CUDA device current (a no-op context for CPU tensors)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def kernel_name(kernel) -> str:
    """A kernel's function name (a JIT or interpreted function, or the name itself)."""
    if isinstance(kernel, str):
        return kernel
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(fn))


def declare_int32_operands(kernel, *names: str):
    """Declare that ``kernel`` computes offsets into the pointer arguments ``names`` in int32 (small
    tensors: adapter weights, tables, counters). ``launch`` then checks on every call that each such
    tensor's largest offset is below 2**31 elements, and the compile report's int32-offset check
    (peftfast.tools.compile_report.int32_offsets) skips them. Returns the kernel."""
    unknown = [n for n in names if n not in kernel.arg_names]
    if unknown:
        raise ValueError(f"{kernel_name(kernel)} has no argument(s) {unknown}; arguments: {kernel.arg_names}")
    _INT32_OPERANDS[kernel_name(kernel)] = tuple(names)
    return kernel


def int32_operands(kernel) -> tuple[str, ...]:
    """The pointer arguments ``kernel`` declared with ``declare_int32_operands`` (empty when none)."""
    return _INT32_OPERANDS.get(kernel_name(kernel), ())


def _check_int32_operands(kernel, args) -> None:
    names = int32_operands(kernel)
    if not names:
        return
    for name, value in zip(kernel.arg_names, args):
        if name in names and isinstance(value, torch.Tensor):
            span = sum((n - 1) * abs(s) for n, s in zip(value.shape, value.stride()) if n > 0)
            if span >= INT32_LIMIT:
                raise ValueError(f"{kernel_name(kernel)}: operand {name} {tuple(value.shape)} with strides "
                                 f"{value.stride()} spans {span} elements; this kernel addresses it with 32-bit "
                                 f"offsets (at most {INT32_LIMIT - 1})")


# CUDA's grid limits: x up to 2**31 - 1 programs, y and z up to 65535
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def check_grid(kernel, grid) -> tuple[int, ...]:
    """The grid as a tuple, after checking it against CUDA's limits (a ValueError naming the axis)."""
    grid = tuple(int(g) for g in grid)
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"{kernel_name(kernel)}: a grid has 1 to 3 axes, got {grid}")
    for axis, (n, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if n > limit:
            raise ValueError(f"{kernel_name(kernel)}: grid {grid} has {n} programs on axis {axis}; CUDA allows at "
                             f"most {limit} there (rows go on axis 0)")
    return grid


def launch_stream(device: torch.device) -> int:
    """The raw CUDA stream a launch on ``device`` runs on (what Triton launches on while ``device``
    is current: that device's current torch stream); 0 for a CPU device (the interpreter). Per-stream
    state (tiles.epoch_counters) is keyed by this."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def check_not_capturing(device: torch.device) -> None:
    """Refuse a launch while ``device``'s current stream is being captured into a CUDA graph
    (``torch.cuda.graphs`` / ``torch.compile(mode="reduce-overhead")``): the launches read tables
    built from host lists, grow and reuse arrival-counter buffers that a replay would find in another
    state, and take a dropout seed drawn on the host, so a replayed graph would be wrong."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("peftfast's Triton kernels cannot be captured in a CUDA graph (torch.cuda.graph, "
                           "torch.compile(mode='reduce-overhead')): they copy host tables, reuse per-stream arrival "
                           "counters and draw dropout seeds on the host. Capture without them (e.g. "
                           "PEFTFAST_BACKEND=torch, or torch.compile with mode='default' / 'max-autotune-no-cudagraphs')")


class GpuTarget(NamedTuple):
    name: str
    arch: int  # compute capability, e.g. 86
    sms: int  # streaming multiprocessors


# compute capability -> the GPU a launch is planned for when the device is not a CUDA one (the interpreter,
# meta tensors) or while recording: the flagship of each architecture the kernels are built for
REFERENCE_GPUS = {80: GpuTarget("A100", 80, 108), 86: GpuTarget("RTX 3090", 86, 82),
                  89: GpuTarget("RTX 4090", 89, 128), 90: GpuTarget("H100 SXM", 90, 132)}
DEFAULT_ARCH = 90


class Launch(NamedTuple):
    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    meta: dict


_RECORDING: list = []  # [(target, list of Launch)] while recording_launches is active (innermost last)
_TARGETS: dict = {}


def gpu_target(device: torch.device) -> GpuTarget:
    """The GPU launches on ``device`` are planned for: the CUDA device's capability and SM count; the
    recorded architecture's reference GPU while ``recording_launches``; else REFERENCE_GPUS[90]."""
    if _RECORDING:
        return _RECORDING[-1][0]
    if device.type != "cuda":
        return REFERENCE_GPUS[DEFAULT_ARCH]
    index = device.index if device.index is not None else torch.cuda.current_device()
    target = _TARGETS.get(index)
    if target is None:
        props = torch.cuda.get_device_properties(index)
        target = _TARGETS[index] = GpuTarget(props.name, props.major * 10 + props.minor, props.multi_processor_count)
    return target


@contextlib.contextmanager
def recording_launches(arch: int = DEFAULT_ARCH):
    """Inside the block, ``launch`` appends a ``Launch`` to the yielded list instead of running the
    kernel (after the same grid and operand checks), and ``gpu_target`` is ``REFERENCE_GPUS[arch]``:
    the launchers plan as they would on that GPU. Works on meta tensors (nothing is computed; outputs
    stay uninitialised)."""
    if arch not in REFERENCE_GPUS:
        raise ValueError(f"arch {arch} has no reference GPU; allowed: {sorted(REFERENCE_GPUS)}")
    launches: list[Launch] = []
    _RECORDING.append((REFERENCE_GPUS[arch], launches))
    try:
        yield launches
    finally:
        _RECORDING.pop()


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` under the device of the first tensor argument, after checking the
    grid against CUDA's limits (``check_grid``) and the declared int32 operands' sizes
    (``declare_int32_operands``); only recorded inside ``recording_launches``."""
    grid = check_grid(kernel, grid)
    _check_int32_operands(kernel, args)
    if _RECORDING:
        _RECORDING[-1][1].append(Launch(kernel, grid, args, meta))
        return
    t = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if t is not None and t.is_cuda:
        check_not_capturing(t.device)
        with torch.cuda.device(t.device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)
