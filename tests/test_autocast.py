"""LoRA, AdaLoRA, LoHa and LoKr under ``torch.autocast`` (Trainer's ``bf16=True`` / ``fp16=True`` on a float32 model): the adapted
layers compute what PEFT's do there (base and adapter matmuls in autocast's dtype, 16-bit outputs, float32
gradients), compared with the real ``peft`` on the same weights. Before this, a float32 model under autocast
failed in its second adapted layer (a 16-bit input met the float32 weight in the fused op); LoHa and LoKr failed in
the backward (the blocked delta op's 16-bit output gradient met the float32 weight)."""
import copy

import peft
import pytest
import torch
from torch import nn

import peftfast


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(33, 21)
        self.lin1 = nn.Linear(21, 19, bias=False)
        self.head = nn.Linear(19, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin1(torch.relu(self.lin0(x)))))


def run(lib, config_kw: dict, state: dict | None, x: torch.Tensor, dtype: torch.dtype, method: str):
    torch.manual_seed(0)
    base = Net()
    if method == "adalora":
        config = lib.AdaLoraConfig(target_modules=["lin0", "lin1"], init_r=5, total_step=10, **config_kw)
    elif method == "loha":
        config = lib.LoHaConfig(target_modules=["lin0", "lin1"], r=5, alpha=7, **config_kw)
    elif method == "lokr":
        config = lib.LoKrConfig(target_modules=["lin0", "lin1"], r=5, alpha=7, **config_kw)
    else:
        config = lib.LoraConfig(target_modules=["lin0", "lin1"], r=5, lora_alpha=7, init_lora_weights=False,
                                **config_kw)
    model = lib.get_peft_model(copy.deepcopy(base), config)
    if state is None:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        state = {k: v.clone() for k, v in model.state_dict().items()}
    else:
        model.load_state_dict(state)
    model.train()
    with torch.autocast("cpu", dtype=dtype):
        y = model(x)
    y.float().pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y, grads, state


@pytest.mark.parametrize("backend,dtype", [("default", torch.bfloat16), ("default", torch.float16),
                                           ("triton", torch.float16)], ids=["bf16", "fp16", "fp16-triton"],
                         indirect=["backend"])
@pytest.mark.parametrize("method", ["lora", "adalora", "loha", "lokr"])
def test_autocast_matches_peft(backend, dtype, method, monkeypatch):
    """(bf16 runs on the PyTorch path only: the interpreter's bf16 dots are not a GPU's. On the Triton backend LoHa
    and LoKr run their kernels on x, W and b in autocast's dtype with the fp32 factors.)"""
    from peftfast.kernels import lycoris as LY

    seen = []
    for name in ("launch_forward", "launch_grad_x", "launch_grad_factors"):
        def spy(*a, _real=getattr(LY, name), _name=name, **k):
            seen.append((_name, a[0].dtype))
            return _real(*a, **k)
        monkeypatch.setattr(LY, name, spy)
    x = torch.randn(6, 33)
    ours, ours_grads, state = run(peftfast, {}, None, x, dtype, method)
    if method in ("loha", "lokr"):
        on_triton = backend == "triton"
        assert sorted(seen) == (sorted([(n, dtype) for n in ("launch_forward", "launch_grad_factors")] * 2
                                       + [("launch_grad_x", dtype)]) if on_triton else []), seen
    theirs, their_grads, _ = run(peft, {}, state, x, dtype, method)
    assert ours.dtype == theirs.dtype == dtype
    # one rounding of the 16-bit type apart: the fused op rounds base + adapter once, PEFT rounds each step
    eps = torch.finfo(dtype).eps
    scale = theirs.float().abs().max().item()
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=4 * eps * scale)
    assert ours_grads.keys() == their_grads.keys()
    for name, g in their_grads.items():
        assert ours_grads[name].dtype == g.dtype == torch.float32, name
        torch.testing.assert_close(ours_grads[name], g, rtol=0, atol=8 * eps * g.abs().max().item(), msg=name)
