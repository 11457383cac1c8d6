"""LoHa / LoKr on a linear: peftfast's kernels (kernels/lycoris.py) and PEFT's eager computation.

peftfast (``LYCORIS_LINEAR`` on the Triton backend), bytes per launch as counted (unique addresses), launches
in the order they run:

    prepare:  torch, once per call (forward, and again in backward): a small low-rank LoKr factor formed
              whole (casts to fp32, F = U @ V), a full factor's fp32 copy, s times the tensor that carries it.
    forward:  ONE kernel: reads X, W, the kernels' factors (a full one in fp32, a low-rank one in the
              activation dtype) (and b), writes Y. Tensor-core FLOPs: the GEMM 2 T N K, plus the products of
              the factors left low rank, regenerated for every row block of BLOCK_M rows:
              cdiv(T, BM) * 2 N K R_pad each (R_pad: the rank rounded up to BLOCK_R = 16, as the dots are
              padded). CUDA-core work: ``COUNTED_DELTA_INSTRUCTIONS`` per delta element per row block.
    backward: dX kernel (the same structure over the other operand: reads dY, W, factors, writes dX);
              torch zeroes fp32 gradient buffers shaped like the kernels' factors; factor-gradient kernel:
              reads dY, X, factors, adds into the buffers with atomics (each buffer element read and
              written), the GEMM dY^T X (2 T N K) plus per (N, K) tile, per low-rank factor, its product and
              two small dots; torch: ``unprepare_grads`` (s, a formed factor's dU = dF V^T, dV = U^T dF),
              db, the casts of the factor gradients.

CUDA-core work is counted in instructions, each holding an fp32 lane for a cycle, i.e. 2 FLOPs of
``Gpu.fp32_flops`` (which counts an FMA as 2): the instructions the delta adds to the kernels' main loops, counted
in their compiled SASS (``peftfast.tools.costmodel.sass``), index and address arithmetic included. Not modelled:
that some of them (64-bit address IMADs) issue at half rate, the shared-memory round trip of the modified
operand tile (a memory-pipe cost, not counted here), and loads.

Time of one launch: ``max(bytes / bandwidth, tensor FLOPs / tensor peak + CUDA-core FLOPs / fp32 peak)``
("serial": the CUDA-core work of the delta does not overlap the tensor cores), and the optimistic
``max(bytes / bandwidth, tensor, CUDA-core)`` ("overlapped"). Both are reported.

PEFT (``loha.Linear.forward`` / ``lokr.Linear.forward`` unmerged, no dropout): the base F.linear,
the delta built in full (rank products, Hadamard or Kronecker product, the scale), a second F.linear
with the delta, the add; autograd's backward: dY @ W and dY @ D, their add, dD = dY^T X, the chain
rule over [N, K] tensors and the small products.

Adapters in fp32 on a 16-bit model (``factor_dtype``; PEFT's default ``autocast_adapter_dtype=True``):
peftfast's ``prepare`` casts the factors to the model's dtype for the forward and dX kernels (the same kernels)
and, in backward, prepares them again in fp32 for the factor-gradient kernel, whose rank-r dots then run in TF32
(counted as twice their FLOPs: half the 16-bit tensor-core rate); the gradients stay fp32. PEFT, outside
autocast, builds D in fp32, casts x to fp32 and runs X @ D^T, dY @ D and dY^T X as fp32 GEMMs (CUDA cores).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..specs import Gpu, Kernel, cdiv, nbytes

BLOCK_R = 16
# CUDA-core instructions per generated delta element per row block (forward, dX), counted in the compiled SASS of
# the kernels as they launch at the shape (bf16, T = 8192, 4096 x 4096, r = 16): the main loop's ALU
# instructions minus those of the same kernel with DELTA=False, over the delta elements a thread generates per
# iteration (``python -m peftfast.tools.costmodel.sass --arch N`` prints them; tests/kernels/test_lycoris_costmodel.py
# recounts sm_90). They include what the compiler emits around the FMA: index and address arithmetic, masks,
# operand packing, the loop's uniform-datapath bookkeeping. Keyed by architecture, then (case, kernel): ``loha``;
# ``lokr`` both factors gathered (w1 full, w2 formed or full; the ALIGN 1 variants, FMA in bf16; dX holding w2's
# tiles in registers, HELD, on 128-row tiles), ``lokr_wide_blocks`` the same with blocks too tall to hold (dX's plain
# ALIGN 1 loop on 256-row tiles: w1 [8, 8], w2 [512, 512] at 4096), ``lokr_align2``
# the same with LoKr's blocks aligned to the tiles along the kernel's loop only (ALIGN 2: a GQA k/v projection's
# forward), larger than the tiles along it but not a multiple (ALIGN 3: blocks of 80, a 5120-wide layer), smaller
# (``lokr_general``, ALIGN 4, a reciprocal division per index shared by both factors, 128-row tiles: blocks of 24, a
# 576-wide layer; ALIGN 0, the same with 64-bit integer divisions, runs only past 2^22 rows or columns and is counted
# as ALIGN 4); ``lokr_w2_low_rank`` a factor left low rank (its rank-r dots in the loop). fp16 runs the same code;
# fp32 activations use these too.
COUNTED_DELTA_INSTRUCTIONS = {
    90: {("loha", "forward"): 17.88, ("loha", "grad_x"): 18.12, ("lokr", "forward"): 0.88, ("lokr", "grad_x"): 0.25,
         ("lokr_wide_blocks", "forward"): 0.88, ("lokr_wide_blocks", "grad_x"): 5.38,
         ("lokr_w2_low_rank", "forward"): 17.38, ("lokr_w2_low_rank", "grad_x"): 13.00,
         ("lokr_align2", "forward"): 0.88, ("lokr_align2", "grad_x"): 8.12,
         ("lokr_align3", "forward"): 2.00, ("lokr_align3", "grad_x"): 9.12,
         ("lokr_general", "forward"): 21.00, ("lokr_general", "grad_x"): 11.12},
    89: {("loha", "forward"): 20.25, ("loha", "grad_x"): 19.88, ("lokr", "forward"): -1.00, ("lokr", "grad_x"): 0.19,
         ("lokr_wide_blocks", "forward"): -1.00, ("lokr_wide_blocks", "grad_x"): 0.00,
         ("lokr_w2_low_rank", "forward"): 16.00, ("lokr_w2_low_rank", "grad_x"): 11.50,
         ("lokr_align2", "forward"): 0.62, ("lokr_align2", "grad_x"): 4.50,
         ("lokr_align3", "forward"): 0.12, ("lokr_align3", "grad_x"): 5.62,
         ("lokr_general", "forward"): 23.75, ("lokr_general", "grad_x"): 8.12},
}
# (sm_89's LoKr forward loop has fewer ALU instructions than its DELTA=False twin: the compiler schedules the two
# differently; the model counts it as 0.)
GPU_ARCH = {"H100": 90, "RTX 4090": 89}
# Each such instruction holds an fp32 lane for one cycle, i.e. 2 FLOPs of the fp32 peak (which counts an FMA as 2).
FLOPS_PER_INSTRUCTION = 2


def delta_case(kf: "Factors", kernel: str = "forward", act: torch.dtype = torch.bfloat16) -> str:
    """The counted case of the kernels' factors (after ``prepare``) in ``kernel``: for LoKr with both factors
    gathered, the ``ALIGN`` variant the launcher picks for its blocks (``kernels.lycoris.aligned``)."""
    if kf.f1[0] == kf.f2[0] and kf.f1[1] == kf.f2[1] and kf.f1[2] and kf.f2[2]:
        return "loha"
    if not _both_gathered(kf):
        return "lokr_w2_low_rank"
    cfg = _lokr_variant(kf, kernel, act)
    if cfg["ALIGN"] == 1 and kernel == "grad_x" and not cfg["HELD"]:
        return "lokr_wide_blocks"
    return ("lokr_general", "lokr", "lokr_align2", "lokr_align3", "lokr_general")[cfg["ALIGN"]]


def _both_gathered(kf: "Factors") -> bool:
    """Both of the kernels' factors full (LoKr with its small factors formed): the ALIGN / HELD variants."""
    return not (kf.f1[2] or kf.f2[2])


def _lokr_variant(kf: "Factors", kernel: str, act: torch.dtype) -> dict:
    """The GPU config ``kernel``'s launcher picks for LoKr with both factors gathered (``kernels.lycoris.with_variant``:
    ALIGN, HELD, BLOCK_M)."""
    from peftfast.kernels import lycoris as LY  # lazily: the module reads TRITON_INTERPRET

    (a, c, _), (p, q, _) = kf.f1, kf.f2
    return LY.with_variant(LY.gpu_config(kernel, act, (1, 1)), kernel, act, LY.lokr_layout(True, True, p, q, a, c))


def variant_block_m(block_m: int, kf: "Factors", kernel: str, act: torch.dtype = torch.bfloat16) -> int:
    """Rows per program of ``kernel`` for the kernels' factors: ``block_m``, or the launcher's for LoKr's variants
    with both factors gathered (fewer for ALIGN 4 and dX holding w2's tiles: ``kernels.lycoris.variant_block_m``)."""
    if not _both_gathered(kf):
        return block_m
    from peftfast.kernels.lycoris import variant_block_m as launched  # lazily: the module reads TRITON_INTERPRET

    cfg = _lokr_variant(kf, kernel, act)
    return launched(block_m, cfg["ALIGN"], cfg.get("HELD", 0))


def delta_instructions(kf: "Factors", kernel: str, gpu_name: str = "H100", act: torch.dtype = torch.bfloat16) -> float:
    return max(0.0, COUNTED_DELTA_INSTRUCTIONS[GPU_ARCH.get(gpu_name, 90)][(delta_case(kf, kernel, act), kernel)])


@dataclass(frozen=True)
class Factors:
    """A delta's two factors: each (rows, cols, rank) with rank 0 for a full factor."""

    f1: tuple[int, int, int]
    f2: tuple[int, int, int]

    def elements(self) -> int:
        n = 0
        for rows, cols, r in (self.f1, self.f2):
            n += rows * cols if r == 0 else r * (rows + cols)
        return n

    def tensors(self) -> list[int]:
        """Elements of each factor tensor, in the op's order (F, or U then V, per factor)."""
        out = []
        for rows, cols, r in (self.f1, self.f2):
            out += [rows * cols] if r == 0 else [rows * r, r * cols]
        return out

    def padded_ranks(self) -> list[int]:
        return [cdiv(r, BLOCK_R) * BLOCK_R for _, _, r in (self.f1, self.f2) if r]

    def full_bytes(self, act_bytes: int, narrow: bool | None = None) -> int:
        """Bytes per element of a full factor as the kernels read it: act's when ``prepare`` narrows (16-bit
        activations; ``narrow`` None: that is act_bytes != 4) and both factors are full, else fp32."""
        narrow = act_bytes != 4 if narrow is None else narrow
        return act_bytes if narrow and self.f1[2] == 0 and self.f2[2] == 0 else 4

    def nbytes(self, act_bytes: int, factor_bytes: int | None = None, narrow: bool | None = None) -> int:
        """Bytes of the factors as the kernels read them: a full factor in ``full_bytes``, a low-rank one in act's
        when ``prepare`` narrows, else in its own (``factor_bytes``, default act's)."""
        narrow = act_bytes != 4 if narrow is None else narrow
        fb = self.full_bytes(act_bytes, narrow)
        lb = act_bytes if narrow or factor_bytes is None else factor_bytes
        return sum(rows * cols * fb if r == 0 else r * (rows + cols) * lb for rows, cols, r in (self.f1, self.f2))


def loha(d_in: int, d_out: int, r: int) -> Factors:
    return Factors((d_out, d_in, r), (d_out, d_in, r))


def lokr(d_in: int, d_out: int, a: int, c: int, r1: int, r2: int) -> Factors:
    """kron(w1 [a, c], w2 [d_out / a, d_in / c]); r1 / r2 = 0 for a full factor."""
    return Factors((a, c, r1), (d_out // a, d_in // c, r2))


def _form_rule() -> tuple[int, int]:
    from peftfast.kernels.lycoris import FORM_LIMIT, FORM_SHARE  # lazily: the module reads TRITON_INTERPRET

    return FORM_LIMIT, FORM_SHARE


def formed(fac: Factors, d_in: int, d_out: int) -> tuple[bool, bool]:
    """Which low-rank factors ``prepare`` forms whole (small LoKr factors)."""
    limit, share = _form_rule()
    return tuple(bool(r) and rows * cols <= limit and rows * cols * share <= d_in * d_out
                 for rows, cols, r in (fac.f1, fac.f2))


def kernel_factors(fac: Factors, d_in: int, d_out: int) -> Factors:
    """The factors as the kernels see them (formed ones full)."""
    f = formed(fac, d_in, d_out)
    return Factors(*((rows, cols, 0 if fm else r) for (rows, cols, r), fm in zip((fac.f1, fac.f2), f)))


@dataclass(frozen=True)
class Launch:
    kernel: Kernel
    cuda_flops: int = 0  # CUDA-core FLOP-equivalents of the same launch (Kernel.flops: tensor cores)

    def time(self, gpu: Gpu, overlapped: bool = False) -> float:
        tc = self.kernel.flops / (gpu.tensor_flops if self.kernel.tensor_core else gpu.fp32_flops)
        cc = self.cuda_flops / gpu.fp32_flops
        compute = max(tc, cc) if overlapped else tc + cc
        return max(self.kernel.bytes / gpu.bandwidth, compute)


def path_time(launches: list[Launch], gpu: Gpu, overlapped: bool = False) -> float:
    return sum(x.time(gpu, overlapped) for x in launches)


def _tile_work(row_blocks: int, d_in: int, d_out: int, kf: Factors, kernel: str, gpu_name: str,
               act: torch.dtype) -> tuple[int, int]:
    """(tensor FLOPs, CUDA-core FLOP-equivalents) of generating W + D ``row_blocks`` times."""
    tc = sum(row_blocks * 2 * d_out * d_in * rp for rp in kf.padded_ranks())
    instructions = delta_instructions(kf, kernel, gpu_name, act)
    return tc, round(row_blocks * d_out * d_in * instructions * FLOPS_PER_INSTRUCTION)


def _torch(name: str, read: int, written: int, flops: int = 0) -> Launch:
    return Launch(Kernel(name, read, written, flops))


def narrows(a: int, f: int, exact: bool = False) -> bool:
    """Whether ``prepare`` reads the factors in the activations' 16-bit dtype (``a``, ``f``: activation and factor
    bytes): always with 16-bit activations, except for the factor-gradient kernel's ``exact`` operands of fp32
    factors (``kernels.lycoris.rounds_factors``)."""
    return a != 4 and not (exact and f != a)


def _prepare(fac: Factors, d_in: int, d_out: int, a: int, f: int | None = None, exact: bool = False) -> list[Launch]:
    """``prepare``'s torch ops, in order (``f``: the factors' bytes, default the activations' ``a``): the formed
    factors' casts to fp32 and products; then per factor its cast to the dtype the kernels read it in (a formed or
    full one: the activations' 16-bit dtype when both end up full and ``prepare`` narrows, else fp32; a low-rank
    one: the activations' when it narrows, else its own); then s times the tensor that carries it (the first full
    factor, else factor 1's U). A cast to the dtype a tensor has is no op."""
    f = a if f is None else f
    out = []
    fm = formed(fac, d_in, d_out)
    kf = kernel_factors(fac, d_in, d_out)
    narrow = narrows(a, f, exact)
    fb = kf.full_bytes(a, narrow)
    for (rows, cols, r), form in zip((fac.f1, fac.f2), fm):
        if form:
            if f != 4:
                out += [_torch("torch: U to fp32", rows * r * f, rows * r * 4),
                        _torch("torch: V to fp32", r * cols * f, r * cols * 4)]
            out.append(_torch("torch: F = U @ V (fp32)", (rows * r + r * cols) * 4, rows * cols * 4,
                              2 * rows * r * cols))
    for (rows, cols, r), form in zip((fac.f1, fac.f2), fm):
        have = 4 if form else f
        if form or r == 0:
            if have != fb:
                out.append(_torch("torch: full factor to the kernels' dtype", rows * cols * have, rows * cols * fb))
        elif narrow and f != a:
            out += [_torch("torch: U to the activations' dtype", rows * r * f, rows * r * a),
                    _torch("torch: V to the activations' dtype", r * cols * f, r * cols * a)]
    rows, cols, r = kf.f1 if kf.f1[2] == 0 or kf.f2[2] != 0 else kf.f2
    n, nb = (rows * cols, fb) if r == 0 else (rows * r, a if narrow else f)
    out.append(_torch("torch: s folded into a factor", n * nb, n * nb, n))
    return out


def peftfast_forward(t: int, d_in: int, d_out: int, fac: Factors, act: torch.dtype, block_m: int,
                     bias: bool = False, gpu_name: str = "H100",
                     factor_dtype: torch.dtype | None = None) -> list[Launch]:
    """The launches in order: ``prepare``'s torch ops, then the one kernel (CUDA-core work as counted for
    ``gpu_name``'s architecture). ``factor_dtype``: the adapter's (default act's; fp32 on a 16-bit model is
    PEFT's default): ``prepare`` rounds such factors to act's dtype, so the kernel is the same."""
    a = nbytes(act)
    f = nbytes(factor_dtype or act)
    kf = kernel_factors(fac, d_in, d_out)
    tc, cc = _tile_work(cdiv(t, variant_block_m(block_m, kf, "forward", act)), d_in, d_out, kf, "forward", gpu_name,
                        act)
    read = t * d_in * a + d_out * d_in * a + kf.nbytes(a, f) + (d_out * a if bias else 0)
    return _prepare(fac, d_in, d_out, a, f) + [
        Launch(Kernel("peftfast: X @ (W + D)^T (+ b), D tiles inside", read, t * d_out * a,
                      2 * t * d_in * d_out + tc, True), cc)]


def peftfast_backward(t: int, d_in: int, d_out: int, fac: Factors, act: torch.dtype, block_m_dx: int,
                      bias: bool = False, gpu_name: str = "H100",
                      factor_dtype: torch.dtype | None = None) -> list[Launch]:
    """The launches in order: ``prepare``, the dX kernel, for factors ``prepare`` rounded (fp32 ones on a
    16-bit model) a second ``prepare`` keeping them fp32, the zeroed fp32 buffers, the factor-gradient kernel,
    ``unprepare_grads``, db, the casts of the factor gradients to the factors' dtype."""
    a = nbytes(act)
    f = nbytes(factor_dtype or act)
    kf = kernel_factors(fac, d_in, d_out)
    tc, cc = _tile_work(cdiv(t, variant_block_m(block_m_dx, kf, "grad_x", act)), d_in, d_out, kf, "grad_x",
                        gpu_name, act)
    out = _prepare(fac, d_in, d_out, a, f)
    out.append(Launch(Kernel("peftfast bwd: dX = dY @ (W + D), D tiles inside",
                             t * d_out * a + d_out * d_in * a + kf.nbytes(a, f), t * d_in * a,
                             2 * t * d_in * d_out + tc, True), cc))
    exact = f != a and a != 4
    if exact:
        out += _prepare(fac, d_in, d_out, a, f, exact=True)
    narrow = narrows(a, f, exact)
    fb = kf.nbytes(a, f, narrow)
    out += [_torch("torch: zero an fp32 factor-gradient buffer", 0, n * 4) for n in kf.tensors()]
    # once per (N, K) tile: P1, P2 (a low-rank one: one dot, and two more for its gradients), dP = dD * P (two
    # products), and, with 16-bit factors, a low-rank dP's rounding before its dots. fp32 factors on a 16-bit model
    # run those rank-r dots in TF32, at half the 16-bit tensor-core rate: counted as twice the FLOPs.
    ranks = kf.padded_ranks()
    tc_g = 2 * t * d_in * d_out + sum(3 * 2 * d_out * d_in * rp for rp in ranks) * (2 if exact else 1)
    instr = 2 + (len(ranks) if narrow else 0)
    e4 = sum(kf.tensors()) * 4
    out.append(Launch(Kernel("peftfast bwd: dD = dY^T X tiles -> factor grads (fp32 atomics)",
                             t * d_out * a + t * d_in * a + fb + e4, e4, tc_g, True),
                      instr * FLOPS_PER_INSTRUCTION * d_out * d_in))
    # unprepare_grads: s on the tensor that carries it, then a formed factor's dU, dV
    rows, cols, r = kf.f1 if kf.f1[2] == 0 or kf.f2[2] != 0 else kf.f2
    n = rows * cols if r == 0 else rows * r
    out.append(_torch("torch: s times a kernel gradient", n * 4, n * 4, n))
    for (rows, cols, r), form in zip((fac.f1, fac.f2), formed(fac, d_in, d_out)):
        if form:
            cast = [_torch("torch: V to fp32", r * cols * f, r * cols * 4)] if f != 4 else []
            out += cast + [_torch("torch: dU = dF @ V^T", (rows * cols + r * cols) * 4, rows * r * 4,
                                  2 * rows * cols * r)]
            cast = [_torch("torch: U to fp32", rows * r * f, rows * r * 4)] if f != 4 else []
            out += cast + [_torch("torch: dV = U^T @ dF", (rows * r + rows * cols) * 4, r * cols * 4,
                                  2 * rows * cols * r)]
    if bias:  # fp32 sum, then its cast (none for fp32)
        out.append(_torch("torch: db = sum dY (fp32)", t * d_out * a, d_out * 4, t * d_out))
        if a != 4:
            out.append(_torch("torch: cast db", d_out * 4, d_out * a, d_out))
    if f != 4:
        out += [_torch("torch: cast a factor gradient", n * 4, n * f, n) for n in fac.tensors()]
    return out


def _mm(name, m, k, n, act):
    a = nbytes(act)
    return Launch(Kernel(name, (m * k + k * n) * a, m * n * a, 2 * m * k * n, act != torch.float32))


def _ew(name, reads, writes, act):
    a = nbytes(act)
    return Launch(Kernel(name, reads * a, writes * a, writes))


def _peft_delta(d_in, d_out, fac: Factors, act) -> list[Launch]:
    """PEFT's construction of D [N, K] (rank products, the elementwise product, the scale)."""
    nk = d_in * d_out
    out = [_mm("PEFT: factor product", rows, r, cols, act) for rows, cols, r in (fac.f1, fac.f2) if r]
    if fac.f1[0] == d_out:  # LoHa: Hadamard of two [N, K]
        out.append(_ew("PEFT: Hadamard product", 2 * nk, nk, act))
    else:  # LoKr: kron of two small factors
        out.append(_ew("PEFT: Kronecker product", fac.f1[0] * fac.f1[1] + fac.f2[0] * fac.f2[1], nk, act))
    out.append(_ew("PEFT: * scale", nk, nk, act))
    return out


def _cast(name, elements, src: torch.dtype, dst: torch.dtype) -> list[Launch]:
    return [] if src == dst else [_torch(name, elements * nbytes(src), elements * nbytes(dst))]


def peft_forward(t: int, d_in: int, d_out: int, fac: Factors, act: torch.dtype,
                 factor_dtype: torch.dtype | None = None) -> list[Launch]:
    """Base F.linear included. Factors of another dtype (``factor_dtype``: fp32 on a 16-bit model, PEFT's
    default): D is built in theirs, x is cast to it (``_cast_input_dtype``) and X @ D^T runs in it (an fp32 GEMM:
    CUDA cores, as torch's matmuls without TF32), the base output is added in fp32 and the sum cast back."""
    fdt = factor_dtype or act
    f = nbytes(fdt)
    add = Launch(Kernel("PEFT: result + delta output", t * d_out * (nbytes(act) + f), t * d_out * f, t * d_out))
    return ([_mm("PEFT: base X @ W^T", t, d_in, d_out, act)] + _peft_delta(d_in, d_out, fac, fdt)
            + _cast("PEFT: x to the adapter's dtype", t * d_in, act, fdt)
            + [_mm("PEFT: X @ D^T", t, d_in, d_out, fdt), add]
            + _cast("PEFT: output back to x's dtype", t * d_out, fdt, act))


def peft_backward(t: int, d_in: int, d_out: int, fac: Factors, act: torch.dtype,
                  factor_dtype: torch.dtype | None = None) -> list[Launch]:
    """Autograd's backward, op by op as PEFT 0.21 runs it (base dX included): dY @ W, dY @ D, dD = dY^T X, the
    scale; LoHa's custom backward recomputes each rank product (an [N, K] write) before its Hadamard factor
    and contracts; LoKr's kron backward multiplies dD by each broadcast factor and sums; then the add of the
    two dX terms (autograd accumulates it last). Factors of another dtype: dY cast to theirs and back for the
    base, dY @ D, dD and the chain rule in theirs, dX of the delta cast to x's dtype."""
    fdt = factor_dtype or act
    nk = d_in * d_out
    out = (_cast("PEFT bwd: dY to the adapter's dtype", t * d_out, act, fdt)
           + _cast("PEFT bwd: dY back for the base", t * d_out, fdt, act)
           + [_mm("PEFT bwd: dY @ W", t, d_out, d_in, act), _mm("PEFT bwd: dY @ D", t, d_out, d_in, fdt)]
           + _cast("PEFT bwd: dX of the delta to x's dtype", t * d_in, fdt, act)
           + [_ew("PEFT bwd: dD * scale", nk, nk, fdt)])
    if fac.f1[0] == d_out:  # Hadamard: per factor, recompute the other product, dP = dD * it, dU, dV
        for (rows, cols, r), (orows, ocols, o_r) in ((fac.f1, fac.f2), (fac.f2, fac.f1)):
            out += [_mm("PEFT bwd: recompute the other rank product", orows, o_r, ocols, fdt),
                    _ew("PEFT bwd: dD * other product", 2 * nk, nk, fdt),
                    _mm("PEFT bwd: dU = dP @ V^T", rows, cols, r, fdt),
                    _mm("PEFT bwd: dV = U^T dP", r, rows, cols, fdt)]
    else:  # Kronecker: dD * broadcast factor, summed to the other factor's shape (w1's gradient, then w2's)
        for (rows, cols, _r), (orows, ocols, _o) in ((fac.f1, fac.f2), (fac.f2, fac.f1)):
            out += [_ew("PEFT bwd: dD * broadcast factor", nk + orows * ocols, nk, fdt),
                    _ew("PEFT bwd: sum to the factor's shape", nk, rows * cols, fdt)]
        for rows, cols, r in (fac.f1, fac.f2):
            if r:
                out += [_mm("PEFT bwd: dU = dP @ V^T", rows, cols, r, fdt),
                        _mm("PEFT bwd: dV = U^T dP", r, rows, cols, fdt)]
    out += [_mm("PEFT bwd: dD = dY^T X", d_out, t, d_in, fdt),
            _ew("PEFT bwd: dX add", 2 * t * d_in, t * d_in, act)]
    return out


def base_forward(t, d_in, d_out, act) -> list[Launch]:
    return [_mm("base: X @ W^T", t, d_in, d_out, act)]


def base_backward(t, d_in, d_out, act) -> list[Launch]:
    return [_mm("base: dX = dY @ W", t, d_out, d_in, act)]


def block_ms(act: torch.dtype) -> tuple[int, int]:
    """Rows per program of the forward and of the dX kernel (the launchers' GPU tiles): the delta is
    regenerated once per such row block. (Imported here: the kernel module reads TRITON_INTERPRET on import.)"""
    from peftfast.kernels.lycoris import gpu_config

    return gpu_config("forward", act)["BLOCK_M"], gpu_config("grad_x", act)["BLOCK_M"]


def ratio_rows(gpu: Gpu, t: int = 8192, d: int = 4096, r: int = 16, act: torch.dtype = torch.bfloat16,
               factor_dtype: torch.dtype | None = None) -> list[tuple[str, float, float, float, float]]:
    """(case, peftfast fwd / base fwd serial, overlapped, peftfast bwd / base dX serial, overlapped) and the
    same for PEFT (serial only: PEFT's launches are separate kernels), as rows; ``factor_dtype``: the adapters'
    (default act's; fp32 is PEFT's default on a 16-bit model)."""
    cases = {  # name: (factors, d_in, d_out)
        f"LoHa r={r}": (loha(d, d, r), d, d),
        f"LoKr w1 full [64,64], w2 rank {r}": (lokr(d, d, 64, 64, 0, r), d, d),
        f"LoKr w1, w2 full (r >= {d // 128})": (lokr(d, d, 64, 64, 0, 0), d, d),
        f"LoKr w1 full [8,8], w2 [512,512] rank {r}": (lokr(d, d, 8, 8, 0, r), d, d),
        f"LoKr w1 full [4,4], w2 rank {r} (not formed)": (lokr(d, d, 4, 4, 0, r), d, d),
        # LoKr's blocks (PEFT's factorization) aligned to the tiles along the loop only, or not at all
        f"LoKr GQA k/v {d // 4}x{d}, w2 [32,64] rank {r}": (lokr(d, d // 4, d // 128, 64, 0, r), d, d // 4),
        f"LoKr {5 * d // 4}x{5 * d // 4}, w2 [80,80] rank {r}": (lokr(5 * d // 4, 5 * d // 4, 64, 64, 0, r),
                                                                  5 * d // 4, 5 * d // 4),
        f"LoKr 576x576, w2 [24,24] rank {r} (general)": (lokr(576, 576, 24, 24, 0, r), 576, 576),
    }
    block_m, block_m_dx = block_ms(act)
    rows = []
    for name, (fac, d_in, d_out) in cases.items():
        bf = path_time(base_forward(t, d_in, d_out, act), gpu)
        bb = path_time(base_backward(t, d_in, d_out, act), gpu)
        fw = peftfast_forward(t, d_in, d_out, fac, act, block_m, gpu_name=gpu.name, factor_dtype=factor_dtype)
        bw = peftfast_backward(t, d_in, d_out, fac, act, block_m_dx, gpu_name=gpu.name, factor_dtype=factor_dtype)
        rows.append((f"peftfast {name}", path_time(fw, gpu) / bf, path_time(fw, gpu, True) / bf,
                     path_time(bw, gpu) / bb, path_time(bw, gpu, True) / bb))
        pf = peft_forward(t, d_in, d_out, fac, act, factor_dtype)
        pb = peft_backward(t, d_in, d_out, fac, act, factor_dtype)
        rows.append((f"PEFT {name}", path_time(pf, gpu) / bf, path_time(pf, gpu) / bf,
                     path_time(pb, gpu) / bb, path_time(pb, gpu) / bb))
    return rows


def render(gpu: Gpu, **kw) -> str:
    fp32 = kw.get("factor_dtype") == torch.float32
    adapters = "fp32 adapters (PEFT's default; PEFT's rows without autocast)" if fp32 else "bf16 adapters"
    lines = [f"LoHa / LoKr linear, modelled on {gpu.name} (T={kw.get('t', 8192)}, {kw.get('d', 4096)}x"
             f"{kw.get('d', 4096)}, bf16 model, {adapters}): ratio to the base GEMM (forward) / base dX GEMM "
             "(backward)",
             f"{'path':<54} {'fwd serial':>10} {'fwd overl.':>10} {'bwd serial':>10} {'bwd overl.':>10}"]
    for name, a, b, c, d in ratio_rows(gpu, **kw):
        lines.append(f"{name:<54} {a:>10.3f} {b:>10.3f} {c:>10.3f} {d:>10.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    from ..specs import H100, RTX4090

    for gpu in (H100, RTX4090):
        for factor_dtype in (None, torch.float32):
            print(render(gpu, factor_dtype=factor_dtype))
            print()


LYCORIS_TARGETS = {"forward": 1.05, "backward": 2.1}  # the modelled targets (H100, bf16)


def bench_rows(gpu: Gpu, t: int, d: int, r: int, act: torch.dtype, launch_overhead: float) -> list[dict]:
    """Rows for the bench's modelled section (op "lycoris"): the keys of ``bench.modelled.model_row``, times
    "serial" (CUDA-core delta work not overlapped with the tensor cores), ratios to the base GEMMs."""
    fac_cases = {f"LoHa r={r}": loha(d, d, r), f"LoKr w1 full 64x64, w2 rank {r}": lokr(d, d, 64, 64, 0, r)}
    base = (base_forward(t, d, d, act), base_backward(t, d, d, act))
    rows = []
    # the adapters in the model's dtype, then in fp32 (PEFT's default on a 16-bit model; PEFT without autocast)
    cases = [(name, fac, None) for name, fac in fac_cases.items()]
    if act != torch.float32:
        cases += [(f"{name}, fp32 adapters", fac, torch.float32) for name, fac in fac_cases.items()]
    for name, fac, fdt in cases:
        for who, fwd, bwd in (("peftfast", peftfast_forward(t, d, d, fac, act, block_ms(act)[0], gpu_name=gpu.name,
                                                            factor_dtype=fdt),
                               peftfast_backward(t, d, d, fac, act, block_ms(act)[1], gpu_name=gpu.name,
                                                 factor_dtype=fdt)),
                              ("PEFT", peft_forward(t, d, d, fac, act, fdt), peft_backward(t, d, d, fac, act, fdt))):
            row = {"section": "modelled", "gpu": gpu.name, "op": "lycoris", "path": f"{who} {name}",
                   "shape": {"T": t, "d_in": d, "d_out": d, "r": r}, "bandwidth": gpu.bandwidth,
                   "launch_overhead_s": launch_overhead}
            for key, ks, ref in (("fwd", fwd, base[0]), ("bwd", bwd, base[1])):
                tt, tb = path_time(ks, gpu), path_time(ref, gpu)
                to, tbo = tt + launch_overhead * len(ks), tb + launch_overhead * len(ref)
                row.update({f"{key}_launches": len(ks), f"{key}_bytes": sum(x.kernel.bytes for x in ks),
                            f"{key}_flops": sum(x.kernel.flops + x.cuda_flops for x in ks), f"{key}_time_s": tt,
                            f"{key}_base_time_s": tb, f"{key}_ratio": tt / tb, f"{key}_time_ovh_s": to,
                            f"{key}_base_time_ovh_s": tbo, f"{key}_ratio_ovh": to / tbo})
                if who == "peftfast":
                    limit = LYCORIS_TARGETS["forward" if key == "fwd" else "backward"]
                    row[f"{key}_target"], row[f"{key}_met"] = limit, to / tbo <= limit
            rows.append(row)
    return rows
