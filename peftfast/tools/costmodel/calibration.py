"""Calibration: traffic counted at small shapes against the formulas, per op.

The formulas are only worth their modelled times if they say what the code does. Each check
runs a path at a small shape and counts it: eager PyTorch ops through a ``TorchDispatchMode``
(``traffic.count_torch``: each aten op's input and output bytes), Triton kernels in the
interpreter (``traffic.count_triton``: the unique addresses each launch loads and stores). A
``Check`` pairs the counted bytes and launches with the modelled ones: exact for eager paths,
within ``KERNEL_BYTES_TOLERANCE`` for Triton kernels (which may touch small extras). Counting
the Triton kernels needs ``TRITON_INTERPRET=1`` set before triton is imported.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .formulas import (ia3_fused_matmul, lora_layer, matmul_4bit_fused, peftfast_fused_backward,
                       peftfast_fused_forward, peftfast_lora_forward, planned_lora_backward, qlora_layer)
from .formulas.fused import fused_forward_reread
from .formulas.quant import decode_reads
from .plans import epoch_counters, sm_count
from .specs import Kernel, path_bytes

# formulas count each operand once per launch; a kernel may also touch small extras (e.g. a
# per-row statistic or a partial-sum buffer), which must stay below this fraction.
KERNEL_BYTES_TOLERANCE = 0.10


@dataclass
class Check:
    name: str
    counted_bytes: int
    modelled_bytes: int
    counted_launches: int
    modelled_launches: int
    tolerance: float = 0.0

    @property
    def ok(self) -> bool:
        close = abs(self.counted_bytes - self.modelled_bytes) <= self.tolerance * self.modelled_bytes
        return close and self.counted_launches == self.modelled_launches

    def line(self) -> str:
        tol = "exact" if self.tolerance == 0 else f"within {self.tolerance:.0%}"
        return (f"{self.name:<52} counted {self.counted_bytes:>9} B / {self.counted_launches:>2} launches, "
                f"modelled {self.modelled_bytes:>9} B / {self.modelled_launches:>2} launches "
                f"[{'ok' if self.ok else 'MISMATCH'}, {tol}]")


def peft_like_forward(x, base, lora_a, lora_b, dropout, scaling: float):
    """PEFT's vanilla LoRA forward in eager PyTorch, same op order (the formulas' subject)."""
    result = base(x)
    result_dtype = result.dtype
    x = x.to(lora_a.weight.dtype)
    result = result + lora_b(lora_a(dropout(x))) * scaling
    return result.to(result_dtype)


def calibrate_eager(t: int = 24, d_in: int = 40, d_out: int = 56, r: int = 4, act: torch.dtype = torch.bfloat16,
                    ad: torch.dtype = torch.float32, dropout_p: float = 0.1) -> list[Check]:
    """Count PEFT's op sequence on CPU and compare with the formulas (CPU dropout), exactly."""
    from torch import nn

    from ..traffic import count_torch

    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).to(act).requires_grad_(False)
    lora_a = nn.Linear(d_in, r, bias=False).to(ad)
    lora_b = nn.Linear(r, d_out, bias=False).to(ad)
    with torch.no_grad():
        for m in (base, lora_a, lora_b):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
    dropout = nn.Dropout(dropout_p) if dropout_p > 0 else nn.Identity()
    x = torch.randn(t, d_in, generator=gen).to(act).requires_grad_(True)
    with count_torch() as fwd:
        y = peft_like_forward(x, base, lora_a, lora_b, dropout, 2.0)
    dy = torch.randn(y.shape, generator=gen).to(y.dtype)
    with count_torch() as bwd:
        y.backward(dy)
    checks = []
    for name, counted, backward in (("eager PEFT path, forward", fwd, False), ("eager PEFT path, backward", bwd, True)):
        model = lora_layer("peft", backward, t, d_in, d_out, r, act, ad, dropout_p, dropout_impl="cpu")
        checks.append(Check(f"{name} (T={t}, {d_in}->{d_out}, r={r})", counted.bytes, path_bytes(model),
                            counted.launches, len(model)))
    return checks


def count_device(fn) -> tuple[int, int, list[str]]:
    """(bytes, launches, names) of the Triton launches (unique bytes) and torch ops in fn().

    Torch ops on 0-dim tensors only are left out: the dropout seed is a host-side scalar drawn
    from torch's CPU generator, no GPU kernel."""
    from ..traffic import count_torch, count_triton

    with count_torch() as torch_ops, count_triton() as triton_ops:
        fn()
    ops = [x for x in torch_ops.launch_log if not x.scalar_only]
    launches = triton_ops.launch_log + ops
    return (sum(x.unique_bytes_read + x.unique_bytes_written for x in launches), len(launches),
            [x.name for x in launches])


def count_triton_forward_backward(forward, dy: torch.Tensor) -> tuple[tuple, tuple]:
    """``count_device`` of ``forward()`` and then of ``backward(dy)`` on its output, with the ops forced
    onto their Triton kernels (PEFTFAST_BACKEND=triton) and the previous backend restored afterwards.
    The kernels' epoch counters (one buffer per device and stream, zeroed once when first allocated
    and reused by every later launch) are allocated before counting: not a per-call cost."""
    import os

    epoch_counters(dy.device, 1)
    saved = os.environ.get("PEFTFAST_BACKEND")
    os.environ["PEFTFAST_BACKEND"] = "triton"
    try:
        out = []
        fwd = count_device(lambda: out.append(forward()))
        bwd = count_device(lambda: out[0].backward(dy))
    finally:
        if saved is None:
            os.environ.pop("PEFTFAST_BACKEND")
        else:
            os.environ["PEFTFAST_BACKEND"] = saved
    return fwd, bwd


def require_interpreter() -> None:
    from peftfast.kernels.backend import interpreting

    if not interpreting():
        raise RuntimeError("counting the Triton kernels needs TRITON_INTERPRET=1 set before triton is imported")


def counted_input(t: int, d_in: int) -> tuple[torch.dtype, torch.Generator, torch.Tensor]:
    """(fp16, a generator seeded 0, x [t, d_in] fp16 drawn from it first, requiring grad) for a kernel count;
    raises RuntimeError outside the interpreter."""
    require_interpreter()
    act = torch.float16
    gen = torch.Generator().manual_seed(0)
    return act, gen, torch.randn(t, d_in, generator=gen).to(act).requires_grad_(True)


def adapter_weights(gen: torch.Generator, r: int, d_in: int, d_out: int, ad: torch.dtype):
    """(A [r, d_in], B [d_out, r]) random adapter weights in ``ad`` that require grad."""
    a = (torch.randn(r, d_in, generator=gen) / d_in**0.5).to(ad).requires_grad_(True)
    b = (torch.randn(d_out, r, generator=gen) / r**0.5).to(ad).requires_grad_(True)
    return a, b


def op_checks(op: str, shape: str, fwd: tuple, bwd: tuple, model_f: list[Kernel], model_b: list[Kernel],
              fwd_reread: int = 0) -> list[Check]:
    """Forward and backward Checks of one op's counts against its kernel lists; ``fwd_reread``:
    bytes the formulas charge twice that a count of unique addresses sees once."""
    return [
        Check(f"peftfast {op} forward {shape}", fwd[0], path_bytes(model_f) - fwd_reread, fwd[1], len(model_f),
              KERNEL_BYTES_TOLERANCE),
        Check(f"peftfast {op} backward {shape}", bwd[0], path_bytes(model_b), bwd[1], len(model_b),
              KERNEL_BYTES_TOLERANCE),
    ]


def count_with_adapters(gen: torch.Generator, t: int, d_in: int, d_out: int, r: int, act: torch.dtype,
                        ad: torch.dtype, op) -> tuple[tuple, tuple]:
    """Draw one adapter (A, B in ``ad``) and dY [t, d_out] from ``gen``, then count ``op(A, B)``'s forward and
    backward Triton kernels (``count_triton_forward_backward``)."""
    a, b = adapter_weights(gen, r, d_in, d_out, ad)
    dy = torch.randn(t, d_out, generator=gen).to(act)
    return count_triton_forward_backward(lambda: op(a, b), dy)

def calibrate_peftfast(t: int = 37, d_in: int = 45, d_out: int = 52, r: int = 7, dropout_p: float = 0.1,
                       ad: torch.dtype = torch.float32) -> list[Check]:
    """Count ``lora_linear``'s Triton kernels under the interpreter (unique bytes per launch)
    plus the torch ops between them, and compare with ``peftfast_lora_forward`` /
    ``peftfast_lora_backward`` (fp16 activations, adapters in ``ad``).

    Needs ``TRITON_INTERPRET=1`` set before the kernels were imported (RuntimeError
    otherwise); raises ImportError when ``peftfast.kernels.lora`` does not exist.
    """

    from peftfast.kernels import lora

    act, gen, x = counted_input(t, d_in)
    base_out = torch.randn(t, d_out, generator=gen).to(act)
    fwd, bwd = count_with_adapters(
        gen, t, d_in, d_out, r, act, ad, lambda a, b: lora.lora_linear(x, base_out, [a], [b], [1.5], [dropout_p], True))
    return op_checks("lora_linear", f"(T={t}, {d_in}->{d_out}, r={r}, adapters {str(ad)[6:]})", fwd, bwd,
                     peftfast_lora_forward(t, d_in, d_out, [r], act, ad),
                     planned_lora_backward(t, d_in, d_out, r, act, ad, dropout_p > 0))


def calibrate_peftfast_fused(t: int = 37, d_in: int = 45, d_out: int = 52, r: int = 7, dropout_p: float = 0.1,
                             ad: torch.dtype = torch.float32, bias: bool = True) -> list[Check]:
    """Count ``lora_linear_fused``'s Triton kernels under the interpreter (unique bytes per
    launch) plus the torch ops between them, and compare with ``peftfast_fused_forward`` /
    ``peftfast_fused_backward`` (fp16 activations and base weight, adapters in ``ad``).

    Needs ``TRITON_INTERPRET=1`` set before the kernels were imported (RuntimeError
    otherwise); raises ImportError when ``peftfast.kernels.lora_fused`` does not exist.
    """

    from peftfast.kernels import lora_fused

    act, gen, x = counted_input(t, d_in)
    w = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(act)
    b = torch.randn(d_out, generator=gen).to(act).requires_grad_(True) if bias else None
    fwd, bwd = count_with_adapters(
        gen, t, d_in, d_out, r, act, ad,
        lambda a, bb: lora_fused.lora_linear_fused(x, w, b, [a], [bb], [1.5], [dropout_p], True))
    shape = f"(T={t}, {d_in}->{d_out}, r={r}, adapters {str(ad)[6:]}{', bias' if bias else ''})"
    # the forward's second read of X (same addresses) is seen once by the unique count
    return op_checks("lora_linear_fused", shape, fwd, bwd,
                     peftfast_fused_forward(t, d_in, d_out, [r], act, ad, bias),
                     peftfast_fused_backward(t, d_in, d_out, [r], act, ad, bias=bias),
                     fwd_reread=fused_forward_reread(t, d_in, act))


def calibrate_qlora_fused(t: int = 37, d_in: int = 128, d_out: int = 52, r: int = 7, dropout_p: float = 0.1,
                          ad: torch.dtype = torch.float32) -> list[Check]:
    """Count ``qlora_linear_fused``'s Triton kernels under the interpreter (a random NF4-layout
    weight, blocksize 64, fp32 scales; fp16 activations) and compare with
    ``qlora_fused_forward`` / ``qlora_fused_backward``. Same requirements as
    ``calibrate_peftfast_fused``."""

    from peftfast.kernels import qlora
    from peftfast.kernels.quant import Packed4bit

    require_interpreter()
    act = torch.float16
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (d_out * d_in // 2,), generator=gen, dtype=torch.uint8)
    absmax = torch.rand(d_out * d_in // 64, generator=gen) + 0.5
    code = torch.linspace(-1.0, 1.0, 16)
    p = Packed4bit(data, absmax, code, 64, (d_out, d_in), act)
    x = torch.randn(t, d_in, generator=gen).to(act).requires_grad_(True)
    fwd, bwd = count_with_adapters(
        gen, t, d_in, d_out, r, act, ad,
        lambda a, bb: qlora.qlora_linear_fused(x, p, None, [a], [bb], [1.5], [dropout_p], True))
    shape = f"(T={t}, {d_in}->{d_out}, r={r}, NF4 bs 64, adapters {str(ad)[6:]})"
    return op_checks("qlora_linear_fused", shape, fwd, bwd,
                     qlora_layer("peftfast-fused", False, t, d_in, d_out, r, act, ad, dropout_p),
                     qlora_layer("peftfast-fused", True, t, d_in, d_out, r, act, ad, dropout_p))


def calibrate_4bit() -> list[Check]:
    """The 4-bit GEMM (decode with its split reduction, prefill, dX) counted in the interpreter
    against ``matmul_4bit_fused`` and ``decode_reads`` (fp16 activations, blocksize 64)."""
    from peftfast.kernels import qmatmul
    from peftfast.kernels.quant import Packed4bit

    from ..traffic import count_triton

    gen = torch.Generator().manual_seed(0)
    n, bs, act = 192, 64, torch.float16
    code = torch.sort(torch.randn(16, generator=gen)).values

    def packed(k):
        return Packed4bit(torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, generator=gen),
                          torch.rand(n * k // bs, generator=gen) + 0.5, code, bs, (n, k), act)

    checks = []
    for t, k in ((1, 1024), (16, 256)):  # a split reduction (3 slices), then none
        p = packed(k)
        x = torch.randn(t, k, generator=gen).to(act)
        with count_triton() as tr:
            qmatmul.matmul_4bit_triton(x, p)
        want = decode_reads(t, n, k, sm_count(x.device), act)
        gemm = tr.launch_log[0]
        checks.append(Check(f"4-bit decode GEMM, bytes read (T={t}, {k}->{n})", gemm.unique_bytes_read,
                            want["gemm_read"], 1, 1))
        split = gemm.grid[1] if gemm.grid else None
        checks.append(Check(f"4-bit decode, all launches (T={t}, split {split}, modelled {want['split']})",
                            tr.unique_bytes, sum(v for key, v in want.items() if key != "split"),
                            tr.launches, 2 if want["split"] > 1 else 1))
    k = 256
    p = packed(k)
    for backward in (False, True):
        a = torch.randn(40, n if backward else k, generator=gen).to(act)
        with count_triton() as tr:
            qmatmul.matmul_4bit_triton(a, p, transpose=not backward)
        kern = matmul_4bit_fused(40, k, n, act, backward)
        checks.append(Check(f"4-bit GEMM {'dX' if backward else 'forward'} (T=40, {k}->{n})",
                            tr.unique_bytes, kern.bytes, tr.launches, 1))
    return checks


def calibrate_ia3() -> list[Check]:
    """The IA3 GEMM (scale on x, then on y) counted in the interpreter against ``ia3_fused_matmul``."""
    from peftfast.kernels.ia3 import ia3_linear

    gen = torch.Generator().manual_seed(1)
    t, d_in, d_out, act = 40, 96, 80, torch.float16
    checks = []
    for ff in (True, False):
        x = torch.randn(t, d_in, generator=gen).to(act)
        w = torch.randn(d_out, d_in, generator=gen).to(act)
        s = torch.rand(d_in if ff else d_out, generator=gen) + 0.5
        counted, launches, _ = count_device(lambda x=x, w=w, s=s, ff=ff: ia3_linear(x, w, None, s, ff))
        kern = ia3_fused_matmul(t, d_in, d_out, act, torch.float32, ff)
        checks.append(Check(f"IA3 fused matmul, scale on {'x' if ff else 'y'} (T={t}, {d_in}->{d_out})",
                            counted, kern.bytes, launches, 1, KERNEL_BYTES_TOLERANCE))
    return checks


def calibrate_peftfast_dora(t: int = 37, d_in: int = 45, d_out: int = 52, r: int = 7,
                            ad: torch.dtype = torch.float32) -> list[Check]:
    """Count DoRA's fused path (``dora_row_norm_fused``, then ``dora_linear_fused``; no bias, fp16
    activations) under the interpreter and compare with ``peftfast_dora_forward`` / ``peftfast_dora_backward``.
    Same requirements as ``calibrate_peftfast_fused``."""
    from peftfast.kernels import lora_fused

    from .formulas.dora import peftfast_dora_backward, peftfast_dora_forward

    act, gen, x = counted_input(t, d_in)
    w = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(act)
    m = (torch.rand(d_out, generator=gen) + 0.5).requires_grad_(True)

    def op(a, b):
        norm = lora_fused.dora_row_norm_fused(w, [a], [b], [1.5])
        return lora_fused.dora_linear_fused(x, w, None, [a], [b], [1.5], m, norm)

    fwd, bwd = count_with_adapters(gen, t, d_in, d_out, r, act, ad, op)
    shape = f"(T={t}, {d_in}->{d_out}, r={r}, adapters {str(ad)[6:]})"
    return op_checks("DoRA (norm + dora_linear_fused)", shape, fwd, bwd,
                     peftfast_dora_forward(t, d_in, d_out, [r], act, ad),
                     peftfast_dora_backward(t, d_in, d_out, [r], act, ad),
                     fwd_reread=fused_forward_reread(t, d_in, act))
