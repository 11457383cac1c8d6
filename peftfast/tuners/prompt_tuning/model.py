"""PromptEmbedding: the trained virtual-token embeddings of prompt tuning."""
from __future__ import annotations

import math

import torch
from torch import nn

from ...config import ConfigError
from .config import PromptTuningInit


def init_token_ids(config, vocab_size: int, total: int) -> list[int] | torch.Tensor | None:
    """The token ids whose embeddings start the prompt: a text's ids repeated or cut to ``total`` (TEXT), ``total``
    ids drawn uniformly from the vocabulary with torch's generator (SAMPLE_VOCAB), or None (RANDOM)."""
    if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
        return torch.randint(0, vocab_size, (total,), dtype=torch.long)
    if config.prompt_tuning_init != PromptTuningInit.TEXT:
        return None
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # never run code from a tokenizer folder named in a config file
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} gives no tokens with the "
                          f"tokenizer {config.tokenizer_name_or_path!r}; give a non-empty text")
    ids = (ids * math.ceil(total / len(ids)))[:total]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ConfigError(f"the tokenizer {config.tokenizer_name_or_path!r} gives token ids {bad[:3]} outside the "
                          f"model's vocabulary of {vocab_size}; use the model's own tokenizer")
    return ids


class PromptEmbedding(nn.Module):
    """``embedding``: an ``nn.Embedding`` of ``num_virtual_tokens * num_transformer_submodules`` rows of
    ``token_dim``; forward(indices [B, T]) -> [B, T, token_dim]. Text and vocabulary initialisation copy rows of the
    model's word embeddings (as float32), and are skipped in inference mode (weights come from a checkpoint)."""

    def __init__(self, config, word_embeddings: nn.Module) -> None:
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.inference_mode:
            return
        ids = init_token_ids(config, word_embeddings.num_embeddings, total)
        if ids is not None:
            ids = torch.as_tensor(ids, dtype=torch.long, device=word_embeddings.weight.device)
            with torch.no_grad():
                rows = word_embeddings(ids).detach().clone().to(torch.float32)
            self.embedding.weight = nn.Parameter(rows)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)
