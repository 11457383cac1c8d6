"""Prefix tuning against PEFT 0.21.2 where PEFT works on transformers 5 (causal-LM and seq2seq forward), against
greedy decoding by repeated forward passes for generate (PEFT's generate drops the prefix there), and checkpoints
both ways."""
from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftfast as fast
from tests._models import causal_inputs, seq2seq_inputs, seq_cls_inputs, tiny_bert_seq_cls, tiny_gpt2, tiny_llama, \
    tiny_t5


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def pair(build, task, **options):
    theirs = quiet(peft.get_peft_model, build(), peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3,
                                                                         **options))
    ours = quiet(fast.get_peft_model, build(), fast.PrefixTuningConfig(task_type=task, num_virtual_tokens=3,
                                                                       **options))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("build,task,inputs", [(tiny_llama, "CAUSAL_LM", causal_inputs),
                                              (tiny_gpt2, "CAUSAL_LM", causal_inputs),
                                              (tiny_t5, "SEQ_2_SEQ_LM", seq2seq_inputs)])
@pytest.mark.parametrize("projection", [False, True])
def test_parity_with_peft(build, task, inputs, projection):
    theirs, ours = pair(build, task, prefix_projection=projection, encoder_hidden_size=12)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for attr in ("num_attention_heads", "token_dim", "num_layers", "num_transformer_submodules"):
        assert getattr(ours.peft_config["default"], attr) == getattr(theirs.peft_config["default"], attr)
    batch = inputs(batch=3, seq=6)
    out_t, out_o = quiet(theirs, **batch), ours(**batch)
    torch.testing.assert_close(out_o.logits, out_t.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_o.loss, out_t.loss, rtol=1e-5, atol=1e-6)
    with ours.disable_adapter():
        plain = ours(**batch).logits
    assert not torch.allclose(plain, out_o.logits, atol=1e-4)
    out_t.loss.backward()
    out_o.loss.backward()
    pairs = [(n, p, q) for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()) if p.requires_grad]
    assert pairs
    for name, p, q in pairs:
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert pairs[0][1].grad.abs().sum() > 0


def test_prefix_is_keys_and_values_in_front():
    """The defining math on one layer's input: with an all-ones mask, position_ids given are shifted by n (the prefix
    takes positions 0..n-1), and a prefix whose keys/values are a real prefix's gives the same logits as that
    prefix's tokens in front (a 1-layer model, prefix = the layer's k/v of those tokens)."""
    base = tiny_gpt2(layers=1)
    model = quiet(fast.get_peft_model, base, fast.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    full = causal_inputs(batch=2, seq=8)["input_ids"]
    head, tail = full[:, :3], full[:, 3:]
    with torch.no_grad():
        cache = base(input_ids=head, use_cache=True).cache
        k, v = cache.layers[0].keys[0], cache.layers[0].values[0]  # [H, n, D] of sample 0
        rows = torch.cat([k.permute(1, 0, 2).reshape(3, -1), v.permute(1, 0, 2).reshape(3, -1)], dim=1)
        model.prompt_encoder["default"].embedding.weight.copy_(rows)
        ours = model(input_ids=tail[:1]).logits
        reference = base(input_ids=full[:1]).logits[:, 3:]
        shifted = model(input_ids=tail[:1], position_ids=torch.arange(5)[None]).logits
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shifted, ours)


def greedy(model, ids, steps):
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("projection", [False, True])
def test_generate_is_greedy_decoding_of_forward(projection):
    _, model = pair(tiny_gpt2, "CAUSAL_LM", prefix_projection=projection)
    model.eval()
    ids = causal_inputs(batch=2, seq=5)["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, greedy(model, ids, 6))
    with model.disable_adapter():
        assert not torch.equal(out, model.generate(input_ids=ids, max_new_tokens=6, do_sample=False))


def test_seq2seq_generate_is_greedy_decoding_of_forward():
    _, model = pair(tiny_t5, "SEQ_2_SEQ_LM")
    model.eval()
    batch = seq2seq_inputs(batch=2, seq=6)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5,
                         do_sample=False)
    dec = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(out.shape[1] - 1):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           decoder_input_ids=dec).logits[:, -1]
            dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, dec)


def test_sequence_classification_where_peft_refuses():
    model = quiet(fast.get_peft_model, tiny_bert_seq_cls(), fast.PrefixTuningConfig(task_type="SEQ_CLS",
                                                                                    num_virtual_tokens=3))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_()
    batch = seq_cls_inputs(batch=3, seq=5)
    out = model(**batch)
    with model.disable_adapter(), torch.no_grad():
        assert not torch.allclose(model(**batch).logits, out.logits, atol=1e-4)
    out.loss.backward()
    assert model.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
    theirs = quiet(peft.get_peft_model, tiny_bert_seq_cls(), peft.PrefixTuningConfig(task_type="SEQ_CLS",
                                                                                     num_virtual_tokens=3))
    with pytest.raises(ValueError, match="does not support past key values"):
        theirs(**batch)


@pytest.mark.parametrize("projection", [False, True])
def test_checkpoints_both_ways(tmp_path, projection):
    theirs, ours = pair(tiny_llama, "CAUSAL_LM", prefix_projection=projection)
    quiet(ours.save_pretrained, str(tmp_path / "ours"))
    quiet(theirs.save_pretrained, str(tmp_path / "theirs"))
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "theirs"))
    assert sorted(a) == sorted(b) == ["prompt_embeddings"]
    torch.testing.assert_close(a["prompt_embeddings"], b["prompt_embeddings"], rtol=1e-6, atol=1e-7)
    batch = causal_inputs(batch=2, seq=6)
    ours.eval()
    with torch.no_grad():
        reference = ours(**batch).logits
    for loader, folder in ((fast, "theirs"), (peft, "ours")):
        loaded = quiet(loader.PeftModel.from_pretrained, tiny_llama(), str(tmp_path / folder))
        with torch.no_grad():
            torch.testing.assert_close(quiet(loaded, **batch).logits, reference, rtol=1e-5, atol=1e-6)
    base = tiny_gpt2()
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="token_dim 64 does not fit GPT2LMHeadModel"):
        fast.get_peft_model(base, fast.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2,
                                                                  token_dim=64, num_attention_heads=2))
    assert [n for n, _ in base.named_modules()] == names and all(p.requires_grad for p in base.parameters())


def test_encoder_prefix_is_keys_and_values_in_front():
    """The encoder path (BERT: the classification, QA and feature-extraction wrappers): on a 1-layer model a prefix
    holding the layer's keys/values of real tokens gives the logits those tokens give in front of the input."""
    from peftfast import zoo

    base = zoo.bert_token_cls(0, 16, 1, num_labels=5)
    model = quiet(fast.get_peft_model, base, fast.PrefixTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=3))
    full = zoo.token_ids(2, 8, 3)
    with torch.no_grad():
        emb = base.bert.embeddings(input_ids=full[:1])[:, :3]
        attention = base.bert.encoder.layer[0].attention.self
        rows = torch.cat([attention.key(emb)[0], attention.value(emb)[0]], dim=1)
        model.prompt_encoder["default"].embedding.weight.copy_(rows)
        ours = model(input_ids=full[:, 3:], attention_mask=torch.ones(2, 5, dtype=torch.long)).logits
        reference = base(input_ids=torch.cat([full[:1, :3].expand(2, -1), full[:, 3:]], dim=1)).logits[:, 3:]
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
