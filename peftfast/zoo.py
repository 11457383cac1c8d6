"""Tiny models for tests, the demo and benchmarks: transformers architectures built from configs,
two small custom networks, and the inputs that drive them.

Every builder takes ``(seed, hidden, layers, vocab)`` first, seeds torch itself right before the
model is constructed (two calls give bit-identical weights), and returns the model in eval mode.
Architecture details that differ between users (heads, feed-forward width, special tokens, a
``_name_or_path``) are keyword options with the values most tests use; a config is built from
exactly the values passed, so two callers asking for the same options get the same model.

Dropout is off everywhere, so a forward pass in train mode is deterministic and comparable
across libraries. Input builders use their own ``torch.Generator`` and never touch the global
random state.

    llama(), gpt2(), bert_seq_cls(), bert_token_cls(), bert_qa(), t5()     transformers models
    llama_config(), gpt2_config(), bert_config(), t5_config()               their configs
    tiny_net(), wide_net() (TinyNet, WideNet)                               custom nn.Modules
    token_ids(), causal_inputs(), seq_cls_inputs(), token_cls_inputs(),
    qa_inputs(), seq2seq_inputs(), net_inputs()                             inputs (with labels)
    random_biases()                                                         non-zero biases
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

VOCAB = 61  # odd on purpose
NET_VOCAB = 37  # TinyNet's embedding size


# ------------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------------
def _named(cfg: Any, name_or_path: Optional[str]) -> Any:
    if name_or_path is not None:
        cfg._name_or_path = name_or_path
    return cfg


def llama_config(hidden: int = 16, layers: int = 2, vocab: int = VOCAB, *, heads: int = 2, kv_heads: int = 1,
                 intermediate: Optional[int] = None, max_positions: int = 64, attention_bias: bool = False,
                 tie_word_embeddings: bool = False, pad: Optional[int] = 0, bos: Optional[int] = 1,
                 eos: Optional[int] = 2, name_or_path: Optional[str] = None):
    """A Llama config; ``intermediate`` defaults to ``2 * hidden + 4``."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 4 if intermediate is None else intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        attention_bias=attention_bias,
        mlp_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    return _named(cfg, name_or_path)


def gpt2_config(hidden: int = 16, layers: int = 2, vocab: int = VOCAB, *, heads: int = 2, max_positions: int = 64,
                pad: Optional[int] = 0, bos: int = 1, eos: int = 2, name_or_path: Optional[str] = None):
    from transformers import GPT2Config

    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=pad, bos_token_id=bos,
                     eos_token_id=eos)
    return _named(cfg, name_or_path)


def bert_config(hidden: int = 16, layers: int = 2, vocab: int = VOCAB, *, num_labels: int = 3, heads: int = 2,
                intermediate: Optional[int] = None, max_positions: int = 64,
                classifier_dropout: Optional[float] = 0.0, pad: int = 0, name_or_path: Optional[str] = None):
    """A BERT config; ``intermediate`` defaults to ``2 * hidden + 4``."""
    from transformers import BertConfig

    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden + 4 if intermediate is None else intermediate,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=classifier_dropout,
        num_labels=num_labels,
        pad_token_id=pad,
    )
    return _named(cfg, name_or_path)


def t5_config(hidden: int = 16, layers: int = 2, vocab: int = VOCAB, *, heads: int = 2, d_kv: int = 8,
              intermediate: Optional[int] = None, name_or_path: Optional[str] = None):
    """A T5 config (as many decoder as encoder layers); ``intermediate`` defaults to ``2 * hidden + 4``."""
    from transformers import T5Config

    cfg = T5Config(
        vocab_size=vocab,
        d_model=hidden,
        d_kv=d_kv,
        d_ff=2 * hidden + 4 if intermediate is None else intermediate,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        dropout_rate=0.0,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return _named(cfg, name_or_path)


# ------------------------------------------------------------------------------------------------------
# transformers models
# ------------------------------------------------------------------------------------------------------
def llama(seed: int = 0, hidden: int = 16, layers: int = 2, vocab: int = VOCAB, **options: Any):
    """LlamaForCausalLM; ``options`` as in ``llama_config``."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(hidden, layers, vocab, **options)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def gpt2(seed: int = 0, hidden: int = 16, layers: int = 2, vocab: int = VOCAB, **options: Any):
    """GPT2LMHeadModel (Conv1D projections); ``options`` as in ``gpt2_config``."""
    from transformers import GPT2LMHeadModel

    cfg = gpt2_config(hidden, layers, vocab, **options)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).eval()


def bert_seq_cls(seed: int = 0, hidden: int = 16, layers: int = 2, vocab: int = VOCAB, **options: Any):
    """BertForSequenceClassification (3 labels unless ``num_labels``); ``options`` as in ``bert_config``."""
    from transformers import BertForSequenceClassification

    cfg = bert_config(hidden, layers, vocab, **options)
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).eval()


def bert_token_cls(seed: int = 0, hidden: int = 16, layers: int = 2, vocab: int = VOCAB, **options: Any):
    """BertForTokenClassification (5 labels unless ``num_labels``)."""
    from transformers import BertForTokenClassification

    cfg = bert_config(hidden, layers, vocab, **{"num_labels": 5, **options})
    torch.manual_seed(seed)
    return BertForTokenClassification(cfg).eval()


def bert_qa(seed: int = 0, hidden: int = 16, layers: int = 2, vocab: int = VOCAB, **options: Any):
    """BertForQuestionAnswering (start and end logits)."""
    from transformers import BertForQuestionAnswering

    cfg = bert_config(hidden, layers, vocab, **{"num_labels": 2, **options})
    torch.manual_seed(seed)
    return BertForQuestionAnswering(cfg).eval()


def t5(seed: int = 0, hidden: int = 16, layers: int = 2, vocab: int = VOCAB, **options: Any):
    """T5ForConditionalGeneration; ``options`` as in ``t5_config``."""
    from transformers import T5ForConditionalGeneration

    cfg = t5_config(hidden, layers, vocab, **options)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(cfg).eval()


def random_biases(model: nn.Module, std: float = 0.1) -> nn.Module:
    """transformers initialises biases to zero; give every ``*.bias`` values (from the global generator, in
    parameter order) so that bias handling is exercised."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, std)
    return model


# ------------------------------------------------------------------------------------------------------
# custom modules
# ------------------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear (no bias) -> Conv1D (GPT-2 style) -> head; odd sizes."""

    def __init__(self, vocab: int = NET_VOCAB, dim: int = 12, hidden: int = 23, classes: int = 5) -> None:
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


def tiny_net(seed: int = 0, **kwargs: Any) -> TinyNet:
    """TinyNet with a non-zero Conv1D bias (Conv1D initialises it to zero)."""
    torch.manual_seed(seed)
    net = TinyNet(**kwargs)
    with torch.no_grad():
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


def wide_net(seed: int = 0) -> WideNet:
    torch.manual_seed(seed)
    return WideNet().eval()


# ------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------
def token_ids(batch: int = 2, seq: int = 7, seed: int = 1, vocab: int = VOCAB, low: int = 3) -> torch.Tensor:
    """[batch, seq] ids in [low, vocab) (below 3: pad/bos/eos), from their own generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (batch, seq), generator=g)


def causal_inputs(batch: int = 2, seq: int = 7, seed: int = 1, vocab: int = VOCAB) -> dict:
    ids = token_ids(batch, seq, seed, vocab)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def seq_cls_inputs(batch: int = 2, seq: int = 7, seed: int = 1, vocab: int = VOCAB) -> dict:
    ids = token_ids(batch, seq, seed, vocab)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(batch) % 3}


def token_cls_inputs(batch: int = 2, seq: int = 7, seed: int = 1, vocab: int = VOCAB) -> dict:
    ids = token_ids(batch, seq, seed, vocab)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids * 7) % 5}


def qa_inputs(batch: int = 2, seq: int = 7, seed: int = 1, vocab: int = VOCAB) -> dict:
    ids = token_ids(batch, seq, seed, vocab)
    start = torch.arange(batch) % seq
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "start_positions": start,
        "end_positions": (start + 2).clamp(max=seq - 1),
    }


def seq2seq_inputs(batch: int = 2, seq: int = 7, seed: int = 1, vocab: int = VOCAB) -> dict:
    ids = token_ids(batch, seq, seed, vocab)
    labels = token_ids(batch, seq - 2, seed + 100, vocab)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def net_inputs(batch: int = 2, seq: int = 7, seed: int = 1) -> dict:
    """Inputs for TinyNet: ids over its whole embedding (from 0)."""
    return {"input_ids": token_ids(batch, seq, seed, NET_VOCAB, low=0)}
