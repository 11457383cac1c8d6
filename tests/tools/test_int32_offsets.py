"""The int32-offset check of the compile report (TTIR analysis), on toy kernels and on every kernel.

A GPU computes ``ptr + index * stride`` in the integer type of its operands: int32 * int32 wraps
past 2**31 elements and the kernel reads or writes the wrong address (the interpreter does not
show it). The toys below are the patterns the check must flag (an atomic ticket's row block, a
program id times a block size, an index times a stride) and their 64-bit forms, which it must not.
The compile workers load this file by path, so the toys are real JIT functions there.
"""
import pytest
import triton
import triton.language as tl
from peftfast.kernels.aot import AotSpec

from peftfast.tools import compile_report as cr

pytestmark = pytest.mark.slow


@triton.jit
def toy_ticket_rows(x_ptr, count_ptr, y_ptr, M, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    WIDE: tl.constexpr):
    # the row block comes from an atomic ticket (int32) like the fused forward's look-ahead shrink
    ticket = tl.atomic_add(count_ptr, 1)
    if WIDE:
        ticket = ticket.to(tl.int64)
    offs_m = ticket * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))
    tl.store(y_ptr + offs_m, tl.sum(x, axis=1), mask=offs_m < M)


@triton.jit
def toy_pid_rows(x_ptr, y_ptr, M, stride_xm, BLOCK_M: tl.constexpr, WIDE: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(y_ptr + offs_m * stride_xm, tl.load(x_ptr + offs_m * stride_xm, mask=offs_m < M), mask=offs_m < M)


@triton.jit
def toy_loop_rows(x_ptr, y_ptr, M, stride_xm, BLOCK_M: tl.constexpr, WIDE: tl.constexpr):
    # a loop over rows with an int32 induction variable times a run-time stride
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if WIDE:
            offs_m = offs_m.to(tl.int64)
        acc += tl.load(x_ptr + offs_m * stride_xm, mask=offs_m < M, other=0.0)
    tl.store(y_ptr + tl.arange(0, BLOCK_M), acc)


@triton.jit
def toy_table(x_ptr, table_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # small table rows (i * 4) and tile-local offsets times a run-time row length: not flagged
    pid = tl.program_id(0).to(tl.int64)
    i = tl.load(table_ptr + 0)
    start = tl.load(table_ptr + i * 4)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    lane = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + start + lane * n, mask=offs < n), mask=offs < n)


def _sig(fn, types, consts):
    return {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}


def toy_specs():
    specs = []
    for wide in (False, True):
        c = {"BLOCK_M": 64, "BLOCK_K": 64, "WIDE": wide}
        specs.append(AotSpec(f"ticket[wide={wide}]", toy_ticket_rows,
                             _sig(toy_ticket_rows, {"x_ptr": "*fp16", "count_ptr": "*i32", "y_ptr": "*fp32"}, c), c))
        c = {"BLOCK_M": 128, "WIDE": wide}
        specs.append(AotSpec(f"pid[wide={wide}]", toy_pid_rows,
                             _sig(toy_pid_rows, {"x_ptr": "*fp32", "y_ptr": "*fp32"}, c), c))
        specs.append(AotSpec(f"loop[wide={wide}]", toy_loop_rows,
                             _sig(toy_loop_rows, {"x_ptr": "*fp32", "y_ptr": "*fp32"}, c), c))
    c = {"BLOCK": 128}
    specs.append(AotSpec("table", toy_table, _sig(toy_table, {"x_ptr": "*fp32", "table_ptr": "*i32",
                                                            "y_ptr": "*fp32"}, c), c))
    return specs


def test_toy_kernels_flagged_exactly_where_offsets_are_32_bit():
    report = cr.offset_report([cr.SpecSource(path=__file__, factory="toy_specs")], progress=False)
    assert set(report) == {s.name for s in toy_specs()}
    for name, found in report.items():
        assert not isinstance(found, str), (name, found)
        if "wide=False" in name:
            assert found, f"{name}: the int32 offset was not flagged"
        else:
            assert found == [], f"{name}: flagged {found}"
    assert any("x_ptr" in f and "test_int32_offsets.py" in f for f in report["ticket[wide=False]"])


def test_every_kernel_has_64_bit_offsets_on_large_tensors():
    """Every kernel module's specs, one per index key (the same index arithmetic in another dtype or
    dot precision builds the same offsets): no int32 product feeds an offset of a large tensor."""
    report = cr.offset_report(progress=False, one_per_key=True)
    assert len(report) > 100, sorted(report)
    problems = {name: found for name, found in report.items() if found}
    assert not problems, "\n".join(f"{k}: {v}" for k, v in problems.items())


def test_declared_int32_operands_are_checked_at_launch():
    import torch
    from peftfast.kernels import runtime
    from peftfast.kernels import qmatmul

    kernel = next(s.fn for s in qmatmul.aot_specs() if s.name.startswith("matmul_4bit"))

    assert "code_ptr" in runtime.int32_operands(kernel)
    big = torch.empty(2**31 + 1, dtype=torch.uint8, device="meta").as_strided((2,), (2**31,))
    args = [None] * len(kernel.arg_names)
    args[kernel.arg_names.index("code_ptr")] = big
    with pytest.raises(ValueError, match="code_ptr .* spans 2147483648 elements"):
        runtime.launch(kernel, (1,), *args)
    with pytest.raises(ValueError, match="no argument"):
        runtime.declare_int32_operands(kernel, "nope_ptr")
