"""The LoHa / LoKr cost model (peftfast/tools/costmodel/formulas/lycoris.py) against counted traffic: every
Triton launch's unique bytes (interpreter) and every torch op between them, forward and backward, equal the
formulas' per-launch bytes; and the modelled ratios at the issue's shape are what the report states."""
import pytest
import torch

from peftfast.kernels import lycoris as LY
from peftfast.tools.costmodel.formulas import lycoris as FL
from peftfast.tools.costmodel.specs import H100
from peftfast.tools.traffic import count_torch, count_triton

T, N, K = 37, 45, 33


def _case(kind, act, g, fdt=None):
    if kind == "loha":
        shapes, layout, fac = [(N, 3), (3, K), (N, 5), (5, K)], LY.loha_layout(N, K), FL.Factors((N, K, 3), (N, K, 5))
    elif kind == "lokr_fl":
        shapes, layout = [(5, 3), (9, 2), (2, 11)], LY.lokr_layout(True, False, 9, 11, 5, 3)
        fac = FL.lokr(K, N, 5, 3, 0, 2)
    elif kind == "lokr_ll":
        shapes, layout = [(5, 4), (4, 3), (9, 2), (2, 11)], LY.lokr_layout(False, False, 9, 11, 5, 3)
        fac = FL.lokr(K, N, 5, 3, 4, 2)
    else:
        shapes, layout, fac = [(5, 3), (9, 11)], LY.lokr_layout(True, True, 9, 11, 5, 3), FL.lokr(K, N, 5, 3, 0, 0)
    return [torch.randn(*s, generator=g).to(fdt or act).requires_grad_() for s in shapes], layout, fac


def _split(model):
    """(the Triton launches, the torch ops) of a formula's launch list, each in order."""
    triton = [m.kernel for m in model if m.kernel.name.startswith("peftfast")]
    return triton, [m.kernel for m in model if not m.kernel.name.startswith("peftfast")]


@pytest.mark.parametrize("kind, act, fdt, form_limit", [
    ("loha", torch.float16, None, None), ("lokr_ff", torch.float32, None, None),
    ("lokr_fl", torch.float16, None, None), ("lokr_ll", torch.float32, None, None),
    ("lokr_fl", torch.float16, None, 0),
    # fp32 factors on a 16-bit model (PEFT's default): rounded for the GEMMs, kept fp32 for their gradients
    ("loha", torch.float16, torch.float32, None), ("lokr_ff", torch.float16, torch.float32, None),
    ("lokr_fl", torch.float16, torch.float32, None), ("lokr_ll", torch.float16, torch.float32, None),
    ("lokr_fl", torch.float16, torch.float32, 0)])
def test_counted_bytes_match_formulas(triton_kernels, monkeypatch, kind, act, fdt, form_limit):
    """Every launch, Triton and torch (``prepare``'s casts, products and scaling, ``unprepare_grads``), in order;
    form_limit 0: LoKr's low-rank factors left low rank; fdt: the factors' dtype (default act)."""
    if form_limit is not None:
        monkeypatch.setattr(LY, "FORM_LIMIT", form_limit)
    g = torch.Generator().manual_seed(0)
    fs, layout, fac = _case(kind, act, g, fdt)
    x = torch.randn(T, K, generator=g).to(act).requires_grad_()
    w = torch.randn(N, K, generator=g).to(act)
    b = torch.randn(N, generator=g).to(act).requires_grad_()
    with count_triton() as tr, count_torch() as to:
        y = LY.LYCORIS_LINEAR(x, w, b, fs, layout, 0.5, hint=True)
    triton, torch_ops = _split(FL.peftfast_forward(T, K, N, fac, act, 16, bias=True, factor_dtype=fdt))
    assert [(lt.unique_bytes_read, lt.unique_bytes_written) for lt in tr.launch_log] == \
        [(m.bytes_read, m.bytes_written) for m in triton]
    assert [(lt.bytes_read, lt.bytes_written) for lt in to.launch_log] == \
        [(m.bytes_read, m.bytes_written) for m in torch_ops]
    dy = torch.randn(T, N, generator=g).to(act)
    with count_triton() as tr, count_torch() as to:
        y.backward(dy)
    triton, torch_ops = _split(FL.peftfast_backward(T, K, N, fac, act, 16, bias=True, factor_dtype=fdt))
    assert [(lt.unique_bytes_read, lt.unique_bytes_written) for lt in tr.launch_log] == \
        [(m.bytes_read, m.bytes_written) for m in triton]
    assert [(lt.bytes_read, lt.bytes_written) for lt in to.launch_log] == \
        [(m.bytes_read, m.bytes_written) for m in torch_ops]


def test_counted_case_follows_the_launchers_align_choice():
    """The model counts the ALIGN variant the launcher picks for LoKr's blocks (bf16 GPU tiles: forward 64 x 32
    (N x K), dX 32 x 64)."""
    kv = FL.kernel_factors(FL.lokr(4096, 1024, 32, 64, 0, 16), 4096, 1024)  # w2 [32, 64]
    wide = FL.kernel_factors(FL.lokr(5120, 5120, 64, 64, 0, 16), 5120, 5120)  # w2 [80, 80]
    square = FL.kernel_factors(FL.lokr(4096, 4096, 64, 64, 0, 16), 4096, 4096)  # w2 [64, 64]
    assert [FL.delta_case(kv, k) for k in ("forward", "grad_x")] == ["lokr_align2", "lokr"]
    small = FL.kernel_factors(FL.lokr(576, 576, 24, 24, 0, 16), 576, 576)  # w2 [24, 24]
    assert [FL.delta_case(wide, k) for k in ("forward", "grad_x")] == ["lokr_align3", "lokr_align3"]
    assert [FL.delta_case(small, k) for k in ("forward", "grad_x")] == ["lokr_general", "lokr_general"]
    assert [FL.delta_case(square, k) for k in ("forward", "grad_x")] == ["lokr", "lokr"]
    # blocks of 512 rows: too tall for dX to hold w2's tiles (HELD 0, the plain ALIGN 1 loop on 256-row tiles)
    tall = FL.kernel_factors(FL.lokr(4096, 4096, 8, 8, 0, 16), 4096, 4096)  # w2 [512, 512], formed
    assert [FL.delta_case(tall, k) for k in ("forward", "grad_x")] == ["lokr", "lokr_wide_blocks"]
    assert [FL.variant_block_m(256, kf, "grad_x") for kf in (square, tall, kv, small)] == [128, 256, 128, 128]
    assert FL.variant_block_m(64, square, "grad_x", torch.float32) == 64


def test_small_lokr_factors_formed_in_the_model():
    """The formulas form what ``prepare`` forms: LoKr's [64, 64] w2 at the issue's shape, not a [1024, 1024] one,
    never LoHa's [N, K] products."""
    assert FL.formed(FL.lokr(4096, 4096, 64, 64, 0, 16), 4096, 4096) == (False, True)
    assert FL.formed(FL.lokr(4096, 4096, 4, 4, 0, 16), 4096, 4096) == (False, False)
    assert FL.formed(FL.loha(4096, 4096, 16), 4096, 4096) == (False, False)


def test_counted_instructions_are_the_kernels():
    """The model's CUDA-core instructions per delta element are those of the kernels as they compile now (sm_90,
    the issue's shape): a change to the kernels that moves them fails here until the table is recounted
    (``python -m peftfast.tools.costmodel.sass --arch 90``)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-m", "peftfast.tools.costmodel.sass", "--arch", "90", "--json"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    counted = {tuple(key.split("/")): v for key, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    assert counted == FL.COUNTED_DELTA_INSTRUCTIONS[90]


def test_modelled_ratios_h100():
    """The figures the report quotes (T=8192, 4096 x 4096, r=16, bf16, H100): serial CUDA-core work, then
    overlapped."""
    rows = {name: vals for name, *vals in FL.ratio_rows(H100)}
    got = {name: [round(v, 3) for v in rows[f"peftfast {name}"]] for name in (
        "LoHa r=16", "LoKr w1 full [64,64], w2 rank 16", "LoKr w1 full [4,4], w2 rank 16 (not formed)")}
    assert got == {"LoHa r=16": [1.959, 1.125, 2.991, 2.140],
                   "LoKr w1 full [64,64], w2 rank 16": [1.041, 1.000, 2.026, 2.000],
                   "LoKr w1 full [4,4], w2 rank 16 (not formed)": [1.873, 1.063, 2.679, 2.069]}
    # LoKr blocks aligned to the forward's tiles along K only (ALIGN 2), and in neither direction (general)
    assert [round(v, 3) for v in rows["peftfast LoKr GQA k/v 1024x4096, w2 [32,64] rank 16"]] == \
        [1.041, 1.000, 2.027, 2.001]
    # blocks too tall for dX to hold w2's tiles: its plain ALIGN 1 loop
    assert [round(v, 3) for v in rows["peftfast LoKr w1 full [8,8], w2 [512,512] rank 16"]] == \
        [1.044, 1.003, 2.260, 2.006]
    assert [round(v, 3) for v in rows["peftfast LoKr 5120x5120, w2 [80,80] rank 16"]] == [1.093, 1.000, 2.428, 2.000]
    # blocks smaller than the tiles (the general variant, ALIGN 4: a reciprocal division per index, 128-row tiles)
    assert [round(v, 3) for v in rows["peftfast LoKr 576x576, w2 [24,24] rank 16 (general)"]] == \
        [2.960, 1.960, 3.043, 2.040]
    for name in got:
        pf, _, pb, _ = rows[f"PEFT {name}"]
        assert pf > rows[f"peftfast {name}"][0] and pb > rows[f"peftfast {name}"][2]
    # fp32 adapters on the bf16 model (PEFT's default): the same kernels but the factor gradients' TF32 dots;
    # PEFT (no autocast) with fp32 delta GEMMs
    rows = {name: [round(v, 3) for v in vals] for name, *vals in FL.ratio_rows(H100, factor_dtype=torch.float32)}
    assert rows["peftfast LoHa r=16"] == [1.961, 1.127, 3.000, 2.152]
    assert rows["peftfast LoKr w1 full [64,64], w2 rank 16"] == [1.041, 1.000, 2.026, 2.000]
    assert [rows["PEFT LoHa r=16"][i] for i in (0, 2)] == [14.113, 26.576]
    assert [rows["PEFT LoKr w1 full [64,64], w2 rank 16"][i] for i in (0, 2)] == [13.852, 26.183]


@pytest.mark.parametrize("act", [torch.float32, torch.float16], ids=["fp32", "fp32_adapter_on_fp16"])
@pytest.mark.parametrize("name, kw, fac", [
    ("LoHaConfig", dict(r=4, alpha=4), FL.loha(K, N, 4)),
    ("LoKrConfig", dict(r=2, alpha=2), FL.lokr(K, N, 5, 3, 0, 2)),  # w1 [5, 3] full, w2 = [9, 2] @ [2, 11]
])
def test_peft_formulas_match_counted_peft(name, kw, fac, act):
    """PEFT's eager LoHa / LoKr layer (the real peft 0.21) counted op by op: the formulas' bytes per launch, up
    to the 4-byte 0-dim scale tensor PEFT multiplies by; on an fp16 model PEFT keeps the adapter in fp32 (its
    default autocast_adapter_dtype)."""
    import peft
    from torch import nn

    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(K, N, bias=False)).to(act),
                                getattr(peft, name)(target_modules=["0"], init_weights=False, **kw))
    layer = model.base_model.model[0].eval()  # eval: no module-dropout draw (gradients still flow)
    assert {p.dtype for n, p in layer.named_parameters() if "base_layer" not in n} == {torch.float32}
    x = torch.randn(T, K).to(act).requires_grad_()
    with count_torch() as fwd:
        y = layer(x)
    dy = torch.randn_like(y)
    with count_torch() as bwd:
        y.backward(dy)
    for counted, formula in ((fwd, FL.peft_forward(T, K, N, fac, act, torch.float32)),
                             (bwd, FL.peft_backward(T, K, N, fac, act, torch.float32))):
        got = sorted(lt.bytes_read + lt.bytes_written for lt in counted.launch_log)
        want = sorted(m.kernel.bytes for m in formula)
        assert len(got) == len(want)
        assert all(0 <= g - w <= 4 for g, w in zip(got, want)), (got, want)
