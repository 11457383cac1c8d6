"""Tiny models and helpers shared by the checkpoint tests (interop, hardening, fuzz).

Builders seed torch themselves, so two calls give bit-identical base weights: a model saved from one
build and loaded onto another build must reproduce its outputs exactly. Sizes are odd on purpose.
``randomize_adapters`` gives every adapter tensor (LoRA A and B, embedding A and B, modules_to_save
copies) fresh random values, so an adapter visibly changes the outputs and a round trip that drops or
mixes up a tensor cannot pass.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

VOCAB = 53
HIDDEN = 24  # 4 heads of 6 (RoPE needs an even head size)
SEQ_LEN = 7


def tiny_llama(seed: int = 0, hidden: int = HIDDEN, layers: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 3,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=32, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, hidden: int = HIDDEN, layers: int = 2) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0, hidden: int = HIDDEN, layers: int = 2) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden + 3, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=3, pad_token_id=0)
    return BertForSequenceClassification(cfg).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def inputs(seed: int = 1, batch: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB, (batch, SEQ_LEN), generator=g)}


def randomize_adapters(model: nn.Module, seed: int = 2, std: float = 0.3) -> None:
    """Fresh random values (never zeros) for every adapter tensor and modules_to_save copy."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or ".modules_to_save." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**batch).logits.detach().clone()


def outputs_per_adapter(model: nn.Module, names: list[str], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        model.set_adapter(name)
        out[name] = logits(model, batch)
    return out


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Everything a failed load must leave as it was: the module tree and types, every tensor value, requires_grad
    and training flags, hooks, adapter configs, the active adapter and each adapter layer's bookkeeping."""
    layers = {}
    for name, m in model.named_modules():
        plain = {k: copy.deepcopy(v) for k, v in vars(m).items()
                 if not k.startswith("_") and isinstance(v, (dict, list, str, int, float, bool, type(None)))}
        plain["_active_adapter"] = copy.deepcopy(getattr(m, "_active_adapter", None))
        plain["_disable_adapters"] = getattr(m, "_disable_adapters", None)
        hooks = tuple(len(getattr(m, h)) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"))
        layers[name] = (type(m).__name__, m.training, hooks, plain)
    configs = None
    if isinstance(getattr(model, "peft_config", None), dict):
        configs = {k: copy.deepcopy(vars(c)) for k, c in model.peft_config.items()}
    return {
        "layers": layers,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "configs": configs,
        "attrs": sorted(vars(model)),
        "active": copy.deepcopy(getattr(model, "active_adapter", None)) if configs is not None else None,
        "model_config": copy.deepcopy(getattr(getattr(model, "config", None), "__dict__", None)),
    }


def assert_same_fingerprint(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["layers"].keys() == after["layers"].keys(), "module tree changed"
    for name, value in before["layers"].items():
        assert after["layers"][name] == value, f"module {name!r} changed: {value} -> {after['layers'][name]}"
    assert before["state"].keys() == after["state"].keys(), "state-dict keys changed"
    for key, tensor in before["state"].items():
        assert torch.equal(tensor, after["state"][key]), f"tensor {key} changed"
    for k in ("grad", "configs", "attrs", "active", "model_config"):
        assert before[k] == after[k], f"{k} changed"


def tree_files(root: str) -> set[str]:
    """Relative paths of every file under ``root``."""
    out = set()
    for here, _, files in os.walk(root):
        for f in files:
            out.add(os.path.relpath(os.path.join(here, f), root))
    return out
