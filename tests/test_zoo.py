"""peftfast.zoo: one place that builds the tiny models of the tests, the demo and the benchmarks."""

from __future__ import annotations

import inspect

import pytest
import torch

from peftfast import zoo

BUILDERS = [zoo.llama, zoo.gpt2, zoo.bert_seq_cls, zoo.bert_token_cls, zoo.bert_qa, zoo.t5]


@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
def test_builders_take_seed_hidden_layers_vocab_and_are_reproducible(build):
    assert list(inspect.signature(build).parameters)[:4] == ["seed", "hidden", "layers", "vocab"]
    a, b, c = build(seed=3, hidden=24, layers=3, vocab=41), build(3, 24, 3, 41), build(4, 24, 3, 41)
    assert not a.training
    assert a.config.vocab_size == 41
    for (name, x), (_, y), (_, z) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(x, y), name
    assert any(not torch.equal(x, z) for x, z in zip(a.state_dict().values(), c.state_dict().values()))


def test_options_reach_the_config():
    model = zoo.llama(0, 24, 2, 53, heads=4, kv_heads=2, intermediate=51, name_or_path="tiny/x")
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 51)
    assert cfg._name_or_path == "tiny/x" and len(model.model.layers) == 2


def test_inputs_leave_the_global_generator_alone():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    for make in (zoo.causal_inputs, zoo.seq_cls_inputs, zoo.token_cls_inputs, zoo.qa_inputs, zoo.seq2seq_inputs,
                 zoo.net_inputs):
        batch = make(batch=2, seq=7, seed=5)
        assert batch["input_ids"].shape == (2, 7)
    assert torch.equal(torch.rand(3), expected)
    ids = zoo.token_ids(4, 9, seed=2, vocab=20)
    assert ids.min() >= 3 and ids.max() < 20 and torch.equal(ids, zoo.token_ids(4, 9, seed=2, vocab=20))


def test_custom_nets_run_on_their_inputs():
    assert zoo.tiny_net()(**zoo.net_inputs()).shape == (2, 7, 5)
    assert zoo.wide_net()(torch.randn(2, 256)).shape == (2, 192)
