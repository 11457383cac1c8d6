"""What each kernel module declares for ahead-of-time compilation checks.

A kernel module with Triton kernels exposes ``aot_specs() -> list[AotSpec]``: one entry per
kernel x launch config x dtype that the launcher can actually use. The compile report
(``peftfast compile-report``) builds every entry for sm_80, sm_86, sm_89 and sm_90 (or the
architectures the entry names) and checks registers, spills, shared memory and tensor-core
instructions.

Hand-written entries leave every pointer and integer argument unspecialised (the worst case for
registers: no 16-byte vector accesses). At run time Triton specialises each call on its argument
values: an integer equal to 1 becomes a constant, and a pointer whose address or an integer whose
value is divisible by 16 is compiled with ``tt.divisibility = 16`` (wider loads, other register
use). ``spec_from_launch`` turns one launch (kernel, arguments, meta-parameters) into the entry
Triton itself would compile for it, with Triton's own argument binder: kernels/launch_specs.py
records the launches of representative shapes on each architecture and compiles those.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AotSpec:
    name: str  # human-readable, unique, e.g. "lora_shrink[fp16,BM=64,BK=64,BR=16]"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]  # every argument -> "*fp16", "*bf16", "*fp32", "*u8", "*i8", "i32", "i64", "fp32", "constexpr"
    constexprs: dict[str, Any] = field(default_factory=dict)  # values of the "constexpr" arguments
    num_warps: int = 4
    num_stages: int = 3
    uses_dot: bool = False  # True for matmul kernels: tensor-core instructions must appear
    aligned: tuple[str, ...] = ()  # arguments compiled as divisible by 16 (tt.divisibility): pointers, ints
    options: dict[str, Any] = field(default_factory=dict)  # other compile options, e.g. enable_fp_fusion
    archs: tuple[int, ...] = ()  # compute capabilities to build for; empty: every one the report covers

    def attrs(self) -> dict[tuple[int, ...], list]:
        """``ASTSource``'s attrs: ``tt.divisibility`` 16 on each ``aligned`` argument."""
        names = list(self.fn.arg_names)
        return {(names.index(n),): [["tt.divisibility", 16]] for n in self.aligned}

    def compile_options(self) -> dict[str, Any]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, **self.options}


_JITS: dict[int, tuple] = {}  # id(kernel) -> (kernel, its JITFunction, {arch: binder})


def jit_function(kernel):
    """The ``triton.runtime.jit.JITFunction`` of ``kernel`` (under ``TRITON_INTERPRET=1`` a kernel is an
    InterpretedFunction; a JITFunction with its specialisation settings is made from it)."""
    from triton.runtime.jit import JITFunction

    entry = _JITS.get(id(kernel))
    if entry is None:
        jit = kernel if isinstance(kernel, JITFunction) else \
            JITFunction(kernel.fn, **getattr(kernel, "kwargs", {}))
        entry = _JITS[id(kernel)] = (kernel, jit, {})
    return entry[1]


def _binder(kernel, arch: int):
    """Triton's argument binder of ``kernel`` for compute capability ``arch`` (what a launch runs first)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = jit_function(kernel)
    binders = _JITS[id(kernel)][2]
    if arch not in binders:
        binders[arch] = create_function_from_signature(jit.signature, jit.params,
                                                       make_backend(GPUTarget("cuda", arch, 32)))
    return binders[arch]


def _param_names(jit) -> list[str]:
    return [p.name for p in jit.params]


def spec_from_launch(kernel, args: tuple, meta: dict, arch: int, name: str, uses_dot: bool) -> AotSpec:
    """The AotSpec Triton compiles for ``kernel[grid](*args, **meta)`` on compute capability ``arch``:
    argument types, constants (constexprs and integers equal to 1) and the divisibility-by-16
    attributes from Triton's own binder (``create_function_from_signature``), the launch options
    (num_warps, num_stages, enable_fp_fusion, ...) from ``meta``. Tensors may be meta tensors (their
    address reads as 0: aligned, as every fresh CUDA allocation is)."""
    jit = jit_function(kernel)
    bound, specialization, options = _binder(kernel, arch)(*args, **meta)
    names = _param_names(jit)
    signature, constexprs, aligned = {}, {}, []
    for pname, (ty, attr) in zip(names, specialization):
        signature[pname] = ty
        if ty == "constexpr":
            constexprs[pname] = bound[pname]
        elif isinstance(attr, str) and "D" in attr:
            aligned.append(pname)
    opts = {k: v for k, v in options.items() if k not in ("num_warps", "num_stages")}
    return AotSpec(name, jit, signature, constexprs, int(meta.get("num_warps", 4)),
                   int(meta.get("num_stages", 3)), uses_dot, tuple(aligned), opts, (arch,))


def spec_key(spec: AotSpec) -> str:
    """What a compile depends on (not the name): two specs with one key build the same binary."""
    text = repr((getattr(spec.fn, "__name__", "?"), sorted(spec.signature.items()),
                 sorted((k, repr(v)) for k, v in spec.constexprs.items()), spec.num_warps, spec.num_stages,
                 sorted(spec.aligned), sorted((k, repr(v)) for k, v in spec.options.items()),
                 sorted(spec.archs)))
    return hashlib.sha1(text.encode()).hexdigest()[:10]
