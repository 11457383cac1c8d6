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
