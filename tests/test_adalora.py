"""AdaLoRA against the real PEFT 0.21: a short training run with rank allocation, checkpoints both ways,
merge/unload, the fused op underneath, and refusals that leave the model as it was."""
from __future__ import annotations

import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftfast
from peftfast.tuners.adalora import layer as adalora_layer
from peftfast.utils.save_and_load import AdapterLoadError
from peftfast.config import ConfigError
from peftfast.zoo import causal_inputs

from tests._models import tiny_gpt2, tiny_llama


def _config(module, **extra):
    kw = dict(task_type="CAUSAL_LM", init_r=6, target_r=3, tinit=1, tfinal=2, deltaT=1, total_step=6, lora_alpha=4,
              beta1=0.7, beta2=0.8, orth_reg_weight=0.3)
    kw.update(extra)
    return module.AdaLoraConfig(**kw)


def _pair(builder, targets, **extra):
    torch.manual_seed(0)
    ref = peft.get_peft_model(builder(), _config(peft, target_modules=targets, **extra))
    torch.manual_seed(0)
    ours = peftfast.get_peft_model(builder(), _config(peftfast, target_modules=targets, **extra))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # fresh non-zero A, E, B in both (PEFT initialises E to zero)
        for (n, p), (m, q) in zip(ref.named_parameters(), ours.named_parameters()):
            assert n == m
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
                q.copy_(p)
    return ref, ours


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("builder, targets", [(tiny_llama, ["q_proj", "v_proj", "down_proj"]),
                                              (tiny_gpt2, ["c_attn", "c_proj"])], ids=["llama", "gpt2-conv1d"])
def test_training_run_matches_peft(builder, targets, tmp_path):
    ref, ours = _pair(builder, targets)
    assert list(ref.state_dict()) == list(ours.state_dict())
    assert ref.get_nb_trainable_parameters() == ours.get_nb_trainable_parameters()
    opt_ref = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.05)
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    patterns = []
    for step in range(8):  # warm-up, budget decrease, final phase (total_step=6, tfinal=2), past the end
        batch = causal_inputs(seed=step)
        out_ref, out_ours = ref(**batch), ours(**batch)
        torch.testing.assert_close(out_ours.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_ours.loss, out_ref.loss, rtol=1e-5, atol=1e-5)
        out_ref.loss.backward()
        out_ours.loss.backward()
        g_ref, g_ours = _grads(ref), _grads(ours)
        assert g_ref.keys() == g_ours.keys()
        for name in g_ref:
            torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)
        opt_ref.step()
        opt_ours.step()
        ref.base_model.update_and_allocate(step)
        ours.base_model.update_and_allocate(step)
        assert ours.peft_config["default"].rank_pattern == ref.peft_config["default"].rank_pattern
        patterns.append(ours.peft_config["default"].rank_pattern)
        opt_ref.zero_grad()
        opt_ours.zero_grad()
    kept = [sum(sum(m) for m in p.values()) for p in patterns if p]
    assert kept[0] > kept[-1] == 3 * len(patterns[-1])  # ranks were pruned down to target_r per layer
    assert any(not all(m) for m in patterns[-1].values())

    # files: same names, shapes, config; values equal to float rounding after 8 steps
    ref.save_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    c_ref = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    c_ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for c in (c_ref, c_ours):
        c["target_modules"] = sorted(c["target_modules"])
    assert c_ours == c_ref
    w_ref = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    w_ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert w_ours.keys() == w_ref.keys() and not any("ranknum" in k for k in w_ours)
    for key in w_ref:
        torch.testing.assert_close(w_ours[key], w_ref[key], rtol=1e-4, atol=1e-6, msg=key)
    # with PEFT's values in our model the files are byte-identical
    with torch.no_grad():
        for p, q in zip(ref.parameters(), ours.parameters()):
            q.copy_(p)
    ours.save_pretrained(tmp_path / "same")
    assert (tmp_path / "same" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "ref" / "adapter_model.safetensors").read_bytes()

    # load both ways: pruned shapes, same outputs; merge_and_unload keeps them
    batch = causal_inputs(seed=11)
    batch.pop("labels")  # PEFT's AdaLoRA forward needs a trainable adapter when labels are given
    ref.eval()
    with torch.no_grad():
        expected = ref(**batch).logits
    loaded = peftfast.PeftModel.from_pretrained(builder(), str(tmp_path / "ref"))
    back = peft.PeftModel.from_pretrained(builder(), str(tmp_path / "same"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        ranks = {n: p.shape[0] for n, p in loaded.named_parameters() if n.endswith("lora_E.default")}
        assert sorted(ranks.values()) == sorted(sum(m) for m in patterns[-1].values())
        merged = loaded.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_forward_uses_the_fused_op_with_e_folded_into_a(monkeypatch):
    calls = []
    fused = adalora_layer.lora_linear_fused

    def spy(x, weight, bias, weights_a, weights_b, scalings, dropout_ps, training):
        calls.append((weights_a, scalings))
        return fused(x, weight, bias, weights_a, weights_b, scalings, dropout_ps, training)

    monkeypatch.setattr(adalora_layer, "lora_linear_fused", spy)
    _, ours = _pair(tiny_llama, ["q_proj"])
    ours(**causal_inputs())
    assert len(calls) == 2  # one op per targeted nn.Linear
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    (a,), (s,) = calls[0]
    torch.testing.assert_close(a, layer.lora_A["default"] * layer.lora_E["default"])
    assert s == pytest.approx(4 / (6 + 1e-5), rel=1e-7)


def test_conv2d_layer_matches_peft():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1)
            self.lin = nn.Linear(5, 4)

        def forward(self, x):
            return self.lin(self.conv(x).mean((2, 3)))

    def build():
        torch.manual_seed(0)
        return Net()

    kw = dict(init_r=4, target_r=2, total_step=4, target_modules=["conv", "lin"])
    ref = peft.get_peft_model(build(), peft.AdaLoraConfig(**kw))
    ours = peftfast.get_peft_model(build(), peftfast.AdaLoraConfig(**kw))
    with torch.no_grad():
        for (n, p), (m, q) in zip(ref.named_parameters(), ours.named_parameters()):
            assert n == m
            if ".lora_" in n:
                p.normal_()
                q.copy_(p)
    x = torch.randn(2, 3, 6, 7)
    y_ref, y_ours = ref(x), ours(x)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-5)
    y_ref.square().sum().backward()
    y_ours.square().sum().backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        ours.base_model.merge_adapter()
        torch.testing.assert_close(ours(x), y_ref, rtol=1e-4, atol=1e-5)
        ours.base_model.unmerge_adapter()
        with ours.disable_adapter():
            torch.testing.assert_close(ours(x), build()(x))


@pytest.mark.parametrize("field, value", [
    ("total_step", None), ("total_step", 0), ("tinit", 6), ("orth_reg_weight", -1.0), ("beta1", 1.0),
    ("init_r", 0), ("target_r", -2), ("deltaT", 0), ("use_dora", True), ("rank_pattern", {"x.lora_E": [1, 0]}),
])
def test_bad_config_values_are_refused(field, value):
    kw = dict(total_step=6, target_modules=["q_proj"])
    kw[field] = value
    with pytest.raises(ConfigError, match=field if field != "tinit" else "budgeting phase"):
        peftfast.AdaLoraConfig(**kw)


def test_one_trainable_adapter_and_disable(tmp_path):
    _, ours = _pair(tiny_llama, ["q_proj"])
    before = {n: p.clone() for n, p in ours.named_parameters()}
    with pytest.raises(ValueError, match="only 1 trainable adapter"):
        ours.add_adapter("other", _config(peftfast, target_modules=["q_proj"]))
    assert list(ours.peft_config) == ["default"]
    assert {n for n, _ in ours.named_parameters()} == set(before)
    ours.add_adapter("frozen", _config(peftfast, target_modules=["v_proj"], inference_mode=True))
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".frozen" in n)
    batch = causal_inputs()
    batch.pop("labels")
    ours.eval()
    with torch.no_grad(), ours.disable_adapter():
        torch.testing.assert_close(ours(**batch).logits, tiny_llama()(**batch).logits)
    with pytest.raises(TypeError, match="add_weighted_adapter"):
        ours.base_model.add_weighted_adapter(["default"], [1.0], "x")


def test_mismatched_checkpoint_leaves_the_model_unchanged(tmp_path):
    ref, _ = _pair(tiny_llama, ["q_proj", "v_proj"])
    ref.peft_config["default"].rank_pattern = {
        f"model.layers.{i}.self_attn.{m}.lora_E.default": [True, False, True, True, False, True]
        for i in range(2) for m in ("q_proj", "v_proj")}
    ref.save_pretrained(tmp_path / "a")
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A"
    assert weights[key].shape == (4, 16)
    weights[key] = torch.randn(5, 16)  # a rank the rank_pattern does not keep
    from safetensors.torch import save_file
    save_file(weights, os.path.join(tmp_path, "a", "adapter_model.safetensors"))
    model = tiny_llama()
    with pytest.raises(AdapterLoadError, match="shape"):
        peftfast.PeftModel.from_pretrained(model, str(tmp_path / "a"))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    # into an existing model: the adapter keeps its full ranks and values
    _, ours = _pair(tiny_llama, ["q_proj", "v_proj"])
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="shape"):
        ours.load_adapter(str(tmp_path / "a"), adapter_name="default")
    after = ours.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_triton_backend_matches_peft(triton_backend):
    """The fused kernels (Triton's interpreter on CPU) under AdaLoRA: logits and every adapter gradient."""
    ref, ours = _pair(tiny_llama, ["q_proj"])
    batch = causal_inputs(batch=1, seq=5)
    out_ref, out_ours = ref(**batch), ours(**batch)
    torch.testing.assert_close(out_ours.logits, out_ref.logits, rtol=1e-4, atol=1e-4)
    out_ref.loss.backward()
    out_ours.loss.backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_bitsandbytes_bases_match_peft(quant, tmp_path):
    """AdaLoRA over bitsandbytes Linear4bit / Linear8bitLt (loaded with BitsAndBytesConfig): logits, loss and
    every adapter gradient as PEFT's; merging requantises (PEFT cannot merge these)."""
    import warnings

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peftfast.tuners.adalora import SVDLinear4bit, SVDLinear8bitLt

    from peftfast import zoo

    # bitsandbytes' CPU kernels need every quantised layer 64 wide
    zoo.llama(0, 64, 2, heads=4, kv_heads=4, intermediate=128).save_pretrained(tmp_path / "base")
    q = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32) \
        if quant == "nf4" else dict(load_in_8bit=True)

    def load():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=BitsAndBytesConfig(**q),
                                                        dtype=torch.float32)

    ref, ours = _pair(load, ["q_proj", "v_proj"])
    cls = SVDLinear4bit if quant == "nf4" else SVDLinear8bitLt
    assert sum(type(m) is cls for m in ours.modules()) == 4
    batch = causal_inputs()
    with torch.no_grad(), ref.disable_adapter(), ours.disable_adapter():
        # the quantised base alone: bitsandbytes' CPU matmul and peftfast's differ in rounding; the adapters
        # may add at most a few times that
        base_err = (ours(**batch).logits - ref(**batch).logits).abs().max().item()
    out_ref, out_ours = ref(**batch), ours(**batch)
    assert (out_ours.logits - out_ref.logits).abs().max().item() <= 4 * base_err + 1e-5
    out_ref.loss.backward()
    out_ours.loss.backward()
    for (n, p), (_, q_) in zip(ref.named_parameters(), ours.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q_.grad, p.grad, rtol=2e-2, atol=1e-4 + 4 * base_err, msg=n)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        before = layer.dequantized_weight()
        expected = before + layer.get_delta_weight("default")
    with pytest.warns(UserWarning, match="requantises"):
        merged = ours.merge_and_unload()
    after = merged.model.layers[0].self_attn.q_proj
    assert type(after) is type(layer.get_base_layer())
    with torch.no_grad():
        got = layer.dequantized_weight()  # the layer's base is the merged model's module
        assert (got - expected).abs().mean() < 0.5 * (before - expected).abs().mean()


def test_float64_model_keeps_float64_precision():
    """On a float64 model the adapter's scale s / (ranknum + 1e-5) is taken in float64 (it was rounded to
    float32: output 3.6e-9 relative off the formula, PEFT 1.6e-16)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 17, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = peftfast.get_peft_model(nn.Sequential(nn.Linear(17, 9)).double(), peftfast.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=3, total_step=10, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        a, b, e = layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"]
        ref = layer.base_layer(x) + (x @ (a * e).T @ b.T) * (3 / (4.0 + 1e-5))
        out = model(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-14


def test_rank_pattern_naming_an_unadapted_layer_is_a_config_error(tmp_path):
    """A saved rank_pattern that names a layer the adapter does not hold is refused with a ValueError that says
    what the keys must be (it was a bare KeyError), and the model stays as it was."""
    ref, _ = _pair(tiny_llama, ["q_proj"])
    ref.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["rank_pattern"] = {"model.layers.0.self_attn.k_proj.lora_E": [True] * config["init_r"]}
    path.write_text(json.dumps(config))
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="k_proj.*not an AdaLoRA layer.*lora_E"):
        peftfast.PeftModel.from_pretrained(model, str(tmp_path / "a"))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_resuming_allocation_on_a_pruned_checkpoint_says_why(tmp_path):
    """A checkpoint saved after pruning, loaded trainable, then trained with update_and_allocate: PEFT fails inside
    kthvalue ("selected number k out of range"); here a ValueError says the schedule starts from init_r per layer
    while the adapter holds fewer ranks (a layer pruned to rank 0 has no gradient: scored as zero, not refused)."""
    _, ours = _pair(tiny_gpt2, ["c_attn", "c_proj"], target_r=2)
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    for step in range(6):
        ours(**causal_inputs(seed=step)).loss.backward()
        opt.step()
        ours.base_model.update_and_allocate(step)
        opt.zero_grad()
    ours.save_pretrained(tmp_path / "a")
    loaded = peftfast.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "a"), is_trainable=True)
    held = sum(p.shape[0] for n, p in loaded.named_parameters() if "lora_E" in n)
    ranks = [p.shape[0] for n, p in loaded.named_parameters() if "lora_E" in n]
    assert held < 6 * len(ranks) and 0 in ranks  # (seeded: one layer pruned to rank 0)
    loaded(**causal_inputs(seed=9)).loss.backward()
    with pytest.raises(ValueError, match="pruned rank_pattern"):
        loaded.base_model.update_and_allocate(3)
