"""The grouped LoRA kernels (kernels/lora_grouped.py) in Triton's interpreter: tiny odd shapes, ranks 1 / 8 / 64
mixed, 1 / 3 / 17 adapters with unused ones (empty segments) and base rows, against float64 (forward and every
gradient; the backward is the reference on both backends), and the launch plan."""
from __future__ import annotations

import pytest
import torch

from peftfast.kernels.backend import interpreting
from peftfast.kernels.lora_grouped import aot_specs, block_rows_for, group_plan, num_blocks
from tests.test_multi_adapter import (DROPOUT_PS, RANKS, alone_outputs, check_mixed_grads_equal_alone, run_op_case,
                                      three_adapters, train_mixed)


@pytest.fixture
def interpreted(triton_backend):
    if not interpreting():
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    return triton_backend


@pytest.mark.parametrize("n,m,k,o", [(1, 5, 7, 3), (3, 37, 23, 19), (17, 21, 13, 9)])
def test_triton_grouped_vs_float64(interpreted, n, m, k, o):
    run_op_case(n, m, k, o, [RANKS[i % 3] for i in range(n)])
    # a fresh base output (not a leaf): the expand adds into it in place, under autograd too
    run_op_case(n, m, k, o, [RANKS[i % 3] for i in range(n)], fresh_base=True)


@pytest.mark.parametrize("n,m,k,o", [(1, 7, 9, 5), (3, 37, 23, 19), (17, 21, 13, 9)])
def test_triton_grouped_dropout_vs_float64(interpreted, n, m, k, o):
    """The shrink kernel applies each row's adapter's mask (regenerated from the seed): forward and every
    gradient equal each adapter trained alone with the same masks."""
    run_op_case(n, m, k, o, [RANKS[i % 3] for i in range(n)], [DROPOUT_PS[i % 4] for i in range(n)])


def test_triton_backward_several_blocks_per_adapter(interpreted):
    """Adapters with several row blocks (the weight-gradient kernel sums them, split over programs), with and
    without dropout."""
    run_op_case(3, 150, 23, 19, [8, 64, 1])
    run_op_case(3, 150, 23, 19, [8, 64, 1], [0.2, 0.5, 0.0])


@pytest.mark.parametrize("dropout", [False, True])
def test_triton_backward_launches_do_not_depend_on_adapters(interpreted, monkeypatch, dropout):
    """Forward and backward on the Triton backend: kernels only (the reference backward never runs), the same
    launches for 3 and 17 adapters (no per-adapter loop)."""
    from peftfast.kernels import lora_grouped as G
    from peftfast.kernels import runtime

    real = G.launch
    seen = []

    def record(kernel, grid, *args, **meta):
        seen.append(runtime.kernel_name(kernel))
        return real(kernel, grid, *args, **meta)

    def refuse(*args, **kwargs):
        raise AssertionError("the reference backward ran on the Triton backend")

    monkeypatch.setattr(G, "launch", record)
    monkeypatch.setattr(G, "backward_reference", refuse)
    counts = []
    for n in (3, 17):
        seen.clear()
        run_op_case(n, 29, 11, 7, [RANKS[i % 3] for i in range(n)], [0.25] * n if dropout else None)
        counts.append(sorted(seen))
    assert counts[0] == counts[1]
    assert counts[0].count("_grouped_grad_w_kernel") == 2 and counts[0].count("_grouped_shrink_kernel") == 2


def test_row_masks_are_the_per_adapter_masks(interpreted):
    """keep_mask_rows_torch (one stream and threshold per row, what the grouped reference uses) gives the bits of
    keep_mask_torch and of the Triton keep_mask kernel for each row's adapter."""
    from peftfast.kernels import dropout as D

    seed, ps = int(D.draw_seed()), (0.0, 0.1, 0.5, 0.93)
    rows, streams = torch.randint(0, 300, (41,)), torch.randint(0, 4, (41,))
    got = D.keep_mask_rows_torch(seed, rows, streams, 37, torch.tensor([D.threshold(p) for p in ps])[streams])
    for s, p in enumerate(ps):
        want = D.keep_mask_torch(seed, s, 300, 37, p)
        assert torch.equal(want, D.keep_mask_triton(seed, s, 300, 37, p, "cpu"))
        assert torch.equal(got[streams == s], want[rows[streams == s]]), p
    assert 0.3 < got.float().mean() < 0.8


def test_plan_size_independent_of_which_adapters():
    """The plan's size depends on (rows, adapters, block) only: a new adapter mix needs no new launch shape."""
    for n, m in ((1, 64), (16, 64), (64, 64), (16, 32768)):
        br = block_rows_for(m, n, True)
        assert 16 <= br <= 64
        g = torch.Generator().manual_seed(n)
        for skew in (torch.randint(-1, n, (m,), generator=g), torch.zeros(m, dtype=torch.int64)):
            table, badapter = group_plan(skew, n, br)
            assert table.shape == (num_blocks(m, n, br), br)
            rows = table[table < m]
            assert rows.numel() == int((skew >= 0).sum()) and rows.unique().numel() == rows.numel()


def test_aot_specs_cover_the_launcher_configs():
    specs = aot_specs()
    names = {s.name for s in specs}
    assert len(names) == len(specs)
    assert any("shrink" in n and "BM=16" in n for n in names) and any("expand" in n and "BM=64" in n for n in names)


def test_triton_in_place_and_model(interpreted):
    """Without autograd the expand adds into the base output itself; a whole model's mixed batch through the
    kernels equals each sample alone."""
    from peftfast.kernels.lora_grouped import lora_grouped
    from tests.test_multi_adapter import alone_outputs, make_model, op_case, loop_reference, stacked_store

    a, b, scal, index, x, base = op_case(3, 19, 11, 7, [1, 8, 5], torch.float32)
    with torch.no_grad():
        fresh = base.detach() * 1.0
        want = loop_reference(x, base, a, b, scal, index)
        y = lora_grouped(x.detach(), fresh, a, b, *stacked_store(a, b, scal), index)
    assert y.data_ptr() == fresh.data_ptr()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    pm, names = make_model(3)
    pm.eval()
    ids = torch.randint(0, 29, (4, 3))
    per_sample = ["a2", "__base__", "a0", "a2"]
    with torch.no_grad():
        torch.testing.assert_close(pm(ids, adapter_names=per_sample), alone_outputs(pm, ids, per_sample),
                                   rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph(torch_backend):
    """torch.compile(fullgraph=True, backend="aot_eager"): the plan (sync-free) and the op (with dropout) trace
    without a graph break and give eager's output and gradients."""
    from peftfast.kernels.lora_grouped import lora_grouped
    from tests.test_multi_adapter import op_case, stacked_store

    from peftfast.kernels.lora_grouped import dropout_tables

    a, b, scal, index, x, base = op_case(3, 13, 7, 5, [1, 8, 4], torch.float32)
    st_a, st_b, _ = stacked_store(a, b, scal)
    scale, thresholds = dropout_tables(scal, [0.2, 0.0, 0.5], x.device)  # with dropout: a fixed seed

    def f(x, base, index):
        return lora_grouped(x, base, a, b, st_a, st_b, scale, index, thresholds=thresholds, seed=1234)

    leaves = [x, base, *a, *b]
    want = f(x, base, index)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, base, index)
    torch.testing.assert_close(got, want)
    gy = torch.randn_like(want)
    for g1, g2 in zip(torch.autograd.grad(got, leaves, gy), torch.autograd.grad(want, leaves, gy)):
        torch.testing.assert_close(g1, g2)


def test_every_launch_has_an_aot_spec(monkeypatch):
    """The compile report builds what the launchers pick: every grouped launch of forward and backward (meta
    tensors, nothing runs) at each block size and store rank the plan and the store can give matches an AotSpec
    in its warps, stages and meta-parameters."""
    from peftfast.kernels import lora_grouped as G
    from peftfast.kernels import runtime
    seen = []
    monkeypatch.setattr(G, "launch", lambda kernel, grid, *args, **meta: seen.append((runtime.kernel_name(kernel),
                                                                                      meta)))
    m, k, o, n = 300, 96, 80, 5
    for act, ad in G.DTYPE_PAIRS:
        for rows in (16, 32, 64):
            for rank in (1, 8, 16, 32, 64):
                meta = dict(device="meta")
                x, dy = torch.empty(m, k, dtype=act, **meta), torch.empty(m, o, dtype=act, **meta)
                a = torch.empty(n, rank, k, dtype=ad, **meta)
                b = torch.empty(n, rank, o, dtype=ad, **meta).transpose(1, 2)  # the store's layout
                scale, thresholds = torch.empty(n, **meta), torch.empty(n, dtype=torch.int64, **meta)
                table = torch.empty(n + m // rows, rows, dtype=torch.int64, **meta)
                badapter = torch.empty(n + m // rows, dtype=torch.int64, **meta)
                for th in (None, thresholds):
                    _, h = G.forward_triton(x, dy, a, b, scale, table, badapter, th, 1)
                    G.backward_triton(dy, x, h, a, b, scale, table, badapter, True, True, th, 1)
                    if rows == G.FUSED_BLOCK_ROWS:  # lora_grouped_linear: forward with/without bias, backward
                        w, bias = torch.empty(o, k, dtype=act, **meta), torch.empty(o, dtype=act, **meta)
                        for bb in (None, bias):
                            G.launch_grouped_linear(x, w, bb, a, b, scale, table, badapter, th, 1)
                        G.backward_triton(dy, x, h, a, b, scale, table, badapter, True, True, th, 1,
                                          dx_init=torch.empty(m, k, dtype=act, **meta))
                        G.backward_fused_triton(dy, x, h, w, a, b, scale, table, badapter, True, th, 1)
    assert {name for name, _ in seen} == {"_grouped_shrink_kernel", "_grouped_expand_kernel",
                                          "_grouped_grad_w_kernel", "_grouped_linear_kernel",
                                          "_grouped_linear_dx_kernel"}
    specs = G.aot_specs()
    for name, meta in seen:  # a spec of that kernel with the launch's warps, stages and every fixed constexpr
        assert any(spec.fn.__name__ == name and (spec.num_warps, spec.num_stages) == (meta["num_warps"],
                                                                                     meta["num_stages"])
                   and all(meta[k] == v for k, v in spec.constexprs.items() if k in meta) for spec in specs), (
            name, {k: v for k, v in meta.items() if not isinstance(v, torch.Tensor)})


@pytest.mark.parametrize("fused", [False, True], ids=["grouped", "fused"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("dropout", [False, True])
def test_cost_model_matches_counted_traffic(interpreted, dtype, dropout, fused):
    """The bench's per-launch formulas (``grouped_launches``, ``fused_launch``) give exactly the bytes (distinct
    addresses) and launches counted from the kernels in the interpreter and the torch ops between them, forward
    and backward (fused: ``lora_grouped_linear``, 150 rows so that adapters hold several 64-row blocks)."""
    from peftfast.tools.bench.multi_adapter import calibrate

    for row in calibrate(m=150 if fused else 96, dtype=dtype, dropout=dropout, fused=fused):
        assert row["counted_launches"] == row["modelled_launches"], row
        assert row["counted_bytes"] == row["modelled_bytes"], row


# ------------------------------------------------------------------------------------------------------
# the base linear fused with the grouped adapters (prefill): lora_grouped_linear
# ------------------------------------------------------------------------------------------------------
def run_linear_case(n, m, k, o, ranks, dtype=torch.float32, ps=None, bias=True, seed=0, grad_x=True, grad_w=True,
                    base=None, adapter_dtype=None):
    """lora_grouped_linear vs F.linear + each adapter alone on its rows (fp32/16-bit and float64): forward and the
    gradients of x, the bias and every adapter factor (``grad_x`` / ``grad_w`` False: x / the factors frozen);
    with dropout probabilities ``ps`` the loop uses the masks regenerated from the op's seed. ``base``: (op, the
    weight it takes, that weight as a dense [O, K] tensor in ``dtype``, in float64) for another base
    (tests/test_multi_adapter_quant.py: lora_grouped_qlinear); default lora_grouped_linear over a random dense
    weight. ``adapter_dtype``: adapters in that dtype (the loop computes their term in it, as PEFT does)."""
    from peftfast.kernels import dropout as D
    from peftfast.kernels.lora_grouped import dropout_tables, lora_grouped_linear
    from tests.numerics import assert_matches_float64
    from tests.test_multi_adapter import loop_reference, op_case, stacked_store

    a, b, scal, index, x, _ = op_case(n, m, k, o, ranks, dtype, seed=seed)
    if adapter_dtype is not None:
        a = [t.detach().to(adapter_dtype) for t in a]
        b = [t.detach().to(adapter_dtype) for t in b]
    x.requires_grad_(grad_x)
    for w in (*a, *b):
        w.requires_grad_(grad_w)
    g = torch.Generator().manual_seed(seed + 1)
    if base is None:
        weight = (torch.randn(o, k, generator=g) / k ** 0.5).to(dtype)
        base = (lora_grouped_linear, weight, weight, weight.double())
    op, weight, w_plain, w64 = base
    bvec = torch.randn(o, generator=g).to(dtype).requires_grad_() if bias else None
    st_a, st_b, st_s = stacked_store(a, b, scal)
    masks = None
    if ps is None:
        y = op(x, weight, bvec, a, b, st_a, st_b, st_s, index)
    else:
        scale, thresholds = dropout_tables(scal, ps, x.device)
        op_seed = int(D.draw_seed())
        y = op(x, weight, bvec, a, b, st_a, st_b, scale, index, thresholds=thresholds, seed=op_seed)
        masks = [D.keep_mask_torch(op_seed, i, m, k, p) for i, p in enumerate(ps)]

    def loop(xx, bb, aa, bs, w):
        out = torch.nn.functional.linear(xx, w, bb)
        ad = aa[0].dtype
        return loop_reference(xx.to(ad), out.to(ad), aa, bs, scal, index, masks, ps).to(xx.dtype)

    leaves = [x, *([bvec] if bias else []), *a, *b]
    nb_ = 1 if bias else 0
    plain = loop(x, bvec, a, b, w_plain)
    d = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    ref = loop(d[0], d[1] if bias else None, d[1 + nb_:1 + nb_ + n], d[1 + nb_ + n:], w64)
    assert_matches_float64("y", y, plain, ref, k=8)
    gy = torch.randn(y.shape, generator=g).to(dtype)
    d = [t for t in d if t.requires_grad]
    leaves = [t for t in leaves if t.requires_grad]
    got = torch.autograd.grad(y, leaves, gy)
    pl = torch.autograd.grad(plain, leaves, gy)
    rf = torch.autograd.grad(ref, d, gy.double())
    for i, (g1, g2, g3) in enumerate(zip(got, pl, rf)):
        assert_matches_float64(f"grad {i} (x, bias, A.., B..)", g1, g2, g3, k=8)
    return y


@pytest.mark.parametrize("n,m,k,o", [(1, 70, 9, 5), (3, 150, 23, 19), (17, 90, 13, 131)])
def test_triton_grouped_linear_vs_float64(interpreted, n, m, k, o):
    """One launch for the base GEMM and every row's adapter (blocks of 64 rows, several per adapter, base rows in
    their own blocks, unused adapters): forward and every gradient."""
    run_linear_case(n, m, k, o, [RANKS[i % 3] for i in range(n)])
    run_linear_case(n, m, k, o, [RANKS[i % 3] for i in range(n)], bias=False, seed=3)


def test_triton_grouped_linear_fp16(interpreted):
    """fp16 (the interpreter has no bf16 arithmetic: the bf16 launches are checked by compiling them)."""
    run_linear_case(3, 133, 40, 72, [8, 16, 3], dtype=torch.float16)


def test_triton_grouped_linear_dropout_vs_float64(interpreted):
    run_linear_case(3, 150, 23, 19, [8, 64, 1], ps=[0.3, 0.0, 0.6])


def _record_launches(monkeypatch) -> list:
    """The names of the grouped module's kernel launches from now on (the test's monkeypatch undoes it)."""
    from peftfast.kernels import lora_grouped as G
    from peftfast.kernels import runtime

    real = G.launch
    seen = []

    def record(kernel, grid, *args, **meta):
        seen.append(runtime.kernel_name(kernel))
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(G, "launch", record)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,m,k,o,dropout", [(1, 70, 150, 40, False), (3, 150, 83, 45, True), (17, 200, 70, 37, True),
                                             (17, 90, 13, 131, False)])
def test_triton_grouped_linear_fused_backward_vs_float64(interpreted, monkeypatch, dtype, n, m, k, o, dropout):
    """The backward's dX in one launch (``_grouped_linear_dx_kernel``: dY @ W, the dH shrink and the masked dX
    expand; several dX column tiles and O steps, base-model and unused blocks), then dA and dB from the dH it
    stores: dX and every gradient against float64, with and without dropout and bias; no dY @ W matmul, no separate
    dH shrink or dX expand, and the same four launches for 1, 3 and 17 adapters."""
    from peftfast.kernels import lora_grouped as G

    def refuse(*args, **kwargs):
        raise AssertionError("the grouped backward ran for lora_grouped_linear's dX")

    seen = _record_launches(monkeypatch)
    monkeypatch.setattr(G, "backward_triton", refuse)
    monkeypatch.setattr(G, "backward_reference", refuse)
    ps = [DROPOUT_PS[i % 4] for i in range(n)] if dropout else None
    run_linear_case(n, m, k, o, [RANKS[(i + 1) % 3] for i in range(n)], dtype, ps=ps, bias=n != 3, seed=n)
    assert seen == ["_grouped_linear_kernel", "_grouped_linear_dx_kernel", "_grouped_grad_w_kernel",
                    "_grouped_grad_w_kernel"]


def test_triton_grouped_linear_backward_partial_needs(interpreted, monkeypatch):
    """dX only (frozen adapters): the one dX launch, no weight-gradient kernel; adapter gradients only (x needs
    none): the grouped backward without its dX expand. Both against float64."""
    seen = _record_launches(monkeypatch)
    run_linear_case(3, 150, 40, 21, [8, 64, 1], ps=[0.3, 0.0, 0.6], grad_w=False)
    assert seen == ["_grouped_linear_kernel", "_grouped_linear_dx_kernel"]
    seen.clear()
    run_linear_case(3, 150, 40, 21, [8, 64, 1], ps=[0.3, 0.0, 0.6], grad_x=False)
    assert seen == ["_grouped_linear_kernel", "_grouped_shrink_kernel", "_grouped_grad_w_kernel",
                    "_grouped_grad_w_kernel"]


@pytest.mark.parametrize("dropout", [False, True])
def test_triton_grouped_linear_backward_fewer_launches(interpreted, monkeypatch, dropout):
    """Counted as the cost-model test counts them (kernels and torch ops): the fused dX launch replaces dY @ W, the
    dH shrink and the dX expand (two launches fewer) and moves fewer bytes than that path (kept for weight-only
    backward and other plans), whose gradients it equals."""
    from collections import Counter

    from peftfast.kernels import lora_grouped as G
    from peftfast.tools.bench.multi_adapter import calibrate

    new = calibrate(m=150, dtype=torch.float16, dropout=dropout, fused=True)[1]
    monkeypatch.setattr(G, "fused_dx_supported", lambda table, rank: False)
    old = calibrate(m=150, dtype=torch.float16, dropout=dropout, fused=True)[1]
    assert new["counted_launches"] == old["counted_launches"] - 2
    assert Counter(old["counted_names"]) - Counter(new["counted_names"]) == Counter(
        ["aten.mm.default", "_grouped_shrink_kernel", "_grouped_expand_kernel"])
    assert Counter(new["counted_names"]) - Counter(old["counted_names"]) == Counter(["_grouped_linear_dx_kernel"])
    assert new["counted_bytes"] < old["counted_bytes"]


def test_grouped_linear_reference_vs_float64(torch_backend):
    """The PyTorch path of the same op (F.linear, then the grouped reference), with and without dropout."""
    run_linear_case(3, 37, 23, 19, [8, 64, 1])
    run_linear_case(3, 37, 23, 19, [8, 64, 1], ps=[0.3, 0.0, 0.6])


def test_triton_grouped_linear_is_one_launch(interpreted, monkeypatch):
    """Forward: one kernel (after the plan) whatever the number of adapters; it never calls F.linear."""
    seen = _record_launches(monkeypatch)
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: (_ for _ in ()).throw(AssertionError("F.linear")))
    for n in (3, 17):
        seen.clear()
        with torch.no_grad():
            from peftfast.kernels.lora_grouped import lora_grouped_linear
            from tests.test_multi_adapter import op_case, stacked_store
            a, b, scal, index, x, _ = op_case(n, 140, 11, 7, [RANKS[i % 3] for i in range(n)], torch.float32)
            lora_grouped_linear(x, torch.randn(7, 11), None, a, b, *stacked_store(a, b, scal), index)
        assert seen == ["_grouped_linear_kernel"]


def test_grouped_linear_bad_input():
    from peftfast.kernels.lora_grouped import lora_grouped_linear
    from tests.test_multi_adapter import op_case, stacked_store

    a, b, scal, index, x, _ = op_case(3, 20, 11, 7, [8, 1, 3], torch.float32)
    with pytest.raises(ValueError, match="weight"):
        lora_grouped_linear(x, torch.randn(7, 12), None, a, b, *stacked_store(a, b, scal), index)
    with pytest.raises(ValueError, match="requires grad"):
        lora_grouped_linear(x, torch.randn(7, 11, requires_grad=True), None, a, b, *stacked_store(a, b, scal), index)


def test_fused_kernels_refuse_a_plan_not_made_for_them(interpreted):
    """A caller's plan from make_plan (base rows in no block) on the Triton path: a clear error, no launch; the
    fused plan for the same rows gives the float64 result, base rows included (-1 in the index)."""
    from peftfast.kernels.lora_grouped import fused_plan, lora_grouped_linear, make_plan
    from tests.test_multi_adapter import op_case, stacked_store

    a, b, scal, index, x, _ = op_case(3, 150, 11, 7, [8, 1, 3], torch.float32)
    assert bool((index < 0).any())
    weight = torch.randn(7, 11)
    stores = stacked_store(a, b, scal)
    with pytest.raises(ValueError, match="fused_plan"):
        lora_grouped_linear(x, weight, None, a, b, *stores, index, plan=make_plan(index, 3, True))
    with torch.no_grad():
        y = lora_grouped_linear(x, weight, None, a, b, *stores, index, plan=fused_plan(index, 3))
        want = x.double() @ weight.double().T
        for i in range(x.shape[0]):
            if index[i] >= 0:
                j = int(index[i])
                want[i] += scal[j] * (x[i].double() @ a[j].double().T) @ b[j].double().T
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)


def test_prefill_model_runs_the_fused_kernel(interpreted, monkeypatch):
    """A mixed batch over plain nn.Linear layers with rows enough to fill the fused kernel's 64-row blocks: each
    layer runs ``_grouped_linear_kernel`` (no separate base output), the output equals each sample alone, and in
    training every adapter's gradients equal training it alone on its samples (through both layers: the second
    layer's dX reaches the first's adapters). Fewer rows (decode) keep the base layer + grouped kernels."""
    from torch import nn

    from peftfast.kernels import lora_grouped as G
    from peftfast.kernels import runtime

    torch.manual_seed(5)
    names = ["a0", "a1", "a2"]
    pm = three_adapters(nn.Sequential(nn.Linear(13, 17), nn.Tanh(), nn.Linear(17, 7)), names, ["0", "2"], 0.3)
    seen = []
    real = G.launch

    def record(kernel, grid, *args, **meta):
        seen.append(runtime.kernel_name(kernel))
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(G, "launch", record)
    g = torch.Generator().manual_seed(1)
    batch, seq = 8, 130  # 1040 rows >= 4 x (3 adapters + base) x 64
    x = torch.randn(batch, seq, 13, generator=g)
    per_sample = ["a0", "a2", "__base__", "a2", "a0", "a2", "a2", "__base__"]  # a1: no sample (empty segment)
    pm.eval()
    with torch.no_grad():
        y = pm(x, adapter_names=per_sample)
    assert seen.count("_grouped_linear_kernel") == 2 and "_grouped_shrink_kernel" not in seen
    with torch.no_grad():
        torch.testing.assert_close(y, alone_outputs(pm, x, per_sample), rtol=1e-5, atol=1e-5)
    seen.clear()
    with torch.no_grad():
        pm(x[:, :3], adapter_names=per_sample)  # 24 rows: decode-sized
    assert "_grouped_linear_kernel" not in seen and "_grouped_shrink_kernel" in seen

    params = train_mixed(pm, names)
    weight = torch.randn(batch, seq, 7, generator=g)
    seen.clear()
    check_mixed_grads_equal_alone(pm, names, per_sample, x, weight, params, tol=lambda r: dict(rtol=1e-4, atol=1e-4),
                                  own_count=4, nonzero=True)
    assert seen.count("_grouped_linear_kernel") >= 2


@pytest.mark.parametrize("preferred", ["fused", "unfused"])
def test_prefill_follows_the_measured_choice(interpreted, monkeypatch, tmp_path, preferred):
    """Measured dispatch of a mixed prefill (kernels/autotune.py, injected times, the interpreter's CPU tensors
    counted as measurable): the first call of each layer's key times both candidates (the fused launch; the base
    layer then the grouped kernels), later calls of the key run the faster one and time nothing; either way the
    output equals each sample alone and each adapter's gradients equal training it alone."""
    from torch import nn

    from peftfast.kernels import autotune
    from tests.kernels.test_autotune import FakeTimer

    timer = FakeTimer({"fused": 1.0 if preferred == "fused" else 2.0,
                       "unfused": 1.0 if preferred == "unfused" else 2.0}, run=True)
    tuner = autotune.Tuner(timer=timer, directory=tmp_path, version="test")
    monkeypatch.setattr(autotune, "TUNER", tuner)
    monkeypatch.setattr(autotune, "tunable", lambda device: autotune.autotune_enabled())
    monkeypatch.setattr(autotune, "may_measure", lambda device: True)
    seen = _record_launches(monkeypatch)
    torch.manual_seed(6)
    names = ["a0", "a1", "a2"]
    pm = three_adapters(nn.Sequential(nn.Linear(11, 15), nn.Tanh(), nn.Linear(15, 6)), names, ["0", "2"], 0.3)
    g = torch.Generator().manual_seed(2)
    batch, seq = 8, 130  # 1040 rows: the fused kernel's gate passes
    x = torch.randn(batch, seq, 11, generator=g)
    per_sample = ["a2", "a0", "__base__", "a0", "a2", "a2", "a0", "a0"]
    pm.eval()
    with torch.no_grad():
        y = pm(x, adapter_names=per_sample)
    assert [c[0] for c in timer.calls] == ["fused", "unfused"] * 2  # two layers, two keys
    keys = [key for _, key, _ in tuner.decisions()]
    assert all(d.choice == preferred for _, _, d in tuner.decisions())
    # (kind, d_out, d_in, rank tile, adapters used: 2, dtypes, step): not the 3 held (adding one measures nothing)
    assert sorted(k[2:] for k in keys) == [("dense", 6, 15, 64, 2, "float32", "float32", "fwd"),
                                           ("dense", 15, 11, 64, 2, "float32", "float32", "fwd")]
    seen.clear()
    with torch.no_grad():
        y2 = pm(x, adapter_names=per_sample)
    assert len(timer.calls) == 4  # decided: nothing timed again
    fused_runs = seen.count("_grouped_linear_kernel")
    assert fused_runs == (2 if preferred == "fused" else 0)
    assert ("_grouped_shrink_kernel" in seen) == (preferred == "unfused")
    with torch.no_grad():
        alone = alone_outputs(pm, x, per_sample)
    torch.testing.assert_close(y, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, alone, rtol=1e-5, atol=1e-5)

    params = train_mixed(pm, names)
    weight = torch.randn(batch, seq, 6, generator=g)
    check_mixed_grads_equal_alone(pm, names, per_sample, x, weight, params, tol=lambda r: dict(rtol=1e-4, atol=1e-4),
                                  own_count=4, nonzero=True)
    steps = sorted(key[-1] for _, key, _ in tuner.decisions() if key[0] == "lora_grouped_linear")
    assert steps == ["fwd", "fwd", "fwd+bwd", "fwd+bwd-dx"]  # layer 0's x needs no gradient


def test_grouped_linear_torch_compile_fullgraph(torch_backend):
    """lora_grouped_linear under torch.compile(fullgraph=True, backend="aot_eager"), with dropout (a fixed seed)
    and a trainable bias: eager's output and gradients (the custom op, its fake and its backward op)."""
    from peftfast.kernels.lora_grouped import lora_grouped_linear

    check_linear_op_compiles(lora_grouped_linear, torch.randn(5, 7), 7, 5)


def check_linear_op_compiles(op, weight, k: int, o: int) -> None:
    """``op`` (lora_grouped_linear's signature) over ``weight`` ([o, k] as the op takes it) under
    torch.compile(fullgraph=True, backend="aot_eager") equals eager: output and the gradients of x, a trainable
    bias and every adapter factor, three adapters with dropout at a fixed seed."""
    from peftfast.kernels.lora_grouped import dropout_tables
    from tests.test_multi_adapter import op_case, stacked_store

    a, b, scal, index, x, _ = op_case(3, 13, k, o, [1, 8, 4], torch.float32)
    st_a, st_b, _ = stacked_store(a, b, scal)
    scale, thresholds = dropout_tables(scal, [0.2, 0.0, 0.5], x.device)
    bias = torch.randn(o, requires_grad=True)

    def f(x, index):
        return op(x, weight, bias, a, b, st_a, st_b, scale, index, thresholds=thresholds, seed=1234)

    leaves = [x, bias, *a, *b]
    want = f(x, index)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, index)
    torch.testing.assert_close(got, want)
    gy = torch.randn_like(want)
    for g1, g2 in zip(torch.autograd.grad(got, leaves, gy), torch.autograd.grad(want, leaves, gy)):
        torch.testing.assert_close(g1, g2)


def _recorded(pm, x, names, train: bool) -> list:
    """The launches of a mixed call, and of its backward when ``train``: recorded for sm_90, nothing runs."""
    from peftfast.kernels import runtime

    with runtime.recording_launches(90) as launches:
        if train:
            pm(x, adapter_names=names).sum().backward()
        else:
            with torch.no_grad():
                pm(x, adapter_names=names)
    assert launches
    return launches


def _kernel_variants(pm, x, names, train: bool) -> set[str]:
    """The compiled variants (keys of the AotSpecs Triton's own binder gives) that a mixed call launches."""
    from peftfast.kernels.aot import spec_from_launch, spec_key

    return {spec_key(spec_from_launch(rec.kernel, rec.args, rec.meta, 90, "", True))
            for rec in _recorded(pm, x, names, train)}


def _grids(pm, x, names, train: bool) -> list:
    return [(rec.kernel.__name__, rec.grid) for rec in _recorded(pm, x, names, train)]


def test_a_reserved_rank_lets_larger_adapters_come_without_new_kernels(interpreted):
    """``reserve_mixed_batch_rank(64)`` (a server's maximum LoRA rank): stores padded to rank 64 from the first
    adapter (rank 4), so adding adapters of ranks 20 and 64 launches exactly the kernel variants of the first call
    (forward and training backward, grouped and fused); outputs still equal each sample alone; without the
    reservation the rank-20 adapter changes the variants. The setting is refused unless a positive int."""
    from torch import nn

    import peftfast as fast
    from peftfast.tuners.lora import reserve_mixed_batch_rank

    def config(r):
        return fast.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0", "2"], lora_dropout=0.1)

    decode, prefill = torch.randn(6, 1, 37), torch.randn(4, 130, 37)
    for reserved in (64, 1):
        reserve_mixed_batch_rank(reserved)
        try:
            torch.manual_seed(0)
            pm = fast.get_peft_model(nn.Sequential(nn.Linear(37, 29), nn.Tanh(), nn.Linear(29, 23)), config(4),
                                     adapter_name="a0")
            pm.base_model.train_mixed_batches = True

            def variants(names):
                return (_kernel_variants(pm.eval(), decode, names, False),
                        _kernel_variants(pm.train(), decode, names, True),
                        _kernel_variants(pm.eval(), prefill, ["a0", "__base__", "a0", "a0"], False))

            first = variants(["a0", "__base__"] * 3)
            pm.add_adapter("wide", config(20))
            assert (variants(["wide", "a0", "__base__", "wide", "a0", "a0"]) == first) == (reserved == 64)
            if reserved == 64:
                pm.add_adapter("widest", config(64))
                names = ["widest", "a0", "__base__", "wide", "widest", "a0"]
                assert variants(names) == first
                with torch.no_grad():
                    pm.eval()
                    torch.testing.assert_close(pm(decode, adapter_names=names), alone_outputs(pm, decode, names),
                                               rtol=1e-5, atol=1e-5)
        finally:
            reserve_mixed_batch_rank(1)
    for bad in (0, -4, 2.0, True, "64"):
        with pytest.raises(ValueError, match="positive int"):
            reserve_mixed_batch_rank(bad)


def test_adding_or_deleting_adapters_compiles_no_new_kernel(interpreted):
    """Serving while adapters come and go: after adding adapters (to 2, 3 and 16 held: Triton specialises integers
    equal to 1 or divisible by 16, such as the count of adapters or of blocks) of ranks up to the store's (16), and
    deleting one, a mixed call launches exactly the kernel variants it launched with one adapter:
    batches of 6 and 130 rows on the grouped kernels (also when they use the new adapters), a prefill on the fused
    kernel, forward and training backward (dropout on); and a batch's forward launches the same grids with 1 and 16
    adapters held. An adapter of a larger rank tile does compile new variants (the check sees a change)."""
    from torch import nn

    import peftfast as fast

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 29), nn.Tanh(), nn.Linear(29, 23))

    def config(r):
        return fast.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0", "2"], lora_dropout=0.1)

    pm = fast.get_peft_model(model, config(16), adapter_name="a0")  # the store's rank: 16 throughout
    pm.base_model.train_mixed_batches = True
    # 6 rows; 130 rows (on the grouped kernels, blocks of up to 64 rows); 520 rows (fused for one adapter used)
    decode, mid, prefill = torch.randn(6, 1, 37), torch.randn(2, 65, 37), torch.randn(4, 130, 37)

    def variants(names):
        return (_kernel_variants(pm.eval(), decode, names, False), _kernel_variants(pm.train(), decode, names, True),
                _kernel_variants(pm.eval(), mid, names[:2], False), _kernel_variants(pm.train(), mid, names[:2], True),
                _kernel_variants(pm.eval(), prefill, ["a0", "__base__", "a0", "a0"], False),
                _kernel_variants(pm.train(), prefill, ["a0", "__base__", "a0", "a0"], True))

    first = variants(["a0", "__base__"] * 3)
    assert all(first)
    grids = [_grids(pm.eval(), prefill, ["a0", "__base__", "a0", "a0"], False),
             _grids(pm.eval(), decode, ["a0", "__base__"] * 3, False)]
    pm.add_adapter("a1", config(5))
    assert variants(["a0", "__base__"] * 3) == first
    pm.add_adapter("a2", config(8))
    assert variants(["a1", "a0", "__base__", "a2", "a1", "a2"]) == first
    for i in range(3, 6):
        pm.add_adapter(f"a{i}", config(1 + i))
    assert variants(["a4", "a0", "a5", "a1", "__base__", "a2"]) == first  # the fused plan: 6 + 1 + 9 = 16 blocks
    for i in range(6, 16):
        pm.add_adapter(f"a{i}", config(1 + i % 16))
    assert variants([f"a{i}" for i in (15, 3, 0, 9, 9, 4)]) == first
    # the plan's blocks bound the adapters a batch uses: the same batch's forward launches the same grids with 16
    # held (the backward's weight-gradient grids cover every held adapter: each gets its gradient, zero if unused)
    assert [_grids(pm.eval(), prefill, ["a0", "__base__", "a0", "a0"], False),
            _grids(pm.eval(), decode, ["a0", "__base__"] * 3, False)] == grids
    pm.delete_adapter("a1")
    assert variants(["a2", "a0", "__base__", "a14", "a5", "a2"]) == first
    with torch.no_grad():  # 15 held, fewer used: the plans bound the used ones, outputs equal each sample alone
        pm.eval()
        for x, names in ((decode, ["a2", "a0", "__base__", "a14", "a5", "a2"]), (mid, ["a14", "__base__"]),
                         (prefill, ["a0", "__base__", "a0", "a0"])):
            torch.testing.assert_close(pm(x, adapter_names=names), alone_outputs(pm, x, names), rtol=1e-5, atol=1e-5)
    pm.add_adapter("wide", config(20))  # the store's rank grows from 16 to 32
    assert variants(["a2", "a0", "__base__", "a14", "a5", "wide"]) != first
