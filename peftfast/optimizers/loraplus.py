"""LoRA+ (Hayou et al., 2024, arXiv:2402.12354): the B factors learn ``loraplus_lr_ratio`` times faster than the A factors.

``create_loraplus_optimizer(model, optimizer_cls, lr=..., loraplus_lr_ratio=..., **kwargs)`` builds ``optimizer_cls``
over the model's trainable parameters in four groups, PEFT's layout (so optimizer state dicts line up with PEFT's):

0. A factors and every other trainable matrix: ``lr``, ``loraplus_weight_decay``;
1. parameters of LoRA adapters on embeddings: ``loraplus_lr_embedding`` (default 1e-6), ``loraplus_weight_decay``;
2. B factors and trainable vectors that take weight decay: ``lr * loraplus_lr_ratio``, ``loraplus_weight_decay``;
3. B factors and vectors without weight decay (biases, normalisation weights): ``lr * loraplus_lr_ratio``, 0.

Other keyword arguments go to ``optimizer_cls``. For bitsandbytes' 8-bit Adam variants, ``nn.Embedding`` weights are
kept in 32-bit optimizer state, as bitsandbytes recommends.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

_EIGHT_BIT_ADAMS = {"Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit"}


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that take no weight decay: biases, and everything inside a normalisation layer."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

    norms = tuple(ALL_LAYERNORM_LAYERS)
    out = set()
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if isinstance(module, norms) or "bias" in full:
                out.add(full)
    return out


def _owner(model: nn.Module, name: str) -> Any:
    """The module two levels above a parameter (``<layer>.lora_embedding_A.<adapter>``: the adapter layer)."""
    parts = name.split(".")[:-2]
    module = model
    for part in parts:
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if parts else None


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, **kwargs: Any) -> Optimizer:
    """An ``optimizer_cls`` whose LoRA B factors use ``lr * loraplus_lr_ratio`` (see the module docstring)."""
    from ..tuners.lora.layer import Embedding as LoraEmbedding

    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    no_decay = _no_decay_names(model)
    a_like, embedding, b_decay, b_no_decay = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if isinstance(_owner(model, name), LoraEmbedding):
            embedding.append(param)
        elif "lora_B" in name or param.ndim == 1:
            (b_no_decay if name in no_decay else b_decay).append(param)
        else:
            a_like.append(param)
    groups = [
        {"params": a_like, "weight_decay": weight_decay, "lr": lr},
        {"params": embedding, "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": b_decay, "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": b_no_decay, "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]
    optimizer = optimizer_cls(groups, lr=lr, **kwargs)
    if optimizer_cls.__name__ in _EIGHT_BIT_ADAMS:
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
