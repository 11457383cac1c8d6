"""Tiny models for the LoRA tests, from ``peftfast.zoo``, and the table of families that drives them.

The builders are the zoo's with this suite's sizes (hidden 16, 2 layers, vocabulary 61, a
``_name_or_path`` per architecture); every builder seeds torch itself, so two calls give
bit-identical weights. Each ``Family`` bundles a builder with what the tests need to drive it: the
task type, the default LoRA targets, extra targets and names for the table-driven cases, and a
function making inputs (with labels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from peftfast import zoo
from peftfast.zoo import (  # the suite's input builders and custom nets are the zoo's (see __all__)
    VOCAB,
    TinyNet,
    WideNet,
    causal_inputs,
    net_inputs,
    qa_inputs,
    seq2seq_inputs,
    seq_cls_inputs,
    tiny_net,
    token_cls_inputs,
    wide_net,
)


# ------------------------------------------------------------------------------------------------------
# transformers models
# ------------------------------------------------------------------------------------------------------
def tiny_llama(seed: int = 0, hidden: int = 16, layers: int = 2):
    return zoo.llama(seed, hidden, layers, attention_bias=True, name_or_path="tiny/llama")


def tiny_gpt2(seed: int = 0, hidden: int = 16, layers: int = 2):
    return zoo.gpt2(seed, hidden, layers, name_or_path="tiny/gpt2")


def tiny_bert_seq_cls(seed: int = 0, hidden: int = 16, layers: int = 2):
    return zoo.bert_seq_cls(seed, hidden, layers, num_labels=3, name_or_path="tiny/bert")


def tiny_bert_token_cls(seed: int = 0, hidden: int = 16, layers: int = 2):
    return zoo.bert_token_cls(seed, hidden, layers, num_labels=5, name_or_path="tiny/bert")


def tiny_bert_qa(seed: int = 0, hidden: int = 16, layers: int = 2):
    return zoo.bert_qa(seed, hidden, layers, num_labels=2, name_or_path="tiny/bert")


def tiny_t5(seed: int = 0, hidden: int = 16, layers: int = 2):
    return zoo.t5(seed, hidden, layers, name_or_path="tiny/t5")


def model_output(out) -> torch.Tensor:
    """The main output tensor of a model call (logits, or start logits for QA, or a plain tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    return torch.cat([out.start_logits, out.end_logits], dim=-1)


def model_loss(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return (out.float() ** 2).mean()
    return out.loss


# ------------------------------------------------------------------------------------------------------
# the table of families
# ------------------------------------------------------------------------------------------------------
@dataclass
class Family:
    name: str
    build: Callable[..., nn.Module]
    inputs: Callable[..., dict]
    task_type: str | None
    targets: list[str]  # several linear layers in attention and MLP
    default_targets: list[str]  # what PEFT picks when target_modules is None
    fan_in_fan_out: bool = False
    bias_targets: list[str] = field(default_factory=list)  # targets whose base layer has a bias
    rank_pattern_key: str = ""  # a rank/alpha pattern key that matches a subset of targets
    exclude: list[str] = field(default_factory=list)  # exclude_modules that removes some targets
    regex: str = ""  # a full-match regex target
    layers_pattern: str = ""  # container of the numbered layers
    modules_to_save: list[str] = field(default_factory=list)
    embedding: str = ""  # name of the input embedding module


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "llama",
        tiny_llama,
        causal_inputs,
        "CAUSAL_LM",
        ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        ["q_proj", "v_proj"],
        bias_targets=["q_proj", "v_proj"],
        rank_pattern_key="model.layers.1.self_attn.q_proj",
        exclude=["model.layers.0.self_attn.o_proj"],
        regex=r".*layers\.1\.mlp\.(gate|up)_proj",
        layers_pattern="layers",
        modules_to_save=["lm_head"],
        embedding="embed_tokens",
    ),
    "gpt2": Family(
        "gpt2",
        tiny_gpt2,
        causal_inputs,
        "CAUSAL_LM",
        ["c_attn", "c_proj", "c_fc"],
        ["c_attn"],
        fan_in_fan_out=True,
        bias_targets=["c_attn"],
        rank_pattern_key="h.0.attn.c_attn",
        exclude=["mlp.c_proj"],
        regex=r".*h\.\d\.attn\.c_(attn|proj)",
        layers_pattern="h",
        modules_to_save=["ln_f"],
        embedding="wte",
    ),
    "bert": Family(
        "bert",
        tiny_bert_seq_cls,
        seq_cls_inputs,
        "SEQ_CLS",
        ["query", "value", "dense"],
        ["query", "value"],
        bias_targets=["query", "value"],
        rank_pattern_key="value",
        exclude=["attention.output.dense"],
        regex=r"bert\.encoder\.layer\.0\.attention\.self\.(query|key)",
        layers_pattern="layer",
        modules_to_save=["embeddings.LayerNorm"],
        embedding="word_embeddings",
    ),
    "bert_tok": Family(
        "bert_tok",
        tiny_bert_token_cls,
        token_cls_inputs,
        "TOKEN_CLS",
        ["query", "key", "value"],
        ["query", "value"],
        bias_targets=["query"],
        rank_pattern_key="query",
        exclude=["layer.1.attention.self.key"],
        regex=r".*\.(query|value)",
        layers_pattern="layer",
        modules_to_save=[],
        embedding="word_embeddings",
    ),
    "bert_qa": Family(
        "bert_qa",
        tiny_bert_qa,
        qa_inputs,
        "QUESTION_ANS",
        ["query", "value", "intermediate.dense"],
        ["query", "value"],
        bias_targets=["value"],
        rank_pattern_key="intermediate.dense",
        exclude=["layer.0.attention.self.value"],
        regex=r".*\.(query|key)",
        layers_pattern="layer",
        modules_to_save=[],
        embedding="word_embeddings",
    ),
    "t5": Family(
        "t5",
        tiny_t5,
        seq2seq_inputs,
        "SEQ_2_SEQ_LM",
        ["q", "k", "v", "o", "wi", "wo"],
        ["q", "v"],
        bias_targets=[],
        rank_pattern_key="decoder.block.1.layer.0.SelfAttention.q",
        exclude=["EncDecAttention.k"],
        regex=r"encoder\.block\.\d\.layer\.0\.SelfAttention\.[qv]",
        layers_pattern="block",
        modules_to_save=["final_layer_norm"],
        embedding="shared",
    ),
}

PARITY_FAMILIES = list(FAMILIES)
# The four architecture families of the issue; option-by-option cases run on these only.
MAIN_FAMILIES = ["llama", "gpt2", "bert", "t5"]


__all__ = [
    "FAMILIES", "MAIN_FAMILIES", "PARITY_FAMILIES", "VOCAB", "Family", "TinyNet", "WideNet", "causal_inputs",
    "model_loss", "model_output", "net_inputs", "qa_inputs", "seq2seq_inputs", "seq_cls_inputs", "tiny_bert_qa",
    "tiny_bert_seq_cls", "tiny_bert_token_cls", "tiny_gpt2", "tiny_llama", "tiny_net", "tiny_t5",
    "token_cls_inputs", "wide_net",
]
