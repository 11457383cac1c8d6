"""Activation memory of a LoRA training step, measured against PEFT on the same model."""
import copy

import pytest
import torch

import peftfast
from peftfast import zoo
from peftfast.tools.memory import measure_saved_bytes

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _llama():
    return zoo.llama(0, 48, 2, 97, heads=4, kv_heads=2, intermediate=80, pad=None).train()


def _saved(lib, base, dropout):
    cfg = lib.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = lib.get_peft_model(copy.deepcopy(base), cfg)
    model.train()
    ids = torch.randint(0, 97, (3, 29))
    return measure_saved_bytes(model, lambda: model(input_ids=ids, labels=ids).loss)


def test_dropout_costs_no_activation_memory_vs_peft():
    base = _llama()
    ours = _saved(peftfast, base, 0.1)
    peft_no_dropout = _saved(peft, base, 0.0)
    peft_dropout = _saved(peft, base, 0.1)
    # The claim: with dropout, peftfast keeps no more than PEFT keeps without dropout.
    assert ours.total <= peft_no_dropout.total, (ours.as_row(), peft_no_dropout.as_row())
    assert ours.bool_bytes == 0
    # And the measurement can tell the difference: PEFT's dropout really costs a mask and a dropped copy of x
    # per layer (on CPU, ATen keeps the mask as a float tensor, so this shows in the total, not in bool bytes).
    assert peft_dropout.total > peft_no_dropout.total


def test_measure_counts_a_known_saved_tensor():
    lin = torch.nn.Linear(7, 5)
    x = torch.randn(11, 7, requires_grad=True)
    got = measure_saved_bytes(lin, lambda: torch.relu(lin(x)).sum())
    # linear saves x (11*7 fp32); relu saves its output (11*5 fp32); weights are excluded.
    assert got.total == 11 * 7 * 4 + 11 * 5 * 4
