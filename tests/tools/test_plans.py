"""costmodel.plans: every launch plan asks ``peftfast.kernels``, and the formulas follow the plan."""
import pytest
import torch

import peftfast.kernels as kernels
from peftfast.tools import costmodel as cm
from peftfast.tools.costmodel import plans

bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32

# (plan, the kernel package's name for the rule, arguments, a value no launcher rule gives)
CASES = [
    (plans.lora_grad_splits, "grad_w_splits", (200, 52, [7], f32, True), 123),
    (plans.fused_shrink_items, "shrink_items", (96, 600, bf16), 123),
    (plans.fused_dy_splits, "dy_plan", (64, 600, [5], bf16, f32), (17, 19)),
    (plans.fused_dx_block_m, "fused_dx_block_m", (bf16, bf16), 123),
    (plans.qlora_dx_block_m, "qlora_dx_block_m", (37, f16), 123),
]


@pytest.mark.parametrize("plan,name,args,value", CASES, ids=[c[1] for c in CASES])
def test_plan_asks_the_kernels(monkeypatch, plan, name, args, value):
    calls = []

    def rule(*a):
        calls.append(a)
        return value

    monkeypatch.setattr(kernels, name, rule, raising=False)
    assert plan(*args) == value
    assert calls == [args]


@pytest.mark.parametrize("plan,name,args,value", CASES, ids=[c[1] for c in CASES])
def test_kernel_rules_give_the_values_the_formula_tests_state(plan, name, args, value):
    """The launchers' own rules, through the plans, give the values test_costmodel.py's formula checks use."""
    want = {"grad_w_splits": 7, "shrink_items": 2, "dy_plan": (10, 4), "fused_dx_block_m": 128,
            "qlora_dx_block_m": 64}
    assert plan(*args) == want[name]


def test_epoch_counters_asks_the_kernels(monkeypatch):
    """The calibration allocates the kernels' own epoch-counter buffer (no copy of the rule)."""
    calls = []
    monkeypatch.setattr(kernels, "epoch_counters", lambda *a: calls.append(a) or ("buffer", 1 << 32))
    assert plans.epoch_counters(torch.device("cpu"), 8) == "buffer" and calls == [(torch.device("cpu"), 8)]
    monkeypatch.undo()
    got = plans.epoch_counters(torch.device("cpu"), 8)
    assert got.dtype == torch.int64 and got.numel() >= 8


def test_the_formulas_follow_the_plans(monkeypatch):
    """A different split or tile in the kernels changes the modelled bytes by exactly the fp32
    partials it implies."""
    t, k, n, r = 8192, 4096, 4096, 16
    lora_bwd = cm.lora_layer("peftfast", True, t, k, n, r, bf16, f32, 0.1)
    fused_bwd = cm.peftfast_fused_backward(t, k, n, [r], bf16, f32)
    monkeypatch.setattr(kernels, "grad_w_splits", lambda *a: 1, raising=False)
    monkeypatch.setattr(kernels, "fused_dx_block_m", lambda act, ad=None: 32, raising=False)
    unsplit = cm.lora_layer("peftfast", True, t, k, n, r, bf16, f32, 0.1)
    assert not any(x.name.startswith("torch: sum") for x in unsplit)  # one split: no sum of partials
    assert len(unsplit) == len(lora_bwd) - 2
    halved = cm.peftfast_fused_backward(t, k, n, [r], bf16, f32)
    extra = (t // 32 - t // 64) * r * k * 4  # dA partials: twice the row blocks (fp32 adapters: 64), written and read
    assert cm.path_bytes(halved) - cm.path_bytes(fused_bwd) == 2 * extra


def test_decode_split_and_sm_count_ask_qmatmul(monkeypatch):
    from peftfast.kernels import qmatmul

    monkeypatch.setattr(qmatmul, "sm_count", lambda device: 77, raising=False)
    assert plans.sm_count(torch.device("cpu")) == 77
    rows = cm.decode_reads(1, 4096, 4096, 132)
    assert rows["split"] == plans.decode_split(1, 4096, 4096, 132) >= 1
