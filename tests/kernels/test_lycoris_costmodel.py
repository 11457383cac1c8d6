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


def _case(kind, act, g):
    if kind == "loha":
        shapes, layout, fac = [(N, 3), (3, K), (N, 5), (5, K)], LY.loha_layout(N, K), FL.Factors((N, K, 3), (N, K, 5))
    elif kind == "lokr_fl":
        shapes, layout = [(5, 3), (9, 2), (2, 11)], LY.lokr_layout(True, False, 9, 11, 5, 3)
        fac = FL.lokr(K, N, 5, 3, 0, 2)
    else:
        shapes, layout, fac = [(5, 3), (9, 11)], LY.lokr_layout(True, True, 9, 11, 5, 3), FL.lokr(K, N, 5, 3, 0, 0)
    return [torch.randn(*s, generator=g).to(act).requires_grad_() for s in shapes], layout, fac


@pytest.mark.parametrize("kind, act", [("loha", torch.float16), ("lokr_ff", torch.float32)])
def test_counted_bytes_match_formulas(triton_kernels, kind, act):
    g = torch.Generator().manual_seed(0)
    fs, layout, fac = _case(kind, act, g)
    x = torch.randn(T, K, generator=g).to(act).requires_grad_()
    w = torch.randn(N, K, generator=g).to(act)
    b = torch.randn(N, generator=g).to(act).requires_grad_()
    with count_triton() as tr, count_torch() as to:
        y = LY.LYCORIS_LINEAR(x, w, b, fs, layout, 0.5, hint=True)
    model = FL.peftfast_forward(T, K, N, fac, act, 16, bias=True)
    assert to.launches == 0
    assert [(lt.unique_bytes_read, lt.unique_bytes_written) for lt in tr.launch_log] == \
        [(m.kernel.bytes_read, m.kernel.bytes_written) for m in model]
    dy = torch.randn(T, N, generator=g).to(act)
    with count_triton() as tr, count_torch() as to:
        y.backward(dy)
    model = FL.peftfast_backward(T, K, N, fac, act, 16, bias=True)
    assert [(lt.unique_bytes_read, lt.unique_bytes_written) for lt in tr.launch_log] == \
        [(m.kernel.bytes_read, m.kernel.bytes_written) for m in model[:2]]
    assert [(lt.bytes_read, lt.bytes_written) for lt in to.launch_log] == \
        [(m.kernel.bytes_read, m.kernel.bytes_written) for m in model[2:]]


def test_modelled_ratios_h100():
    """The figures the report quotes (T=8192, 4096 x 4096, r=16, bf16, H100, serial CUDA-core work)."""
    rows = {name: vals for name, *vals in FL.ratio_rows(H100)}
    fwd, _, bwd, _ = rows["peftfast LoHa r=16"]
    assert fwd == pytest.approx(1.483, abs=1e-3) and bwd == pytest.approx(2.503, abs=1e-3)
    pf, _, pb, _ = rows["PEFT LoHa r=16"]
    assert pf > fwd and pb > bwd
