"""Batched ``generate`` with left padding for prompt tuning, P-tuning and prefix tuning: each row of a padded
batch of prompts of different lengths generates exactly the tokens of greedy decoding by repeated forward passes on
that prompt alone, unpadded (the defining math; PEFT 0.21.2's cached prompt generate is broken on transformers 5,
see README)."""
from __future__ import annotations

import warnings

import pytest
import torch

import peftfast as fast
from tests._models import tiny_gpt2, tiny_llama


def sharp(build, seed: int = 0):
    """Projections large enough that a few virtual tokens change the greedy tokens."""
    model = build(seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


CONFIGS = {
    "prompt_tuning": lambda: fast.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "p_tuning": lambda: fast.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=10),
    "prefix_tuning": lambda: fast.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix_projection": lambda: fast.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                         prefix_projection=True, encoder_hidden_size=12),
}


def greedy_alone(model, ids, steps):
    seq = ids[None]
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[0, ids.shape[0]:]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_left_padded_batch_generate_equals_each_prompt_alone(build, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fast.get_peft_model(sharp(build), CONFIGS[method]()).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # fresh adapter weights, not the init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    vocab = model.get_base_model().config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=g) for n in (6, 3, 5)]
    pad = 0
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), torch.ones_like(p)])
                        for p in prompts])
    steps = 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                             pad_token_id=pad)
    new = out[:, width:]
    expected = [greedy_alone(model, p, steps) for p in prompts]
    for row, (got, want) in enumerate(zip(new, expected)):
        assert torch.equal(got, want), (method, row, got.tolist(), want.tolist())
    with model.disable_adapter():  # the adapter matters for these tokens
        plain = [greedy_alone(model.get_base_model(), p, steps) for p in prompts]
    assert any(not torch.equal(a, b) for a, b in zip(expected, plain)), method


def sequence_logprob(model, prompt, new):
    """log p(new | prompt) under the model's forward (the prefix included), summed over the new tokens."""
    seq = torch.cat([prompt, new])[None]
    with torch.no_grad():
        logp = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0].log_softmax(-1)
    n = prompt.shape[0]
    return sum(logp[n - 1 + i, t].item() for i, t in enumerate(new.tolist()))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prefix_tuning", "prefix_projection"])
def test_prefix_beam_search_scores_are_the_forward_log_probs(build, method):
    """num_beams > 1: the cache rows holding the prefix are expanded and reordered with the beams. Each returned
    beam's score (length_penalty 0: the sum of its tokens' log-probs) is the log-prob the forward pass gives it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fast.get_peft_model(sharp(build), CONFIGS[method]()).eval()
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    vocab = model.get_base_model().config.vocab_size
    ids = torch.randint(3, vocab, (2, 4), generator=g)
    steps, beams = 4, 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                             min_new_tokens=steps, num_beams=beams, num_return_sequences=beams, do_sample=False,
                             length_penalty=0.0, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    assert out.sequences.shape == (2 * beams, 4 + steps)
    for row in range(2 * beams):
        prompt, new = ids[row // beams], out.sequences[row, 4:]
        want = sequence_logprob(model, prompt, new)
        assert abs(out.sequences_scores[row].item() - want) < 1e-4 * max(1.0, abs(want)), (row, want)
    for b in range(2):
        rows = out.sequences[b * beams:(b + 1) * beams, 4:]
        assert len({tuple(r.tolist()) for r in rows}) == beams
        greedy = greedy_alone(model, ids[b], steps)
        # the best beam is at least as likely as the greedy sequence
        assert out.sequences_scores[b * beams].item() >= sequence_logprob(model, ids[b], greedy) - 1e-4
