"""PromptEncoder (P-tuning): virtual-token embeddings reparameterised by an MLP or a bidirectional LSTM + MLP."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .config import PromptEncoderConfig, PromptEncoderReparameterizationType


class PromptEncoder(nn.Module):
    """forward(indices [B, T]) -> [B, T, token_dim].

    MLP: ``mlp_head`` = Linear(d, h), ReLU, Linear(h, h), ReLU, Linear(h, d) on the embeddings.
    LSTM: ``lstm_head`` (bidirectional, ``encoder_num_layers`` layers, hidden h) then ``mlp_head`` = Linear(2h, 2h),
    ReLU, Linear(2h, d). In inference mode only ``embedding`` exists: it holds the encoder's output, which is what a
    checkpoint stores (``prompt_embeddings``).
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.token_dim = config.token_dim
        self.input_size = self.token_dim
        self.output_size = self.token_dim
        self.hidden_size = config.encoder_hidden_size
        self.total_virtual_tokens = config.num_virtual_tokens * config.num_transformer_submodules
        self.encoder_type = PromptEncoderReparameterizationType(config.encoder_reparameterization_type)
        self.embedding = nn.Embedding(self.total_virtual_tokens, self.token_dim)
        if config.inference_mode:
            return
        h = self.hidden_size
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(input_size=self.input_size, hidden_size=h, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, self.output_size))
        else:
            if config.encoder_num_layers != PromptEncoderConfig.encoder_num_layers:
                warnings.warn(f"for {self.encoder_type.value}, the argument `encoder_num_layers` is ignored. Exactly "
                              f"{PromptEncoderConfig.encoder_num_layers} MLP layers are used.")
            self.mlp_head = nn.Sequential(nn.Linear(self.input_size, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                          nn.Linear(h, self.output_size))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.embedding(indices)
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)
