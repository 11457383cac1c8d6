"""Eager PyTorch paths, op for op: the building blocks, the base linear, and PEFT's LoRA layer.

Each aten op is one launch that reads each operand once and writes its result once, exactly
what ``traffic.count_torch`` counts on the same path at small shapes (tests/tools check the PEFT
formulas against PEFT's real layers, launch for launch and byte for byte). ``matmul`` and
``elementwise`` are also the blocks the peftfast formulas are built from.
"""
from __future__ import annotations

import torch

from ..specs import LOW_PRECISION, Kernel, nbytes


def matmul(name: str, m: int, k: int, n: int, a: torch.dtype, b: torch.dtype, out: torch.dtype) -> Kernel:
    """[m, k] @ [k, n] -> [m, n]: each operand read once, the result written once, 2mkn FLOPs.

    Tensor-core peak when both operands are fp16/bf16, fp32 peak otherwise (fp32 matmuls with
    TF32 disabled, PyTorch's default for ``torch.mm``)."""
    tc = a in LOW_PRECISION and b in LOW_PRECISION
    return Kernel(name, m * k * nbytes(a) + k * n * nbytes(b), m * n * nbytes(out), 2 * m * k * n, tc)


def elementwise(name: str, reads: list[tuple[int, torch.dtype]], writes: list[tuple[int, torch.dtype]]) -> Kernel:
    """An elementwise kernel: reads and writes each listed (numel, dtype) once, 1 FLOP per
    output element (always bandwidth-bound at these sizes)."""
    flops = max(n for n, _ in writes)
    return Kernel(name, sum(n * nbytes(d) for n, d in reads), sum(n * nbytes(d) for n, d in writes), flops)


def base_linear_forward(t: int, d_in: int, d_out: int, dtype: torch.dtype) -> list[Kernel]:
    """Y = X @ W^T, one GEMM (bias-free; a bias adds d_out elements, negligible)."""
    return [matmul("base: X @ W^T", t, d_in, d_out, dtype, dtype, dtype)]


def base_linear_backward(t: int, d_in: int, d_out: int, dtype: torch.dtype) -> list[Kernel]:
    """Frozen base weight: only dX = dY @ W (no dW)."""
    return [matmul("base: dX = dY @ W", t, d_out, d_in, dtype, dtype, dtype)]



def peft_lora_forward(
    t: int, d_in: int, d_out: int, r: int, act: torch.dtype, ad: torch.dtype, dropout_p: float,
    training: bool = True, dropout_impl: str = "cuda",
) -> list[Kernel]:
    """PEFT ``lora.Linear.forward`` after the base layer, one adapter:
    ``x = x.to(ad); result = result + lora_B(lora_A(dropout(x))) * s; result.to(act)``.

    Ops: cast x to the adapter dtype (only if ``ad != act``); dropout when training with p > 0
    (PEFT uses ``nn.Identity`` for p = 0); two bias-free GEMMs in the adapter dtype; the scale
    (a separate ``mul``); the add, whose result has the promoted dtype of ``act`` and ``ad``;
    the cast back to ``act`` when that differs. ``dropout_impl="cuda"``: one fused
    ``native_dropout`` writing the output and a 1-byte mask; ``"cpu"``: ATen's CPU
    composition (``bernoulli_`` into a noise tensor of x's dtype, ``div_`` by 1-p, ``mul``),
    used to check the formula against counts on a CPU.
    """
    tk, tn = t * d_in, t * d_out
    ks = []
    if ad != act:
        ks.append(elementwise("peft: x.to(adapter dtype)", [(tk, act)], [(tk, ad)]))
    if training and dropout_p > 0:
        if dropout_impl == "cuda":
            ks.append(elementwise("peft: native_dropout", [(tk, ad)], [(tk, ad), (tk, torch.bool)]))
        elif dropout_impl == "cpu":
            ks.append(elementwise("peft: bernoulli_", [], [(tk, ad)]))
            ks.append(elementwise("peft: noise.div_(1-p)", [(tk, ad)], [(tk, ad)]))
            ks.append(elementwise("peft: x * noise", [(tk, ad), (tk, ad)], [(tk, ad)]))
        else:
            raise ValueError(f"dropout_impl={dropout_impl!r}; allowed: 'cuda', 'cpu'")
    ks.append(matmul("peft: lora_A", t, d_in, r, ad, ad, ad))
    ks.append(matmul("peft: lora_B", t, r, d_out, ad, ad, ad))
    ks.append(elementwise("peft: * scaling", [(tn, ad)], [(tn, ad)]))
    summed = torch.promote_types(act, ad)
    ks.append(elementwise("peft: result + lora", [(tn, act), (tn, ad)], [(tn, summed)]))
    if summed != act:
        ks.append(elementwise("peft: result.to(act)", [(tn, summed)], [(tn, act)]))
    return ks


def peft_lora_backward(
    t: int, d_in: int, d_out: int, r: int, act: torch.dtype, ad: torch.dtype, dropout_p: float,
    training: bool = True, dropout_impl: str = "cuda", needs_dx: bool = True,
) -> list[Kernel]:
    """Autograd's backward of ``peft_lora_forward`` (base dX excluded, see
    ``base_linear_backward``): casts mirroring the forward casts (dY to the promoted dtype,
    the grad of the base output back to ``act``, dX_lora back to ``act``), the scale ``mul``,
    four GEMMs (dH = dZ @ B, dB = dZ^T @ H, dA = dH^T @ drop(x), dXd = dH @ A), the dropout
    backward (``native_dropout_backward`` reads the saved 1-byte mask; on CPU a ``mul`` by
    the saved noise), and the add of dX_lora into the base layer's dX (x feeds both).
    """
    tk, tn = t * d_in, t * d_out
    summed = torch.promote_types(act, ad)
    dropout = training and dropout_p > 0
    ks = []
    if summed != act:
        ks.append(elementwise("peft bwd: dY.to(promoted)", [(tn, act)], [(tn, summed)]))
        ks.append(elementwise("peft bwd: dY.to(act) for base output", [(tn, summed)], [(tn, act)]))
    if summed != ad:
        ks.append(elementwise("peft bwd: dZ.to(adapter dtype)", [(tn, summed)], [(tn, ad)]))
    ks.append(elementwise("peft bwd: * scaling", [(tn, ad)], [(tn, ad)]))
    ks.append(matmul("peft bwd: dH = dZ @ B", t, d_out, r, ad, ad, ad))
    ks.append(matmul("peft bwd: dB = dZ^T @ H", d_out, t, r, ad, ad, ad))
    ks.append(matmul("peft bwd: dA = dH^T @ Xd", r, t, d_in, ad, ad, ad))
    if needs_dx:
        ks.append(matmul("peft bwd: dXd = dH @ A", t, r, d_in, ad, ad, ad))
        if dropout and dropout_impl == "cuda":
            ks.append(elementwise("peft bwd: native_dropout_backward", [(tk, ad), (tk, torch.bool)], [(tk, ad)]))
        elif dropout:
            ks.append(elementwise("peft bwd: dXd * noise", [(tk, ad), (tk, ad)], [(tk, ad)]))
        if ad != act:
            ks.append(elementwise("peft bwd: dX.to(act)", [(tk, ad)], [(tk, act)]))
        ks.append(elementwise("peft bwd: dX_base + dX_lora", [(tk, act), (tk, act)], [(tk, act)]))
    return ks



def dx_accumulate(t: int, d_in: int, act: torch.dtype) -> Kernel:
    """Autograd's sum of the two gradients reaching the layer input (base path + LoRA path)."""
    return elementwise("autograd: dX_base + dX_lora", [(t * d_in, act), (t * d_in, act)], [(t * d_in, act)])

