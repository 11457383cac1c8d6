"""The cost model against counted traffic: PEFT's real layers (test-only oracle) and peftfast's kernels."""
import importlib
import importlib.util
from collections import Counter

import pytest
import torch
from torch import nn

from peftfast.tools import costmodel as cm
from peftfast.tools.traffic import count_torch

peft = pytest.importorskip("peft")


class _Tiny(nn.Module):
    def __init__(self, d_in, d_out, dtype):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False).to(dtype)

    def forward(self, x):
        return self.proj(x)


def _signature(kernels_or_launches):
    """Multiset of (bytes read, bytes written): one entry per launch."""
    return Counter((k.bytes_read, k.bytes_written) for k in kernels_or_launches)


def _peft_lora_counts(t_shape, d_in, d_out, r, act, autocast_adapters, p):
    model = _Tiny(d_in, d_out, act)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=p)
    pm = peft.get_peft_model(model, cfg, autocast_adapter_dtype=autocast_adapters)
    layer = pm.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # never the zero init
    pm.train()
    x = torch.randn(*t_shape, d_in).to(act).requires_grad_(True)
    with count_torch() as fwd:
        y = pm(x)
    g = torch.randn_like(y)
    with count_torch() as bwd:
        y.backward(g)
    assert x.grad is not None and layer.lora_A["default"].weight.grad is not None
    return fwd, bwd, layer.lora_A["default"].weight.dtype


@pytest.mark.parametrize("p", [0.1, 0.0])
@pytest.mark.parametrize("act,autocast", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True),
                                          (torch.float32, True)])
def test_peft_lora_layer_matches_formula_exactly(act, autocast, p):
    t_shape, d_in, d_out, r = (2, 13), 41, 29, 7
    fwd, bwd, ad = _peft_lora_counts(t_shape, d_in, d_out, r, act, autocast, p)
    t = t_shape[0] * t_shape[1]
    for counted, backward in ((fwd, False), (bwd, True)):
        model = cm.lora_layer("peft", backward, t, d_in, d_out, r, act, ad, p, dropout_impl="cpu")
        assert counted.launches == len(model), (counted.table(), [k.name for k in model])
        assert counted.bytes == cm.path_bytes(model)
        assert _signature(counted.launch_log) == _signature(model)


def test_eager_reference_is_peft_op_for_op():
    """calibrate_eager (used by the report, which cannot import PEFT) runs PEFT's exact ops."""
    act, d_in, d_out, r = torch.bfloat16, 40, 56, 4
    fwd, bwd, ad = _peft_lora_counts((24,), d_in, d_out, r, act, True, 0.1)
    checks = cm.calibrate_eager(24, d_in, d_out, r, act, ad, 0.1)
    assert all(c.ok for c in checks), [c.line() for c in checks]
    assert [c.counted_bytes for c in checks] == [fwd.bytes, bwd.bytes]
    assert [c.counted_launches for c in checks] == [fwd.launches, bwd.launches]


@pytest.mark.parametrize("feedforward", [True, False])
def test_peft_ia3_forward_matches_formula_exactly(feedforward):
    d_in, d_out, t = 37, 23, 19
    model = _Tiny(d_in, d_out, torch.bfloat16)
    cfg = peft.IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if feedforward else [])
    pm = peft.get_peft_model(model, cfg)
    layer = pm.base_model.model.proj
    with torch.no_grad():
        layer.ia3_l["default"].normal_()
    x = torch.randn(t, d_in).to(torch.bfloat16)
    with count_torch() as c:
        pm(x)
    formula = cm.peft_ia3_forward(t, d_in, d_out, torch.bfloat16, layer.ia3_l["default"].dtype, feedforward)
    assert _signature(c.launch_log) == _signature(formula), c.table()


def test_building_blocks_by_hand():
    k = cm.matmul("mm", 2, 3, 4, torch.float16, torch.float16, torch.float32)
    assert (k.bytes_read, k.bytes_written, k.flops, k.tensor_core) == ((6 + 12) * 2, 8 * 4, 48, True)
    assert not cm.matmul("mm", 2, 3, 4, torch.float32, torch.float32, torch.float32).tensor_core
    e = cm.elementwise("cast", [(10, torch.bfloat16)], [(10, torch.float32), (10, torch.bool)])
    assert (e.bytes_read, e.bytes_written) == (20, 50)


def test_time_is_max_of_bandwidth_and_compute_plus_launch():
    gpu = cm.Gpu("test", bandwidth=1e12, tensor_flops=100e12, fp32_flops=10e12)
    memory_bound = cm.Kernel("m", 2_000_000, 1_000_000, 1000)
    assert memory_bound.time(gpu) == pytest.approx(3e-6)
    compute_bound = cm.Kernel("c", 1000, 1000, 10**9, tensor_core=True)
    assert compute_bound.time(gpu) == pytest.approx(1e-5)
    assert cm.Kernel("c", 1000, 1000, 10**9).time(gpu) == pytest.approx(1e-4)  # fp32 peak
    assert memory_bound.time(gpu, 5e-6) == pytest.approx(8e-6)
    assert cm.path_time([memory_bound, compute_bound], gpu, 1e-6) == pytest.approx(3e-6 + 1e-5 + 2e-6)


def test_nf4_and_int8_weight_bytes_match_bitsandbytes():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    n, k = 96, 136  # 13056 elements: 204 blocks of 64
    w = torch.randn(n, k)
    for nested in (False, True):
        packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        stored = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
        stored += state.code.numel() * state.code.element_size()
        if nested:
            stored += state.state2.absmax.numel() * 4 + state.state2.code.numel() * 4
        assert cm.nf4_weight_bytes(n, k, 64, nested) == stored
    x_bytes = 5 * k * 2
    assert cm.matmul_4bit_fused(5, k, n, torch.bfloat16).bytes_read == x_bytes + cm.nf4_weight_bytes(n, k)
    deq = cm.dequant_4bit_then_matmul(5, k, n, torch.bfloat16)
    assert deq[0].bytes_written == n * k * 2 and deq[1].bytes_read == x_bytes + n * k * 2


def test_splits_mirror_the_launcher_rule():
    # fp32 operands: row blocks of 32; one rank tile, one column block -> one split per 32 rows
    assert cm.lora_grad_splits(200, 52, [7], torch.float32, True) == 7
    assert cm.lora_grad_splits(37, 52, [7], torch.bfloat16, False) == 1
    # enough column blocks that 528 programs are reached without splitting
    assert cm.lora_grad_splits(8192, 64 * 528, [16], torch.bfloat16, False) == 1


def _ratio(impl, backward, gpu, ad, p, overhead=0.0, t=8192, d=4096, r=16):
    ks = cm.lora_layer(impl, backward, t, d, d, r, torch.bfloat16, ad, p)
    base = cm.lora_layer("base", backward, t, d, d, r, torch.bfloat16, ad)
    return cm.path_time(ks, gpu, overhead) / cm.path_time(base, gpu, overhead)


@pytest.mark.parametrize("gpu", [cm.H100, cm.RTX4090])
def test_target_shape_ordering(gpu):
    bf16, f32 = torch.bfloat16, torch.float32
    for backward in (False, True):
        fused = _ratio("peftfast-fused", backward, gpu, f32, 0.1)
        ours = _ratio("peftfast", backward, gpu, f32, 0.1)
        peft_nodrop = _ratio("peft", backward, gpu, bf16, 0.0)
        peft_drop = _ratio("peft", backward, gpu, bf16, 0.1)
        peft_f32 = _ratio("peft", backward, gpu, f32, 0.1)
        assert 1.0 < fused < ours < peft_nodrop < peft_drop < peft_f32
        assert _ratio("peftfast", backward, gpu, f32, 0.1, 3e-6) > ours  # extra launches cost extra


def test_peft_figures_of_the_design_are_reproduced():
    """DESIGN: PEFT's LoRA linear at T=8192, 4096x4096, r=16, bf16 on H100 costs ~1.6x the base
    GEMM forward (dropout on) and ~1.75x backward; both come out of the counted-op formulas."""
    assert _ratio("peft", False, cm.H100, torch.bfloat16, 0.1) == pytest.approx(1.6, abs=0.05)
    assert _ratio("peft", True, cm.H100, torch.bfloat16, 0.1) == pytest.approx(1.75, abs=0.05)


def test_report_is_computed_and_labelled():
    a = cm.render_report(calibrate=False)
    b = cm.render_report(t=4096, calibrate=False)
    assert "modelled from counted traffic" in a
    assert "H100" in a and "RTX 4090" in a and "with 3.0 us per launch" in a
    assert a != b  # numbers follow the shape
    assert cm.main(["--no-calibrate", "--gpu", "h100", "--tokens", "1024"]) == 0


def test_report_calibration_lines_pass():
    text, ok = cm.build_report(gpus=(cm.H100,))
    assert ok
    calib = [line for line in text.splitlines() if line.startswith("  ") and " counted " in line]
    expected = 2 + sum(n for m, n in (("lora", 4), ("lora_fused", 6)) if importlib.util.find_spec(f"peftfast.kernels.{m}"))
    assert len(calib) == expected and all("[ok" in line for line in calib), "\n".join(calib)


@pytest.mark.parametrize("t,ad,p", [(37, torch.float32, 0.1), (200, torch.float16, 0.0), (200, torch.float32, 0.1)])
def test_peftfast_kernels_match_the_model(t, ad, p):
    """Counted traffic of kernels/lora.py (interpreter, unique bytes per launch, plus the torch
    ops between launches) vs peftfast_lora_forward/backward: launches equal, bytes within
    KERNEL_BYTES_TOLERANCE. Skipped only when kernels/lora.py does not exist."""
    if importlib.util.find_spec("peftfast.kernels.lora") is None:
        pytest.skip("peftfast.kernels.lora does not exist")
    importlib.import_module("peftfast.kernels.lora")
    checks = cm.calibrate_peftfast(t=t, d_in=45, d_out=52, r=7, dropout_p=p, ad=ad)
    for check in checks:
        print(check.line())
        assert check.ok, check.line()


@pytest.mark.parametrize("t,ad,p,bias", [(37, torch.float32, 0.1, True), (200, torch.float16, 0.0, True),
                                         (113, torch.float32, 0.3, False), (1100, torch.float16, 0.1, True)])
def test_peftfast_fused_kernels_match_the_model(t, ad, p, bias):
    """Counted traffic of kernels/lora_fused.py (interpreter, unique bytes per launch, plus the
    torch ops between launches) vs peftfast_fused_forward/backward: launches equal, bytes within
    KERNEL_BYTES_TOLERANCE. Skipped only when kernels/lora_fused.py does not exist."""
    if importlib.util.find_spec("peftfast.kernels.lora_fused") is None:
        pytest.skip("peftfast.kernels.lora_fused does not exist")
    importlib.import_module("peftfast.kernels.lora_fused")
    checks = cm.calibrate_peftfast_fused(t=t, d_in=45, d_out=52, r=7, dropout_p=p, ad=ad, bias=bias)
    for check in checks:
        print(check.line())
        assert check.ok, check.line()


def test_fused_model_by_hand():
    """The fused path replaces the base GEMMs: forward = one GEMM kernel with the shrink inside
    (16-bit activations; fp32: shrink + GEMM); backward = one dY pass (G and dB, partials summed
    inside) and one dX GEMM that also computes dA (no dX_lora, no add, no separate read of X)."""
    bf16, f32 = torch.bfloat16, torch.float32
    t, k, n, r = 64, 96, 600, 5
    (fwd,) = cm.peftfast_fused_forward(t, k, n, [r], bf16, f32)
    base = cm.base_linear_forward(t, k, n, bf16)[0]
    assert cm.fused_shrink_items(k, n, bf16) == 2  # 2 K blocks of 64: 2 slices
    partials = 2 * t * r * 4
    assert fwd.bytes_read == base.bytes_read + t * r * 4 + n * r * 4 + t * k * 2 + r * k * 4 + r * 4 + partials
    assert fwd.bytes_written == base.bytes_written + t * r * 4 + partials
    assert fwd.flops == base.flops + 2 * t * n * r + 2 * t * k * r and fwd.tensor_core
    assert cm.fused_forward_reread(t, k, bf16) == t * k * 2
    shrink, gemm = cm.peftfast_fused_forward(t, k, n, [r], f32, f32)
    assert shrink == cm.peftfast_lora_forward(t, k, n, [r], f32, f32)[0]
    assert gemm.bytes_read == t * k * 4 + n * k * 4 + t * r * 4 + n * r * 4 and cm.fused_forward_reread(t, k, f32) == 0
    assert cm.fused_dy_splits(t, n, [r], bf16, bf16) == (3, 4)  # 3 blocks of 256 columns; 4 splits of 16 rows
    assert cm.fused_dy_splits(t, n, [r], bf16, f32) == (10, 4)  # fp32 adapters: 10 blocks of 64, 4 splits of 16 rows
    assert cm.fused_dy_splits(t, n, [r], f32, f32) == (5, 4)  # fp32 model: 5 blocks of 128, 4 splits of 16 rows
    bwd = cm.peftfast_fused_backward(t, k, n, [r], bf16, bf16)
    assert len(bwd) == 2  # the dY pass and the dX + dA kernel; every partial sum happens inside them
    dy_pass, dx = bwd
    partials = 3 * t * r * 4 + 4 * n * r * 4
    assert dy_pass.bytes_read == t * n * 2 + t * r * 2 + n * r * 2 + r * 4 + partials
    assert dy_pass.bytes_written == partials + t * r * 2 + n * r * 2
    dx_base = cm.base_linear_backward(t, k, n, bf16)[0]
    da_partials = 1 * r * k * 4  # 64 rows: one 128-row block
    assert dx.bytes_read == dx_base.bytes_read + t * r * 2 + r * k * 2 + t * k * 2 + da_partials
    assert dx.bytes_written == dx_base.bytes_written + da_partials + r * k * 2
    assert dx.flops == dx_base.flops + 4 * t * k * r and dx.tensor_core
    with_bias = cm.peftfast_fused_backward(t, k, n, [r], bf16, f32, bias=True)
    assert [x.name for x in with_bias[-2:]] == ["torch: dbias = sum_T dY", "torch: dbias.to(act)"]
    assert cm.lora_layer("peftfast-fused", True, t, k, n, r, bf16, f32, 0.1) == \
        cm.peftfast_fused_backward(t, k, n, [r], bf16, f32)


def test_fused_rows_in_the_report():
    text = cm.render_report(calibrate=False, gpus=(cm.H100, cm.RTX4090))
    rows = [line for line in text.splitlines() if line.startswith("peftfast (fused base)")]
    assert len(rows) == 8  # 2 table rows + 2 verdicts, per GPU
    assert sum("target 1.07" in line and "target 1.13" in line for line in rows) == 4
