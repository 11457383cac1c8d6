"""The compile report compiles what the launchers pick: every launch below (meta tensors and a
recording ``launch``; nothing runs) must match an AotSpec of its kernel in num_warps, num_stages and
every meta-parameter the spec fixes. Covers the configs retuned against register spills: the
128-rank shrink with fp32 adapters and the int8 dX kernel that also computes dA."""
import importlib

import pytest
import torch

from peftfast.kernels import lora as L, qmatmul as Q, runtime
from peftfast.kernels.adapters import make_plan

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture
def launches(monkeypatch):
    seen = []

    def record(kernel, grid, *args, **meta):
        seen.append((runtime.kernel_name(kernel), meta))

    for name in ("lora", "qmatmul"):
        monkeypatch.setattr(importlib.import_module(f"peftfast.kernels.{name}"), "launch", record)
    return seen


def _meta(*shape, dtype=F16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _unmatched(seen, specs):
    bad = []
    for name, meta in seen:
        def fits(spec):
            fixed = {k: v for k, v in spec.constexprs.items() if k in meta}
            return (spec.fn.__name__ == name and spec.num_warps == meta.get("num_warps")
                    and spec.num_stages == meta.get("num_stages") and all(meta[k] == v for k, v in fixed.items()))
        if not any(fits(s) for s in specs):
            bad.append(f"{name} {dict((k, v) for k, v in meta.items() if not isinstance(v, torch.Tensor))}")
    return bad


@pytest.mark.parametrize("act", [F16, BF16, F32])
@pytest.mark.parametrize("rank", [5, 40, 100])
def test_lora_launches_are_compiled(launches, act, rank):
    m, k, n = 300, 96, 80
    for ad in dict.fromkeys((act, F32)):
        plan = make_plan((rank,), (2.0,), (0.1,))
        x, dy = _meta(m, k, dtype=act), _meta(m, n, dtype=act)
        a, b = _meta(rank, k, dtype=ad), _meta(n, rank, dtype=ad)
        t = L.launch_shrink(x, a, plan, 1, True)
        L.launch_shrink(x, a, plan, 1, False)
        L.launch_grad_w(t, dy, plan, 1, False, transpose_out=True)
        L.launch_grad_w(_meta(m, rank, dtype=ad), x, plan, 1, True, transpose_out=False)
        L.launch_expand(_meta(m, rank, dtype=ad), b, _meta(m, n, dtype=act), _meta(m, n, dtype=act))
        L.launch_grad_x(_meta(m, rank, dtype=ad), a, plan, 1, act)
    assert len(launches) >= 6
    assert not _unmatched(launches, L.aot_specs())


@pytest.mark.parametrize("act", [F16, BF16, F32])
def test_int8_dx_with_da_launch_is_compiled(launches, act):
    m, k, n, r = 300, 128, 192, 8
    cb, scb = _meta(n, k, dtype=torch.int8), _meta(n, dtype=F32)
    table = _meta(1, 4, dtype=torch.int64)
    for ad in dict.fromkeys((act, F32)):
        g, a = _meta(m, r, dtype=ad), _meta(r, k, dtype=ad)
        lora = (g, a, table, 0, False, runtime.dot_precision(act, ad))
        Q.matmul_int8_triton(_meta(m, n, dtype=act), cb, scb, transpose=False, lora=lora,
                             lora_x=_meta(m, k, dtype=act))
    dx = [(name, meta) for name, meta in launches if name == "_matmul_int8_kernel"]
    assert dx and all(meta["LORA_DA"] for _, meta in dx)
    if act != F32:
        assert {meta["num_stages"] for _, meta in dx} == {3, 2}  # the fp32-adapter variant runs two stages
    assert not _unmatched(dx, Q.aot_specs())


# ----------------------------------------------------------------------------------------------
# What runs on each GPU architecture, with Triton's run-time specialisation, is compiled
# ----------------------------------------------------------------------------------------------
# Representative shapes of the compile report (kernels/launch_specs.py): one 4096 -> 4096 layer, rank 16,
# T = 1, 7, 16 (decode), 128 and 8192 tokens, fp16/bf16 activations with fp16, bf16 or fp32 adapters. Here
# the launches come from the public ops (autograd included) on meta tensors, recorded as on each
# architecture's reference GPU (runtime.recording_launches); each must be exactly a spec the compile report
# builds for that architecture: the same argument types, constants, divisibility-by-16 attributes, warps,
# stages and compile options.
from peftfast.kernels import launch_specs as S, lora_fused as LF, qlora as QL  # noqa: E402
from peftfast.kernels.aot import spec_from_launch, spec_key  # noqa: E402
from peftfast.tools import compile_report as cr  # noqa: E402

D, RANK = S.D, S.RANK


@pytest.fixture(scope="module")
def compiled_keys():
    """arch -> spec_key of every (spec, arch) the full compile report builds."""
    out = {arch: set() for arch in cr.ARCHS}
    for source in cr.discover_sources():
        for spec in getattr(importlib.import_module(source.module), "aot_specs", list)():
            for arch in spec.archs or cr.ARCHS:
                out[arch].add(spec_key(spec.__class__(**{**spec.__dict__, "archs": (arch,)})))
    return out


def _public_op_launches(arch, tokens, act, ad, op):
    """Forward + backward of one public op on meta tensors (dropout 0 and 0.1, with and without an x
    gradient), recorded as on ``arch``'s reference GPU."""
    with runtime.recording_launches(arch) as rec:
        for p in (0.0, 0.1):
            for need_x in (True, False):
                for bias in (None, _meta(D, dtype=act)):
                    x = _meta(tokens, D, dtype=act).requires_grad_(need_x)
                    leaves = [x] if need_x else []
                    if op.startswith("matmul"):
                        w = S.meta_packed4bit(act, op.endswith("nested")) if "4bit" in op else S.meta_int8_weight()
                        y = Q.matmul_4bit(x, w, bias) if "4bit" in op else Q.matmul_int8(x, w.cb, w.scb, bias)
                    else:
                        a = _meta(RANK, D, dtype=ad).requires_grad_()
                        b = _meta(D, RANK, dtype=ad).requires_grad_()
                        leaves += [a, b]
                        args = ([a], [b], [2.0], [p], True)
                        if op == "lora_fused":
                            y = LF.lora_linear_fused(x, _meta(D, D, dtype=act), bias, *args)
                        elif op == "lora_unfused":  # what the measured dispatch may pick: cuBLAS, then lora.py
                            y = L.lora_linear(x, torch.nn.functional.linear(x, _meta(D, D, dtype=act), bias), *args)
                        else:
                            w = S.meta_int8_weight() if op == "qlora_int8" else S.meta_packed4bit(act, op.endswith("nested"))
                            y = QL.qlora_linear_fused(x, w, bias, *args)
                    if leaves:
                        torch.autograd.grad(y, leaves, torch.empty_like(y))
    return rec


def _unmatched_launches(recorded, keys, arch):
    bad = []
    for rec in recorded:
        spec = spec_from_launch(rec.kernel, rec.args, rec.meta, arch, "", True)
        if spec_key(spec) not in keys:
            bad.append(f"{runtime.kernel_name(rec.kernel)} {spec.constexprs} aligned={spec.aligned} "
                       f"warps={spec.num_warps} stages={spec.num_stages} {spec.options}")
    return bad


@pytest.mark.parametrize("arch", cr.ARCHS)
def test_launches_per_arch_are_compiled(arch, compiled_keys, triton_backend):
    bad, n = [], 0
    for op in S.OPS:
        for tokens in S.TOKENS:
            pairs = [(act, None) for act in (F16, BF16)] if op.startswith("matmul") else S.DTYPES
            for act, ad in pairs:
                recorded = _public_op_launches(arch, tokens, act, ad, op)
                n += len(recorded)
                bad += [f"{op} T={tokens} {act}/{ad}: {b}"
                        for b in _unmatched_launches(recorded, compiled_keys[arch], arch)]
    assert n > 1000
    assert not bad, f"{len(bad)} of {n} launches on sm_{arch} have no AotSpec; e.g.\n" + "\n".join(bad[:10])


@pytest.mark.parametrize("tokens, m_is", [(1, "constant"), (7, "plain"), (16, "aligned")])
def test_launch_specs_follow_triton_specialisation(tokens, m_is, triton_backend):
    """The spec of a recorded launch is what Triton compiles for it: M = 1 a constant, M = 16 divisible
    by 16, M = 7 neither; pointers of fresh tensors aligned; the seed of a launch without dropout (0) an
    int32, with dropout (>= 2**32) an int64."""
    from peftfast.kernels.adapters import make_plan

    x, a = _meta(tokens, 64, dtype=F16), _meta(16, 64, dtype=F32)
    specs = {}
    for seed, p in ((0, 0.0), (S.SEED, 0.1)):
        with runtime.recording_launches(86) as rec:
            L.launch_shrink(x, a, make_plan((16,), (2.0,), (p,)), seed, p > 0)
        (launch,) = rec
        specs[p] = spec_from_launch(launch.kernel, launch.args, launch.meta, 86, "shrink", True)
    spec = specs[0.0]
    assert spec.archs == (86,) and {"x_ptr", "a_ptr", "t_ptr", "K"} <= set(spec.aligned)
    assert (spec.signature["M"], "M" in spec.aligned, spec.constexprs.get("M")) == {
        "constant": ("constexpr", False, 1), "plain": ("i32", False, None), "aligned": ("i32", True, None)}[m_is]
    assert spec.constexprs["stride_xk"] == 1 and spec.constexprs["BLOCK_R"] == 16
    assert spec.signature["seed"] == "i32" and specs[0.1].signature["seed"] == "i64"
    assert spec_key(spec) != spec_key(specs[0.1])


def test_recording_plans_for_the_arch_gpu(triton_backend):
    """Inside recording_launches the launchers plan for that architecture's reference GPU (the SM count
    qmatmul's decode split follows), and nothing runs."""
    assert Q.sm_count(torch.device("meta")) == runtime.REFERENCE_GPUS[90].sms
    for arch, gpu in runtime.REFERENCE_GPUS.items():
        with runtime.recording_launches(arch) as rec:
            assert Q.sm_count(torch.device("cpu")) == gpu.sms
            Q.matmul_4bit_triton(_meta(1, S.D, dtype=F16), S.meta_packed4bit(F16, True), None)
        assert [runtime.kernel_name(r.kernel) for r in rec] == ["_matmul_4bit_kernel", "_split_reduce_kernel"]
    with pytest.raises(ValueError, match="no reference GPU"):
        with runtime.recording_launches(75):
            pass


@pytest.mark.parametrize("nested", [False, True])
def test_nested_qlora_runs_two_stages_below_sm90(nested, triton_backend):
    """The double-quantised 4-bit kernel with the adapter term spilled with three stages on sm_80/86/89
    (compile report of the launched specs); it runs two there, three on sm_90 and without nesting."""
    from peftfast.kernels.adapters import adapter_table, make_plan

    plan = make_plan((RANK,), (2.0,), (0.0,))
    x, t, b = _meta(128, D, dtype=BF16), _meta(128, RANK, dtype=F32), _meta(D, RANK, dtype=F32)
    for arch in cr.ARCHS:
        with runtime.recording_launches(arch) as rec:
            lora = (t, b, adapter_table(plan, x.device), 0, False, runtime.dot_precision(BF16, F32))
            Q.matmul_4bit_triton(x, S.meta_packed4bit(BF16, nested), None, transpose=True, lora=lora)
            Q.matmul_4bit_triton(x, S.meta_packed4bit(BF16, nested), None, transpose=True)
        with_lora, plain = (r.meta["num_stages"] for r in rec)
        assert plain == 3 and with_lora == (2 if nested and arch < 90 else 3)


@pytest.mark.parametrize("act, ad, stages", [(F16, F16, 3), (F16, BF16, 2), (BF16, F16, 2), (BF16, F32, 2)])
def test_int8_dx_with_da_of_another_dtype_runs_two_stages(launches, act, ad, stages):
    """The int8 dX + dA kernel spilled 8 bytes on sm_86 with three stages for fp16 adapters on bf16
    activations and the reverse (decode tile, dropout; launched specs): two stages when the adapter dtype
    is not the activations'."""
    from peftfast.kernels.adapters import adapter_table, make_plan

    plan = make_plan((RANK,), (2.0,), (0.1,))
    lora = (_meta(7, RANK, dtype=ad), _meta(RANK, 256, dtype=ad), adapter_table(plan, "meta"), S.SEED, True,
            runtime.dot_precision(act, ad))
    Q.matmul_int8_triton(_meta(7, 128, dtype=act), _meta(128, 256, dtype=torch.int8), _meta(128, dtype=F32),
                         transpose=False, lora=lora, lora_x=_meta(7, 256, dtype=act))
    assert [meta["num_stages"] for name, meta in launches] == [stages]


@pytest.mark.parametrize("act", [F16, BF16, F32])
@pytest.mark.parametrize("rank", [7, 40])
def test_fused_lora_and_dora_launches_are_compiled(monkeypatch, act, rank):
    """lora_fused.py's kernels as its launchers pick them: LoRA with and without dropout, and DoRA's
    variants (mns in the forward epilogue, the dX kernel and the dY pass, with and without bias; the
    row-norm kernel)."""
    from peftfast.kernels import lora_fused as LF

    seen = []
    monkeypatch.setattr(LF, "launch", lambda kernel, grid, *args, **meta: seen.append((runtime.kernel_name(kernel),
                                                                                       meta)))
    monkeypatch.setattr(L, "launch", lambda kernel, grid, *args, **meta: None)  # lora.py's shrink: covered above
    m, k, n = 300, 96, 80
    for ad in dict.fromkeys((act, F32)):
        x, dy, w = _meta(m, k, dtype=act), _meta(m, n, dtype=act), _meta(n, k, dtype=act)
        a, b, g, t = _meta(rank, k, dtype=ad), _meta(n, rank, dtype=ad), _meta(m, rank, dtype=ad), \
            _meta(m, rank, dtype=ad)
        mn = (_meta(n, dtype=F32), _meta(n, dtype=F32))
        for p in (0.0, 0.1):
            plan = make_plan((rank,), (2.0,), (p,))
            LF.launch_fused_forward(x, w, _meta(n, dtype=act), a, b, plan, 1)
            LF.launch_fused_grad_x(dy, w, g, a, plan, 1, x)
            LF.launch_fused_grad_x(dy, w, g, a, plan, 1)
            LF.launch_dy_pass(dy, t, b, plan)
        plan = make_plan((rank,), (2.0,), (0.0,))
        y = _meta(m, n, dtype=act)
        for bias in (None, _meta(n, dtype=act)):
            LF.launch_fused_forward(x, w, bias, a, b, plan, 0, dora=mn)
            LF.launch_fused_grad_x(dy, w, g, a, plan, 0, x, dora=(*mn, y, bias))
            LF.launch_fused_grad_x(dy, w, g, a, plan, 0, dora=(*mn, y, bias))
        LF.launch_dy_pass(dy, t, b, plan, dora=mn)
        LF.launch_dora_norm(w, a, b, plan)
        LF.launch_dora_grad_m(x, w, t, b, dy, *mn, _meta(3, n, dtype=F32))
    assert {"_dora_norm_kernel", "_dora_grad_m_kernel"} <= {name for name, _ in seen}
    assert any(meta.get("HAS_MNS") for _, meta in seen) and len(seen) >= 14
    assert not _unmatched(seen, LF.aot_specs())
