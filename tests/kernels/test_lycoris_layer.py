"""The LoHa / LoKr layers on the Triton backend (the interpreter on CPU tensors) dispatch nn.Linear to
``kernels/lycoris.py`` and match the real PEFT 0.21 (output and every gradient); with a rank-dropout mask
drawn they keep the blocked PyTorch path."""
import peft
import pytest
import torch
from torch import nn

import peftfast
from peftfast.kernels import lycoris as LY


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(33, 45)
        self.down = nn.Linear(45, 21, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


CASES = [
    ("LoHaConfig", dict(r=3, alpha=5)),
    ("LoKrConfig", dict(r=2, alpha=3)),  # w1 full, w2 = w2_a @ w2_b
    ("LoKrConfig", dict(r=8, alpha=4)),  # both full
    ("LoKrConfig", dict(r=1, alpha=2, decompose_both=True, decompose_factor=3)),  # both low rank
]


def _pair(name, kw):
    kw = dict(kw, target_modules=["up", "down"])
    torch.manual_seed(1)
    ref = peft.get_peft_model(Mlp(), getattr(peft, name)(**kw))
    torch.manual_seed(1)
    ours = peftfast.get_peft_model(Mlp(), getattr(peftfast, name)(**kw))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for (n, p), (m, q) in zip(ref.named_parameters(), ours.named_parameters()):
            assert n == m
            if p.requires_grad:  # no zero-initialised factor: every gradient is non-trivial
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
                q.copy_(p)
    return ref, ours


def _count_launches(monkeypatch):
    calls = []
    for name in ("launch_forward", "launch_grad_x", "launch_grad_factors"):
        real = getattr(LY, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(LY, name, spy)
    return calls


def _step_and_compare(ref, ours, calls, x, close):
    """One forward and backward of both models on ``x`` (each layer launching the forward, dX and factor-gradient
    kernels), then ``close(got, want, what)`` on the output, x's gradient and every adapter gradient (none zero)."""
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y_ours.backward(dy)
    assert calls.count("launch_forward") == 2 and calls.count("launch_grad_factors") == 2
    assert calls.count("launch_grad_x") == 2  # "up" needs dX for x (x requires grad)
    close(y_ours, y_ref, "y")
    close(x_ours.grad, x_ref.grad, "dx")
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert n in grads and grads[n].abs().max() > 0, n
            close(p.grad, grads[n], n)


@pytest.mark.parametrize("name, kw", CASES, ids=[f"{n[:4]}-{i}" for i, (n, _) in enumerate(CASES)])
def test_layer_uses_kernel_and_matches_peft(triton_kernels, monkeypatch, name, kw):
    ref, ours = _pair(name, kw)
    calls = _count_launches(monkeypatch)
    _step_and_compare(ref, ours, calls, torch.randn(2, 7, 33),
                      lambda got, want, what: torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=what))


def test_rank_dropout_keeps_blocked_path(triton_kernels, monkeypatch):
    ref, ours = _pair("LoHaConfig", dict(r=3, alpha=5, rank_dropout=0.5))
    ref.train()
    ours.train()
    calls = _count_launches(monkeypatch)
    x = torch.randn(5, 33)
    torch.manual_seed(9)
    y_ref = ref(x)
    torch.manual_seed(9)
    y_ours = ours(x)
    assert calls == []
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, kw", CASES, ids=[f"{n[:4]}-{i}" for i, (n, _) in enumerate(CASES)])
def test_fp32_adapters_on_fp16_model_use_kernel(triton_kernels, monkeypatch, name, kw):
    """PEFT's default on a 16-bit model keeps the adapters in fp32 (autocast_adapter_dtype=True): the layers still
    run the kernels (W + D rounded to fp16 for the GEMMs, fp32 factor gradients) and match PEFT's fp16 model
    (fp16 base layer plus an fp32 delta) to a few fp16 roundings of each result's largest value."""
    ref, ours = _pair(name, kw)
    ref.half()
    ours.half()
    for model in (ref, ours):  # PEFT's default cast of the adapters back to fp32, as get_peft_model does
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.float32}
    calls = _count_launches(monkeypatch)

    def close(got, want, what):  # 4 fp16 roundings of the largest value
        assert got.dtype == want.dtype, what
        tol = 4 * torch.finfo(torch.float16).eps * want.abs().max().item()
        err = (got.double() - want.double()).abs().max().item()
        assert err <= tol, f"{what}: {err:.3e} > {tol:.3e}"

    _step_and_compare(ref, ours, calls, torch.randn(2, 7, 33).half(), close)
