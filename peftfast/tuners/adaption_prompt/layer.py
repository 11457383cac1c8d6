"""AdaptedAttention: a Llama/Mistral-style attention module with LLaMA-Adapter's gated adaption prompt.

For the active adapter with prompt ``P`` [1, adapter_len, hidden] and gate ``g`` [1], and the attention's own
queries ``Q`` (q_proj of the hidden states, with the rotary position embedding applied, [batch, heads, seq, head_dim]):

    K_p = k_proj(P), V_p = v_proj(P)              (no rotary embedding: the prompt has no position)
    A   = g * softmax(Q K_p^T / sqrt(head_dim)) V_p   (K_p/V_p heads shared by each query group, as GQA does)
    out = o_proj(attention(Q, K, V) + A)

which is what PEFT 0.21's AdaptedAttention computes as ``o_proj(attention) + o_proj(A)`` (equal when o_proj has
no bias; with a bias PEFT adds it a second time, peftfast does not). The wrapped attention runs unchanged: its
q_proj output is picked up by a forward hook (no second q projection), and ``A`` is added to o_proj's input by a
pre-hook (one o_proj call); the prompt attention itself is one scaled_dot_product_attention call. Keys/values of
the prompt are not cached, so generation with the model's KV cache needs nothing more.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter_layers import AdapterLayer
from ...utils.errors import AdapterError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def prompt_attention(query: torch.Tensor, prompt: torch.Tensor, gate: torch.Tensor, k_proj: nn.Module,
                     v_proj: nn.Module, head_dim: int) -> torch.Tensor:
    """``gate * softmax(Q K_p^T / sqrt(head_dim)) V_p`` as [batch, seq, heads * head_dim] for rotated queries
    ``query`` [batch, heads, seq, head_dim] and the prompt [1, adapter_len, hidden]."""
    batch, heads, seq, _ = query.shape
    dtype = query.dtype
    keys = k_proj(prompt.to(k_proj.weight.dtype if k_proj.weight.is_floating_point() else dtype))
    values = v_proj(prompt.to(v_proj.weight.dtype if v_proj.weight.is_floating_point() else dtype))
    kv_heads = keys.shape[-1] // head_dim
    if kv_heads * head_dim != keys.shape[-1] or heads % kv_heads:
        raise ValueError(f"k_proj gives {keys.shape[-1]} features, not a multiple of head_dim={head_dim} that "
                         f"divides the {heads} query heads")
    length = prompt.shape[1]
    keys = keys.view(1, length, kv_heads, head_dim).transpose(1, 2).to(dtype)
    values = values.view(1, length, kv_heads, head_dim).transpose(1, 2).to(dtype)
    if kv_heads != heads:  # each key/value head serves heads // kv_heads consecutive query heads
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
        values = values.repeat_interleave(heads // kv_heads, dim=1)
    keys = keys.expand(batch, -1, -1, -1)
    values = values.expand(batch, -1, -1, -1)
    out = F.scaled_dot_product_attention(query, keys, values, scale=1.0 / math.sqrt(head_dim))
    out = gate.to(dtype) * out
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


class AdaptedAttention(nn.Module, AdapterLayer):
    """Wraps an attention module (``base_layer``) with one adaption prompt and gate per adapter; the active adapter,
    when this layer holds it, adds its gated prompt attention (see the module docstring). Only one adapter is
    active at a time, as in PEFT."""

    adapter_layer_names = ("adaption_prompt", "adaption_gate")
    other_param_names = ("adapter_len",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any) -> None:
        nn.Module.__init__(self)
        if isinstance(base_layer, AdaptedAttention):
            raise AdapterError("the attention module already holds adaption prompts; add adapters to it instead")
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(base_layer, name, None), nn.Module):
                raise ValueError(f"adaption prompts need a Llama/Mistral-style attention module with q_proj, k_proj, "
                                 f"v_proj and o_proj; {type(base_layer).__name__} has no {name}")
        self.base_layer = base_layer
        self.adaption_prompt = nn.ParameterDict({})
        self.adaption_gate = nn.ParameterDict({})
        self.adapter_len: dict[str, int] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    @property
    def head_dim(self) -> int:
        base = self.base_layer
        head_dim = getattr(base, "head_dim", None)
        if head_dim is None:
            cfg = base.config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return int(head_dim)

    def update_layer(self, adapter_name: str, config: Any) -> None:
        base = self.base_layer
        weight = base.q_proj.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        hidden = base.config.hidden_size
        # PEFT's draws, in its order: the prompt from a standard normal, the gate zero ("zero-init attention").
        self.adaption_prompt[adapter_name] = nn.Parameter(
            torch.empty(1, config.adapter_len, hidden, device=weight.device, dtype=dtype).normal_())
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, device=weight.device, dtype=dtype))
        self.adapter_len[adapter_name] = config.adapter_len
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _live_adapter(self) -> Optional[str]:
        if self._disable_adapters:
            return None
        for name in self.active_adapters:
            if name in self.adaption_prompt:
                return name
        return None

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise AdapterError("adaption prompts cannot be merged into the base weights (the prompt attention has its "
                           "own softmax); use unload() to remove them or keep the adapter unmerged")

    def unmerge(self) -> None:
        return None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter = self._live_adapter()
        base = self.base_layer
        if adapter is None:
            return base(*args, **kwargs)
        position_embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if position_embeddings is None:
            raise ValueError(f"{type(base).__name__} was called without position_embeddings (cos, sin); adaption "
                             "prompts need the rotary embedding of the queries, which the decoder layers of "
                             "transformers' Llama and Mistral pass")
        cos, sin = position_embeddings
        head_dim = self.head_dim
        prompt, gate = self.adaption_prompt[adapter], self.adaption_gate[adapter]
        captured: list[torch.Tensor] = []

        def grab_queries(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            captured.append(output)

        def add_prompt_attention(module: nn.Module, inputs: tuple) -> tuple:
            if len(captured) != 1:
                raise RuntimeError(f"expected one q_proj call per attention call, saw {len(captured)}")
            q = captured[0]
            query = q.view(*q.shape[:-1], -1, head_dim).transpose(1, 2)
            query = query * cos.unsqueeze(1) + rotate_half(query) * sin.unsqueeze(1)
            extra = prompt_attention(query, prompt, gate, base.k_proj, base.v_proj, head_dim)
            x = inputs[0]
            return (x + extra.to(x.dtype),) + tuple(inputs[1:])

        q_hook = base.q_proj.register_forward_hook(grab_queries)
        o_hook = base.o_proj.register_forward_pre_hook(add_prompt_attention)
        try:
            return base(*args, **kwargs)
        finally:
            q_hook.remove()
            o_hook.remove()
