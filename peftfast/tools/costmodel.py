"""Per-kernel cost model: bytes moved, FLOPs, launches, and modelled time on named GPUs.

Every formula returns a list of ``Kernel`` records (one per launch) for a path; a path's time on
a GPU is the sum over its kernels of ``max(bytes / bandwidth, flops / peak) + launch_overhead``.
Bytes are the compulsory DRAM traffic of each launch: every operand read once and every result
written once (tiles re-read by several programs are assumed to hit L2). The eager PyTorch
formulas reproduce, op for op, what ``traffic.count_torch`` counts on the same path at small
shapes; the peftfast formulas are what ``traffic.count_triton`` counts as unique bytes per
launch of the Triton kernels (tests check both). Times at real sizes are therefore
*modelled from counted traffic*, not measured.

Notation: T tokens, K = d_in, N = d_out, r (or R = sum of ranks over adapters), ``act`` the
activation dtype, ``ad`` the adapter weight dtype. Unless stated otherwise: nothing is fused
beyond what is listed, the base weight is frozen (no dW), the adapters are trainable, the layer
input needs a gradient, and linears have no bias (a bias adds d_out elements, negligible).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Gpu:
    """Peak figures of one GPU (dense, no sparsity).

    ``tensor_flops``: fp16/bf16 tensor-core FLOP/s with fp32 accumulation (the bf16 matmuls);
    ``fp32_flops``: plain fp32 FLOP/s (fp32 matmuls with TF32 off, PyTorch's default, and
    elementwise ops).
    """

    name: str
    bandwidth: float  # B/s
    tensor_flops: float
    fp32_flops: float


# H100: the DESIGN's round figures (SXM spec sheet: 3.35 TB/s, 989 TFLOP/s bf16 dense);
# fp32 non-tensor 67 TFLOP/s (SXM). RTX 4090: 1008 GB/s, 165 TFLOP/s fp16/bf16 with fp32
# accumulation, 82.6 TFLOP/s fp32.
H100 = Gpu("H100", 3.0e12, 800e12, 67e12)
RTX4090 = Gpu("RTX 4090", 1.0e12, 165e12, 82.6e12)
GPUS = {"h100": H100, "rtx4090": RTX4090}

# Fixed cost per kernel launch (launch latency plus ramp-up/tail of a short kernel on a busy
# stream). Ratios are shown with 0 and with this value.
LAUNCH_OVERHEAD_S = 3e-6


@dataclass(frozen=True)
class Kernel:
    name: str
    bytes_read: int
    bytes_written: int
    flops: int
    tensor_core: bool = False  # True: FLOPs run at the tensor-core peak

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def time(self, gpu: Gpu, launch_overhead: float = 0.0) -> float:
        peak = gpu.tensor_flops if self.tensor_core else gpu.fp32_flops
        return max(self.bytes / gpu.bandwidth, self.flops / peak) + launch_overhead


def path_time(kernels: list[Kernel], gpu: Gpu, launch_overhead: float = 0.0) -> float:
    return sum(k.time(gpu, launch_overhead) for k in kernels)


def path_bytes(kernels: list[Kernel]) -> int:
    return sum(k.bytes for k in kernels)


def _b(dtype: torch.dtype) -> int:
    return dtype.itemsize


# ----------------------------------------------------------------------------------------------
# building blocks


def matmul(name: str, m: int, k: int, n: int, a: torch.dtype, b: torch.dtype, out: torch.dtype) -> Kernel:
    """[m, k] @ [k, n] -> [m, n]: each operand read once, the result written once, 2mkn FLOPs.

    Tensor-core peak when both operands are fp16/bf16, fp32 peak otherwise (fp32 matmuls with
    TF32 disabled, PyTorch's default for ``torch.mm``)."""
    tc = a in LOW_PRECISION and b in LOW_PRECISION
    return Kernel(name, m * k * _b(a) + k * n * _b(b), m * n * _b(out), 2 * m * k * n, tc)


def elementwise(name: str, reads: list[tuple[int, torch.dtype]], writes: list[tuple[int, torch.dtype]]) -> Kernel:
    """An elementwise kernel: reads and writes each listed (numel, dtype) once, 1 FLOP per
    output element (always bandwidth-bound at these sizes)."""
    flops = max(n for n, _ in writes)
    return Kernel(name, sum(n * _b(d) for n, d in reads), sum(n * _b(d) for n, d in writes), flops)


def base_linear_forward(t: int, d_in: int, d_out: int, dtype: torch.dtype) -> list[Kernel]:
    """Y = X @ W^T, one GEMM (bias-free; a bias adds d_out elements, negligible)."""
    return [matmul("base: X @ W^T", t, d_in, d_out, dtype, dtype, dtype)]


def base_linear_backward(t: int, d_in: int, d_out: int, dtype: torch.dtype) -> list[Kernel]:
    """Frozen base weight: only dX = dY @ W (no dW)."""
    return [matmul("base: dX = dY @ W", t, d_out, d_in, dtype, dtype, dtype)]


# ----------------------------------------------------------------------------------------------
# PEFT's LoRA path (eager aten ops)


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


# ----------------------------------------------------------------------------------------------
# peftfast's LoRA kernels


def peftfast_lora_forward(
    t: int, d_in: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype,
    out: torch.dtype | None = None,
) -> list[Kernel]:
    """``lora_linear`` (kernels/lora.py) as the op contract defines it (the base output is an
    input), all adapters in one pass (R = sum of ranks), operands in the adapter dtype:

    shrink: t = s' * drop(X) @ A^T for every adapter; reads X once, the stacked A [R, K] and
    the per-rank scale (R fp32), writes t [T, R] in the adapter dtype (saved for backward);
    the dropout mask is regenerated from a seed, so it costs no bytes.
    expand: Y = base_out + t @ B^T; reads base_out, t and B, writes Y (in place over base_out
    when autograd allows). Both on tensor cores with fp32 accumulation. The small int64 tables
    of rank tiles (32 B per tile) are left out.
    """
    out = out or act
    big_r = sum(ranks)
    return [
        Kernel("peftfast: shrink", t * d_in * _b(act) + big_r * d_in * _b(ad) + big_r * 4, t * big_r * _b(ad),
               2 * t * d_in * big_r, True),
        Kernel("peftfast: expand (+ base_out)",
               t * d_out * _b(out) + t * big_r * _b(ad) + d_out * big_r * _b(ad),
               t * d_out * _b(out), 2 * t * d_out * big_r + t * d_out, True),
    ]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def lora_grad_splits(t: int, n: int, ranks: list[int], ad: torch.dtype, by_adapter: bool) -> int:
    """How many ways kernels/lora.py splits the reduction over T of a weight gradient [R, n].

    Mirrors its launcher: rank tiles of 16/64/128 covering the largest rank (per adapter when
    dropout masks differ, ``by_adapter``) or R; column blocks of 64; row blocks of 32 for fp32
    operands, 64 otherwise; enough programs for ~4 waves on 132 SMs (528), at most one split
    per row block.
    """
    extent = max(ranks) if by_adapter else sum(ranks)
    block_r = next((b for b in (16, 64, 128) if b >= extent), 128)
    tiles = sum(_cdiv(r, block_r) for r in ranks) if by_adapter else _cdiv(sum(ranks), block_r)
    block_m = 32 if ad == torch.float32 else 64
    splits = max(1, min(_cdiv(528, tiles * _cdiv(n, 64)), _cdiv(t, block_m)))
    rows = _cdiv(_cdiv(t, splits), block_m) * block_m
    return _cdiv(t, rows)


def peftfast_lora_backward(
    t: int, d_in: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype,
    out: torch.dtype | None = None, splits_db: int = 1, splits_da: int = 1,
) -> list[Kernel]:
    """Backward of ``lora_linear`` (kernels/lora.py). With G = s' * dY @ B ([T, R]):
    dB = dY^T @ t, dA = G^T @ drop(X), dX = mask * (G @ A), d base_out = dY (no kernel).

    dB: reads t and dY, writes fp32 partials [splits_db, N, R]; G: the shrink kernel on
    (dY, B^T), reads dY and B, writes G in the adapter dtype; dA: reads G and X (mask
    regenerated), writes fp32 partials [splits_da, R, K]; dX: reads G and A, writes dX_lora.
    When a reduction is split, one torch ``sum`` of the partials follows; when the adapter
    dtype is not fp32, one cast of the fp32 gradient. dY is read twice (dB, G), X once. The add
    of dX_lora into the base layer's dX is autograd's, see ``lora_layer``.
    """
    out = out or act
    big_r = sum(ranks)
    f32 = torch.float32
    ks = [Kernel("peftfast bwd: dB = t^T @ dY", t * big_r * _b(ad) + t * d_out * _b(out),
                 splits_db * d_out * big_r * 4, 2 * t * d_out * big_r, True)]
    if splits_db > 1:
        ks.append(elementwise("torch: sum dB partials", [(splits_db * d_out * big_r, f32)], [(d_out * big_r, f32)]))
    if ad != f32:
        ks.append(elementwise("torch: dB.to(adapter dtype)", [(d_out * big_r, f32)], [(d_out * big_r, ad)]))
    ks.append(Kernel("peftfast bwd: G = s' dY @ B", t * d_out * _b(out) + d_out * big_r * _b(ad) + big_r * 4,
                     t * big_r * _b(ad), 2 * t * d_out * big_r, True))
    ks.append(Kernel("peftfast bwd: dA = G^T @ drop(X)", t * big_r * _b(ad) + t * d_in * _b(act),
                     splits_da * big_r * d_in * 4, 2 * t * d_in * big_r, True))
    if splits_da > 1:
        ks.append(elementwise("torch: sum dA partials", [(splits_da * big_r * d_in, f32)], [(big_r * d_in, f32)]))
    if ad != f32:
        ks.append(elementwise("torch: dA.to(adapter dtype)", [(big_r * d_in, f32)], [(big_r * d_in, ad)]))
    ks.append(Kernel("peftfast bwd: dX = mask * (G @ A)", t * big_r * _b(ad) + big_r * d_in * _b(ad),
                     t * d_in * _b(act), 2 * t * d_in * big_r, True))
    return ks


def fused_shrink_items(d_in: int, d_out: int, act: torch.dtype) -> int:
    """K slices per row block of the look-ahead shrink (kernels/lora_fused.py, 16-bit activations):
    min(4, column blocks of 64, K blocks of 64), rounded to whole K blocks."""
    k_blocks, n_blocks = _cdiv(d_in, 64), _cdiv(d_out, 64)
    k_per_item = _cdiv(k_blocks, min(4, n_blocks, k_blocks)) * 64
    return _cdiv(d_in, k_per_item)


def peftfast_fused_forward(t: int, d_in: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype,
                           bias: bool = False) -> list[Kernel]:
    """``lora_linear_fused`` (kernels/lora_fused.py) forward, as built. The base GEMM is included
    (this replaces both the base layer and the adapter).

    16-bit activations: ONE kernel. Its output tiles compute Y = X @ W^T + t @ B^T + b with fp32
    accumulation and one store; the shrink t = s' drop(X) @ A^T runs inside the same launch as
    K slices (4 per row block), done by the tiles of the previous row-block group (the first
    group's by slices that precede every tile): X is read a second time for them (counted here as
    DRAM traffic; it is the same addresses, so a count of unique bytes sees it once), fp32 slice
    partials [slices, T, R] are written and read back, t is written once (saved for backward) and
    read by the tiles. fp32 activations: lora.py's shrink kernel, then the GEMM reading t."""
    big_r = sum(ranks)
    f32 = torch.float32
    tr = t * big_r
    gemm_read = t * d_in * _b(act) + d_out * d_in * _b(act) + tr * _b(ad) + d_out * big_r * _b(ad) \
        + (d_out * _b(act) if bias else 0)
    gemm_flops = 2 * t * d_in * d_out + 2 * t * d_out * big_r
    if act == f32:
        shrink = peftfast_lora_forward(t, d_in, d_out, ranks, act, ad)[0]
        return [shrink, Kernel("peftfast: X @ W^T + t @ B^T (+ b), one store", gemm_read, t * d_out * _b(act),
                               gemm_flops, False)]
    partials = fused_shrink_items(d_in, d_out, act) * tr * 4
    return [Kernel("peftfast: X @ W^T + t @ B^T (+ b), shrink inside",
                   gemm_read + t * d_in * _b(act) + big_r * d_in * _b(ad) + big_r * 4 + partials,
                   t * d_out * _b(act) + tr * _b(ad) + partials, gemm_flops + 2 * t * d_in * big_r, True)]


def fused_forward_reread(t: int, d_in: int, act: torch.dtype) -> int:
    """Bytes of X that ``peftfast_fused_forward`` counts twice (the look-ahead shrink slices and the
    tiles read the same X); a count of unique addresses per launch sees them once."""
    return 0 if act == torch.float32 else t * d_in * _b(act)


def fused_dy_splits(t: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype) -> tuple[int, int]:
    """(N blocks, splits of T) of kernels/lora_fused.py's dY pass, mirroring its launcher: rank
    tiles of 16 (R <= 16, 16-bit adapters) or 32; N blocks of 256 and row blocks of 16 (fp32
    adapters on a 16-bit model: 32; fp32 model: N blocks of 128, rows of 16); ~264 programs."""
    big_r = sum(ranks)
    f32 = torch.float32
    tiles = _cdiv(big_r, 16 if big_r <= 16 and ad != f32 else 32)
    block_n, block_m = (128, 16) if act == ad == f32 else (256, 32) if ad == f32 else (256, 16)
    n_blocks = _cdiv(d_out, block_n)
    splits = max(1, min(_cdiv(264, tiles * n_blocks), _cdiv(t, block_m)))
    rows = _cdiv(_cdiv(t, splits), block_m) * block_m
    return n_blocks, _cdiv(t, rows)


def peftfast_fused_backward(t: int, d_in: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype,
                            bias: bool = False, block_m_dx: int | None = None) -> list[Kernel]:
    """``lora_linear_fused`` backward, as built (adapters trainable, x needs a gradient): two kernels.

    dY pass: ONE kernel reads dY once (plus t, B and the per-rank scale) for both reductions,
    G = s' dY @ B and dB = dY^T @ t, writing fp32 partials (G per block of 256 columns of dY,
    [n_blocks, T, R]; dB per split of T, [splits, N, R]); the last program to finish each piece
    reads its partials back and writes G and dB once in the adapter dtype.
    dX + dA: ONE kernel reads dY, W, G, A and X and writes dX once (dX = dY @ W + mask * (G @ A))
    and dA = G^T @ mask(X): fp32 partials per row block of ``block_m_dx`` rows ([T/block_m, R, K]),
    summed by the last row block of each column block and written once in the adapter dtype. The
    base dX GEMM is included; X is read by this compute-bound kernel instead of a separate pass.
    A trainable bias adds torch's sum over tokens of dY (fp32) and, for 16-bit activations, its cast.
    The arrival counters of both kernels live in one reused buffer (no per-launch memset).
    """
    big_r = sum(ranks)
    f32 = torch.float32
    n_blocks, splits_db = fused_dy_splits(t, d_out, ranks, act, ad)
    tr, nr, rk = t * big_r, d_out * big_r, big_r * d_in
    gp, dbp = n_blocks * tr * 4, splits_db * nr * 4
    ks = [Kernel("peftfast bwd: dY pass (G and dB, partials summed in-kernel)",
                 t * d_out * _b(act) + tr * _b(ad) + nr * _b(ad) + big_r * 4 + gp + dbp,
                 gp + dbp + tr * _b(ad) + nr * _b(ad), 4 * t * d_out * big_r, True)]
    if block_m_dx is None:
        block_m_dx = 64 if act == f32 else 128
    dap = _cdiv(t, block_m_dx) * rk * 4
    ks.append(Kernel("peftfast bwd: dX = dY @ W + mask * (G @ A), dA = G^T @ mask(X)",
                     t * d_out * _b(act) + d_out * d_in * _b(act) + tr * _b(ad) + rk * _b(ad) + t * d_in * _b(act)
                     + dap,
                     t * d_in * _b(act) + dap + rk * _b(ad), 2 * t * d_out * d_in + 4 * t * d_in * big_r,
                     act in LOW_PRECISION))
    if bias:
        ks.append(elementwise("torch: dbias = sum_T dY", [(t * d_out, act)], [(d_out, f32)]))
        if act != f32:
            ks.append(elementwise("torch: dbias.to(act)", [(d_out, f32)], [(d_out, act)]))
    return ks


def dx_accumulate(t: int, d_in: int, act: torch.dtype) -> Kernel:
    """Autograd's sum of the two gradients reaching the layer input (base path + LoRA path)."""
    return elementwise("autograd: dX_base + dX_lora", [(t * d_in, act), (t * d_in, act)], [(t * d_in, act)])


# ----------------------------------------------------------------------------------------------
# quantised bases (bitsandbytes storage)


def nf4_weight_bytes(n: int, k: int, blocksize: int = 64, nested: bool = False, nested_blocksize: int = 256) -> int:
    """Bytes of a bitsandbytes 4-bit weight [n, k]: packed data ceil(nk/2), the 16-entry fp32
    code, and absmax: fp32 per block, or (nested) one uint8 code per block plus fp32 per
    nested block and the 256-entry fp32 nested code."""
    blocks = -(-n * k // blocksize)
    absmax = blocks * 4 if not nested else blocks + -(-blocks // nested_blocksize) * 4 + 256 * 4
    return -(-n * k // 2) + absmax + 16 * 4


def matmul_4bit_fused(t: int, d_in: int, d_out: int, act: torch.dtype, backward: bool = False,
                      blocksize: int = 64, nested: bool = False) -> Kernel:
    """Dequantisation in the GEMM's operand load: forward Y = X @ deq(W)^T reads X and the
    packed weight once; backward dX = dY @ deq(W) reads dY and the packed weight (no
    dequantised copy of W is ever written)."""
    w = nf4_weight_bytes(d_out, d_in, blocksize, nested)
    a, b = (t * d_in, t * d_out) if not backward else (t * d_out, t * d_in)
    return Kernel("4-bit GEMM (dequant in prologue)" + (" dX" if backward else ""),
                  a * _b(act) + w, b * _b(act), 2 * t * d_in * d_out, True)


def dequant_4bit_then_matmul(t: int, d_in: int, d_out: int, act: torch.dtype, backward: bool = False,
                             blocksize: int = 64, nested: bool = False) -> list[Kernel]:
    """bitsandbytes' training path: dequantise W to ``act`` (reads packed, writes N*K*act),
    then a plain GEMM; the backward dequantises again for dX = dY @ W."""
    w = nf4_weight_bytes(d_out, d_in, blocksize, nested)
    deq = Kernel("bnb: dequantize_4bit", w, d_out * d_in * _b(act), d_out * d_in)
    mm = base_linear_backward(t, d_in, d_out, act) if backward else base_linear_forward(t, d_in, d_out, act)
    return [deq] + mm


def matmul_int8_fused(t: int, d_in: int, d_out: int, act: torch.dtype, backward: bool = False) -> Kernel:
    """Row-wise int8 weight (CB [N, K] int8, SCB [N] fp32) dequantised in the GEMM's operand
    load; same structure as ``matmul_4bit_fused``."""
    w = d_out * d_in + d_out * 4
    a, b = (t * d_in, t * d_out) if not backward else (t * d_out, t * d_in)
    return Kernel("int8 GEMM (dequant in prologue)" + (" dX" if backward else ""),
                  a * _b(act) + w, b * _b(act), 2 * t * d_in * d_out, True)


def dequant_int8_then_matmul(t: int, d_in: int, d_out: int, act: torch.dtype, backward: bool = False) -> list[Kernel]:
    """Dequantise CB * SCB / 127 to ``act`` (reads N*K + 4N, writes N*K*act), then a GEMM."""
    deq = Kernel("dequantize_int8", d_out * d_in + d_out * 4, d_out * d_in * _b(act), d_out * d_in)
    mm = base_linear_backward(t, d_in, d_out, act) if backward else base_linear_forward(t, d_in, d_out, act)
    return [deq] + mm


# ----------------------------------------------------------------------------------------------
# IA3


def ia3_fused_matmul(t: int, d_in: int, d_out: int, act: torch.dtype, scale: torch.dtype,
                     feedforward: bool) -> Kernel:
    """The IA3 scale inside the base GEMM: a prologue multiply of the X tile (feedforward, scale
    [d_in]) or an epilogue multiply of the Y tile (scale [d_out]); the only extra traffic is
    the scale vector."""
    base = base_linear_forward(t, d_in, d_out, act)[0]
    n = d_in if feedforward else d_out
    return Kernel("IA3 GEMM (scale fused)", base.bytes_read + n * _b(scale), base.bytes_written,
                  base.flops + t * n, True)


def peft_ia3_forward(t: int, d_in: int, d_out: int, act: torch.dtype, scale: torch.dtype,
                     feedforward: bool) -> list[Kernel]:
    """PEFT ``ia3.Linear.forward`` (one adapter): ``ia3_scaling = 1 * l`` (a tiny mul), then
    feedforward: ``(x.to(scale dtype) * l).to(act)`` before the base GEMM; otherwise
    ``(base(x) * l).to(act)`` after it. Casts only where the dtypes differ."""
    n = d_in if feedforward else d_out
    big = t * n
    prod = torch.promote_types(act, scale)
    ks = [elementwise("peft: 1 * ia3_l", [(n, scale)], [(n, scale)])]
    base = base_linear_forward(t, d_in, d_out, act)
    if not feedforward:
        ks += base
    src = act
    if feedforward and scale != act:
        ks.append(elementwise("peft: x.to(ia3 dtype)", [(big, act)], [(big, scale)]))
        src = scale
    ks.append(elementwise("peft: * ia3_l", [(big, src), (n, scale)], [(big, torch.promote_types(src, scale))]))
    if torch.promote_types(src, scale) != act:
        ks.append(elementwise("peft: .to(act)", [(big, prod)], [(big, act)]))
    if feedforward:
        ks += base
    return ks


# ----------------------------------------------------------------------------------------------
# layers: what one LoRA linear costs, forward and backward, base included

LORA_IMPLS = ("base", "peft", "peftfast", "peftfast-fused")


def lora_layer(impl: str, backward: bool, t: int, d_in: int, d_out: int, r: int, act: torch.dtype,
               ad: torch.dtype, dropout_p: float = 0.0, dropout_impl: str = "cuda") -> list[Kernel]:
    """Every kernel of one LoRA linear (training mode), including the base layer's own GEMM
    (forward) or its dX GEMM (backward, frozen weight), so the ratio to ``impl="base"`` is the
    whole overhead of the adapter."""
    if impl not in LORA_IMPLS:
        raise ValueError(f"impl={impl!r}; allowed: {', '.join(LORA_IMPLS)}")
    if impl == "peftfast-fused":
        if not backward:
            return peftfast_fused_forward(t, d_in, d_out, [r], act, ad)
        return _peftfast_fused_backward(t, d_in, d_out, r, act, ad, dropout_p > 0)
    base = (base_linear_backward if backward else base_linear_forward)(t, d_in, d_out, act)
    if impl == "base":
        return base
    if impl == "peft":
        fn = peft_lora_backward if backward else peft_lora_forward
        return base + fn(t, d_in, d_out, r, act, ad, dropout_p, True, dropout_impl)
    if not backward:
        return base + peftfast_lora_forward(t, d_in, d_out, [r], act, ad)
    return base + _peftfast_backward(t, d_in, d_out, r, act, ad, dropout_p > 0) + [dx_accumulate(t, d_in, act)]


def _peftfast_backward(t, d_in, d_out, r, act, ad, dropout: bool) -> list[Kernel]:
    s_b = lora_grad_splits(t, d_out, [r], ad, by_adapter=False)
    s_a = lora_grad_splits(t, d_in, [r], ad, by_adapter=dropout)
    return peftfast_lora_backward(t, d_in, d_out, [r], act, ad, splits_db=s_b, splits_da=s_a)


def _peftfast_fused_backward(t, d_in, d_out, r, act, ad, dropout: bool, bias: bool = False) -> list[Kernel]:
    return peftfast_fused_backward(t, d_in, d_out, [r], act, ad, bias=bias)


def _packed_gemm(k: Kernel, name: str, d_in: int, d_out: int, act: torch.dtype, blocksize: int,
                 nested: bool) -> Kernel:
    """``k`` (a fused LoRA GEMM reading the dense [d_out, d_in] weight) reading the packed 4-bit weight instead."""
    w = nf4_weight_bytes(d_out, d_in, blocksize, nested)
    return Kernel(name, k.bytes_read - d_out * d_in * _b(act) + w, k.bytes_written, k.flops, True)


def qlora_fused_forward(t: int, d_in: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype,
                        bias: bool = False, blocksize: int = 64, nested: bool = False) -> list[Kernel]:
    """``qlora_linear_fused`` (kernels/lora_fused.py) forward, as built: lora.py's shrink, then
    qmatmul's 4-bit kernel with the adapter loop: reads X, the packed weight, t, B (and the bias)
    and writes Y once (``peftfast_fused_forward`` with the packed instead of the dense weight)."""
    big_r = sum(ranks)
    shrink = peftfast_lora_forward(t, d_in, d_out, ranks, act, ad)[0]
    gemm = Kernel("X @ W^T + t @ B^T (+ b)",
                  t * d_in * _b(act) + d_out * d_in * _b(act) + t * big_r * _b(ad) + d_out * big_r * _b(ad)
                  + (d_out * _b(act) if bias else 0),
                  t * d_out * _b(act), 2 * t * d_in * d_out + 2 * t * d_out * big_r, True)
    return [shrink, _packed_gemm(gemm, "peftfast: X @ deq(W)^T + t @ B^T (+ b), one store", d_in, d_out, act,
                                 blocksize, nested)]


def qlora_fused_backward(t: int, d_in: int, d_out: int, ranks: list[int], act: torch.dtype, ad: torch.dtype,
                         bias: bool = False, blocksize: int = 64, nested: bool = False) -> list[Kernel]:
    """``qlora_linear_fused`` backward, as built: ``peftfast_fused_backward`` (dY pass) with the
    dX + dA kernel reading the packed weight (qmatmul's dX tile: 64 rows when it carries the
    adapter): dX = dY @ deq(W) + mask * (G @ A) and dA = G^T @ mask(X), each stored once."""
    ks = peftfast_fused_backward(t, d_in, d_out, ranks, act, ad, bias, block_m_dx=_qlora_dx_block_m(t, act))
    return [_packed_gemm(k, "peftfast bwd: dX = dY @ deq(W) + mask * (G @ A), dA = G^T @ mask(X)", d_in, d_out,
                         act, blocksize, nested) if k.name.startswith("peftfast bwd: dX") else k for k in ks]


def _qlora_dx_block_m(t: int, act: torch.dtype) -> int:
    """Rows per program of the adapter-carrying 4-bit dX kernel (kernels/qmatmul.py: the decode
    tile for T <= 16, else the medium tile)."""
    return 16 if t <= 16 else 64


def qlora_layer(impl: str, backward: bool, t: int, d_in: int, d_out: int, r: int, act: torch.dtype,
                ad: torch.dtype, dropout_p: float = 0.0, blocksize: int = 64, nested: bool = False) -> list[Kernel]:
    """A LoRA linear on an NF4 base. ``impl="peftfast"``: fused 4-bit GEMM + the lora_linear
    kernels (+ autograd's dX add); ``"peftfast-fused"``: the adapter inside the 4-bit GEMMs
    (``qlora_linear_fused``); ``"peft"``: bitsandbytes dequantise + GEMM, then PEFT's adapter ops."""
    if impl == "peftfast-fused":
        if not backward:
            return qlora_fused_forward(t, d_in, d_out, [r], act, ad, blocksize=blocksize, nested=nested)
        return qlora_fused_backward(t, d_in, d_out, [r], act, ad, blocksize=blocksize, nested=nested)
    if impl == "peftfast":
        ks = [matmul_4bit_fused(t, d_in, d_out, act, backward, blocksize, nested)]
        if not backward:
            return ks + peftfast_lora_forward(t, d_in, d_out, [r], act, ad)
        return ks + _peftfast_backward(t, d_in, d_out, r, act, ad, dropout_p > 0) + [dx_accumulate(t, d_in, act)]
    if impl == "peft":
        ks = dequant_4bit_then_matmul(t, d_in, d_out, act, backward, blocksize, nested)
        fn = peft_lora_backward if backward else peft_lora_forward
        return ks + fn(t, d_in, d_out, r, act, ad, dropout_p)
    raise ValueError(f"impl={impl!r}; allowed: 'peftfast', 'peftfast-fused', 'peft'")


# ----------------------------------------------------------------------------------------------
# calibration: counted traffic at small shapes vs the formulas

# Relative tolerance between counted unique bytes of the Triton kernels and the formulas: the
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

    from .traffic import count_torch

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


def _count_device(fn) -> tuple[int, int, list[str]]:
    """(bytes, launches, names) of the Triton launches (unique bytes) and torch ops in fn().

    Torch ops on 0-dim tensors only are left out: the dropout seed is a host-side scalar drawn
    from torch's CPU generator, no GPU kernel."""
    from .traffic import count_torch, count_triton

    with count_torch() as torch_ops, count_triton() as triton_ops:
        fn()
    ops = [x for x in torch_ops.launch_log if not x.scalar_only]
    launches = triton_ops.launch_log + ops
    return (sum(x.unique_bytes_read + x.unique_bytes_written for x in launches), len(launches),
            [x.name for x in launches])


def _count_triton_forward_backward(forward, dy: torch.Tensor) -> tuple[tuple, tuple]:
    """``_count_device`` of ``forward()`` and then of ``backward(dy)`` on its output, with the ops forced
    onto their Triton kernels (PEFTFAST_BACKEND=triton) and the previous backend restored afterwards.
    The kernels' arrival counters (one buffer per device and stream, zeroed once when first
    allocated and reused by every later launch) are allocated before counting: not a per-call cost."""
    import os

    from peftfast.kernels.lora import _arrival_counters

    _arrival_counters(dy.device, 1)
    saved = os.environ.get("PEFTFAST_BACKEND")
    os.environ["PEFTFAST_BACKEND"] = "triton"
    try:
        out = []
        fwd = _count_device(lambda: out.append(forward()))
        bwd = _count_device(lambda: out[0].backward(dy))
    finally:
        if saved is None:
            os.environ.pop("PEFTFAST_BACKEND")
        else:
            os.environ["PEFTFAST_BACKEND"] = saved
    return fwd, bwd


def _require_interpreter() -> None:
    from peftfast.kernels.backend import interpreting

    if not interpreting():
        raise RuntimeError("counting the Triton kernels needs TRITON_INTERPRET=1 set before triton is imported")


def _adapter_weights(gen: torch.Generator, r: int, d_in: int, d_out: int, ad: torch.dtype):
    """(A [r, d_in], B [d_out, r]) random adapter weights in ``ad`` that require grad."""
    a = (torch.randn(r, d_in, generator=gen) / d_in**0.5).to(ad).requires_grad_(True)
    b = (torch.randn(d_out, r, generator=gen) / r**0.5).to(ad).requires_grad_(True)
    return a, b


def _op_checks(op: str, shape: str, fwd: tuple, bwd: tuple, model_f: list[Kernel], model_b: list[Kernel],
               fwd_reread: int = 0) -> list[Check]:
    """Forward and backward Checks of one op's counts against its kernel lists; ``fwd_reread``:
    bytes the formulas charge twice that a count of unique addresses sees once."""
    return [
        Check(f"peftfast {op} forward {shape}", fwd[0], path_bytes(model_f) - fwd_reread, fwd[1], len(model_f),
              KERNEL_BYTES_TOLERANCE),
        Check(f"peftfast {op} backward {shape}", bwd[0], path_bytes(model_b), bwd[1], len(model_b),
              KERNEL_BYTES_TOLERANCE),
    ]


def calibrate_peftfast(t: int = 37, d_in: int = 45, d_out: int = 52, r: int = 7, dropout_p: float = 0.1,
                       ad: torch.dtype = torch.float32) -> list[Check]:
    """Count ``lora_linear``'s Triton kernels under the interpreter (unique bytes per launch)
    plus the torch ops between them, and compare with ``peftfast_lora_forward`` /
    ``peftfast_lora_backward`` (fp16 activations, adapters in ``ad``).

    Needs ``TRITON_INTERPRET=1`` set before the kernels were imported (RuntimeError
    otherwise); raises ImportError when ``peftfast.kernels.lora`` does not exist.
    """

    from peftfast.kernels import lora

    _require_interpreter()
    act = torch.float16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(t, d_in, generator=gen).to(act).requires_grad_(True)
    base_out = torch.randn(t, d_out, generator=gen).to(act)
    a, b = _adapter_weights(gen, r, d_in, d_out, ad)
    dy = torch.randn(t, d_out, generator=gen).to(act)
    fwd, bwd = _count_triton_forward_backward(
        lambda: lora.lora_linear(x, base_out, [a], [b], [1.5], [dropout_p], True), dy)
    return _op_checks("lora_linear", f"(T={t}, {d_in}->{d_out}, r={r}, adapters {str(ad)[6:]})", fwd, bwd,
                      peftfast_lora_forward(t, d_in, d_out, [r], act, ad),
                      _peftfast_backward(t, d_in, d_out, r, act, ad, dropout_p > 0))


def calibrate_peftfast_fused(t: int = 37, d_in: int = 45, d_out: int = 52, r: int = 7, dropout_p: float = 0.1,
                             ad: torch.dtype = torch.float32, bias: bool = True) -> list[Check]:
    """Count ``lora_linear_fused``'s Triton kernels under the interpreter (unique bytes per
    launch) plus the torch ops between them, and compare with ``peftfast_fused_forward`` /
    ``peftfast_fused_backward`` (fp16 activations and base weight, adapters in ``ad``).

    Needs ``TRITON_INTERPRET=1`` set before the kernels were imported (RuntimeError
    otherwise); raises ImportError when ``peftfast.kernels.lora_fused`` does not exist.
    """

    from peftfast.kernels import lora_fused

    _require_interpreter()
    act = torch.float16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(t, d_in, generator=gen).to(act).requires_grad_(True)
    w = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(act)
    b = torch.randn(d_out, generator=gen).to(act).requires_grad_(True) if bias else None
    a, bb = _adapter_weights(gen, r, d_in, d_out, ad)
    dy = torch.randn(t, d_out, generator=gen).to(act)
    fwd, bwd = _count_triton_forward_backward(
        lambda: lora_fused.lora_linear_fused(x, w, b, [a], [bb], [1.5], [dropout_p], True), dy)
    shape = f"(T={t}, {d_in}->{d_out}, r={r}, adapters {str(ad)[6:]}{', bias' if bias else ''})"
    # the forward's second read of X (same addresses) is seen once by the unique count
    return _op_checks("lora_linear_fused", shape, fwd, bwd,
                      peftfast_fused_forward(t, d_in, d_out, [r], act, ad, bias),
                      _peftfast_fused_backward(t, d_in, d_out, r, act, ad, dropout_p > 0, bias),
                      fwd_reread=fused_forward_reread(t, d_in, act))


def calibrate_qlora_fused(t: int = 37, d_in: int = 128, d_out: int = 52, r: int = 7, dropout_p: float = 0.1,
                          ad: torch.dtype = torch.float32) -> list[Check]:
    """Count ``qlora_linear_fused``'s Triton kernels under the interpreter (a random NF4-layout
    weight, blocksize 64, fp32 scales; fp16 activations) and compare with
    ``qlora_fused_forward`` / ``qlora_fused_backward``. Same requirements as
    ``calibrate_peftfast_fused``."""

    from peftfast.kernels import lora_fused
    from peftfast.kernels.quant import Packed4bit

    _require_interpreter()
    act = torch.float16
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (d_out * d_in // 2,), generator=gen, dtype=torch.uint8)
    absmax = torch.rand(d_out * d_in // 64, generator=gen) + 0.5
    code = torch.linspace(-1.0, 1.0, 16)
    p = Packed4bit(data, absmax, code, 64, (d_out, d_in), act)
    x = torch.randn(t, d_in, generator=gen).to(act).requires_grad_(True)
    a, bb = _adapter_weights(gen, r, d_in, d_out, ad)
    dy = torch.randn(t, d_out, generator=gen).to(act)
    fwd, bwd = _count_triton_forward_backward(
        lambda: lora_fused.qlora_linear_fused(x, p, None, [a], [bb], [1.5], [dropout_p], True), dy)
    shape = f"(T={t}, {d_in}->{d_out}, r={r}, NF4 bs 64, adapters {str(ad)[6:]})"
    return _op_checks("qlora_linear_fused", shape, fwd, bwd, qlora_layer("peftfast-fused", False, t, d_in, d_out, r, act, ad, dropout_p),
                      qlora_layer("peftfast-fused", True, t, d_in, d_out, r, act, ad, dropout_p))


# ----------------------------------------------------------------------------------------------
# report

LORA_TARGETS = {"forward": 1.07, "backward": 1.13}  # DESIGN targets, peftfast vs base GEMM alone
QLORA_TARGETS = {"forward": 1.11, "backward": 1.18}


def _ratio_table(gpu: Gpu, overhead: float, rows: list[tuple[str, list[Kernel], list[Kernel]]]) -> list[str]:
    """Rows of (label, forward kernels, backward kernels); ratios are to the first row."""
    head = (f"{'path':<46}|{'fwd launches':>13}{'MB':>9}{'us':>9}{'ratio':>7}{'+ovh':>7} |"
            f"{'bwd launches':>13}{'MB':>9}{'us':>9}{'ratio':>7}{'+ovh':>7}")
    lines = [head, "-" * len(head)]
    ref_f, ref_b = rows[0][1], rows[0][2]
    for label, fwd, bwd in rows:
        cells = []
        for ks, ref in ((fwd, ref_f), (bwd, ref_b)):
            t0 = path_time(ks, gpu)
            ratio0 = t0 / path_time(ref, gpu)
            ratio1 = path_time(ks, gpu, overhead) / path_time(ref, gpu, overhead)
            cells.append(f"{len(ks):>13}{path_bytes(ks) / 1e6:>9.1f}{t0 * 1e6:>9.1f}{ratio0:>7.3f}{ratio1:>7.3f}")
        lines.append(f"{label:<46}|{cells[0]} |{cells[1]}")
    return lines


def _name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _lora_rows(t, d_in, d_out, r, act):
    f32, a = torch.float32, _name(act)

    def pair(impl, ad, p):
        return (lora_layer(impl, False, t, d_in, d_out, r, act, ad, p),
                lora_layer(impl, True, t, d_in, d_out, r, act, ad, p))

    return [
        ("base GEMM alone", *pair("base", act, 0.0)),
        (f"PEFT, adapters {a}, dropout 0.1", *pair("peft", act, 0.1)),
        (f"PEFT, adapters {a}, no dropout", *pair("peft", act, 0.0)),
        ("PEFT, adapters fp32 (autocast), dropout 0.1", *pair("peft", f32, 0.1)),
        ("PEFT, adapters fp32 (autocast), no dropout", *pair("peft", f32, 0.0)),
        ("peftfast lora_linear, dropout 0.1", *pair("peftfast", f32, 0.1)),
        ("peftfast lora_linear, no dropout", *pair("peftfast", f32, 0.0)),
        ("peftfast (fused base), dropout 0.1", *pair("peftfast-fused", f32, 0.1)),
        ("peftfast (fused base), no dropout", *pair("peftfast-fused", f32, 0.0)),
    ]


def _verdict(label: str, fwd: list[Kernel], bwd: list[Kernel], base: tuple, targets: dict, gpu: Gpu,
             overhead: float) -> str:
    parts = []
    for (name, limit), ks, ref in zip(targets.items(), (fwd, bwd), base):
        ratio = path_time(ks, gpu, overhead) / path_time(ref, gpu, overhead)
        parts.append(f"{name} {ratio:.3f} (target {limit}: {'met' if ratio <= limit else 'MISSED'})")
    return f"{label}, with launch overhead: " + ", ".join(parts)


def _kernel_lines(title: str, kernels: list[Kernel], gpu: Gpu) -> list[str]:
    lines = [title]
    for k in kernels:
        bound = "compute" if k.flops / (gpu.tensor_flops if k.tensor_core else gpu.fp32_flops) > \
            k.bytes / gpu.bandwidth else "memory"
        lines.append(f"    {k.name:<40}{k.bytes / 1e6:>9.1f} MB{k.flops / 1e9:>9.2f} GFLOP"
                     f"{k.time(gpu) * 1e6:>9.1f} us  {bound}-bound")
    return lines


def render_report(t: int = 8192, d_in: int = 4096, d_out: int = 4096, r: int = 16,
                  act: torch.dtype = torch.bfloat16, gpus: tuple[Gpu, ...] = (H100, RTX4090),
                  launch_overhead: float = LAUNCH_OVERHEAD_S, calibrate: bool = True) -> str:
    """The traffic table: calibration against counts, then modelled ratios on each GPU."""
    return build_report(t, d_in, d_out, r, act, gpus, launch_overhead, calibrate)[0]


def build_report(t: int = 8192, d_in: int = 4096, d_out: int = 4096, r: int = 16,
                 act: torch.dtype = torch.bfloat16, gpus: tuple[Gpu, ...] = (H100, RTX4090),
                 launch_overhead: float = LAUNCH_OVERHEAD_S, calibrate: bool = True) -> tuple[str, bool]:
    """(report text, whether every calibration check that ran agreed with the formulas)."""
    out = ["Kernel cost model — modelled from counted traffic", ""]
    ok = True
    if calibrate:
        out.append("Calibration (counted at small shapes vs the formulas):")
        checks = calibrate_eager()
        try:
            checks += calibrate_peftfast() + calibrate_peftfast(t=200, ad=torch.float16)
        except ImportError:
            out.append("  peftfast.kernels.lora not available: its kernels were not counted")
        except RuntimeError as err:
            out.append(f"  peftfast kernels not counted: {err}")
        except Exception as err:  # noqa: BLE001 - a kernel that fails to run is reported, not hidden
            out.append(f"  FAILED to run the peftfast kernels: {type(err).__name__}: {err}")
            ok = False
        try:
            checks += calibrate_peftfast_fused() + calibrate_peftfast_fused(t=200, ad=torch.float16, dropout_p=0.0)
            checks += calibrate_peftfast_fused(t=1100, d_in=150, d_out=130, ad=torch.float16)  # two row-block groups
        except ImportError:
            out.append("  peftfast.kernels.lora_fused not available: its kernels were not counted")
        except RuntimeError as err:
            out.append(f"  peftfast fused kernels not counted: {err}")
        except Exception as err:  # noqa: BLE001 - a kernel that fails to run is reported, not hidden
            out.append(f"  FAILED to run the peftfast fused kernels: {type(err).__name__}: {err}")
            ok = False
        out += ["  " + c.line() for c in checks]
        ok = ok and all(c.ok for c in checks)
        out.append("")
    f32 = torch.float32
    base = lora_layer("base", False, t, d_in, d_out, r, act, act), lora_layer("base", True, t, d_in, d_out, r, act, act)
    shape = f"T={t}, d_in={d_in}, d_out={d_out}, r={r}, {_name(act)}"
    for gpu in gpus:
        out.append(f"== {gpu.name}: {gpu.bandwidth / 1e12:.1f} TB/s, {gpu.tensor_flops / 1e12:.0f} TFLOP/s "
                   f"{_name(act)}, {gpu.fp32_flops / 1e12:.1f} TFLOP/s fp32; ratio = time / base time, "
                   f"+ovh = with {launch_overhead * 1e6:.1f} us per launch")
        out.append(f"One LoRA linear, {shape}; base = the GEMM alone (backward: base dX alone)")
        rows = _lora_rows(t, d_in, d_out, r, act)
        out += _ratio_table(gpu, launch_overhead, rows)
        for label, fwd, bwd in rows[5:]:
            out.append(_verdict(label, fwd, bwd, base, LORA_TARGETS, gpu, launch_overhead))
        out += _kernel_lines("  kernels of peftfast lora_linear, dropout 0.1, forward:", rows[5][1], gpu)
        out += _kernel_lines("  backward:", rows[5][2], gpu)
        out += _kernel_lines("  kernels of peftfast (fused base), dropout 0.1, forward:", rows[7][1], gpu)
        out += _kernel_lines("  backward:", rows[7][2], gpu)
        out.append("")
        out.append(f"NF4 QLoRA linear (blocksize 64), {shape}; base = the bf16 GEMM alone")
        q_rows = [("bf16 base GEMM alone", *base)]
        for label, impl in (("peftfast: 4-bit GEMM + lora_linear, p=0.1", "peftfast"),
                            ("peftfast: LoRA fused in the 4-bit GEMM, p=0.1", "peftfast-fused"),
                            ("PEFT+bnb: dequant+GEMM, fp32 adapters, p=0.1", "peft")):
            q_rows.append((label, qlora_layer(impl, False, t, d_in, d_out, r, act, f32, 0.1),
                           qlora_layer(impl, True, t, d_in, d_out, r, act, f32, 0.1)))
        i8 = [matmul_int8_fused(t, d_in, d_out, act)], [matmul_int8_fused(t, d_in, d_out, act, True)]
        d8 = dequant_int8_then_matmul(t, d_in, d_out, act), dequant_int8_then_matmul(t, d_in, d_out, act, True)
        q_rows += [("int8 base only: fused GEMM", *i8), ("int8 base only: dequant + GEMM", *d8)]
        out += _ratio_table(gpu, launch_overhead, q_rows)
        for row in q_rows[1:3]:
            out.append(_verdict(row[0], row[1], row[2], base, QLORA_TARGETS, gpu, launch_overhead))
        dec = 16
        k4 = matmul_4bit_fused(dec, d_in, d_out, act)
        kb = base_linear_forward(dec, d_in, d_out, act)[0]
        out.append(f"Decode T={dec}: the 4-bit GEMM moves {k4.bytes / 1e6:.1f} MB ({k4.time(gpu) * 1e6:.1f} us), "
                   f"a {_name(act)} GEMM {kb.bytes / 1e6:.1f} MB ({kb.time(gpu) * 1e6:.1f} us)")
        out.append("")
        out.append(f"IA3 linear, forward only, {shape[:shape.index(', r=')]}{shape[shape.index(', r=') + 6:]}; "
                   f"target forward <= 1.01 (backward columns: base dX only)")
        ia3_rows = [("base GEMM alone", *base)]
        for ff in (True, False):
            kind = "feedforward (scale on x)" if ff else "attention (scale on y)"
            ia3_rows.append((f"peftfast IA3 {kind}", [ia3_fused_matmul(t, d_in, d_out, act, f32, ff)], base[1]))
            ia3_rows.append((f"PEFT IA3 {kind}, fp32 ia3_l", peft_ia3_forward(t, d_in, d_out, act, f32, ff), base[1]))
        out += _ratio_table(gpu, launch_overhead, ia3_rows)
        out.append("")
    return "\n".join(out), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftfast traffic", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-in", type=int, default=4096)
    parser.add_argument("--d-out", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--gpu", choices=sorted(GPUS), action="append", help="default: all")
    parser.add_argument("--launch-overhead-us", type=float, default=LAUNCH_OVERHEAD_S * 1e6)
    parser.add_argument("--no-calibrate", action="store_true", help="skip counting at small shapes")
    args = parser.parse_args(argv)
    gpus = tuple(GPUS[g] for g in (args.gpu or sorted(GPUS)))
    text, ok = build_report(args.tokens, args.d_in, args.d_out, args.rank, torch.bfloat16, gpus,
                            args.launch_overhead_us * 1e-6, not args.no_calibrate)
    print(text)
    return 0 if ok else 1
