"""Tiny models for the LoRA tests: transformers architectures built from configs, and small custom modules.

Every builder seeds torch itself, so two calls give bit-identical weights. Dropout is switched off in the
configs so that forward passes in train mode are deterministic and comparable across libraries.
Each ``Family`` bundles a builder with what the tests need to drive it: the task type, the default LoRA
targets, extra targets and names for the table-driven cases, and a function making inputs (with labels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

VOCAB = 61  # odd on purpose


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------------
# transformers models
# ------------------------------------------------------------------------------------------------------
def tiny_llama(seed: int = 0, hidden: int = 16, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 4,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        attention_bias=True,
        mlp_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg._name_or_path = "tiny/llama"
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, hidden: int = 16, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    _seeded(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=hidden,
        n_layer=layers,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg._name_or_path = "tiny/gpt2"
    return GPT2LMHeadModel(cfg).eval()


def _bert_config(num_labels: int = 3, hidden: int = 16, layers: int = 2):
    from transformers import BertConfig

    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden + 4,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
        num_labels=num_labels,
        pad_token_id=0,
    )
    cfg._name_or_path = "tiny/bert"
    return cfg


def tiny_bert_seq_cls(seed: int = 0, hidden: int = 16, layers: int = 2):
    from transformers import BertForSequenceClassification

    _seeded(seed)
    return BertForSequenceClassification(_bert_config(3, hidden, layers)).eval()


def tiny_bert_token_cls(seed: int = 0, hidden: int = 16, layers: int = 2):
    from transformers import BertForTokenClassification

    _seeded(seed)
    return BertForTokenClassification(_bert_config(5, hidden, layers)).eval()


def tiny_bert_qa(seed: int = 0, hidden: int = 16, layers: int = 2):
    from transformers import BertForQuestionAnswering

    _seeded(seed)
    return BertForQuestionAnswering(_bert_config(2, hidden, layers)).eval()


def tiny_t5(seed: int = 0, hidden: int = 16, layers: int = 2):
    from transformers import T5Config, T5ForConditionalGeneration

    _seeded(seed)
    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=hidden,
        d_kv=8,
        d_ff=2 * hidden + 4,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=2,
        dropout_rate=0.0,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    cfg._name_or_path = "tiny/t5"
    return T5ForConditionalGeneration(cfg).eval()


# ------------------------------------------------------------------------------------------------------
# custom modules
# ------------------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear (no bias) -> Conv1D (GPT-2 style) -> head; odd sizes."""

    def __init__(self, vocab: int = 37, dim: int = 12, hidden: int = 23, classes: int = 5) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(vocab, dim)
        self.lin0 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(hidden, dim, bias=False)
        self.conv = Conv1D(dim, dim)  # Conv1D(nf=out, nx=in); weight stored [in, out]
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        h = self.lin1(self.act(self.lin0(h)))
        h = self.conv(h)
        return self.head(h)


def tiny_net(seed: int = 0, **kwargs):
    _seeded(seed)
    net = TinyNet(**kwargs)
    with torch.no_grad():  # Conv1D initialises its bias to zero: give it a value so bias tests see it
        net.conv.bias.normal_(0, 0.1)
    return net.eval()


class WideNet(nn.Module):
    """One wide Linear and one Embedding: enough adapter entries to test initialisation distributions."""

    def __init__(self, d_in: int = 256, d_out: int = 192, vocab: int = 300, dim: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def wide_net(seed: int = 0):
    _seeded(seed)
    return WideNet().eval()


# ------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------
def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def causal_inputs(batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    ids = _ids(batch, seq, seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def seq_cls_inputs(batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    ids = _ids(batch, seq, seed)
    labels = torch.arange(batch) % 3
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def token_cls_inputs(batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    ids = _ids(batch, seq, seed)
    labels = (ids * 7) % 5
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def qa_inputs(batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    ids = _ids(batch, seq, seed)
    start = torch.arange(batch) % seq
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "start_positions": start,
        "end_positions": (start + 2).clamp(max=seq - 1),
    }


def seq2seq_inputs(batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    ids = _ids(batch, seq, seed)
    labels = _ids(batch, seq - 2, seed + 100)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def net_inputs(batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 37, (batch, seq), generator=g)}


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
