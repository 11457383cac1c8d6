"""Launch and byte counters: exact counts on kernels and ops whose traffic is known by hand."""
import pytest
import torch
import triton
import triton.language as tl
from peftfast.kernels.backend import interpreting

from peftfast.tools.traffic import count_torch, count_triton, tensor_bytes

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="Triton kernels run under TRITON_INTERPRET=1")


@triton.jit
def masked_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.jit
def add_row_vector(x_ptr, b_ptr, y_ptr, n_cols, stride_xm, stride_ym, BLOCK_N: tl.constexpr):
    # one program per row: every program re-reads the whole of b
    pid_m = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask = offs_n < n_cols
    x = tl.load(x_ptr + pid_m * stride_xm + offs_n, mask=mask)
    b = tl.load(b_ptr + offs_n, mask=mask)
    tl.store(y_ptr + pid_m * stride_ym + offs_n, (x.to(tl.float32) + b).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def histogram(idx_ptr, counts_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(idx_ptr + offs, mask=mask, other=0)
    tl.atomic_add(counts_ptr + idx, tl.full((BLOCK,), 1, tl.int32), mask=mask)


@needs_interpreter
@pytest.mark.parametrize("n,block", [(1000, 64), (113, 128), (256, 16)])
def test_masked_copy_counts_exact_bytes(n, block):
    x = torch.randn(n + 37)[:n]  # the elements past n exist but must not be counted
    y = torch.empty(n)
    with count_triton() as c:
        masked_copy[(triton.cdiv(n, block),)](x, y, n, BLOCK=block)
    assert torch.equal(y, x)
    assert c.launches == 1
    assert (c.bytes_read, c.bytes_written) == (4 * n, 4 * n)
    assert (c.unique_bytes_read, c.unique_bytes_written) == (4 * n, 4 * n)
    assert c.launch_log[0].grid == (triton.cdiv(n, block), 1, 1)
    assert c.launch_log[0].name == "masked_copy"


@needs_interpreter
def test_requested_vs_unique_bytes_and_element_sizes():
    rows, cols = 7, 45
    x = torch.randn(rows, 50, dtype=torch.float16)[:, :cols]  # strided rows
    b = torch.randn(cols)  # fp32
    y = torch.empty(rows, cols, dtype=torch.float16)
    with count_triton() as c:
        add_row_vector[(rows,)](x, b, y, cols, x.stride(0), y.stride(0), BLOCK_N=64)
    torch.testing.assert_close(y, (x.float() + b).half())
    # every row program loads its row of x (2 B) and all of b (4 B)
    assert c.bytes_read == rows * cols * 2 + rows * cols * 4
    assert c.unique_bytes_read == rows * cols * 2 + cols * 4
    assert c.bytes_written == c.unique_bytes_written == rows * cols * 2


@needs_interpreter
def test_atomics_count_read_and_write():
    n, bins = 300, 5
    idx = torch.randint(0, bins, (n,), dtype=torch.int32)
    counts = torch.zeros(bins, dtype=torch.int32)
    with count_triton() as c:
        histogram[(triton.cdiv(n, 128),)](idx, counts, n, BLOCK=128)
    assert torch.equal(counts, torch.bincount(idx, minlength=bins).to(torch.int32))
    # idx loads (4 B each) plus one read and one write of a counter per atomic
    assert c.bytes_read == 4 * n + 4 * n
    assert c.bytes_written == 4 * n
    assert c.unique_bytes_written == 4 * len(torch.unique(idx))


@needs_interpreter
def test_per_kernel_breakdown_and_nesting():
    n = 200
    x, y = torch.randn(n), torch.empty(n)
    b = torch.randn(64)
    xx, yy = torch.randn(3, 64, dtype=torch.float16), torch.empty(3, 64, dtype=torch.float16)
    with count_torch() as ops, count_triton() as kernels:
        masked_copy[(4,)](x, y, n, BLOCK=64)
        masked_copy[(4,)](y, x, n, BLOCK=64)
        add_row_vector[(3,)](xx, b, yy, 64, 64, 64, BLOCK_N=64)
        z = x * 2.0  # a torch op between kernels
    per = kernels.per_kernel
    assert set(per) == {"masked_copy", "add_row_vector"}
    assert per["masked_copy"].launches == 2 and per["masked_copy"].bytes_read == 2 * 4 * n
    assert per["add_row_vector"].launches == 1
    assert kernels.launches == 3
    assert kernels.bytes_read == sum(k.bytes_read for k in per.values())
    # the interpreter's own host copies are not torch ops of the path
    assert [x.name for x in ops.launch_log] == ["aten.mul.Tensor"]
    assert ops.bytes_read == ops.bytes_written == 4 * n
    assert "masked_copy" in kernels.table()
    assert z.shape == (n,)


def test_triton_counter_outside_blocks_counts_nothing():
    with count_triton() as c:
        pass
    assert c.launches == 0 and c.bytes == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(113, 203, 7), (16, 64, 48)])
def test_mm_bytes_and_launches(m, k, n, dtype):
    a = torch.randn(m, k).to(dtype)
    w = torch.randn(n, k).to(dtype)
    with count_torch() as c:
        y = a @ w.t()  # the transpose is a view: free
    e = a.element_size()
    assert c.launches == 1
    assert c.bytes_read == (m * k + k * n) * e
    assert c.bytes_written == m * n * e
    assert list(c.per_kernel) == ["aten.mm.default"]
    assert y.shape == (m, n)


def test_linear_on_3d_input_and_bias():
    x = torch.randn(2, 13, 41)
    lin = torch.nn.Linear(41, 29)
    with count_torch() as c:
        lin(x)
    # the [2, 13] flattening is a view; one addmm reads x, W and the bias, writes Y
    assert c.launches == 1
    assert c.bytes_read == (26 * 41 + 29 * 41 + 29) * 4
    assert c.bytes_written == 26 * 29 * 4


def test_views_and_metadata_ops_are_free():
    x = torch.randn(6, 8)
    with count_torch() as c:
        x.view(48)
        x.t()
        x.transpose(0, 1)
        x[:, 1:3]
        x.unsqueeze(0).expand(3, 6, 8)
        x.as_strided((4, 4), (8, 1))
        x.detach()
        x.reshape(8, 6)
        x.permute(1, 0)
        torch.empty(100)
        torch.empty_like(x)
    assert c.launches == 0 and c.bytes == 0, c.table()


def test_broadcast_and_in_place_ops():
    x, b = torch.randn(7, 5), torch.randn(5)
    with count_torch() as c:
        y = x + b.expand(7, 5)  # b is read once: 5 elements
        y.add_(x)  # in place: reads y and x, writes y
        y.copy_(x)  # writes y, reads only x
        y.zero_()  # writes only
    assert [x.name for x in c.launch_log] == ["aten.add.Tensor", "aten.add_.Tensor", "aten.copy_.default",
                                              "aten.zero_.default"]
    assert [(x.bytes_read, x.bytes_written) for x in c.launch_log] == [
        ((35 + 5) * 4, 35 * 4), (70 * 4, 35 * 4), (35 * 4, 35 * 4), (0, 35 * 4)]
    assert tensor_bytes(b.expand(7, 5)) == 20


def test_backward_is_counted():
    m, k, n = 11, 9, 6
    a = torch.randn(m, k, requires_grad=True)
    w = torch.randn(k, n, requires_grad=True)
    y = a @ w
    g = torch.randn(m, n)
    with count_torch() as c:
        y.backward(g)
    # dA = g @ w^T and dW = a^T @ g; the transposes are views, the grads are stored as they are
    assert sorted(x.name for x in c.launch_log) == ["aten.mm.default", "aten.mm.default"]
    assert c.bytes_read == ((m * n + n * k) + (k * m + m * n)) * 4
    assert c.bytes_written == (m * k + k * n) * 4
    torch.testing.assert_close(a.grad, g @ w.detach().t())
