"""Mixed batches over bitsandbytes 4-bit and 8-bit bases fused into the quantised base GEMM
(kernels/lora_grouped_q.py): the op in Triton's interpreter against float64 (NF4 / FP4, nested absmax or not,
int8; fp32 and fp16 activations; 1 / 3 / 17 adapters of ranks 1 / 8 / 64 with unused ones and base rows; bias or
not; dropout), forward and the gradients of x, the bias and every A and B; one launch in the forward; the
PyTorch path and torch.compile; and models of real bitsandbytes layers whose mixed prefill takes the fused
kernel: outputs equal each sample alone, training gradients equal each adapter trained alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from peftfast.kernels.lora_grouped_q import aligned, lora_grouped_qlinear
from peftfast.kernels.qlora import Int8Weight, q_dense
from peftfast.kernels.quant import INT8_SCALE, dequantize_4bit_reference
from tests.kernels.test_qmatmul import make_int8, make_packed
from tests.test_multi_adapter_kernels import interpreted  # noqa: F401 (the fixture: Triton in the interpreter)
from tests.test_multi_adapter_kernels import check_linear_op_compiles, run_linear_case
from tests.test_multi_adapter import (RANKS, alone_outputs, check_mixed_grads_equal_alone, op_case, stacked_store,
                                      three_adapters, train_mixed)


def quant_weight(kind: str, o: int, k: int, seed: int, w_dtype=torch.float32, blocksize: int = 64):
    """(the weight as the op takes it, its exact value in float64 [O, K]). kind: nf4 / fp4 (+ "-nested") / int8."""
    if kind == "int8":
        cb, scb = make_int8(o, k, seed)
        return Int8Weight(cb, scb), cb.double() * scb.double()[:, None] * INT8_SCALE
    p = make_packed(o, k, blocksize, kind.endswith("-nested"), kind.split("-")[0], w_dtype, seed=seed)
    # the value the layer stands for: the fp32 product, rounded once into the weight's dtype
    return p, dequantize_4bit_reference(p).double()


def run_qlinear_case(kind, n, m, k, o, ranks, dtype=torch.float32, ps=None, bias=True, seed=0,
                     w_dtype=torch.float32, adapter_dtype=None, blocksize=64):
    """lora_grouped_qlinear vs the quantised base's dense matmul (the weight dequantised to ``dtype``) + each adapter
    alone on its rows, in ``dtype`` (plain) and in float64 (the exact weight): forward, and the gradients of x, the
    bias and every A and B (k = 8 x plain's error; ``run_linear_case``)."""
    p, w64 = quant_weight(kind, o, k, seed, w_dtype, blocksize)
    y = run_linear_case(n, m, k, o, ranks, dtype, ps, bias, seed, base=(lora_grouped_qlinear, p, q_dense(p, dtype), w64),
                        adapter_dtype=adapter_dtype)
    assert y.dtype == dtype and y.shape == (m, o)
    return y


KINDS = ["nf4", "nf4-nested", "fp4", "fp4-nested", "int8"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m,k,o", [(1, 70, 64, 5), (3, 150, 128, 37), (17, 90, 64, 71)])
def test_triton_quant_fused_vs_float64(interpreted, kind, n, m, k, o):
    """One launch for the dequantising base GEMM and every row's adapter (64-row blocks, several per adapter, base
    rows in blocks of their own, unused adapters), with and without bias."""
    run_qlinear_case(kind, n, m, k, o, [RANKS[i % 3] for i in range(n)], bias=n != 1, seed=n)


@pytest.mark.parametrize("kind", ["nf4-nested", "fp4", "int8"])
def test_triton_quant_fused_fp16(interpreted, kind):
    """fp16 activations and adapters, and fp16 activations with fp32 adapters (the interpreter has no bf16
    arithmetic: the bf16 launches are checked by compiling them)."""
    run_qlinear_case(kind, 3, 133, 128, 72, [8, 16, 3], dtype=torch.float16)
    run_qlinear_case(kind, 3, 133, 64, 40, [8, 64, 1], dtype=torch.float16, adapter_dtype=torch.float32, bias=False)


def test_triton_quant_fused_weight_rounded_through_its_dtype(interpreted):
    """A 4-bit weight stored for fp16 under fp32 activations: rounded through fp16 first, as bitsandbytes does."""
    run_qlinear_case("nf4-nested", 3, 100, 64, 33, [8, 64, 1], w_dtype=torch.float16)


@pytest.mark.parametrize("kind", ["nf4-nested", "int8"])
def test_triton_quant_fused_dropout_vs_float64(interpreted, kind):
    """Each row sees its adapter's dropout mask, regenerated from the op's seed in forward and backward."""
    run_qlinear_case(kind, 3, 150, 64, 19, [8, 64, 1], ps=[0.3, 0.0, 0.6])


@pytest.mark.parametrize("kind", ["nf4-nested", "fp4", "int8"])
def test_quant_fused_reference_vs_float64(torch_backend, kind):
    """The PyTorch path of the same op (the quantised reference matmul, then the grouped reference)."""
    run_qlinear_case(kind, 3, 37, 64, 19, [8, 64, 1])
    run_qlinear_case(kind, 3, 37, 64, 19, [8, 64, 1], ps=[0.3, 0.0, 0.6], bias=False)


def _recording(monkeypatch):
    """Every Triton launch of the grouped and quantised-matmul modules, by kernel name; F.linear refused."""
    from peftfast.kernels import lora_grouped as G
    from peftfast.kernels import qmatmul as Q
    from peftfast.kernels import runtime

    seen = []
    for mod in (G, Q):
        def record(kernel, grid, *args, _real=mod.launch, **meta):
            seen.append(runtime.kernel_name(kernel))
            return _real(kernel, grid, *args, **meta)
        monkeypatch.setattr(mod, "launch", record)
    return seen


@pytest.mark.parametrize("kind", ["nf4-nested", "int8"])
def test_triton_quant_fused_is_one_launch(interpreted, monkeypatch, kind):
    """Forward: one kernel (after the plan) whatever the number of adapters; no dequantised weight, no F.linear.
    Backward: one launch for dX and dH (``_grouped_linear_dx_kernel``, the weight dequantised in registers), then
    dA and dB; no quantised-matmul kernel."""
    seen = _recording(monkeypatch)
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("F.linear")))
    p, _ = quant_weight(kind, 7, 64, 0)
    for n in (3, 17):
        a, b, scal, index, x, _ = op_case(n, 140, 64, 7, [RANKS[i % 3] for i in range(n)], torch.float32)
        seen.clear()
        y = lora_grouped_qlinear(x, p, None, a, b, *stacked_store(a, b, scal), index)
        assert seen == ["_grouped_linear_kernel"]
        seen.clear()
        y.sum().backward()
        assert seen[0] == "_grouped_linear_dx_kernel" and "_grouped_linear_kernel" not in seen, seen
        assert not any(name.startswith("_matmul_") for name in seen) and len(seen) <= 7, seen


def test_4bit_blocks_narrower_than_the_dx_tile(interpreted, monkeypatch):
    """A 4-bit weight of blocksize 32: the forward's K tile (16 or 32) lies inside a block, so the forward is fused,
    but the dX kernel's K tile (64 columns) would span two blocks: the backward takes the quantised dX GEMM, then
    the grouped backward adding into it; forward and every gradient still equal float64's."""
    seen = _recording(monkeypatch)
    p, _ = quant_weight("nf4", 7, 64, 0, blocksize=32)
    assert aligned(p, torch.float16, torch.float16, 16) and not aligned(p, torch.float16, torch.float16, 16, dx=True)
    run_qlinear_case("nf4", 3, 140, 64, 23, [8, 16, 3], dtype=torch.float16, blocksize=32)
    assert "_grouped_linear_kernel" in seen and "_matmul_4bit_kernel" in seen
    assert "_grouped_linear_dx_kernel" not in seen


def test_general_4bit_layout_is_not_fused(interpreted):
    """K % blocksize != 0: the fused kernel does not read that layout; the op says what to use instead."""
    p, _ = quant_weight("nf4", 7, 96, 0)  # 96 % 64 != 0
    assert not aligned(p, torch.float32, torch.float32, 8)
    a, b, scal, index, x, _ = op_case(3, 40, 96, 7, [8, 1, 3], torch.float32)
    with pytest.raises(ValueError, match="general layout"):
        lora_grouped_qlinear(x, p, None, a, b, *stacked_store(a, b, scal), index)


def test_quant_fused_bad_input():
    p, _ = quant_weight("int8", 7, 64, 0)
    a, b, scal, index, x, _ = op_case(3, 20, 63, 7, [8, 1, 3], torch.float32)
    with pytest.raises(ValueError, match="x must be"):
        lora_grouped_qlinear(x, p, None, a, b, *stacked_store(a, b, scal), index)
    a, b, scal, index, x, _ = op_case(3, 20, 64, 9, [8, 1, 3], torch.float32)
    with pytest.raises(ValueError, match="stores with K=64, O=9"):
        lora_grouped_qlinear(x, p, None, a, b, *stacked_store(a, b, scal), index)


@pytest.mark.parametrize("kind", ["nf4-nested", "int8"])
def test_quant_fused_torch_compile_fullgraph(torch_backend, kind):
    """Under torch.compile(fullgraph=True, backend="aot_eager"), with dropout (a fixed seed) and a trainable bias:
    eager's output and gradients (the custom op, its fake and its backward op)."""
    check_linear_op_compiles(lora_grouped_qlinear, quant_weight(kind, 5, 64, 0)[0], 64, 5)


# ------------------------------------------------------------------------------------------------------
# models of real bitsandbytes layers: the mixed prefill takes the fused kernel
# ------------------------------------------------------------------------------------------------------
def _qnet(kind: str):
    """Two bitsandbytes linears 64 -> 64 -> 23 (bias; 4-bit: the aligned layout, blocksize 64)."""
    import bitsandbytes as bnb

    def linear(i, o):
        if kind == "int8":
            return bnb.nn.Linear8bitLt(i, o, bias=True, has_fp16_weights=False)
        return bnb.nn.Linear4bit(i, o, bias=True, quant_type=kind, compute_dtype=torch.float32)

    torch.manual_seed(7)
    net = nn.Sequential(linear(64, 64), nn.Tanh(), linear(64, 23)).to("cpu")  # quantised on the move
    for m in net.modules():  # keep bitsandbytes from repacking the 4-bit weight for its CPU inference kernel
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return net


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_prefill_over_quantised_bases_runs_the_fused_kernel(interpreted, monkeypatch, kind):
    """A mixed batch with rows enough to fill the fused kernel's 64-row blocks (1040 >= 4 x (3 adapters + base) x
    64): each layer runs ``_grouped_linear_kernel`` (no separate base matmul), the output equals each sample alone;
    per-token names equal each token's adapter applied alone; decode-sized batches keep the quantised matmul + the
    grouped kernels. In training every adapter's gradients equal training it alone on its samples (through both
    layers)."""
    names = ["a0", "a1", "a2"]
    pm = three_adapters(_qnet(kind), names, ["0", "2"], 0.3)
    seen = _recording(monkeypatch)
    g = torch.Generator().manual_seed(1)
    batch, seq = 8, 130
    x = torch.randn(batch, seq, 64, generator=g)
    per_sample = ["a0", "a2", "__base__", "a2", "a0", "a2", "a2", "__base__"]  # a1: no sample (empty segment)
    pm.eval()
    with torch.no_grad():
        y = pm(x, adapter_names=per_sample)
    assert seen.count("_grouped_linear_kernel") == 2, seen
    assert not {"_matmul_4bit_kernel", "_matmul_int8_kernel", "_grouped_shrink_kernel"} & set(seen), seen
    with torch.no_grad():
        torch.testing.assert_close(y, alone_outputs(pm, x, per_sample), rtol=1e-5, atol=1e-5)
    seen.clear()
    with torch.no_grad():
        pm(x[:, :3], adapter_names=per_sample)  # 24 rows: decode-sized
    assert "_grouped_linear_kernel" not in seen and "_grouped_shrink_kernel" in seen, seen

    # per-token names on the first layer: each token as its adapter alone (or the base layer)
    layer = pm.base_model.model[0]
    choice = names + ["__base__"]
    per_token = [[choice[int(i)] for i in torch.randint(0, 4, (seq,), generator=g)] for _ in range(batch)]
    seen.clear()
    with torch.no_grad():
        got = layer(x, adapter_names=per_token)
        assert seen == ["_grouped_linear_kernel"], seen
        with pm.disable_adapter():
            want = layer(x)
        for name in names:
            layer.set_adapter(name)
            mask = torch.tensor([[t == name for t in per] for per in per_token])
            want = torch.where(mask[..., None], layer(x), want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    params = train_mixed(pm, names)
    weight = torch.randn(batch, seq, 23, generator=g)
    seen.clear()
    check_mixed_grads_equal_alone(pm, names, per_sample, x, weight, params, tol=lambda r: dict(rtol=1e-4, atol=1e-4),
                                  own_count=4, nonzero=True)
    assert seen.count("_grouped_linear_kernel") >= 2, seen


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantised_prefill_follows_the_measured_choice(interpreted, monkeypatch, tmp_path, kind):
    """Measured dispatch (kernels/autotune.py, injected times preferring the unfused path, the interpreter's CPU
    tensors counted as measurable): both candidates timed once per layer key (the fused launch; the quantised
    matmul + the grouped kernels), then the quantised matmul + grouped kernels run, equal to each sample alone."""
    from peftfast.kernels import autotune
    from tests.kernels.test_autotune import FakeTimer

    timer = FakeTimer({"fused": 2.0, "unfused": 1.0}, run=True)
    tuner = autotune.Tuner(timer=timer, directory=tmp_path, version="test")
    monkeypatch.setattr(autotune, "TUNER", tuner)
    monkeypatch.setattr(autotune, "tunable", lambda device: autotune.autotune_enabled())
    monkeypatch.setattr(autotune, "may_measure", lambda device: True)
    names = ["a0", "a1", "a2"]
    pm = three_adapters(_qnet(kind), names, ["0", "2"], 0.3)
    seen = _recording(monkeypatch)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 130, 64, generator=g)
    per_sample = ["a1", "a2", "__base__", "a2", "a0", "a2", "a1", "a0"]
    pm.eval()
    with torch.no_grad():
        pm(x, adapter_names=per_sample)
        assert [c[0] for c in timer.calls] == ["fused", "unfused"] * 2
        keys = sorted(key for _, key, _ in tuner.decisions())
        assert [k[2] for k in keys] == [("int8" if kind == "int8" else "4bit")] * 2
        seen.clear()
        y = pm(x, adapter_names=per_sample)
    assert len(timer.calls) == 4 and "_grouped_linear_kernel" not in seen and "_grouped_shrink_kernel" in seen, seen
    assert ("_matmul_int8_kernel" if kind == "int8" else "_matmul_4bit_kernel") in seen, seen
    with torch.no_grad():
        torch.testing.assert_close(y, alone_outputs(pm, x, per_sample), rtol=1e-5, atol=1e-5)


def test_prefill_over_4bit_base_with_dropout_and_lora_bias(interpreted, monkeypatch):
    """Training with lora_dropout and lora_bias over an NF4 base: the fused kernel runs, each sample of the base
    model is unchanged by the adapters, each adapter's bias reaches only its rows, and gradients reach exactly the
    adapters the batch uses."""
    import peftfast as fast

    pm = None
    for i, name in enumerate(["a0", "a1", "a2"]):
        cfg = fast.LoraConfig(r=RANKS[i], lora_alpha=4, target_modules=["0", "2"], lora_dropout=0.4,
                              lora_bias=i == 1)
        pm = fast.get_peft_model(_qnet("nf4"), cfg, adapter_name=name) if pm is None else pm.add_adapter(name, cfg) or pm
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if "lora_" in k:
                p.copy_(torch.randn_like(p) * 0.3)
    train_mixed(pm, ["a0", "a1", "a2"])
    seen = _recording(monkeypatch)
    x = torch.randn(8, 130, 64, generator=torch.Generator().manual_seed(3))
    per_sample = ["a1", "__base__", "a1", "a0", "a1", "a0", "__base__", "a1"]  # a2 unused
    y = pm(x, adapter_names=per_sample)
    assert seen.count("_grouped_linear_kernel") == 2, seen
    with torch.no_grad(), pm.disable_adapter():
        base = pm(x)
    torch.testing.assert_close(y[1], base[1], rtol=1e-5, atol=1e-5)
    assert (y[0] - base[0]).abs().max() > 1e-2
    y.pow(2).sum().backward()
    for k, p in pm.named_parameters():
        if "lora_" in k and p.requires_grad:
            used = ".a2." not in k
            assert (p.grad is not None and p.grad.abs().max() > 0) == used, k


# ------------------------------------------------------------------------------------------------------
# the cost model of the bench (peftfast/tools/bench/multi_adapter.py)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["4bit", "int8"])
@pytest.mark.parametrize("dropout", [False, True])
def test_quant_cost_model_matches_counted_traffic(interpreted, kind, dropout):
    """``qfused_launches`` gives exactly the bytes (distinct addresses) and launches counted from the kernels in the
    interpreter and the torch ops between them, forward and backward (150 rows: adapters hold several blocks)."""
    from peftfast.tools.bench.multi_adapter import calibrate_quant

    for row in calibrate_quant(kind, dropout=dropout):
        assert row["counted_launches"] == row["modelled_launches"], row
        assert row["counted_bytes"] == row["modelled_bytes"], row


def test_quant_prefill_rows():
    """The modelled NF4 prefill: one launch, within 5% of the packed weight + x + y + the used adapters."""
    from peftfast.tools.bench.multi_adapter import quant_prefill_rows

    rows = quant_prefill_rows()
    assert [r["adapters"] for r in rows] == [1, 4, 16, 64]
    assert all(r["fused"] and r["launches_ours"] == 1 and r["within_budget"] for r in rows), rows


def test_every_quantised_launch_has_an_aot_spec(monkeypatch):
    """The compile report builds what the launcher picks: every launch of the fused kernel over a 4-bit (plain or
    nested absmax) or int8 base (meta tensors, nothing runs), per dtype pair, store rank, bias and dropout, matches a
    spec of ``lora_grouped_q.aot_specs`` in warps, stages, fp contraction and every fixed meta-parameter."""
    from peftfast.kernels import lora_grouped as G
    from peftfast.kernels import lora_grouped_q as GQ
    from peftfast.kernels import runtime
    from peftfast.kernels.quant import Packed4bit

    seen = []
    monkeypatch.setattr(G, "launch", lambda kernel, grid, *args, **meta: seen.append((kernel, meta)))
    m, k, o, n, meta = 300, 128, 80, 5, dict(device="meta")
    u8, f32 = dict(dtype=torch.uint8, **meta), dict(dtype=torch.float32, **meta)
    weights = [Int8Weight(torch.empty(o, k, dtype=torch.int8, **meta), torch.empty(o, **f32))]
    for nested in (False, True):
        extra = (torch.empty(1, **f32), torch.empty(256, **f32), 256, 0.5) if nested else ()
        weights.append(Packed4bit(torch.empty(o * k // 2, **u8), torch.empty(o * k // 64, **(u8 if nested else f32)),
                                  torch.empty(16, **f32), 64, (o, k), torch.float32, *extra))
    for act, ad in G.DTYPE_PAIRS:
        for rank in (1, 8, 16, 32, 64):
            x = torch.empty(m, k, dtype=act, **meta)
            a, b = torch.empty(n, rank, k, dtype=ad, **meta), torch.empty(n, rank, o, dtype=ad, **meta).transpose(1, 2)
            table = torch.empty(n + 1 + m // 64, 64, dtype=torch.int64, **meta)
            for p in weights:
                for bias in (None, torch.empty(o, dtype=act, **meta)):
                    for th in (None, torch.empty(n, dtype=torch.int64, **meta)):
                        G.launch_grouped_linear(x, GQ.quantised_base(p, act), bias, a, b, torch.empty(n, **f32), table,
                                                table[:, 0], th, 1)
                        if bias is None:  # the backward's dX launch (no bias)
                            G.launch_grouped_linear_dx(torch.empty(m, o, dtype=act, **meta), GQ.quantised_base(p, act),
                                                       a, b, torch.empty(n, **f32), table, table[:, 0], th, 1)
    specs = GQ.aot_specs()
    assert len(seen) == len(G.DTYPE_PAIRS) * 5 * 3 * (4 + 2)
    assert {runtime.kernel_name(kernel) for kernel, _ in seen} == {"_grouped_linear_kernel", "_grouped_linear_dx_kernel"}
    for kernel, launch in seen:
        assert any(spec.fn is kernel and (spec.num_warps, spec.num_stages) == (launch["num_warps"], launch["num_stages"])
                   and spec.options == {"enable_fp_fusion": launch["enable_fp_fusion"]}
                   and all(launch[key] == v for key, v in spec.constexprs.items() if key in launch) for spec in specs), (
            {key: v for key, v in launch.items() if not isinstance(v, torch.Tensor)})
