"""Instructions of a kernel's main loop, counted in its compiled SASS (ahead of time: no GPU needed).

The cost model's CUDA-core term for LoHa / LoKr (formulas/lycoris.py) needs the instructions the delta adds per
generated element. Counting them by hand misses what the compiler emits (address arithmetic, masks, index
arithmetic, operand repacking), so they are counted here: the lycoris forward and dX kernels are compiled as
they launch for a representative layer (launches recorded on meta tensors, specialised by Triton's own binder:
``kernels.aot.spec_from_launch``), once as launched and once with ``DELTA=False`` (the same kernel, the same
tiles, the delta generation left out), for a GPU architecture; the SASS (bundled ``cuobjdump``) of the main
loop, the longest backward branch's range, is counted per category (``category``). The difference of ALU
instructions, divided by the delta elements one thread generates per iteration (``BLOCK_K * BLOCK_N / (32 *
num_warps)``), is the extra CUDA-core issue slots per delta element per row block.

Run (a few seconds per compile): ``python -m peftfast.tools.costmodel.sass [--arch 90] [--json]``, in a process
where ``TRITON_INTERPRET`` is off when the kernels are imported.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, replace

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(0x[0-9a-f]+)")
_PREDICATE = re.compile(r"^@!?U?P\w+\s+")
_TENSOR = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "WARPGROUP")
_MEMORY = ("LD", "ST", "RED", "ATOM", "CCTL", "UTMA", "SYNCS", "DEPBAR", "BAR", "ARRIVES", "LDGDEPBAR", "MEMBAR")
_CONTROL = ("NOP", "BRA", "EXIT", "WARPSYNC", "BSSY", "BSYNC", "YIELD")


def opcode(instr: str) -> str:
    """``@P0 HFMA2.BF16_V2 R1, ...`` -> ``HFMA2``."""
    return _PREDICATE.sub("", instr).split()[0].split(".")[0]


def category(instr: str) -> str:
    """tensor (MMA), memory (loads, stores, barriers, async copies), control (branches, NOP) or alu (every other
    instruction: the integer and floating-point work of the CUDA cores, conversions, moves, predicates)."""
    op = opcode(instr)
    if op.startswith(_TENSOR):
        return "tensor"
    if op.startswith(_MEMORY):
        return "memory"
    if op in _CONTROL:
        return "control"
    return "alu"


def main_loop(sass: str) -> list[str]:
    """The instructions of the longest loop (a backward branch and the range it jumps over) in ``sass``."""
    instrs = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTR.match, sass.splitlines()) if m]
    index = {addr: i for i, (addr, _) in enumerate(instrs)}
    best: list[str] = []
    for i, (addr, text) in enumerate(instrs):
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in index:
            body = [t for _, t in instrs[index[int(m.group(1), 16)]:i + 1]]
            best = body if len(body) > len(best) else best
    if not best:
        raise ValueError("no loop in the SASS")
    return best


def loop_counts(spec, arch: int) -> Counter:
    """Instructions per category of ``spec``'s main loop compiled for ``arch`` (per thread, per iteration)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    from ..compile_report import sass_listing

    kernel = triton.compile(ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs()),
                            target=GPUTarget("cuda", arch, 32), options=spec.compile_options())
    return Counter(category(x) for x in main_loop(sass_listing(kernel.asm["cubin"])))


CASES = ("loha", "lokr", "lokr_wide_blocks", "lokr_w2_low_rank", "lokr_align2", "lokr_align3", "lokr_general")


@dataclass(frozen=True)
class DeltaCount:
    case: str
    kernel: str
    arch: int
    alu: int  # ALU instructions per iteration, as launched
    alu_base: int  # the same with DELTA=False
    elements: int  # delta elements per thread per iteration

    @property
    def per_element(self) -> float:
        return (self.alu - self.alu_base) / self.elements


def _launches(case: str, arch: int, t: int, d: int, r: int):
    """The forward and dX launches of one bf16 layer [d, d], T = t, recorded on meta tensors."""
    import torch

    from peftfast.kernels import lycoris as LY
    from peftfast.kernels.runtime import recording_launches

    def meta(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16, device="meta")

    def lokr(a, p, c, q):  # w1 [a, c] full, w2 [p, q] of rank r (formed whole by prepare when small)
        return [meta(a, c), meta(p, r), meta(r, q)], LY.lokr_layout(True, False, p, q, a, c), a * p, c * q

    if case == "loha":
        layers = [([meta(d, r), meta(r, d), meta(d, r), meta(r, d)], LY.loha_layout(d, d), d, d)] * 2
    elif case in ("lokr", "lokr_w2_low_rank"):  # w1 [a, a], w2 [d / a, d / a]: formed for a = 64, not for 4
        a = 64 if case == "lokr" else 4
        layers = [lokr(a, d // a, a, d // a)] * 2
    elif case == "lokr_wide_blocks":  # w1 [8, 8], w2 [d / 8, d / 8] formed: blocks of whole tiles, too tall for dX
        # to hold w2's tiles (p > MAX_HELD * BLOCK_N): ALIGN 1 without HELD
        layers = [lokr(8, d // 8, 8, d // 8)] * 2
    elif case == "lokr_align2":  # blocks aligned along the loop only: the forward of a GQA k/v projection
        # [d / 4, d] (p = 32 < BLOCK_N), the dX of a [d, 3 d / 8] layer (q = 48, not a multiple of BLOCK_K)
        layers = [lokr(d // 128, 32, 64, d // 64), lokr(64, d // 64, 32, 3 * d // 256)]
    elif case == "lokr_align3":  # a [5 d / 4, 5 d / 4] layer, blocks of 80 (PEFT's factorization of 5120: 64 x 80)
        layers = [lokr(64, 5 * d // 256, 64, 5 * d // 256)] * 2
    else:  # lokr_general: blocks smaller than the tiles along the loop (a [576, 576] layer: 24 x 24 blocks)
        layers = [lokr(24, 24, 24, 24)] * 2
    launches = []
    for (factors, layout, n, k), launcher in zip(layers, (LY.launch_forward, LY.launch_grad_x)):
        ops = LY.prepare(factors, layout, 0.5, n, k, torch.bfloat16)
        with recording_launches(arch) as rec:
            if launcher is LY.launch_forward:
                launcher(meta(t, k), meta(n, k), None, ops)
            else:
                launcher(meta(t, n), meta(n, k), ops)
        launches += rec
    return launches


def lycoris_delta_counts(arch: int = 90, t: int = 8192, d: int = 4096, r: int = 16) -> list[DeltaCount]:
    """DeltaCount of the forward and dX kernels, bf16, for LoHa r (``loha``), LoKr with w1 [64, 64] full and w2 of
    rank r formed whole (``lokr``: both factors gathered, blocks of whole tiles: ALIGN 1, dX holding w2's tiles:
    HELD), the same with w1 [8, 8] (``lokr_wide_blocks``: blocks of 512 rows, too tall to hold), LoKr with w1 [4, 4] and
    w2 [d / 4, d / 4] of rank r left low rank (``lokr_w2_low_rank``), and LoKr with both factors gathered whose
    blocks hold whole tiles along the kernel's loop only (``lokr_align2``, ALIGN 2), are larger than the tiles along
    it but not a multiple (``lokr_align3``, ALIGN 3) or smaller (``lokr_general``, ALIGN 0)."""
    from peftfast.kernels.aot import spec_from_launch

    out = []
    for case in CASES:
        for name, rec in zip(("forward", "grad_x"), _launches(case, arch, t, d, r)):
            spec = spec_from_launch(rec.kernel, rec.args, rec.meta, arch, f"lycoris_{name}", True)
            base = replace(spec, constexprs={**spec.constexprs, "DELTA": False})
            c = spec.constexprs
            # dX's HELD variant runs a block's HELD tiles per iteration of its (outer) loop
            elements = c["BLOCK_K"] * c["BLOCK_N"] * max(1, c.get("HELD", 0)) // (32 * spec.num_warps)
            out.append(DeltaCount(case, name, arch, loop_counts(spec, arch)["alu"], loop_counts(base, arch)["alu"],
                                  elements))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--json", action="store_true", help="print {case/kernel: per element} as JSON")
    args = parser.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"
    if args.json:
        print(json.dumps({f"{c.case}/{c.kernel}": round(c.per_element, 2) for c in lycoris_delta_counts(args.arch)}))
        return 0
    print(f"sm_{args.arch}, bf16, T=8192, 4096 x 4096, r=16: ALU instructions per thread per main-loop iteration")
    print(f"{'case':<16} {'kernel':<8} {'launched':>9} {'no delta':>9} {'elements':>9} {'per element':>12}")
    for c in lycoris_delta_counts(args.arch):
        print(f"{c.case:<16} {c.kernel:<8} {c.alu:>9} {c.alu_base:>9} {c.elements:>9} {c.per_element:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
