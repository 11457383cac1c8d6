"""peftfast.utils.hotswap against a freshly loaded adapter and the real PEFT 0.21.

Two LoRA adapters of different ranks and alphas (random B, so every term matters) on a model with linear
layers (one with lora_bias) and a Conv2d are saved; the first is loaded, prepared (scalings as tensors, ranks
padded), optionally compiled, and the second hot-swapped in. The output must equal a model that loaded the
second adapter directly, in peftfast and in PEFT, and a compiled model must not recompile. Refused swaps leave
the model unchanged.
"""
from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import peftfast
from peftfast.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from tests.numerics import max_err

TARGETS = ["lin0", "lin1", "conv"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.lin0 = nn.Linear(5 * 4 * 3, 13)
        self.lin1 = nn.Linear(13, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.lin1(torch.tanh(self.lin0(h)))


def base_model() -> Net:
    torch.manual_seed(0)
    return Net()


def inputs(seed: int = 11) -> torch.Tensor:
    return torch.randn(4, 3, 6, 5, generator=torch.Generator().manual_seed(seed))


def save_adapter(path, r: int, alpha: int, seed: int, targets=TARGETS, **kw) -> None:
    model = peftfast.get_peft_model(base_model(), peftfast.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                                      init_lora_weights=False, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(path)


def loaded(lib, path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.PeftModel.from_pretrained(base_model(), path).eval()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("ranks", [(3, 6), (6, 3), (4, 4)])
def test_hotswap_equals_fresh_load(tmp_path, ranks):
    save_adapter(tmp_path / "a0", ranks[0], 2 * ranks[0] + 1, seed=1)
    save_adapter(tmp_path / "a1", ranks[1], ranks[1] + 3, seed=2)
    x = inputs()
    model = loaded(peftfast, tmp_path / "a0")
    prepare_model_for_compiled_hotswap(model, target_rank=max(ranks), config=model.peft_config)
    assert model.peft_config["default"].r == max(ranks)
    with torch.no_grad():
        out0 = model(x)
        assert max_err(out0, loaded(peftfast, tmp_path / "a0")(x)) < 1e-5  # preparing changes nothing
        hotswap_adapter(model, tmp_path / "a1", adapter_name="default")
        out1 = model(x)
        assert max_err(out1, loaded(peftfast, tmp_path / "a1")(x)) < 1e-5
        assert max_err(out1, loaded(peft, tmp_path / "a1")(x)) < 1e-5
        assert max_err(out1, out0) > 1e-3
        hotswap_adapter(model, tmp_path / "a0", adapter_name="default")
        assert max_err(model(x), out0) < 1e-5


def test_hotswap_without_prepare_same_rank(tmp_path):
    save_adapter(tmp_path / "a0", 4, 8, seed=1)
    save_adapter(tmp_path / "a1", 4, 8, seed=2)
    model = loaded(peftfast, tmp_path / "a0")
    x = inputs()
    with torch.no_grad():
        hotswap_adapter(model, tmp_path / "a1", adapter_name="default")
        assert max_err(model(x), loaded(peft, tmp_path / "a1")(x)) < 1e-5


def test_gradients_after_hotswap(tmp_path):
    """A prepared, hot-swapped model trains like the freshly loaded one: same gradients for the real rows."""
    save_adapter(tmp_path / "a0", 3, 5, seed=1)
    save_adapter(tmp_path / "a1", 5, 7, seed=2)
    model = loaded(peftfast, tmp_path / "a0")
    prepare_model_for_compiled_hotswap(model, target_rank=5)
    hotswap_adapter(model, tmp_path / "a1", adapter_name="default")
    fresh = peftfast.PeftModel.from_pretrained(base_model(), tmp_path / "a1", is_trainable=True)
    for m in (model, fresh):
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)
        m(inputs()).square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        if q.grad is not None:
            assert max_err(p.grad, q.grad) <= 1e-5 * q.grad.abs().max().item(), n


def test_mixed_batch_sees_hotswap(tmp_path):
    """The mixed-batch op keeps a stacked copy of the adapters' factors: a swap must reach it."""
    save_adapter(tmp_path / "a0", 4, 8, seed=1, targets=["lin0", "lin1"])
    save_adapter(tmp_path / "a1", 4, 8, seed=2, targets=["lin0", "lin1"])
    model = loaded(peftfast, tmp_path / "a0")
    model.load_adapter(tmp_path / "a1", adapter_name="other")
    x = inputs()
    names = ["default", "other", "__base__", "default"]
    with torch.no_grad():
        before = model(x, adapter_names=names)
        hotswap_adapter(model, tmp_path / "a1", adapter_name="default")
        after = model(x, adapter_names=names)
        model.set_adapter("other")
        with_a1 = model(x)
        # every row now runs adapter a1 (or the base)
        for i in (0, 1, 3):
            assert max_err(after[i], with_a1[i]) < 1e-5, i
        assert max_err(before[0], after[0]) > 1e-3


def _compiled_swaps(tmp_path, ranks, alphas, prepare: bool):
    save_adapter(tmp_path / "a0", ranks[0], alphas[0], seed=1)
    save_adapter(tmp_path / "a1", ranks[1], alphas[1], seed=2)
    x = inputs()
    expected1 = loaded(peftfast, tmp_path / "a1")(x).detach()
    model = loaded(peftfast, tmp_path / "a0")
    expected0 = model(x).detach()
    if prepare:
        prepare_model_for_compiled_hotswap(model, target_rank=max(ranks))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        assert max_err(compiled(x), expected0) < 1e-5
        hotswap_adapter(compiled, tmp_path / "a1", adapter_name="default")
        assert max_err(compiled(x), expected1) < 1e-5
        hotswap_adapter(compiled, tmp_path / "a0", adapter_name="default")
        assert max_err(compiled(x), expected0) < 1e-5


@pytest.mark.parametrize("ranks", [(3, 5), (5, 3)])
def test_compiled_model_does_not_recompile(tmp_path, ranks):
    _compiled_swaps(tmp_path, ranks, (ranks[0] + 1, ranks[1] + 4), prepare=True)


def test_unprepared_compiled_model_recompiles_on_new_scaling(tmp_path):
    """The control: without tensor scalings, a swap to another alpha changes a constant the graph baked in."""
    with pytest.raises(torch._dynamo.exc.RecompileError):
        _compiled_swaps(tmp_path, (4, 4), (3, 9), prepare=False)


def test_refused_swaps_leave_model_unchanged(tmp_path):
    save_adapter(tmp_path / "a0", 4, 8, seed=1)
    save_adapter(tmp_path / "big", 6, 8, seed=2)
    save_adapter(tmp_path / "dora", 4, 8, seed=3, use_dora=True, targets=["lin0", "lin1"])
    model = loaded(peftfast, tmp_path / "a0")
    before = state(model)
    with pytest.raises(ValueError, match="larger"):
        prepare_model_for_compiled_hotswap(model, target_rank=3)
    with pytest.raises(ValueError, match="use_dora"):
        hotswap_adapter(model, tmp_path / "dora", adapter_name="default")
    from peftfast.utils.hotswap import hotswap_adapter_from_state_dict
    extra = {"base_model.model.lin0.lora_A.default.weight": torch.randn(4, 60),
             "base_model.model.nope.lora_A.default.weight": torch.randn(4, 60)}
    with pytest.raises(RuntimeError, match="unexpected keys"):
        hotswap_adapter_from_state_dict(model, extra, "default", model.peft_config["default"])
    bad = {"base_model.model.lin0.lora_A.default.weight": torch.randn(4, 61)}
    with pytest.raises(ValueError, match="Incompatible shapes"):
        hotswap_adapter_from_state_dict(model, bad, "default", model.peft_config["default"])
    assert same_state(before, state(model))
    model.merge_adapter()
    merged = state(model)
    with pytest.raises(ValueError, match="merged"):
        hotswap_adapter(model, tmp_path / "a0", adapter_name="default")
    assert same_state(merged, state(model))
    # a larger rank without padding replaces the tensors (as PEFT): still the right output
    model.unmerge_adapter()
    hotswap_adapter(model, tmp_path / "big", adapter_name="default")
    with torch.no_grad():
        assert max_err(model(inputs()), loaded(peft, tmp_path / "big")(inputs())) < 1e-5


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, groups=2, padding=1)
        self.c3 = nn.Conv3d(6, 5, (1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 4, 12]
        h = torch.tanh(self.c1(x)).view(x.shape[0], 6, 3, 4)
        h = torch.tanh(self.c2(h)).unsqueeze(2)
        return self.c3(h)


def test_padding_every_convolution_keeps_output_and_swaps(tmp_path):
    targets = ["c1", "c2", "c3"]
    for name, seed, r in (("a0", 1, 2), ("a1", 2, 4)):
        torch.manual_seed(0)
        m = peftfast.get_peft_model(Convs(), peftfast.LoraConfig(r=r, lora_alpha=r + 1, target_modules=targets))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.save_pretrained(tmp_path / name)
    x = torch.randn(3, 4, 12, generator=torch.Generator().manual_seed(4))

    def load(name):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peftfast.PeftModel.from_pretrained(Convs(), tmp_path / name).eval()

    model = load("a0")
    with torch.no_grad():
        out0 = model(x)
        with pytest.raises(ValueError, match="divisible by 2"):
            prepare_model_for_compiled_hotswap(model, target_rank=5)
        prepare_model_for_compiled_hotswap(model, target_rank=6)
        for name in targets:
            layer = getattr(model.base_model.model, name)
            assert layer.lora_A["default"].weight.shape[0] == 6
        assert max_err(model(x), out0) < 1e-5
        hotswap_adapter(model, tmp_path / "a1", adapter_name="default")
        assert max_err(model(x), load("a1")(x)) < 1e-5
        hotswap_adapter(model, tmp_path / "a0", adapter_name="default")
        assert max_err(model(x), out0) < 1e-5
