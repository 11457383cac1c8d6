"""loha_linear / lokr_linear (Triton kernels under the interpreter, and the blocked PyTorch reference)
against float64.

Every output and gradient's max-abs error against a float64 evaluation of the math must be at most
K_TOL times the error of plain PyTorch (``F.linear(x, W + delta, b)`` with the delta built in the
factors' dtype, PEFT's construction) in the same dtype, plus one ulp of the largest reference value.
Shapes are small and odd (several 16 x 16 interpreter tiles with ragged edges); every factor is
drawn random (none zero), so each gradient is non-trivial.
"""
import pytest
import torch
import torch.nn.functional as F
from peftfast.kernels import lycoris as LY
from peftfast.kernels.runtime import DTYPE_NAMES

from tests.numerics import allowed_error, max_err

K_TOL = 4.0
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
M, A, P, C, Q = 37, 5, 9, 3, 11  # LoKr: N = A * P = 45, K = C * Q = 33
N, K = A * P, C * Q


def make(kind, dtype, bias=True, seed=0, blocks=(A, P, C, Q)):
    """(x, W, b, factors, layout, scale, dy): LoHa ranks 3 and 5; LoKr w1 / w2 full or rank 4 / 2; LoKr's
    ``blocks`` (a, p, c, q): w1 [a, c], w2 [p, q]."""
    g = torch.Generator().manual_seed(seed)
    A, P, C, Q = blocks
    N, K = A * P, C * Q

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    if kind == "loha":
        factors = [rnd(N, 3), rnd(3, K), rnd(N, 5), rnd(5, K)]
        layout = LY.loha_layout(N, K)
    else:
        full1, full2 = {"lokr_ff": (True, True), "lokr_fl": (True, False), "lokr_lf": (False, True),
                        "lokr_ll": (False, False)}[kind]
        w1 = [rnd(A, C)] if full1 else [rnd(A, 4), rnd(4, C)]
        w2 = [rnd(P, Q)] if full2 else [rnd(P, 2), rnd(2, Q)]
        factors = w1 + w2
        layout = LY.lokr_layout(full1, full2, P, Q, A, C)
    x = rnd(M, K)
    w = rnd(N, K, scale=0.5)
    b = rnd(N) if bias else None
    dy = rnd(M, N)
    return x, w, b, factors, layout, 0.37, dy


def delta(kind, factors, layout, scale):
    if kind == "loha":
        w1a, w1b, w2a, w2b = factors
        return (w1a @ w1b) * (w2a @ w2b) * scale
    n1 = 1 if layout[0] else 2
    w1 = factors[0] if n1 == 1 else factors[0] @ factors[1]
    rest = factors[n1:]
    w2 = rest[0] if layout[1] else rest[0] @ rest[1]
    return torch.kron(w1, w2) * scale


def plain(kind, inputs, dtype=None):
    """(y, [dx, db, d factors...]) of PEFT's math in ``dtype`` (default: the inputs' dtype)."""
    x, w, b, factors, layout, scale, dy = inputs
    cast = (lambda t: t.detach().to(dtype or t.dtype).requires_grad_())
    xs, fs = cast(x), [cast(f) for f in factors]
    bs = None if b is None else cast(b)
    y = F.linear(xs, w.to(dtype or w.dtype) + delta(kind, fs, layout, scale), bs)
    y.backward(dy.to(y.dtype))
    return y.detach(), [xs.grad] + ([] if bs is None else [bs.grad]) + [f.grad for f in fs]


def run_op(inputs, on_triton):
    x, w, b, factors, layout, scale, dy = inputs
    xs = x.detach().requires_grad_()
    bs = None if b is None else b.detach().requires_grad_()
    fs = [f.detach().requires_grad_() for f in factors]
    y = LY.LYCORIS_LINEAR(xs, w, bs, fs, layout, scale, hint=on_triton)
    y.backward(dy)
    return y.detach(), [xs.grad] + ([] if bs is None else [bs.grad]) + [f.grad for f in fs]


def check(kind, inputs, got):
    ref = plain(kind, inputs, torch.float64)
    base = plain(kind, inputs)
    names = ["y", "dx", "db"] + [f"d_factor{i}" for i in range(len(inputs[3]))]
    for name, g, p, r in zip(names, [got[0], *got[1]], [base[0], *base[1]], [ref[0], *ref[1]]):
        assert g is not None and g.dtype == p.dtype and g.shape == r.shape, name
        assert r.abs().max() > 0, name  # a gradient that is zero would check nothing
        err = max_err(g, r)
        bound = allowed_error(p, r, K_TOL)
        assert err <= bound, f"{kind} {p.dtype} {name}: error {err:.3e} > {bound:.3e} (plain {max_err(p, r):.3e})"


KINDS = ["loha", "lokr_ff", "lokr_fl", "lokr_lf", "lokr_ll"]


@pytest.mark.parametrize("kind", KINDS)
def test_triton_fp32(triton_kernels, kind):
    inputs = make(kind, F32)
    check(kind, inputs, run_op(inputs, True))


@pytest.mark.parametrize("kind", ["loha", "lokr_fl", "lokr_lf"])
def test_triton_fp16(triton_kernels, kind):
    inputs = make(kind, F16, seed=1)
    check(kind, inputs, run_op(inputs, True))


# blocks of whole 16 x 16 interpreter tiles: w2 [16, 32] (p % BLOCK_N == 0, q % BLOCK_K == 0), w1 [3, 2]
ALIGNED = (3, 16, 2, 32)


@pytest.mark.parametrize("kind", ["lokr_ff", "lokr_fl", "lokr_lf", "lokr_ll"])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_triton_lokr_aligned_blocks(triton_kernels, monkeypatch, kind, dtype):
    """LoKr blocks holding whole tiles: with both factors full after ``prepare`` (lokr_ff; lokr_lf, w1 formed) the
    forward and dX run their ALIGN variants (w1 read as one row or column per tile, w2 as a contiguous tile, no
    division in the loop), the factors in fp16 (the FMA in fp16); with w2 left low rank ([16, 32] is too large to
    form here) the general variants."""
    seen = _record_launches(monkeypatch)
    inputs = make(kind, dtype, seed=13, blocks=ALIGNED)
    check(kind, inputs, run_op(inputs, True))
    both_full = kind in ("lokr_ff", "lokr_lf")
    assert [meta.get("ALIGN") for _k, _a, meta in seen] == [both_full, both_full, None]
    kernel, args, meta = seen[0]
    assert (meta["FULL1"] and meta["FULL2"]) == both_full
    if both_full:
        assert args[kernel.arg_names.index("u1_ptr")].dtype == dtype


# blocks holding whole 16 x 16 interpreter tiles along one direction only (ALIGN 2): forward, w2 [6, 16] (q % BLOCK_K
# == 0, p < BLOCK_N: two and a half blocks per tile, N = 30 ends in a partial tile); dX, w2 [16, 7] (p % BLOCK_N == 0,
# K = 35 ends in a partial tile)
ALONG_LOOP = {"forward": ((5, 6, 2, 16), [2, 4, None]), "grad_x": ((3, 16, 5, 7), [4, 2, None]),
              # ALIGN 3: blocks of 20 > 16 along both loops (a tile straddles two blocks; K = 60 and N = 40 end in
              # partial tiles)
              "wrapping": ((2, 20, 3, 20), [3, 3, None])}


@pytest.mark.parametrize("kernel", ["forward", "grad_x", "wrapping"])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_triton_lokr_blocks_aligned_along_the_loop(triton_kernels, monkeypatch, kernel, dtype):
    """LoKr with both factors full whose blocks hold whole tiles only along the kernel's loop: that kernel runs the
    ALIGN 2 variant (w1 one vector, w2 a gather of the fixed direction's rows or columns, their block indices
    computed once), the other kernel the general one; blocks larger than the tiles but not a multiple: ALIGN 3 in
    both; output and every gradient against float64."""
    seen = _record_launches(monkeypatch)
    blocks, want = ALONG_LOOP[kernel]
    inputs = make("lokr_ff", dtype, seed=17, blocks=blocks)
    check("lokr_ff", inputs, run_op(inputs, True))
    assert [meta.get("ALIGN") for _k, _a, meta in seen] == want


@pytest.mark.parametrize("p", [16, 32, 48, 64, 80])
@pytest.mark.parametrize("dtype", [F16, F32])
def test_triton_lokr_dx_holds_w2_tiles(triton_kernels, monkeypatch, p, dtype):
    """16-bit activations, blocks of whole tiles (ALIGN 1) of p <= MAX_HELD * BLOCK_N rows: dX holds w2's p /
    BLOCK_N tiles of its columns in registers and reads w1 once per block (HELD 1 to 4, its loop nested: blocks,
    then their tiles); taller blocks (p = 80: five 16-row tiles) keep the plain ALIGN 1 loop (HELD 0), and so do
    fp32 activations. Output and every gradient against float64; M = 37 ends in a partial row tile, w1 [3, 2]."""
    seen = _record_launches(monkeypatch)
    inputs = make("lokr_ff", dtype, seed=p, blocks=(3, p, 2, 16))
    check("lokr_ff", inputs, run_op(inputs, True))
    held = p // 16 if p // 16 <= LY.MAX_HELD and dtype != F32 else 0
    assert [(meta.get("ALIGN"), meta.get("HELD")) for _k, _a, meta in seen] == [(1, None), (1, held), (None, None)]


@pytest.mark.parametrize("p", [16, 32, 48, 80])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_triton_lokr_w1_gradient_summed_per_tile(triton_kernels, monkeypatch, p, dtype):
    """Blocks of whole tiles with w1 full: each tile of the factor-gradient kernel is one value of w1, its
    contribution summed in the tile and added with one atomic (SUM1; per element, the fp32 sum over p * q * M
    products went past the float64 bound). Output and every gradient against float64; M = 37 ends in a partial row
    tile, w1 [3, 2]; p = 9 (blocks smaller than the tiles) keeps the per-element atomics."""
    seen = _record_launches(monkeypatch)
    inputs = make("lokr_ff", dtype, seed=p, blocks=(3, p, 2, 16))
    check("lokr_ff", inputs, run_op(inputs, True))
    assert [meta.get("SUM1") for _k, _a, meta in seen] == [None, None, True]
    seen.clear()
    inputs = make("lokr_ff", dtype, seed=p, blocks=(3, 9, 2, 16))
    check("lokr_ff", inputs, run_op(inputs, True))
    assert [meta.get("SUM1") for _k, _a, meta in seen] == [None, None, False]


@pytest.mark.parametrize("kind", ["lokr_fl", "lokr_lf", "lokr_ll"])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_triton_lokr_factors_left_low_rank(triton_kernels, monkeypatch, kind, dtype):
    """LoKr factors too large to form whole (FORM_LIMIT 0): the rank-r products inside the tile loops, s folded
    into factor 1's U or, for lokr_lf, into w2's fp32 copy."""
    monkeypatch.setattr(LY, "FORM_LIMIT", 0)
    inputs = make(kind, dtype, seed=10)
    check(kind, inputs, run_op(inputs, True))


def _record_launches(monkeypatch, run=True):
    seen = []
    real = LY.launch

    def record(kernel, grid, *args, **meta):
        seen.append((kernel, args, meta))
        if run:
            real(kernel, grid, *args, **meta)

    monkeypatch.setattr(LY, "launch", record)
    return seen


@pytest.mark.parametrize("kind, full", [("lokr_fl", (True, True)), ("lokr_lf", (True, True)),
                                        ("lokr_ll", (True, True)), ("loha", (False, False))])
def test_small_lokr_factors_formed(triton_kernels, monkeypatch, kind, full):
    """Every launch gathers a small low-rank LoKr factor whole (FULL: no rank-r product per block of rows); with
    both factors full they are read in the 16-bit weight's dtype (the FMA runs in it), a full factor next to a
    low-rank one as an fp32 copy; LoHa's [N, K] products are never formed."""
    seen = _record_launches(monkeypatch)
    inputs = make(kind, F16, seed=11)
    check(kind, inputs, run_op(inputs, True))
    assert len(seen) == 3
    for kernel, args, meta in seen:
        assert (meta["FULL1"], meta["FULL2"]) == full, kernel
        names = kernel.arg_names
        for i, is_full in ((1, full[0]), (2, full[1])):
            u = args[names.index(f"u{i}_ptr")]
            assert u.dtype == (F16 if all(full) or not is_full else F32)


def test_prepare_folds_the_scale_once():
    """The kernels' operands carry s exactly once and give the caller's delta; gradients map back."""
    for kind in ("loha", "lokr_fl", "lokr_lf", "lokr_ff"):
        _x, w, _b, factors, layout, scale, _dy = make(kind, F32, seed=12)
        ops = LY.prepare(factors, layout, scale, *w.shape)
        assert len(ops.factors) == (4 if kind == "loha" else 2)
        torch.testing.assert_close(delta(kind, ops.factors, ops.layout, 1.0), delta(kind, factors, layout, scale))


@pytest.mark.parametrize("act, wide", [(F16, False), (BF16, False), (F32, False), (F16, True), (BF16, True)])
@pytest.mark.parametrize("shape", ["loha", "lokr_small", "lokr_big_w2", "lokr_lf", "lokr_aligned", "lokr_kv",
                                   "lokr_80"])
def test_launches_are_compiled(monkeypatch, act, wide, shape):
    """The compile report compiles what the launchers pick on a GPU (tests/kernels/test_specs_cover_launches.py's
    pattern): every launch (meta tensors; nothing runs) matches an AotSpec of its kernel in num_warps,
    num_stages, every meta-parameter the spec fixes and every pointer's dtype (a full factor's fp32 copy);
    ``wide``: fp32 factors on the 16-bit model, as the op's backward prepares them for each kernel."""
    monkeypatch.setattr(LY, "interpreting", lambda: False)  # the GPU tiles
    seen = _record_launches(monkeypatch, run=False)

    def meta(*s, factor=True):
        return torch.empty(*s, dtype=F32 if wide and factor else act, device="meta")

    m, n, k = 300, 128, 96
    if shape == "loha":
        factors, layout = [meta(n, 5), meta(5, k), meta(n, 3), meta(3, k)], LY.loha_layout(n, k)
    elif shape == "lokr_small":  # w1 [8, 4] full, w2 [16, 24] = rank 2 product: formed
        factors, layout = [meta(8, 4), meta(16, 2), meta(2, 24)], LY.lokr_layout(True, False, 16, 24, 8, 4)
    elif shape == "lokr_big_w2":  # w1 [2, 2], w2 [64, 48] = rank 2 product: too large to form
        factors, layout = [meta(2, 2), meta(64, 2), meta(2, 48)], LY.lokr_layout(True, False, 64, 48, 2, 2)
    elif shape == "lokr_lf":  # w1 [2, 2] = rank 1 product (formed), w2 [64, 48] full
        factors, layout = [meta(2, 1), meta(1, 2), meta(64, 48)], LY.lokr_layout(False, True, 64, 48, 2, 2)
    elif shape == "lokr_aligned":  # w1 [2, 2] full, w2 [64, 64] full: blocks of whole tiles (ALIGN 1 on 16-bit)
        k = 128
        factors, layout = [meta(2, 2), meta(64, 64)], LY.lokr_layout(True, True, 64, 64, 2, 2)
    elif shape == "lokr_kv":  # a GQA k/v projection's blocks: w1 [4, 2] full, w2 [32, 64] = rank 2 product
        # (formed): the forward's 64-row tiles hold two blocks (ALIGN 2), dX's 32 x 64 tiles one (ALIGN 1)
        k = 128
        factors, layout = [meta(4, 2), meta(32, 2), meta(2, 64)], LY.lokr_layout(True, False, 32, 64, 4, 2)
    else:  # blocks of 80 (a 5120-wide layer's): w1 [2, 2] full, w2 [80, 80] full; ALIGN 3 in both
        n = k = 160
        factors, layout = [meta(2, 2), meta(80, 80)], LY.lokr_layout(True, True, 80, 80, 2, 2)
    ops = LY.prepare(factors, layout, 0.5, n, k, act)
    x, w, dy = meta(m, k, factor=False), meta(n, k, factor=False), meta(m, n, factor=False)
    LY.launch_forward(x, w, meta(n, factor=False), ops)
    LY.launch_grad_x(dy, w, ops)
    LY.launch_grad_factors(dy, x, LY.prepare(factors, layout, 0.5, n, k, act, exact=True), True, True)
    specs = LY.aot_specs()
    bad = []
    for kernel, args, kw in seen:
        sig = dict(zip(kernel.arg_names, args))

        def fits(spec):
            fixed = {key: v for key, v in spec.constexprs.items() if key in kw}
            return (spec.fn is kernel and spec.num_warps == kw["num_warps"] and spec.num_stages == kw["num_stages"]
                    and all(kw[key] == v for key, v in fixed.items())
                    and all(spec.signature[name] == "*" + DTYPE_NAMES[t.dtype]
                            for name, t in sig.items() if isinstance(t, torch.Tensor)))
        if not any(fits(s) for s in specs):
            bad.append(f"{kernel.fn.__name__} {({key: v for key, v in kw.items()})}")
    assert len(seen) == 3 and not bad, bad
    variant = [(kw.get("ALIGN"), kw.get("HELD"), kw.get("SUM1"), kw["BLOCK_M"]) for _k, _a, kw in seen]
    if shape == "lokr_aligned" and act != F32:  # dX's 32-row tiles: two per block of w2, held (HELD 2, 128 rows);
        # the factor gradients' 64 x 64 tiles: one value of w1 each (SUM1)
        assert variant == [(1, None, None, 256), (1, 2, None, 128), (None, None, True, 64)]
    if shape == "lokr_kv" and act != F32:
        assert variant == [(2, None, None, 256), (1, 1, None, 128), (None, None, False, 64)]
    if shape == "lokr_80" and act != F32:
        assert [kw.get("ALIGN") for _k, _a, kw in seen] == [3, 3, None]


@pytest.mark.parametrize("kind", ["loha", "lokr_fl"])
def test_reference_bf16(kind, monkeypatch):
    """bf16 runs through the PyTorch reference only: the interpreter's tl.dot on bf16 operands returns
    garbage (Triton 3.9); the bf16 kernels are checked by compiling them (aot_specs)."""
    monkeypatch.setattr(LY, "BLOCK_ELEMENTS", 20 * K)
    inputs = make(kind, BF16, seed=1)
    check(kind, inputs, run_op(inputs, False))


@pytest.mark.parametrize("kind", KINDS)
def test_reference_blocked(kind, monkeypatch):
    """The CPU path over several blocks of output rows (LoKr: blocks of whole w1 rows)."""
    monkeypatch.setattr(LY, "BLOCK_ELEMENTS", 20 * K)
    inputs = make(kind, F32, seed=2)
    check(kind, inputs, run_op(inputs, False))


def test_no_bias_and_partial_grads(triton_kernels):
    """No bias; only some factors trainable; x without a gradient."""
    x, w, _b, factors, layout, scale, dy = make("loha", F32, bias=False, seed=3)
    fs = [f.detach().requires_grad_(i in (1, 2)) for i, f in enumerate(factors)]
    y = LY.LYCORIS_LINEAR(x, w, None, fs, layout, scale, hint=True)
    y.backward(dy)
    fd = [f.detach().double().requires_grad_(i in (1, 2)) for i, f in enumerate(factors)]
    yd = F.linear(x.double(), w.double() + delta("loha", fd, layout, scale))
    yd.backward(dy.double())
    assert fs[0].grad is None and fs[3].grad is None
    for got, ref in ((y, yd), (fs[1].grad, fd[1].grad), (fs[2].grad, fd[2].grad)):
        assert max_err(got, ref) <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("on_triton", [True, False])
def test_no_full_size_tensor(triton_kernels, on_triton, monkeypatch):
    """Forward and backward never allocate a torch tensor with N x K elements (few tokens, so y and dX are
    far smaller than the weight)."""
    monkeypatch.setattr(LY, "BLOCK_ELEMENTS", 20 * K)
    x, w, b, factors, layout, scale, dy = make("loha", F32, seed=4)
    x, dy = x[:3], dy[:3]
    big = []
    real_empty, real_zeros = torch.empty, torch.zeros

    def spy(real):
        def f(*shape, **kw):
            t = real(*shape, **kw)
            if t.numel() >= N * K // 2:
                big.append(tuple(t.shape))
            return t
        return f

    monkeypatch.setattr(torch, "empty", spy(real_empty))
    monkeypatch.setattr(torch, "zeros", spy(real_zeros))
    xs = x.detach().requires_grad_()
    fs = [f.detach().requires_grad_() for f in factors]
    LY.LYCORIS_LINEAR(xs, w, b, fs, layout, scale, hint=on_triton).backward(dy)
    assert fs[0].grad is not None and xs.grad is not None
    assert big == []


def test_public_ops_and_errors():
    x, w, b, factors, layout, scale, _ = make("lokr_fl", F32, seed=5)
    got = LY.lokr_linear(x, w, b, factors[:1], factors[1:], scale)
    assert max_err(got, F.linear(x, w + delta("lokr_fl", factors, layout, scale), b)) < 1e-4
    h = make("loha", F32, seed=6)
    got = LY.loha_linear(h[0], h[1], h[2], *h[3], h[5])
    assert max_err(got, F.linear(h[0], h[1] + delta("loha", h[3], h[4], h[5]), h[2])) < 1e-4
    with pytest.raises(ValueError, match="kron"):
        LY.lokr_linear(x, w, b, factors[:1], [factors[1][:-1], factors[2]], scale)
    with pytest.raises(ValueError, match="frozen"):
        LY.loha_linear(h[0], h[1].requires_grad_(), h[2], *h[3], h[5])
    with torch.no_grad():  # no weight gradient asked for (FSDP's flat-parameter views require grad): accepted
        assert torch.equal(LY.loha_linear(h[0], h[1], h[2], *h[3], h[5]),
                           LY.loha_linear(h[0], h[1].detach(), h[2], *h[3], h[5]))


OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("kind", ["loha"])
def test_opcheck(backend, kind):
    x, w, b, factors, layout, scale, _ = make(kind, F32, seed=7)
    x = x[:5].requires_grad_()
    b.requires_grad_()
    fs = [f.requires_grad_() for f in factors]
    torch.library.opcheck(torch.ops.peftfast.lycoris_linear.default, (x, w, b, fs, layout, scale),
                          test_utils=OPCHECK_TESTS)


def test_compile_fullgraph_matches_eager(backend):
    """torch.compile(fullgraph=True) traces the op as one node and gives eager's output and gradients."""
    x, w, b, factors, layout, scale, dy = make("loha", F32, seed=8)
    fs = [f.detach().requires_grad_() for f in factors]

    def fn(x, *fs):
        return LY.loha_linear(x, w, b, *fs, scale)

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    y = torch.compile(fn, fullgraph=True, backend=record)(x, *fs)
    assert len(graphs) == 1
    assert "peftfast.lycoris_linear" in {str(n.target) for n in graphs[0].graph.nodes}
    y.backward(dy)
    got = [f.grad.clone() for f in fs]
    for f in fs:
        f.grad = None
    fn(x, *fs).backward(dy)
    for g, f in zip(got, fs):
        torch.testing.assert_close(g, f.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, dtype", [("loha", F16), ("lokr_fl", F16)])
def test_triton_gpu_tiles(triton_kernels, monkeypatch, kind, dtype):
    """The launch configurations used on GPUs (256-row tiles, one ragged tile here) under the interpreter."""
    monkeypatch.setattr(LY, "interpreting", lambda: False)  # the GPU tiles
    inputs = make(kind, dtype, seed=9)
    check(kind, inputs, run_op(inputs, True))


# TF32's machine epsilon (10 explicit mantissa bits): the rank-r dots of fp32 factors on a 16-bit model
TF32_EPS = 2.0 ** -10


def plain_wide(kind, inputs):
    """PEFT's math for fp32 factors on a 16-bit model (autocast_adapter_dtype): the base layer in x's dtype,
    the delta in fp32 on x cast to fp32, the sum rounded to x's dtype."""
    x, w, b, factors, layout, scale, dy = inputs
    xs = x.detach().requires_grad_()
    bs = None if b is None else b.detach().requires_grad_()
    fs = [f.detach().requires_grad_() for f in factors]
    y = (F.linear(xs, w, bs) + F.linear(xs.float(), delta(kind, fs, layout, scale))).to(x.dtype)
    y.backward(dy)
    return y.detach(), [xs.grad] + ([] if bs is None else [bs.grad]) + [f.grad for f in fs]


@pytest.mark.parametrize("low_rank", [False, True], ids=["formed", "left_low_rank"])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_fp32_factors_on_fp16_model(triton_kernels, monkeypatch, kind, low_rank):
    """fp32 factors on an fp16 weight and input (PEFT's default adapter dtype on a 16-bit model): the forward and
    dX read the factors rounded to fp16 (W + D is rounded to fp16 before the dot anyway), the factor-gradient
    kernel reads them as fp32 and returns fp32 gradients. Checked against float64 with plain PyTorch's error
    running PEFT's mixed math (fp16 base layer, fp32 delta); a factor gradient that goes through a rank-r dot
    of fp32 factors (TF32 on a GPU, emulated here) may add two TF32 roundings of its largest value."""
    if low_rank:
        monkeypatch.setattr(LY, "FORM_LIMIT", 0)
    seen = _record_launches(monkeypatch)
    x, w, b, factors, layout, scale, dy = make(kind, F32, seed=21)
    inputs = (x.half(), w.half(), b.half(), factors, layout, scale, dy.half())
    got = run_op(inputs, True)
    ref = plain(kind, inputs, torch.float64)
    base = plain_wide(kind, inputs)
    ops = LY.prepare(factors, layout, scale, *w.shape, F16, exact=True)
    dots = not (ops.layout[0] and ops.layout[1])  # a factor left low rank: its P, dU, dV are rank-r dots
    names = ["y", "dx", "db"] + [f"d_factor{i}" for i in range(len(factors))]
    for i, (name, g, p, r) in enumerate(zip(names, [got[0], *got[1]], [base[0], *base[1]], [ref[0], *ref[1]])):
        assert g.dtype == p.dtype == (F16 if i < 3 else F32) and g.shape == r.shape, name
        assert r.abs().max() > 0, name
        bound = allowed_error(p, r, K_TOL) + (2 * TF32_EPS * r.abs().max().item() if i >= 3 and dots else 0.0)
        err = max_err(g, r)
        assert err <= bound, f"{kind} {name}: error {err:.3e} > {bound:.3e} (plain {max_err(p, r):.3e})"
    kernels = [(meta, {n: a for n, a in zip(k.arg_names, args) if n[:1] in "uv" and n.endswith("_ptr")})
               for k, args, meta in seen]
    assert len(kernels) == 3
    for meta, ptrs in kernels[:2]:  # forward, dX: every factor the kernels read in fp16 but a full one next to
        for n, t in ptrs.items():   # a low-rank one (its fp32 copy)
            full = meta[f"FULL{n[1]}"]
            assert t.dtype == (F32 if full and not (meta["FULL1"] and meta["FULL2"]) else F16), n
    assert all(t.dtype == F32 for t in kernels[2][1].values())  # the factor gradients: fp32
    if dots:
        assert kernels[2][0]["DELTA_PRECISION"] == "tf32"  # (the GPU's rounding, emulated by the fixture)


def test_reciprocal_divmod_is_exact_up_to_its_limit(triton_kernels):
    """ALIGN 4's block indices (``reciprocal_divmod``: an fp32 reciprocal, then one correction) equal integer
    division for indices up to ``DIVMOD_LIMIT`` and every divisor tried, the largest indices included."""
    import triton
    import triton.language as tl

    @triton.jit
    def _divmod_kernel(o_ptr, q_ptr, r_ptr, d, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        q, r = LY.reciprocal_divmod(tl.load(o_ptr + offs), d)
        tl.store(q_ptr + offs, q)
        tl.store(r_ptr + offs, r)

    g = torch.Generator().manual_seed(5)
    limit = LY.DIVMOD_LIMIT
    top = torch.arange(limit - 512, limit)
    for d in (1, 2, 3, 7, 24, 41, 80, 97, 1023, 4096, 65537, limit - 1):  # 1 / 41, 1 / 97 round down in fp32
        # random indices, the largest ones, and each side of multiples of d (where a quotient is off by one first)
        near = (torch.arange(256) // 2 * d + torch.arange(256) % 2 - 1).clamp(0, limit - 1)
        o = torch.cat([torch.randint(0, limit, (256,), generator=g), top, near]).to(torch.int64)
        q, r = torch.empty_like(o), torch.empty_like(o)
        _divmod_kernel[(1,)](o, q, r, d, BLOCK=1024)
        assert torch.equal(q, o // d) and torch.equal(r, o % d), d
