"""Tiny models (``peftfast.zoo``'s, at this suite's sizes) and helpers shared by the checkpoint tests
(interop, hardening, fuzz).

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

from peftfast import zoo

VOCAB = 53
HIDDEN = 24  # 4 heads of 6 (RoPE needs an even head size)
SEQ_LEN = 7


def tiny_llama(seed: int = 0, hidden: int = HIDDEN, layers: int = 2) -> nn.Module:
    return zoo.llama(seed, hidden, layers, VOCAB, heads=4, kv_heads=2, intermediate=2 * hidden + 3,
                     max_positions=32)


def tiny_gpt2(seed: int = 0, hidden: int = HIDDEN, layers: int = 2) -> nn.Module:
    return zoo.gpt2(seed, hidden, layers, VOCAB, heads=4, max_positions=32)


def tiny_bert(seed: int = 0, hidden: int = HIDDEN, layers: int = 2) -> nn.Module:
    return zoo.bert_seq_cls(seed, hidden, layers, VOCAB, num_labels=3, heads=4, intermediate=2 * hidden + 3,
                            max_positions=32, classifier_dropout=None)


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def inputs(seed: int = 1, batch: int = 3) -> dict[str, torch.Tensor]:
    return {"input_ids": zoo.token_ids(batch, SEQ_LEN, seed, VOCAB)}


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
