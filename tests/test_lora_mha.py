"""LoRA on nn.MultiheadAttention against the real PEFT.

A small network with one attention block (embed_dim 15: not a power of two, 3 or 5 heads, cross attention
over a key/value sequence of another length with a padding mask, batch_first both ways) and a linear after
it. Same config and same adapter weights (fresh random values, never PEFT's zero B) must give the same module
tree, state-dict keys, outputs, attention weights, every adapter gradient, merged weights and files, in both
directions.

Tolerances are derived: peftfast's fp32 error against a float64 run of the PEFT model may be at most ``K``
times PEFT's own fp32 error, plus one rounding of the reference (tests/numerics.py).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftfast
from peftfast.tuners.lora import layer as lora_layer
from tests.numerics import assert_matches_float64

peft = pytest.importorskip("peft")

K = 3.0
E, L, S = 15, 7, 6  # embed_dim, query length, key/value length


class AttnNet(nn.Module):
    """q: [L, N, 15], kv: [S, N, 15] (or batch first) -> cross attention -> Linear(15, 4); also returns the
    attention weights."""

    def __init__(self, num_heads: int = 3, batch_first: bool = False, dropout: float = 0.0,
                 kdim: int | None = None) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(E, num_heads, dropout=dropout, batch_first=batch_first, kdim=kdim,
                                         vdim=kdim)
        self.lin = nn.Linear(E, 4)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor):
        h, w = self.mha(q, kv, kv, key_padding_mask=mask, need_weights=True, average_attn_weights=False)
        return self.lin(torch.tanh(h)), w


def attn_net(**kw) -> AttnNet:
    torch.manual_seed(0)
    return AttnNet(**kw).eval()


def inputs(batch_first: bool = False, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    q, kv = torch.randn(batch, L, E, generator=g), torch.randn(batch, S, E, generator=g)
    mask = torch.zeros(batch, S, dtype=torch.bool)
    mask[1, -2:] = True  # some padded keys, never a whole row
    mask[2, 0] = True
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    return q, kv, mask


def randomize(model: nn.Module, seed: int = 2, std: float = 0.3) -> None:
    """Fresh random values for every adapter tensor (the same values for the same tree)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def pair(adapters=("default",), net_kw: dict | None = None, dtype: torch.dtype = torch.float32, **config_kwargs):
    """(peftfast model, PEFT model) with the same base weights (in ``dtype``), adapters and adapter values."""
    kw = dict(target_modules=["mha"], r=3, lora_alpha=5)
    kw.update(config_kwargs)
    models = []
    for lib in (peftfast, peft):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = lib.get_peft_model(attn_net(**(net_kw or {})).to(dtype), lib.LoraConfig(**kw),
                                    adapter_name=adapters[0])
            for name in adapters[1:]:
                pm.add_adapter(name, lib.LoraConfig(**kw))
        randomize(pm)
        models.append(pm.eval())
    return models[0], models[1]


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    assert_matches_float64(what, ours, theirs, ref, K, check_dtype=False)


def run(model: nn.Module, x, dtype=torch.float32, weights_seed: int = 5):
    """Output, attention weights and the gradients of every trainable tensor for a random loss."""
    q, kv, mask = x
    y, w = model(q.to(dtype), kv.to(dtype), mask)
    g = torch.Generator().manual_seed(weights_seed)
    loss = (y * torch.randn(y.shape, generator=g).to(dtype)).sum() + (w * torch.randn(w.shape, generator=g)
                                                                      .to(dtype)).sum()
    loss.backward()
    return y.detach(), w.detach(), {n: p.grad for n, p in trainable(model).items()}


def test_module_tree_keys_and_counts_match_peft():
    ours, theirs = pair()
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert sorted(trainable(ours)) == sorted(trainable(theirs))
    layer = ours.base_model.model.mha
    assert isinstance(layer, lora_layer.MultiheadAttention)
    assert isinstance(layer.base_layer.out_proj, lora_layer.Linear)
    assert layer.lora_B["default"].weight.shape == (3 * E, 3) and layer.in_features == E
    assert layer.out_proj is layer.base_layer.out_proj.base_layer
    assert layer.embed_dim == E and layer.num_heads == 3 and layer.head_dim == 5
    assert repr(layer).startswith("lora.MultiheadAttention")


def test_seeded_init_matches_peft():
    """Same seed -> same initial adapter weights (drawn in PEFT's order), B zero, so the output is the base's."""
    states, outs = [], []
    x = inputs()
    for lib in (peftfast, peft):
        torch.manual_seed(3)
        pm = lib.get_peft_model(attn_net(), lib.LoraConfig(target_modules=["mha"], r=4))
        states.append({k: v for k, v in pm.state_dict().items() if "lora_" in k})
        with torch.no_grad():
            outs.append(pm(*x)[0])
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    assert all(not v.any() for k, v in states[0].items() if "lora_B" in k)
    with torch.no_grad():
        torch.testing.assert_close(outs[0], attn_net()(*x)[0])


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("num_heads", [3, 5])
def test_forward_attention_weights_and_gradients_match_peft(batch_first, num_heads):
    ours, theirs = pair(net_kw=dict(num_heads=num_heads, batch_first=batch_first))
    ref = copy.deepcopy(theirs).double()
    x = inputs(batch_first)
    outs = {"ours": run(ours, x), "peft": run(theirs, x), "ref": run(ref, x, torch.float64)}
    assert_close(outs["ours"][0], outs["peft"][0], outs["ref"][0], "output")
    assert_close(outs["ours"][1], outs["peft"][1], outs["ref"][1], "attention weights")
    grads = outs["ours"][2]
    assert sorted(grads) == sorted(outs["peft"][2]) and len(grads) == 4
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert_close(grad, outs["peft"][2][name], outs["ref"][2][name], name)
    with torch.no_grad(), ours.disable_adapter():  # the adapters matter
        assert (ours(*x)[0] - outs["ours"][0]).abs().max() > 1e-2


def test_base_weights_untouched_and_still_parameters_after_forward_and_backward():
    ours, _ = pair()
    base = ours.base_model.model.mha.base_layer
    before = {n: p for n, p in base.named_parameters() if "lora_" not in n}
    values = {n: p.detach().clone() for n, p in before.items()}
    run(ours, inputs())
    after = dict((n, p) for n, p in base.named_parameters() if "lora_" not in n)
    assert list(after) == list(before)
    for n, p in after.items():
        assert p is before[n] and isinstance(p, nn.Parameter) and not p.requires_grad and p.grad is None, n
        assert torch.equal(p, values[n]), n


def test_two_adapters_training_with_attention_dropout_match_peft():
    """Two active adapters in training mode with the base module's attention dropout: same seed, same masks,
    same outputs and gradients as PEFT (the adapters' lora_dropout is not applied, in PEFT either)."""
    ours, theirs = pair(adapters=("one", "two"), net_kw=dict(dropout=0.25, batch_first=True), lora_dropout=0.3)
    ref = copy.deepcopy(theirs).double()
    x = inputs(batch_first=True)
    outs = []
    for model, dtype in ((ours, torch.float32), (theirs, torch.float32), (ref, torch.float64)):
        model.base_model.set_adapter(["one", "two"])
        model.train()
        torch.manual_seed(7)
        outs.append(run(model, x, dtype))
    assert_close(outs[0][0], outs[1][0], outs[2][0], "output")
    assert sorted(outs[0][2]) == sorted(outs[1][2]) and len(outs[0][2]) == 8
    for name, grad in outs[0][2].items():
        if ".one." in name:  # PEFT's merge-based forward detaches all but the last active adapter
            assert grad is None and outs[1][2][name] is None, name
            continue
        assert grad.abs().sum() > 0, name
        assert_close(grad, outs[1][2][name], outs[2][2][name], name)


def test_each_adapter_alone_and_disabled_match_peft():
    ours, theirs = pair(adapters=("one", "two"))
    x = inputs()
    with torch.no_grad():
        for name in ("one", "two"):
            ours.set_adapter(name)
            theirs.set_adapter(name)
            torch.testing.assert_close(ours(*x)[0], theirs(*x)[0])
        with ours.disable_adapter(), theirs.disable_adapter():
            torch.testing.assert_close(ours(*x)[0], theirs(*x)[0])
            torch.testing.assert_close(ours(*x)[0], attn_net()(*x)[0])


def test_merge_unmerge_safe_merge_and_merge_and_unload_match_peft():
    ours, theirs = pair()
    x = inputs()
    with torch.no_grad():
        y, y_peft = ours(*x)[0], theirs(*x)[0]
        weights = {n: p.clone() for n, p in ours.named_parameters() if "lora_" not in n}
        ours.merge_adapter()
        theirs.merge_adapter()
        merged = {n: p.clone() for n, p in ours.state_dict().items() if "lora_" not in n}
        for n, p in theirs.state_dict().items():  # PEFT's merged weights, out_proj's delta included twice
            if "lora_" not in n:
                torch.testing.assert_close(merged[n], p, rtol=1e-5, atol=1e-6, msg=n)
        layer = ours.base_model.model.mha
        assert layer.merged and layer.base_layer.out_proj.merged
        torch.testing.assert_close(ours(*x)[0], y_peft, rtol=1e-4, atol=1e-5)
        ours.unmerge_adapter()
        theirs.unmerge_adapter()
        assert not layer.merged and not layer.base_layer.out_proj.merged
        for n, p in ours.named_parameters():
            if "lora_" not in n:
                torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6, msg=n)
                assert isinstance(p, nn.Parameter) and not p.requires_grad, n
        torch.testing.assert_close(ours(*x)[0], y, rtol=1e-5, atol=1e-6)
        ours.merge_adapter(safe_merge=True)
        torch.testing.assert_close(ours(*x)[0], y_peft, rtol=1e-4, atol=1e-5)
        ours.unmerge_adapter()
        plain = ours.merge_and_unload()
        assert type(plain.mha) is nn.MultiheadAttention and type(plain.mha.out_proj) is not lora_layer.Linear
        assert not any("lora_" in n for n, _ in plain.named_parameters())
        torch.testing.assert_close(plain(*x)[0], y_peft, rtol=1e-4, atol=1e-5)
        peft_plain = theirs.merge_and_unload()
        for n, p in peft_plain.state_dict().items():
            torch.testing.assert_close(plain.state_dict()[n], p, rtol=1e-5, atol=1e-6, msg=n)


def test_unload_gives_back_the_base_module():
    ours, _ = pair()
    x = inputs()
    plain = ours.unload()
    assert type(plain.mha) is nn.MultiheadAttention and type(plain.mha.out_proj) is not lora_layer.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(*x)[0], attn_net()(*x)[0])


@pytest.mark.parametrize("where", ["in_proj", "out_proj"])
def test_safe_merge_refuses_nan_and_leaves_weights_unchanged(where):
    ours, _ = pair()
    layer = ours.base_model.model.mha
    target = layer if where == "in_proj" else layer.base_layer.out_proj
    with torch.no_grad():
        target.lora_B["default"].weight[1, 0] = float("nan")
    before = {n: p.clone() for n, p in ours.named_parameters() if "lora_" not in n}
    with pytest.raises(ValueError, match="NaN"):
        ours.merge_adapter(safe_merge=True)
    for n, p in ours.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n]), n
    assert not layer.merged and not layer.base_layer.out_proj.merged


def test_save_here_load_in_peft_and_the_reverse(tmp_path):
    ours, theirs = pair(net_kw=dict(num_heads=5, batch_first=True))
    randomize(theirs, seed=9)  # different values on each side
    x = inputs(batch_first=True)
    with torch.no_grad():
        ours.save_pretrained(tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "peft")
        files = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft")]
        assert sorted(files[0]) == sorted(files[1]) and len(files[0]) == 4
        assert "base_model.model.mha.base_layer.out_proj.lora_A.weight" in files[0]
        net_kw = dict(num_heads=5, batch_first=True)
        loaded_peft = peft.PeftModel.from_pretrained(attn_net(**net_kw), tmp_path / "ours")
        torch.testing.assert_close(loaded_peft(*x)[0], ours(*x)[0])
        torch.testing.assert_close(loaded_peft(*x)[1], ours(*x)[1])
        loaded_ours = peftfast.PeftModel.from_pretrained(attn_net(**net_kw), tmp_path / "peft")
        assert isinstance(loaded_ours.base_model.model.mha, lora_layer.MultiheadAttention)
        torch.testing.assert_close(loaded_ours(*x)[0], theirs(*x)[0])
        assert (loaded_ours(*x)[0] - ours(*x)[0]).abs().max() > 1e-3  # the two checkpoints differ


def test_state_dict_round_trip_into_a_fresh_model_after_forward():
    ours, _ = pair()
    x = inputs()
    with torch.no_grad():
        y = ours(*x)[0]
        state = {k: v.clone() for k, v in ours.state_dict().items()}
        fresh = peftfast.get_peft_model(attn_net(), peftfast.LoraConfig(target_modules=["mha"], r=3, lora_alpha=5))
        fresh(*x)
        fresh.load_state_dict(state)
        torch.testing.assert_close(fresh.eval()(*x)[0], y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_with_float32_adapters_matches_peft(dtype):
    """autocast_adapter_dtype keeps the adapters in float32 over a half-precision base (both libraries); the
    summed weights are rounded to the base dtype as PEFT's merge rounds them. Checked against a float64 run of
    the same weights with PEFT's half-precision error as the yardstick."""
    ours, theirs = pair(dtype=dtype)
    layer = ours.base_model.model.mha
    assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.in_proj_weight.dtype == dtype
    ref = copy.deepcopy(theirs).double()
    q, kv, mask = inputs()
    with torch.no_grad():
        outs = [model(q.to(dtype), kv.to(dtype), mask)[0] for model in (ours, theirs)]
        y_ref = ref(q.to(dtype).double(), kv.to(dtype).double(), mask)[0]
    assert outs[0].dtype == dtype
    assert_close(outs[0], outs[1], y_ref, "half-precision output")


def test_refusals_leave_the_model_unchanged():
    base = attn_net()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="does not support DoRA"):
        peftfast.get_peft_model(base, peftfast.LoraConfig(target_modules=["mha"], use_dora=True))
    with pytest.raises(ValueError, match="lora_bias"):
        peftfast.get_peft_model(base, peftfast.LoraConfig(target_modules=["mha"], lora_bias=True))
    assert type(base.mha) is nn.MultiheadAttention and type(base.mha.out_proj) is not lora_layer.Linear
    assert base.state_dict().keys() == state.keys()
    with pytest.raises(ValueError, match="Only same embed for query/key/value"):
        peftfast.get_peft_model(attn_net(kdim=8), peftfast.LoraConfig(target_modules=["mha"]))


def test_mixed_adapter_batch_is_refused():
    ours, _ = pair(adapters=("one", "two"))
    with pytest.raises(TypeError, match="does not support mixed adapter batches"):
        ours(*inputs(), adapter_names=["one", "two", "__base__"])


def test_failed_get_peft_model_leaves_the_attention_module_unwrapped():
    """OLoRA is refused on the packed projection after out_proj was wrapped and its weight re-initialised: the
    base model is left as it was, out_proj and its weight included."""
    base = attn_net()
    out_proj = base.mha.out_proj
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="Unknown initialization init_lora_weights='olora'"):
        peftfast.get_peft_model(base, peftfast.LoraConfig(target_modules=["mha"], init_lora_weights="olora"))
    assert type(base.mha) is nn.MultiheadAttention and base.mha.out_proj is out_proj
    assert base.state_dict().keys() == state.keys()
    for k, v in base.state_dict().items():
        assert torch.equal(v, state[k]), k
