"""PrefixEncoder: the trained keys and values of prefix tuning, flattened per virtual token."""
from __future__ import annotations

import torch
from torch import nn


class PrefixEncoder(nn.Module):
    """forward(prefix [B, T]) -> [B, T, num_layers * 2 * token_dim]: for every layer a key and a value row per virtual
    token (``token_dim`` = heads * head_dim of the key/value projections).

    Without ``prefix_projection`` the rows are ``embedding`` itself; with it, ``transform`` (Linear(d, h), Tanh,
    Linear(h, 2 L d)) maps ``embedding`` [T, d] to them. In inference mode ``embedding`` holds the rows (what a
    checkpoint stores as ``prompt_embeddings``).
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.prefix_projection = config.prefix_projection
        d, layers = config.token_dim, config.num_layers
        width = layers * 2 * d
        zero = config.init_weights == "zero"
        if self.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(config.num_virtual_tokens, d)
            self.transform = nn.Sequential(nn.Linear(d, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, width))
            if zero:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            if zero:
                nn.init.zeros_(self.embedding.weight)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding(prefix))
        return self.embedding(prefix)
