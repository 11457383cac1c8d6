"""LLaMA-Adapter (adaption prompts) against the real PEFT 0.21.2 and against its defining math.

Parity on tiny Llama (grouped-query attention) and Mistral models: the same seed gives the same prompts, then
every gate is set to a fresh non-zero value on both sides; state-dict keys, trainable counts, logits, loss and
every trainable gradient agree. The math is checked in float64 on one attention module with a biased o_proj, where
PEFT adds the bias twice (peftfast adds the prompt attention before o_proj). Generation is greedy decoding by
repeated full forward passes; checkpoints go both ways with PEFT; bad checkpoints leave the model unchanged.
"""
from __future__ import annotations

import json
import math
import os
import warnings

import peft
import pytest
import torch

import peftfast as fast
from peftfast import zoo
from peftfast.utils.save_and_load import AdapterLoadError


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def sharpen(model, seed):
    """Projections large enough that a 3-token prompt changes the greedy tokens."""
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def tiny_llama(seed=0, **options):
    return sharpen(zoo.llama(seed, 16, 3, heads=4, kv_heads=2, **options), seed)


def tiny_mistral(seed=0):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=zoo.VOCAB, hidden_size=16, intermediate_size=36, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, attention_dropout=0.0)
    torch.manual_seed(seed)
    return sharpen(MistralForCausalLM(cfg).eval(), seed)


BUILDERS = {"llama": tiny_llama, "mistral": tiny_mistral}


def config(lib, adapter_len=3, adapter_layers=2):
    return lib.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=adapter_len, adapter_layers=adapter_layers)


def set_gates(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "adaption_gate" in name:
                p.copy_(torch.randn(p.shape, generator=g) + 1.0)


def adapter_tensors(model):
    """Adapter tensors under PEFT's checkpoint keys (no adapter name)."""
    return {k: v for k, v in (fast if isinstance(model, fast.PeftModel) else peft).get_peft_model_state_dict(
        model).items()}


def grads(model):
    return {n.replace(".default", ""): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def pair(family, seed=0, **kw):
    build = BUILDERS[family]
    torch.manual_seed(11)
    theirs = quiet(peft.get_peft_model, build(seed), config(peft, **kw))
    torch.manual_seed(11)
    ours = quiet(fast.get_peft_model, build(seed), config(fast, **kw))
    set_gates(theirs, 5)
    set_gates(ours, 5)
    return theirs, ours


def snapshot(model):
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def assert_unchanged(model, before):
    modules, state, flags = snapshot(model)
    assert modules == before[0]
    assert list(state) == list(before[1]) and all(torch.equal(state[k], before[1][k]) for k in state)
    assert flags == before[2]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_parity_with_peft(family):
    theirs, ours = pair(family)
    mine, peft_sd = adapter_tensors(ours), adapter_tensors(theirs)
    assert list(mine) == list(peft_sd) and len(mine) == 4  # layers 1 and 2: prompt and gate each
    assert all(torch.equal(mine[k], peft_sd[k]) for k in mine)  # same draws from the same seed
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert isinstance(ours.base_model, fast.AdaptionPromptModel)
    inputs = zoo.causal_inputs(batch=3, seq=5, seed=2)
    inputs["attention_mask"][0, :2] = 0  # left padding in one row
    ours.train(), theirs.train()
    out_t, out_o = theirs(**inputs), ours(**inputs)
    torch.testing.assert_close(out_o.logits, out_t.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_o.loss, out_t.loss, rtol=1e-5, atol=1e-6)
    out_t.loss.backward()
    out_o.loss.backward()
    g_t, g_o = grads(theirs), grads(ours)
    assert sorted(g_o) == sorted(g_t) and len(g_o) == 4
    for name in g_t:
        assert g_t[name].abs().max() > 0, name
        torch.testing.assert_close(g_o[name], g_t[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        base = BUILDERS[family]()(**inputs).logits
    assert not torch.allclose(out_o.logits, base, atol=1e-2)


def math_llama(case):
    """float64 Llama, 4 query heads sharing 2 key/value heads: with random attention biases (head_dim 4), or with
    head_dim 6 set explicitly (heads * head_dim != hidden, which PEFT's AdaptedAttention cannot reshape)."""
    from transformers import LlamaForCausalLM

    if case == "bias":
        return zoo.random_biases(tiny_llama(attention_bias=True)).double()
    cfg = zoo.llama_config(16, 3, heads=4, kv_heads=2)
    cfg.head_dim = 6
    torch.manual_seed(0)
    return sharpen(LlamaForCausalLM(cfg).eval(), 0).double()


@pytest.mark.parametrize("case", ["bias", "head_dim6"])
def test_gated_attention_matches_math_float64(case):
    """One attention module in float64: peftfast = o_proj(attention + A), against the definition written out here;
    gradients of prompt and gate too. With biases PEFT's output is that plus o_proj's bias once more (same
    gradients). With the gate at zero peftfast's output is the base attention's."""
    from peft.tuners.adaption_prompt.layer import AdaptedAttention as PeftAdapted

    from peftfast.tuners.adaption_prompt import AdaptedAttention

    model = math_llama(case)
    attn = model.model.layers[1].self_attn
    heads, kv_heads, hd, length = 4, 2, attn.head_dim, 5
    ours = AdaptedAttention(attn, "default", config(fast, adapter_len=length))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        ours.adaption_prompt["default"].copy_(torch.randn(1, length, 16, generator=g, dtype=torch.float64))
        ours.adaption_gate["default"].copy_(torch.tensor([0.8], dtype=torch.float64))
    hidden = torch.randn(2, 6, 16, generator=g, dtype=torch.float64)
    position_ids = torch.arange(6).expand(2, -1)
    cos, sin = model.model.rotary_emb(hidden, position_ids)
    mask = torch.full((6, 6), float("-inf"), dtype=torch.float64).triu(1).expand(2, 1, 6, 6)
    kwargs = dict(hidden_states=hidden, position_embeddings=(cos, sin), attention_mask=mask)

    def reference(prompt, gate):
        b, s, _ = hidden.shape
        q = attn.q_proj(hidden).view(b, s, heads, hd).transpose(1, 2)
        k = attn.k_proj(hidden).view(b, s, kv_heads, hd).transpose(1, 2)
        v = attn.v_proj(hidden).view(b, s, kv_heads, hd).transpose(1, 2)
        c, si = cos.unsqueeze(1), sin.unsqueeze(1)
        rot = lambda x: torch.cat((-x[..., hd // 2:], x[..., :hd // 2]), -1)  # noqa: E731
        q, k = q * c + rot(q) * si, k * c + rot(k) * si
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        kp = attn.k_proj(prompt).view(1, length, kv_heads, hd).transpose(1, 2).repeat_interleave(2, 1)
        vp = attn.v_proj(prompt).view(1, length, kv_heads, hd).transpose(1, 2).repeat_interleave(2, 1)
        extra = gate * torch.softmax(q @ kp.transpose(-1, -2) / math.sqrt(hd), -1) @ vp
        return attn.o_proj((att + extra).transpose(1, 2).reshape(b, s, heads * hd))

    prompt = ours.adaption_prompt["default"].detach().clone().requires_grad_(True)
    gate = ours.adaption_gate["default"].detach().clone().requires_grad_(True)
    ref = reference(prompt, gate)
    got = ours(**kwargs)[0]
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref * w).sum(), (prompt, gate))
    our_grads = torch.autograd.grad((got * w).sum(), (ours.adaption_prompt["default"], ours.adaption_gate["default"]))
    for r, o in zip(ref_grads, our_grads):
        assert r.abs().max() > 0
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)
    if case == "bias":
        theirs = PeftAdapted("llama", length, attn)
        with torch.no_grad():
            theirs.adaption_prompt.copy_(prompt)
            theirs.adaption_gate.copy_(gate)
        peft_out = theirs(**kwargs)[0]
        # PEFT's softmax runs in float32 even for float64 inputs: its match is to float32 precision
        torch.testing.assert_close(peft_out, ref + attn.o_proj.bias, rtol=1e-5, atol=1e-6)
        assert (peft_out - got - attn.o_proj.bias).abs().max() < 1e-5 < attn.o_proj.bias.abs().max()
        peft_grads = torch.autograd.grad((peft_out * w).sum(), (theirs.adaption_prompt, theirs.adaption_gate))
        for r, p in zip(ref_grads, peft_grads):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ours.adaption_gate["default"].zero_()
        torch.testing.assert_close(ours(**kwargs)[0], attn(**kwargs)[0], rtol=0, atol=1e-13)
    assert not attn.q_proj._forward_hooks and not attn.o_proj._forward_pre_hooks  # removed after each call


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generate_is_greedy_decoding(family):
    theirs, ours = pair(family)
    ours.eval(), theirs.eval()
    ids = zoo.token_ids(batch=2, seq=4, seed=6)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        seq = ids
        for _ in range(6):
            logits = ours(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        peft_tokens = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        base = BUILDERS[family]().generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, seq)
    assert torch.equal(got, peft_tokens)
    assert not torch.equal(got, base)


def test_disable_adapter_and_unload():
    _, ours = pair("llama")
    inputs = zoo.causal_inputs(batch=2, seq=5)
    base_model = tiny_llama()
    with torch.no_grad():
        base = base_model(**inputs).logits
        adapted = ours(**inputs).logits
        with ours.disable_adapter():
            torch.testing.assert_close(ours(**inputs).logits, base, rtol=0, atol=0)
        torch.testing.assert_close(ours(**inputs).logits, adapted, rtol=0, atol=0)
    assert ours.get_nb_trainable_parameters()[0] == 2 * (3 * 16 + 1)
    with pytest.raises(ValueError, match="cannot be merged"):
        ours.merge_and_unload()
    torch.testing.assert_close(ours(**inputs).logits, adapted, rtol=0, atol=0)
    plain = ours.unload()
    assert [n for n, _ in plain.named_modules()] == [n for n, _ in base_model.named_modules()]
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, base, rtol=0, atol=0)


def test_several_adapters_as_in_peft(tmp_path):
    theirs, ours = pair("llama")
    torch.manual_seed(12)
    theirs.add_adapter("other", config(peft, adapter_len=4, adapter_layers=1))
    torch.manual_seed(12)
    ours.add_adapter("other", config(fast, adapter_len=4, adapter_layers=1))
    inputs = zoo.causal_inputs(batch=2, seq=5, seed=3)
    with torch.no_grad():
        first = ours(**inputs).logits
        torch.testing.assert_close(first, theirs(**inputs).logits, rtol=1e-5, atol=1e-5)  # adding keeps "default"
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    for model in (theirs, ours):
        model.set_adapter("other")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaption_gate" in name and ("other" in name or model is theirs):
                    p.fill_(1.5)
    assert ours.active_adapters == ["other"]
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0] == 4 * 16 + 1
    with torch.no_grad():
        second = ours(**inputs).logits
        torch.testing.assert_close(second, theirs(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second, atol=1e-3)
    with pytest.raises(ValueError, match="one at a time"):
        ours.set_adapter(["default", "other"])
    assert ours.active_adapters == ["other"]
    ours.set_adapter("default")  # an inactive adapter is saved too, in its subfolder, and PEFT loads it
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path / "other")) == ["adapter_config.json", "adapter_model.safetensors"]
    with torch.no_grad():
        loaded = quiet(peft.PeftModel.from_pretrained, tiny_llama(), str(tmp_path / "other"))
        torch.testing.assert_close(loaded(**inputs).logits, second, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(**inputs).logits, first, rtol=0, atol=0)
    ours.set_adapter("other")
    ours.delete_adapter("other")
    theirs.delete_adapter("other")
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, first, rtol=0, atol=0)
    assert adapter_tensors(ours).keys() == adapter_tensors(theirs).keys()


def test_checkpoints_both_ways_with_peft(tmp_path):
    theirs, ours = pair("mistral")
    inputs = zoo.causal_inputs(batch=2, seq=5, seed=4)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "fast")
    from safetensors.torch import load_file

    f_peft = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    f_fast = load_file(tmp_path / "fast" / "adapter_model.safetensors")
    assert list(f_fast) == list(f_peft) and all(torch.equal(f_fast[k], f_peft[k]) for k in f_fast)
    with open(tmp_path / "fast" / "adapter_config.json") as f:
        cfg = json.load(f)
    assert cfg["peft_type"] == "ADAPTION_PROMPT" and cfg["adapter_len"] == 3 and cfg["adapter_layers"] == 2
    with torch.no_grad():
        want = theirs(**inputs).logits
        loaded_fast = fast.PeftModel.from_pretrained(tiny_mistral(), str(tmp_path / "peft"))
        torch.testing.assert_close(loaded_fast(**inputs).logits, want, rtol=1e-5, atol=1e-5)
        loaded_peft = quiet(peft.PeftModel.from_pretrained, tiny_mistral(), str(tmp_path / "fast"))
        torch.testing.assert_close(loaded_peft(**inputs).logits, want, rtol=1e-5, atol=1e-5)
    assert type(loaded_fast).__name__ == "PeftModelForCausalLM"
    assert not any(p.requires_grad for p in loaded_fast.parameters())


def test_bad_checkpoints_leave_the_model_unchanged(tmp_path):
    _, ours = pair("llama")
    ours.save_pretrained(tmp_path / "good")

    def variant(name, **changes):
        folder = tmp_path / name
        os.makedirs(folder)
        with open(tmp_path / "good" / "adapter_config.json") as f:
            cfg = json.load(f)
        cfg.update(changes)
        with open(folder / "adapter_config.json", "w") as f:
            json.dump(cfg, f)
        with open(tmp_path / "good" / "adapter_model.safetensors", "rb") as src, \
                open(folder / "adapter_model.safetensors", "wb") as dst:
            dst.write(src.read())
        return str(folder)

    cases = {
        variant("long", adapter_len=5): r"shape mismatch.*adaption_prompt.*\(1, 3, 16\).*\(1, 5, 16\)",
        variant("deep", adapter_layers=4): r"more adapter layers '4' than the model has '3'",
        variant("zero", adapter_len=0): r"adapter_len must be a positive integer",
    }
    for folder, message in cases.items():
        base = tiny_llama()
        before = snapshot(base)
        with pytest.raises(ValueError, match=message):
            fast.PeftModel.from_pretrained(base, folder)
        assert_unchanged(base, before)
        before = snapshot(ours)
        configs = dict(ours.peft_config)
        with pytest.raises(ValueError, match=message):
            ours.load_adapter(folder, adapter_name="second")
        assert_unchanged(ours, before)
        assert ours.peft_config == configs and ours.active_adapters == ["default"]
    with pytest.raises(ValueError, match="Unsupported model type for adaption prompt: 'gpt2'"):
        fast.get_peft_model(zoo.gpt2(), config(fast))
    with pytest.raises(ValueError, match="adapter_layers must be set"):
        fast.get_peft_model(tiny_llama(), fast.AdaptionPromptConfig(adapter_len=2))
