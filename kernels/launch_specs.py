"""The launches that run, per GPU architecture, as AotSpecs: what the compile report builds besides
each kernel module's hand-written ``aot_specs``.

The hand-written lists cover every config a launcher can pick, compiled without Triton's run-time
specialisations. A real call is compiled with them (kernels/aot.py): integers equal to 1 become
constants, and pointers and integers divisible by 16 (every fresh CUDA allocation, the sizes of
real models) get ``tt.divisibility = 16``, which changes vector widths and register use. And a
launcher may plan by GPU (qmatmul.pick_config: the decode split and the large/medium tile follow
the SM count). So this module runs the launchers themselves, for each reference GPU of
``runtime.REFERENCE_GPUS`` (sm_80 A100, sm_86 RTX 3090, sm_89 RTX 4090, sm_90 H100), on meta
tensors under ``runtime.recording_launches`` (nothing is computed), for the shapes of
``SHAPES``:

* one layer, d_in = d_out = 4096, rank 16 (``D``, ``RANK``);
* T = 1, 7, 16 tokens (decode: Triton makes M = 1 a constant, 16 is divisible by 16, 7 is neither),
  128 (small) and 8192 (large);
* activations fp16 and bf16 with adapters fp16, bf16 or fp32 (``DTYPES``);
* ops (``OPS``): ``lora_linear_fused``'s kernels and the measured alternative it may pick instead
  (F.linear then lora.py's kernels); ``qlora_linear_fused`` over an NF4 weight (blocksize 64; plain
  and nested absmax, i.e. double quantisation) and over an int8 weight; the 4-bit and int8 matmuls
  of frozen layers without adapters. Forward, with and without bias and dropout; backward with and
  without the x gradient.

Each recorded launch becomes the AotSpec Triton compiles for it (``aot.spec_from_launch``: Triton's
binder decides the constants and the divisibility); equal specs are kept once, named after the
first launch that needs them. ``aot_specs()`` is the full list (every architecture; the manual
``peftfast compile-report``); ``ci_specs()`` a representative subset the test suite compiles.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from . import lora as L
from . import lora_fused as LF
from . import qlora as QL
from . import qmatmul as Q
from .adapters import make_plan
from .aot import AotSpec, spec_from_launch, spec_key
from .quant import Packed4bit
from .runtime import DTYPE_NAMES, REFERENCE_GPUS, Launch, kernel_name, recording_launches

D = 4096
RANK = 16
TOKENS = (1, 7, 16, 128, 8192)
DTYPES = tuple((act, ad) for act in (torch.float16, torch.bfloat16)
               for ad in (torch.float16, torch.bfloat16, torch.float32))
SEED = (1 << 40) + 12345  # a dropout seed as dropout.draw_seed draws them: [2**32, 2**62), an int64
NF4_BLOCKSIZE = 64
OPS = ("lora_fused", "lora_unfused", "qlora_4bit", "qlora_4bit_nested", "qlora_int8", "matmul_4bit",
       "matmul_4bit_nested", "matmul_int8")


class Case(NamedTuple):
    op: str
    tokens: int
    act: torch.dtype
    ad: torch.dtype | None  # None: no adapter (the frozen quantised matmuls)

    @property
    def label(self) -> str:
        dtypes = DTYPE_NAMES[self.act] + ("" if self.ad is None else "/" + DTYPE_NAMES[self.ad])
        return f"{self.op} T={self.tokens} {dtypes}"


def _meta(*shape, dtype=torch.float16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def meta_packed4bit(act: torch.dtype, nested: bool) -> Packed4bit:
    """An NF4 weight [D, D] on the meta device (double-quantised absmax when ``nested``), as launches see it."""
    n_blocks = D * D // NF4_BLOCKSIZE
    if not nested:
        return Packed4bit(_meta(D * D // 2, dtype=torch.uint8), _meta(n_blocks, dtype=torch.float32),
                          _meta(16, dtype=torch.float32), NF4_BLOCKSIZE, (D, D), act)
    return Packed4bit(_meta(D * D // 2, dtype=torch.uint8), _meta(n_blocks, dtype=torch.uint8),
                      _meta(16, dtype=torch.float32), NF4_BLOCKSIZE, (D, D), act,
                      _meta(-(-n_blocks // 256), dtype=torch.float32), _meta(256, dtype=torch.float32), 256,
                      0.0123)


def meta_int8_weight() -> QL.Int8Weight:
    """An int8 weight [D, D] with its row scales, on the meta device."""
    return QL.Int8Weight(_meta(D, D, dtype=torch.int8), _meta(D, dtype=torch.float32))


def _run(case: Case) -> None:
    """Every launch ``case`` makes (forward, backward variants), on meta tensors."""
    t_, act, ad = case.tokens, case.act, case.ad
    x, dy = _meta(t_, D, dtype=act), _meta(t_, D, dtype=act)
    if ad is None:  # a frozen quantised layer: forward, and dX for the layers below
        for bias in (None, _meta(D, dtype=act)):
            if case.op == "matmul_int8":
                w = meta_int8_weight()
                Q.matmul_int8_triton(x, w.cb, w.scb, bias, transpose=True)
            else:
                Q.matmul_4bit_triton(x, meta_packed4bit(act, case.op.endswith("nested")), bias, transpose=True)
        if case.op == "matmul_int8":
            w = meta_int8_weight()
            Q.matmul_int8_triton(dy, w.cb, w.scb, None, transpose=False)
        else:
            Q.matmul_4bit_triton(dy, meta_packed4bit(act, case.op.endswith("nested")), None, transpose=False)
        return
    a, b = [_meta(RANK, D, dtype=ad)], [_meta(D, RANK, dtype=ad)]
    for p in (0.0, 0.1):
        plan = make_plan([RANK], [2.0], [p])
        seed = SEED if p else 0
        for bias in (None, _meta(D, dtype=act)):
            if case.op == "lora_fused":
                weight = _meta(D, D, dtype=act)
                _y, t = LF.plan_forward(x, weight, bias, a, b, plan, seed, True)
            elif case.op == "lora_unfused":  # F.linear (cuBLAS), then lora.py's kernels on its output
                _y, t = L.plan_forward(x, _meta(t_, D, dtype=act), a, b, plan, seed, False, True)
            else:
                w = meta_int8_weight() if case.op == "qlora_int8" else meta_packed4bit(act, case.op.endswith("nested"))
                _y, t = QL.plan_forward(x, w, bias, a, b, plan, seed, True)
        for need_x in (True, False):  # the first adapted layer of a model has no x gradient
            if case.op == "lora_fused":
                LF.plan_backward(dy, x, t, weight, a, b, plan, seed, need_x, False, True, True, True)
            elif case.op == "lora_unfused":
                L.plan_backward(dy, x, t, a, b, plan, seed, need_x, True, True, True)
            else:
                QL.plan_backward(dy, x, t, w, a, b, plan, seed, need_x, True, True, True)


def cases() -> Iterator[Case]:
    for op in OPS:
        for tokens in TOKENS:
            if op.startswith("matmul"):
                for act in dict.fromkeys(act for act, _ in DTYPES):
                    yield Case(op, tokens, act, None)
            else:
                for act, ad in DTYPES:
                    yield Case(op, tokens, act, ad)


def launches(arch: int, case: Case) -> list[Launch]:
    """The launches ``case`` makes on the reference GPU of ``arch`` (nothing runs)."""
    with recording_launches(arch) as recorded:
        _run(case)
    return recorded


def _uses_dot(kernel) -> bool:
    return "reduce" not in kernel_name(kernel) and "keep_mask" not in kernel_name(kernel)


def derive(archs=tuple(REFERENCE_GPUS), select: Callable[[Case], bool] | None = None) -> list[AotSpec]:
    """The AotSpecs of every launch of every case (``select`` keeps a subset) on each of ``archs``,
    each distinct compile once, named '<kernel>[sm_<arch>; <first case that launches it> #<key>]'."""
    specs: dict[str, AotSpec] = {}
    for arch in archs:
        for case in cases():
            if select is not None and not select(case):
                continue
            for rec in launches(arch, case):
                spec = spec_from_launch(rec.kernel, rec.args, rec.meta, arch, "", _uses_dot(rec.kernel))
                key = spec_key(spec)
                if key not in specs:
                    name = f"{kernel_name(rec.kernel).strip('_')}[sm_{arch}; {case.label} #{key[:6]}]"
                    specs[key] = spec.__class__(**{**spec.__dict__, "name": name})
    return list(specs.values())


def aot_specs() -> list[AotSpec]:
    """Every distinct compile the representative launches make, on every architecture."""
    return derive()


def ci_specs() -> list[AotSpec]:
    """The subset the test suite compiles (tests/tools/test_compile_report.py, about a minute): the dense
    fused LoRA and the double-quantised NF4 QLoRA layer, bf16 activations with fp32 adapters (PEFT's
    default for a bf16 model), T = 1, 128 and 8192, on sm_86 (the tightest register and shared-memory
    limits)."""
    return derive((86,), lambda c: c.op in ("lora_fused", "qlora_4bit_nested") and c.act == torch.bfloat16
                  and c.ad == torch.float32 and c.tokens in (1, 128, 8192))
