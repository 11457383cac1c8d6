"""Prompt tuning and P-tuning against the real PEFT 0.21.2 and against their defining math.

Parity (same weights copied from PEFT's model): module tree / state-dict keys, trainable counts, outputs, loss and
every trainable gradient, per task wrapper. Generation is checked against greedy decoding by repeated full forward
passes (PEFT's own cached generate is not the oracle on transformers 5: see README), and must differ from the base
model's. Checkpoints go both ways with PEFT; bad checkpoints and configs leave the model unchanged.
"""
from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftfast as fast
from tests._models import (causal_inputs, model_output, qa_inputs, seq2seq_inputs, seq_cls_inputs, tiny_bert_qa,
                           tiny_bert_seq_cls, tiny_bert_token_cls, tiny_gpt2, tiny_llama, tiny_t5, token_cls_inputs)


def sharp_llama(seed: int = 0):
    """A tiny Llama whose projections are large enough for a few virtual tokens to change its greedy tokens (at the
    default init its attention barely reads other positions)."""
    model = tiny_llama(seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


FAMILIES = {
    "llama": (tiny_llama, "CAUSAL_LM", causal_inputs),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", causal_inputs),
    "bert_seq_cls": (tiny_bert_seq_cls, "SEQ_CLS", seq_cls_inputs),
    "bert_token_cls": (tiny_bert_token_cls, "TOKEN_CLS", token_cls_inputs),
    "bert_qa": (tiny_bert_qa, "QUESTION_ANS", qa_inputs),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM", seq2seq_inputs),
    "bert_features": (lambda: tiny_bert_seq_cls().bert, "FEATURE_EXTRACTION", seq_cls_inputs),
}
METHODS = {
    "prompt_tuning": lambda lib, task: lib.PromptTuningConfig(task_type=task, num_virtual_tokens=3),
    "p_tuning_mlp": lambda lib, task: lib.PromptEncoderConfig(task_type=task, num_virtual_tokens=3,
                                                              encoder_hidden_size=10),
    "p_tuning_lstm": lambda lib, task: lib.PromptEncoderConfig(task_type=task, num_virtual_tokens=2,
                                                               encoder_reparameterization_type="LSTM",
                                                               encoder_hidden_size=6),
}
CASES = [(f, m) for f in FAMILIES for m in METHODS
         if m == "prompt_tuning" or (m == "p_tuning_mlp" and f in ("gpt2", "bert_token_cls", "bert_qa", "t5"))
         or (m == "p_tuning_lstm" and f in ("llama", "bert_seq_cls"))]


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def pair(family: str, method: str):
    build, task, make_inputs = FAMILIES[family]
    theirs = quiet(peft.get_peft_model, build(), METHODS[method](peft, task))
    ours = quiet(fast.get_peft_model, build(), METHODS[method](fast, task))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # fresh non-default adapter weights (heads too), the same on both sides
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ours.load_state_dict(theirs.state_dict())
    inputs = make_inputs(batch=3, seq=5)
    if family == "bert_features":
        inputs.pop("labels")
    return theirs, ours, inputs


def run(model, inputs, family):
    if family == "bert_token_cls":  # PEFT passes token labels unpadded and fails; compare without them
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
    out = model(**inputs)
    if family == "bert_features":
        value = out.last_hidden_state
        return value, (value ** 2).mean()
    return model_output(out), out.loss if getattr(out, "loss", None) is not None else (model_output(out) ** 2).mean()


@pytest.mark.parametrize("family,method", CASES)
def test_parity_with_peft(family, method):
    theirs, ours, inputs = pair(family, method)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in theirs.named_parameters() if p.requires_grad]
    for attr in ("num_virtual_tokens", "num_transformer_submodules", "num_attention_heads", "token_dim", "num_layers",
                 "encoder_hidden_size"):
        assert getattr(ours.peft_config["default"], attr, None) == getattr(theirs.peft_config["default"], attr, None)
    assert getattr(ours, "transformer_backbone_name", None) == getattr(theirs, "transformer_backbone_name", None)
    assert type(ours.word_embeddings) is type(theirs.word_embeddings)
    ours.train(), theirs.train()
    out_t, loss_t = run(theirs, inputs, family)
    out_o, loss_o = run(ours, inputs, family)
    torch.testing.assert_close(out_o, out_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        base = quiet(FAMILIES[family][0])
        base_out = model_output(base(**inputs)) if family != "bert_features" else base(**inputs).last_hidden_state
    assert out_o.shape[1] != base_out.shape[1] or not torch.allclose(out_o, base_out, atol=1e-3)
    loss_t.backward()
    loss_o.backward()
    grads = [(n, p.grad) for n, p in ours.named_parameters() if p.requires_grad]
    for (name, g_o), (_, p_t) in zip(grads, [(n, p) for n, p in theirs.named_parameters() if p.requires_grad]):
        assert g_o is not None and p_t.grad is not None, name
        torch.testing.assert_close(g_o, p_t.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads if "prompt_encoder" in n)


def test_causal_lm_labels_are_padded_for_the_virtual_tokens():
    """The loss is the base model's loss over the real tokens only: labels get n entries of -100 in front."""
    model = quiet(fast.get_peft_model, tiny_llama(), fast.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                              num_virtual_tokens=4))
    batch = causal_inputs(batch=2, seq=6)
    out = model(**batch)
    # position i predicts token i + 1: the last virtual token predicts the first real one, no position predicts a
    # virtual token
    logits = out.logits[:, 3:-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    embeds = torch.cat([model.prompt_encoder["default"].embedding.weight[None].expand(2, -1, -1),
                        model.word_embeddings(batch["input_ids"])], dim=1)
    torch.testing.assert_close(out.logits, model.get_base_model()(inputs_embeds=embeds).logits)


def greedy_by_forward(model, ids, steps, **extra):
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), **extra).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("build,method", [(sharp_llama, "prompt_tuning"), (tiny_gpt2, "p_tuning_mlp")])
def test_generate_is_greedy_decoding_of_forward(build, method):
    model = quiet(fast.get_peft_model, build(), METHODS[method](fast, "CAUSAL_LM")).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.mul_(3)
    ids = causal_inputs(batch=2, seq=5)["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(out, greedy_by_forward(model, ids, 6))
    with model.disable_adapter():
        plain = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(plain, greedy_by_forward(model.get_base_model(), ids, 6))
    assert not torch.equal(out, plain)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), out)  # positional ids
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=False), out)


def test_seq2seq_generate_matches_peft_and_forward():
    theirs, ours, inputs = pair("t5", "prompt_tuning")
    theirs.eval(), ours.eval()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False))
    dec = torch.zeros(ids.shape[0], 1, dtype=torch.long)  # T5 starts decoding from pad (0)
    with torch.no_grad():
        for _ in range(out.shape[1] - 1):
            logits = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[:, -1]
            dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, dec)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,method", [("llama", "prompt_tuning"), ("gpt2", "p_tuning_mlp"),
                                           ("bert_seq_cls", "p_tuning_lstm"), ("t5", "prompt_tuning")])
def test_checkpoints_both_ways(tmp_path, family, method):
    theirs, ours, inputs = pair(family, method)
    build, task, _ = FAMILIES[family]
    quiet(ours.save_pretrained, str(tmp_path / "ours"))
    quiet(theirs.save_pretrained, str(tmp_path / "theirs"))
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "theirs"))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    ours.eval(), theirs.eval()
    reference = run(ours, inputs, family)[0].detach()
    for loader, folder in ((fast, "theirs"), (peft, "ours")):
        loaded = quiet(loader.PeftModel.from_pretrained, build(), str(tmp_path / folder))
        assert loaded.peft_config["default"].inference_mode
        with torch.no_grad():
            torch.testing.assert_close(run(loaded, inputs, family)[0], reference, rtol=1e-5, atol=1e-6)
    if task == "CAUSAL_LM":
        loaded = quiet(fast.PeftModel.from_pretrained, build(), str(tmp_path / "theirs"))
        ids = inputs["input_ids"]
        assert torch.equal(loaded.generate(input_ids=ids, max_new_tokens=4, do_sample=False),
                           greedy_by_forward(ours, ids, 4))


def fingerprint(model):
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def assert_same(before, after):
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    for k in before[1]:
        assert torch.equal(before[1][k], after[1][k]), k
    assert before[2] == after[2]


def edit_config(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


def test_hardened_loading(tmp_path):
    src = quiet(peft.get_peft_model, tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                           num_virtual_tokens=3))
    quiet(src.save_pretrained, str(tmp_path / "pt"))
    lora = quiet(peft.get_peft_model, tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                    task_type="CAUSAL_LM"))
    quiet(lora.save_pretrained, str(tmp_path / "lora"))

    bad_tokens = tmp_path / "bad_tokens"
    quiet(src.save_pretrained, str(bad_tokens))
    edit_config(str(bad_tokens), num_virtual_tokens=5)
    bad_dim = tmp_path / "bad_dim"
    quiet(src.save_pretrained, str(bad_dim))
    edit_config(str(bad_dim), token_dim=24)
    seq2seq = tmp_path / "seq2seq"
    quiet(src.save_pretrained, str(seq2seq))
    edit_config(str(seq2seq), task_type="SEQ_2_SEQ_LM", num_transformer_submodules=1)

    base = tiny_llama()
    before = fingerprint(base)
    with pytest.raises(ValueError, match=r"prompt_embeddings: checkpoint has shape \(3, 16\), the model expects "
                                         r"\(5, 16\)"):
        fast.PeftModel.from_pretrained(base, str(bad_tokens))
    with pytest.raises(ValueError, match="token_dim 24 does not fit LlamaForCausalLM"):
        fast.PeftModel.from_pretrained(base, str(bad_dim))
    with pytest.raises(ValueError, match="needs an encoder-decoder model"):
        fast.PeftModel.from_pretrained(base, str(seq2seq))
    with pytest.raises(ValueError, match="Cannot set a prompt learning adapter to trainable"):
        fast.PeftModel.from_pretrained(base, str(tmp_path / "pt"), is_trainable=True)
    assert_same(before, fingerprint(base))
    assert not hasattr(base, "peft_config")

    model = quiet(fast.PeftModel.from_pretrained, base, str(tmp_path / "pt"))
    before = fingerprint(model)
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        model.load_adapter(str(tmp_path / "lora"), adapter_name="other")
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        model.add_adapter("other", fast.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="prompt_embeddings: checkpoint has shape"):
        model.load_adapter(str(bad_tokens), adapter_name="other")
    with pytest.raises(ValueError, match="token_dim 24 does not fit"):
        model.add_adapter("other", fast.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, token_dim=24))
    assert_same(before, fingerprint(model))
    assert list(model.peft_config) == ["default"] and list(model.prompt_encoder) == ["default"]
    lora_model = quiet(fast.get_peft_model, tiny_llama(), fast.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        lora_model.load_adapter(str(tmp_path / "pt"), adapter_name="prompt")
    with pytest.raises(ValueError, match="does not support prompt learning"):
        fast.inject_adapter_in_model(fast.PromptTuningConfig(num_virtual_tokens=2), tiny_llama())


def test_several_prompt_adapters(tmp_path):
    model = quiet(fast.get_peft_model, tiny_bert_seq_cls(), fast.PromptTuningConfig(task_type="SEQ_CLS",
                                                                                    num_virtual_tokens=3))
    model.add_adapter("other", fast.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5))
    assert model.active_adapter == "default" and model.prompt_tokens["other"].tolist() == list(range(5))
    batch = seq_cls_inputs(batch=3, seq=6)
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        first = model(**batch).logits
        model.set_adapter("other")
        second = model(**batch).logits
        with model.disable_adapter():
            plain = model(**batch).logits
        torch.testing.assert_close(plain, tiny_bert_seq_cls()(**batch).logits)
    assert not torch.allclose(first, second)
    assert model.base_model.classifier.active_adapter == "other"
    quiet(model.save_pretrained, str(tmp_path))
    assert os.path.isfile(tmp_path / "other" / "adapter_model.safetensors")
    theirs = quiet(peft.PeftModel.from_pretrained, tiny_bert_seq_cls(), str(tmp_path / "other"))
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, second)
    with pytest.warns(UserWarning, match="Setting active adapter to default"):
        model.delete_adapter("other")
    assert model.active_adapter == "default" and list(model.prompt_encoder) == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, first)


def test_text_and_vocab_initialisation_match_peft(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>").save_pretrained(
        str(tmp_path))
    for kwargs in ({"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "w5 w17 w9",
                    "tokenizer_name_or_path": str(tmp_path)},
                   {"prompt_tuning_init": "SAMPLE_VOCAB"}):
        torch.manual_seed(11)
        theirs = quiet(peft.get_peft_model, tiny_llama(), peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=7, **kwargs))
        torch.manual_seed(11)
        ours = quiet(fast.get_peft_model, tiny_llama(), fast.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=7, **kwargs))
        weight = ours.prompt_encoder["default"].embedding.weight
        torch.testing.assert_close(weight, theirs.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)
    text_rows = fast.get_peft_model(tiny_llama(), fast.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text="w5 w17 w9",
        tokenizer_name_or_path=str(tmp_path))).prompt_encoder["default"].embedding.weight
    ids = torch.tensor([9, 21, 13] * 3)[:7]  # "w5 w17 w9" -> 9, 21, 13, repeated to 7 tokens
    torch.testing.assert_close(text_rows, tiny_llama().get_input_embeddings().weight[ids], rtol=0, atol=0)
    with pytest.raises(ValueError, match="tokenizer_name_or_path can't be None"):
        fast.PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="x")


def test_prompt_attributes_and_config_fields_match_peft():
    for ours_cls, theirs_cls in ((fast.PromptTuningConfig, peft.PromptTuningConfig),
                                 (fast.PromptEncoderConfig, peft.PromptEncoderConfig),
                                 (fast.PrefixTuningConfig, peft.PrefixTuningConfig)):
        ours, theirs = ours_cls(), theirs_cls()
        assert ours.to_json_dict().keys() == {k for k in theirs.to_dict()}
        for k, v in theirs.to_dict().items():
            if k != "peft_version":
                assert ours.to_json_dict()[k] == (v.value if hasattr(v, "value") else v), k
    model = quiet(fast.get_peft_model, tiny_t5(), fast.PromptTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                          num_virtual_tokens=4))
    assert model.peft_config["default"].num_transformer_submodules == 2
    assert model.get_prompt(batch_size=3).shape == (3, 8, 16)
    assert model.get_prompt_embedding_to_save("default").shape == (8, 16)
    with pytest.raises(TypeError, match="invalid PeftModel"):
        model.get_layer_status()


def test_inference_mode_config_counts_as_peft():
    """PEFT leaves an inference-mode prompt encoder's embedding trainable (get_peft_model); so does peftfast.
    from_pretrained(is_trainable=False) freezes it here (PEFT leaves it trainable)."""
    for method in ("prompt_tuning", "p_tuning_mlp"):
        configs = [METHODS[method](lib, "CAUSAL_LM") for lib in (peft, fast)]
        for c in configs:
            c.inference_mode = True
        theirs = quiet(peft.get_peft_model, tiny_llama(), configs[0])
        ours = quiet(fast.get_peft_model, tiny_llama(), configs[1])
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
        assert list(ours.state_dict()) == list(theirs.state_dict())
