"""Prompt learning on PeftModel's seam: prompt tuning and P-tuning (virtual tokens in front of the input embeddings)
and prefix tuning (trained keys/values in front of every attention layer's own, as a prefilled cache).

These methods inject no layers. ``PeftModel.base_model`` is the user's model itself, the trained encoders sit in
``peft_model.prompt_encoder[adapter_name]`` and the task wrappers hand their calls to ``PromptLearningHandler``
(registered per method with ``register_prompt_learning_handler``). Each method package passes its encoder class.

Shapes: B batch, L input tokens, n = num_virtual_tokens, d = token_dim, S = num_transformer_submodules,
N layers, H key/value heads, D = d // H.

- prompt tuning / P-tuning: prompts [B, n, d] (from the encoder's S*n rows; seq2seq uses the first n, for the
  encoder) are concatenated before the token embeddings [B, L, d]; the attention mask gets n ones in front, causal-LM
  and token-classification labels n entries of -100.
- prefix tuning: the encoder's rows [n, N*2*d] are viewed as N layers of key and value [B, H, n, D] and handed to the
  model as a ``DynamicCache`` holding them (transformers 5's ``cache`` argument), so the model's own attention
  (SDPA) reads them like cached tokens; positions start at n, the attention mask gets n ones in front.

``generate`` runs the base model's ``generate``: prompt methods pass the input ids (so the output holds them, as
PEFT's does) together with ``inputs_embeds`` that already hold the virtual tokens; prefix tuning passes the prefilled
cache. Either way the virtual tokens enter the cache once, at the first step.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..utils.errors import ConfigError
from ..utils.other import ModulesToSaveWrapper, get_submodules
from ..utils.peft_types import PeftType, TaskType

PREFIX_TYPES = (PeftType.PREFIX_TUNING,)


# ----------------------------------------------------------------------------------------------------------------
# config and model inspection
# ----------------------------------------------------------------------------------------------------------------
def _model_config_dict(model_config: Any) -> dict:
    if model_config is None:
        return {}
    d = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    return d.get("text_config") or d


def prepare_prompt_learning_config(config: Any, model_config: Any) -> Any:
    """Fill ``num_layers``, ``token_dim``, ``num_attention_heads`` (and ``encoder_hidden_size``) from the model's
    config where the adapter config leaves them None, by PEFT's rules: prefix tuning on a grouped-query model uses
    the key/value heads (token_dim = head_dim * num_key_value_heads)."""
    d = _model_config_dict(model_config)

    def first(*names: str, what: str) -> Any:
        for obj in (model_config,):
            for n in names:
                if n == "num_hidden_layers" and getattr(obj, n, None) is not None:
                    return getattr(obj, n)
        for n in names:
            if d.get(n) is not None:
                return d[n]
        raise ConfigError(f"Please specify `{what}` in `peft_config`: the model's config has none of "
                          f"{', '.join(names)}")

    if config.num_layers is None:
        config.num_layers = first("num_hidden_layers", "num_layers", "n_layer", what="num_layers")
    if config.token_dim is None:
        config.token_dim = first("hidden_size", "n_embd", "d_model", what="token_dim")
    if config.num_attention_heads is None:
        config.num_attention_heads = first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads",
                                           what="num_attention_heads")
    if PeftType(config.peft_type) in PREFIX_TYPES and "num_key_value_heads" in d:
        head_dim = d.get("head_dim") or config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * d["num_key_value_heads"]
        config.num_attention_heads = d["num_key_value_heads"]
    if getattr(config, "encoder_hidden_size", None) is None:  # set on every prompt config, as PEFT does
        config.encoder_hidden_size = config.token_dim
    return config


def check_prompt_config(config: Any) -> None:
    """Sizes that must be positive integers (a config file can carry anything)."""
    for name in ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
        value = getattr(config, name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if config.num_virtual_tokens is None:
        raise ConfigError("num_virtual_tokens must be set (a positive integer) for prompt learning")
    if config.num_transformer_submodules not in (1, 2):
        raise ConfigError(f"num_transformer_submodules must be 1 or 2, got {config.num_transformer_submodules!r}")
    hidden = getattr(config, "encoder_hidden_size", None)
    if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
        raise ConfigError(f"encoder_hidden_size must be a positive integer, got {hidden!r}")


def find_backbone(model: nn.Module) -> tuple[Optional[str], nn.Module]:
    """(name, module) of the first child that is a transformers PreTrainedModel (PEFT's transformer_backbone)."""
    for name, child in model.named_children():
        if any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
               for c in type(child).__mro__):
            return name, child
    return None, model


def find_word_embeddings(model: nn.Module, backbone: nn.Module) -> nn.Module:
    """The model's token embedding: ``embeddings.word_embeddings`` (BERT-style), else the first parameter of the
    backbone with a row per vocabulary entry (PEFT's rule)."""
    try:
        return model.get_submodule("embeddings.word_embeddings")
    except AttributeError:
        pass
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is not None:
        for name, p in backbone.named_parameters():
            if p.shape[0] == vocab:
                return backbone.get_submodule(name.rsplit(".", 1)[0]) if "." in name else backbone
    raise ConfigError(f"prompt learning needs the model's word embeddings; none found in {type(model).__name__} "
                      "(no embeddings.word_embeddings and no parameter with vocab_size rows)")


def check_fits_model(config: Any, model: nn.Module, word_embeddings: nn.Module) -> None:
    """Refuse a config whose sizes do not fit this model (e.g. a checkpoint saved for another base model)."""
    peft_type = PeftType(config.peft_type)
    if peft_type in PREFIX_TYPES:
        if config.token_dim % config.num_attention_heads:
            raise ConfigError(f"prefix tuning: token_dim {config.token_dim} is not divisible by num_attention_heads "
                              f"{config.num_attention_heads}")
        d = _model_config_dict(getattr(model, "config", None))
        heads = d.get("num_key_value_heads") or d.get("num_attention_heads") or d.get("n_head") or d.get("num_heads")
        layers = d.get("num_hidden_layers") or d.get("num_layers") or d.get("n_layer")
        hidden = d.get("hidden_size") or d.get("n_embd") or d.get("d_model")
        head_dim = d.get("head_dim") or d.get("d_kv") or (hidden // d.get("num_attention_heads", d.get("n_head",
                                                                                                    d.get("num_heads", 1)))
                                                          if hidden else None)
        if heads and head_dim and config.token_dim != heads * head_dim:
            raise ConfigError(f"prefix tuning: token_dim {config.token_dim} does not fit {type(model).__name__}, whose "
                              f"attention keys/values have {heads} heads of {head_dim} ({heads * head_dim}); was the "
                              "adapter made for another model?")
        if layers and config.num_layers != layers:
            raise ConfigError(f"prefix tuning: num_layers {config.num_layers} does not fit {type(model).__name__}, "
                              f"which has {layers} layers; was the adapter made for another model?")
        return
    width = getattr(word_embeddings, "embedding_dim", None) or word_embeddings.weight.shape[-1]
    if config.token_dim != width:
        raise ConfigError(f"{peft_type.value}: token_dim {config.token_dim} does not fit {type(model).__name__}, whose "
                          f"word embeddings have {width} dimensions; was the adapter made for another model?")


def _is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def check_task_fits_model(config: Any, task: Any, model: nn.Module) -> None:
    task = TaskType(task) if task is not None else None
    if task == TaskType.SEQ_2_SEQ_LM and not _is_seq2seq(model):
        raise ConfigError(f"a SEQ_2_SEQ_LM prompt adapter needs an encoder-decoder model; {type(model).__name__} is "
                          "not one")
    if task in (TaskType.CAUSAL_LM,) and _is_seq2seq(model) and PeftType(config.peft_type) not in PREFIX_TYPES:
        raise ConfigError(f"a CAUSAL_LM prompt adapter puts virtual tokens before the decoder's input; "
                          f"{type(model).__name__} is an encoder-decoder model: use task_type SEQ_2_SEQ_LM")


# ----------------------------------------------------------------------------------------------------------------
# adapters on the PeftModel
# ----------------------------------------------------------------------------------------------------------------
def set_head_modules(model: nn.Module, config: Any, adapter_name: str, active: bool) -> list[tuple]:
    """Wrap the ``modules_to_save`` children of ``model`` (classifier heads) in ModulesToSaveWrapper, PEFT's way for
    prompt learning (a module whose name ends with an entry). Returns undo records: (parent, name, old module) for a
    new wrapper, (wrapper, None, adapter name) for an added copy."""
    names = list(getattr(config, "modules_to_save", None) or [])
    records: list[tuple] = []
    if not names:
        return records
    for key, module in list(model.named_modules()):
        if not key or any(p in ("modules_to_save", "original_module") for p in key.split(".")):
            continue
        if not any(key.endswith(n) for n in names):  # a plain suffix, as PEFT matches it
            continue
        parent, target, attr = get_submodules(model, key)
        if isinstance(target, ModulesToSaveWrapper):
            if adapter_name not in target.modules_to_save:
                target.update(adapter_name)
                records.append((target, None, adapter_name))
            if active:
                target.set_adapter(adapter_name, inference_mode=config.inference_mode)
            continue
        wrapper = ModulesToSaveWrapper(target, adapter_name)
        if not active:
            wrapper.set_adapter([])
        elif config.inference_mode:
            wrapper.set_adapter(adapter_name, inference_mode=True)
        setattr(parent, attr, wrapper)
        records.append((parent, attr, target))
    return records


def head_wrappers(model: nn.Module) -> list[ModulesToSaveWrapper]:
    return [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]


def build_prompt_encoder(peft_model: Any, adapter_name: str, encoder_cls: type) -> None:
    """PEFT's _setup_prompt_encoder: freeze the base model, find the backbone and word embeddings, fill the derived
    config fields, check they fit, and add ``prompt_encoder[adapter_name]`` and ``prompt_tokens[adapter_name]``."""
    config = peft_model.peft_config[adapter_name]
    base = peft_model.base_model
    prepare_prompt_learning_config(config, getattr(base, "config", None))
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    check_prompt_config(config)
    check_task_fits_model(config, config.task_type, base)
    name, backbone = find_backbone(base)
    word_embeddings = find_word_embeddings(base, backbone)
    check_fits_model(config, base, word_embeddings)
    if PeftType(config.peft_type) in PREFIX_TYPES:
        if any(getattr(m, "gradient_checkpointing", False) for m in base.modules()):
            raise ValueError(f"{PeftType(config.peft_type).value} does not work with gradient checkpointing.")
    for p in base.parameters():
        p.requires_grad_(False)
    if "prompt_encoder" not in peft_model._modules:
        peft_model.prompt_encoder = nn.ModuleDict({})
        peft_model.prompt_tokens = {}
    if name is not None:
        peft_model.transformer_backbone_name = name
    peft_model.word_embeddings = word_embeddings
    if encoder_cls.__init__.__code__.co_argcount >= 3:
        encoder = encoder_cls(config, word_embeddings)
    else:
        encoder = encoder_cls(config)
    device = word_embeddings.weight.device
    peft_model.prompt_encoder[adapter_name] = encoder.to(device)
    peft_model.prompt_tokens[adapter_name] = torch.arange(config.num_virtual_tokens
                                                          * config.num_transformer_submodules).long()


def prompt_rows(peft_model: Any, adapter_name: str, count: Optional[int] = None) -> torch.Tensor:
    """The encoder's output for the adapter's virtual tokens, [count or S*n, width] (one row per token); in inference
    mode the stored rows."""
    config = peft_model.peft_config[adapter_name]
    encoder = peft_model.prompt_encoder[adapter_name]
    tokens = peft_model.prompt_tokens[adapter_name]
    if count is not None:
        tokens = tokens[:count]
    if config.inference_mode:
        return encoder.embedding.weight[: len(tokens)]
    return encoder(tokens.to(encoder.embedding.weight.device)[None])[0]


def prompt_embedding_to_save(peft_model: Any, adapter_name: str) -> torch.Tensor:
    """What a checkpoint stores as ``prompt_embeddings``: the encoder's output rows (prefix tuning: the first n)."""
    config = peft_model.peft_config[adapter_name]
    count = config.num_virtual_tokens if PeftType(config.peft_type) in PREFIX_TYPES else None
    with torch.no_grad():
        return prompt_rows(peft_model, adapter_name, count).detach().cpu()


def get_prompt(peft_model: Any, batch_size: int) -> Any:
    """Prompt methods: [B, S*n, d] virtual-token embeddings. Prefix tuning: a DynamicCache (or an
    EncoderDecoderCache for seq2seq) holding every layer's key and value prefix, [B, H, n, D] each."""
    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    if PeftType(config.peft_type) not in PREFIX_TYPES:
        rows = prompt_rows(peft_model, name)
        return rows[None].expand(batch_size, -1, -1)
    return prefix_cache(peft_model, config, prompt_rows(peft_model, name, config.num_virtual_tokens), batch_size)


def prefix_cache(peft_model: Any, config: Any, rows: torch.Tensor, batch_size: int) -> Any:
    from transformers import DynamicCache, EncoderDecoderCache

    n, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    head_dim = config.token_dim // heads
    dtype = getattr(peft_model.base_model, "dtype", None)
    if dtype is not None and rows.dtype != dtype:
        rows = rows.to(dtype)
    # rows [n, N*2*d] -> [N*2, H, n, D]: one key/value slab per layer; the batch is an expand (no copy per sample)
    kv = rows.view(n, layers * 2, heads, head_dim).permute(1, 2, 0, 3)
    base = peft_model.base_model
    seq2seq = _is_seq2seq(base)
    cache = DynamicCache()
    for layer in range(layers):
        # Encoder-decoder models: PEFT 0.21 hands decoder layer l the slab of layer (2 l) mod N (its key/value list is
        # doubled, then cut in fours); kept so that its checkpoints give the same outputs.
        slab = (2 * layer) % layers if seq2seq else layer
        key = kv[2 * slab][None].expand(batch_size, -1, -1, -1)
        value = kv[2 * slab + 1][None].expand(batch_size, -1, -1, -1)
        cache.update(key, value, layer)
    if seq2seq:  # the prefix is on the decoder's self-attention; cross-attention is computed from the encoder
        return EncoderDecoderCache(cache, DynamicCache())
    return cache


# ----------------------------------------------------------------------------------------------------------------
# forward and generate
# ----------------------------------------------------------------------------------------------------------------
def _batch_size(input_ids: Optional[torch.Tensor], inputs_embeds: Optional[torch.Tensor]) -> int:
    if input_ids is None and inputs_embeds is None:
        raise ValueError("You have to provide either input_ids or inputs_embeds")
    return (input_ids if input_ids is not None else inputs_embeds).shape[0]


def _ones_before(mask: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat((torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device), mask), dim=1)


def _given(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


_CLS_TASKS = (TaskType.SEQ_CLS, TaskType.TOKEN_CLS, TaskType.QUESTION_ANS)


class PromptLearningHandler:
    """What PeftModel's task wrappers call for a prompt-learning adapter (see the module docstring)."""

    def __init__(self, encoder_cls: type) -> None:
        self.encoder_cls = encoder_cls

    # -- setup --------------------------------------------------------------------------------------------------
    def add(self, peft_model: Any, adapter_name: str) -> None:
        build_prompt_encoder(peft_model, adapter_name, self.encoder_cls)

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, peft_model: Any, task: Any, inputs: dict, kwargs: dict) -> Any:
        base = peft_model.base_model
        kwargs = {k: v for k, v in kwargs.items() if k not in peft_model.special_peft_forward_args}
        if peft_model._adapters_disabled:
            return base(**_given(inputs), **kwargs)
        config = peft_model.active_peft_config
        task = TaskType(task) if task is not None else None
        inputs = dict(inputs)
        input_ids, inputs_embeds = inputs.pop("input_ids", None), inputs.pop("inputs_embeds", None)
        kwargs.update(_given(inputs))
        batch = _batch_size(input_ids, inputs_embeds)
        n = config.num_virtual_tokens
        is_prefix = PeftType(config.peft_type) in PREFIX_TYPES
        self._adjust_ids(kwargs, config, task, is_prefix, batch)
        if task == TaskType.SEQ_2_SEQ_LM:
            return self._seq2seq_forward(peft_model, config, input_ids, inputs_embeds, kwargs, batch, is_prefix)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = _ones_before(kwargs["attention_mask"], n)
        if is_prefix:
            return self._prefix_forward(peft_model, task, input_ids, inputs_embeds, kwargs, batch)
        if kwargs.get("labels") is not None and task in (TaskType.CAUSAL_LM, TaskType.TOKEN_CLS):
            labels = kwargs["labels"]
            kwargs["labels"] = torch.cat((torch.full((batch, n), -100, dtype=labels.dtype, device=labels.device),
                                          labels), dim=1)
        if inputs_embeds is None:
            inputs_embeds = peft_model.word_embeddings(input_ids)
        prompts = get_prompt(peft_model, batch).to(inputs_embeds.dtype)
        return base(inputs_embeds=torch.cat((prompts, inputs_embeds), dim=1), **kwargs)

    @staticmethod
    def _adjust_ids(kwargs: dict, config: Any, task: Any, is_prefix: bool, batch: int) -> None:
        """position_ids: shifted by n for prefix tuning, dropped (with PEFT's warning) otherwise; token_type_ids: zeros
        in front for the classification wrappers, dropped for the others (PEFT's rules)."""
        n = config.num_virtual_tokens
        if kwargs.get("position_ids") is not None:
            if is_prefix:
                kwargs["position_ids"] = kwargs["position_ids"] + n
            else:
                warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
                del kwargs["position_ids"]
        if kwargs.get("token_type_ids") is not None:
            if task in _CLS_TASKS:
                if not is_prefix:
                    t = kwargs["token_type_ids"]
                    kwargs["token_type_ids"] = torch.cat((torch.zeros(batch, n, dtype=t.dtype, device=t.device), t),
                                                         dim=1)
            else:
                warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type "
                              "ids")
                del kwargs["token_type_ids"]

    @staticmethod
    def _prefix_forward(peft_model: Any, task: Any, input_ids, inputs_embeds, kwargs: dict, batch: int) -> Any:
        base = peft_model.base_model
        kwargs.pop("past_key_values", None)
        kwargs.pop("cache", None)
        kwargs["cache"] = get_prompt(peft_model, batch)
        return base(input_ids=input_ids, inputs_embeds=inputs_embeds, **_given(kwargs))

    @staticmethod
    def _seq2seq_forward(peft_model: Any, config: Any, input_ids, inputs_embeds, kwargs: dict, batch: int,
                         is_prefix: bool) -> Any:
        base = peft_model.base_model
        n = config.num_virtual_tokens
        if is_prefix:
            if kwargs.get("decoder_attention_mask") is not None:
                kwargs["decoder_attention_mask"] = _ones_before(kwargs["decoder_attention_mask"], n)
            if kwargs.get("attention_mask") is not None:
                pass  # the encoder's own mask: the prefix is added to its self-attention through the cache
            kwargs.pop("past_key_values", None)
            kwargs["cache"] = get_prompt(peft_model, batch)
            return base(input_ids=input_ids, inputs_embeds=inputs_embeds, **_given(kwargs))
        if inputs_embeds is None:
            inputs_embeds = peft_model.word_embeddings(input_ids)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = _ones_before(kwargs["attention_mask"], n)
        prompts = get_prompt(peft_model, batch).to(inputs_embeds.dtype)
        return base(inputs_embeds=torch.cat((prompts[:, :n], inputs_embeds), dim=1), **kwargs)

    # -- generate -----------------------------------------------------------------------------------------------
    def generate(self, peft_model: Any, task: Any, args: tuple, kwargs: dict) -> Any:
        base = peft_model.base_model
        kwargs = {k: v for k, v in kwargs.items() if k not in peft_model.special_peft_forward_args}
        if peft_model._adapters_disabled:
            return base.generate(*args, **kwargs)
        config = peft_model.active_peft_config
        task = TaskType(task) if task is not None else None
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise TypeError("generate() takes the input ids as its only positional argument")
            kwargs["input_ids"] = args[0]
        input_ids, inputs_embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        batch = _batch_size(input_ids, inputs_embeds)
        n = config.num_virtual_tokens
        is_prefix = PeftType(config.peft_type) in PREFIX_TYPES
        self._adjust_ids(kwargs, config, task, is_prefix, batch)
        kwargs.pop("task_ids", None)
        if "encoder_outputs" in kwargs and not is_prefix:
            del kwargs["encoder_outputs"]
            warnings.warn("`encoder_outputs` should not be passed to `generate` when using prompt tuning. Ignoring it.")
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        device = (input_ids if input_ids is not None else inputs_embeds).device
        seq2seq = task == TaskType.SEQ_2_SEQ_LM or _is_seq2seq(base)
        if is_prefix:
            return self._prefix_generate(peft_model, config, input_ids, inputs_embeds, kwargs, batch, seq2seq)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=device)
        kwargs["attention_mask"] = _ones_before(mask, n)
        embeds = inputs_embeds if inputs_embeds is not None else peft_model.word_embeddings(input_ids)
        prompts = get_prompt(peft_model, batch).to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat((prompts[:, :n], embeds), dim=1)
        if input_ids is not None and not seq2seq:
            kwargs["input_ids"] = input_ids  # returned in front of the new tokens, as from the base model
        return base.generate(**kwargs)

    @staticmethod
    def _prefix_generate(peft_model: Any, config: Any, input_ids, inputs_embeds, kwargs: dict, batch: int,
                         seq2seq: bool) -> Any:
        """The base model's generate with the prefix already in its cache: the first step runs the whole input
        after the n cached positions, each later step one token."""
        base = peft_model.base_model
        n = config.num_virtual_tokens
        for name in ("past_key_values", "cache"):
            if kwargs.pop(name, None) is not None:
                raise ValueError(f"generate() with prefix tuning builds its own cache (the prefix); do not pass {name}")
        # generate expands every input row to max(num_beams, num_return_sequences) rows before the first step; the
        # cache is not a tensor and is not expanded, so it is built for the expanded batch (every row's prefix is
        # the same, so the order of the rows does not matter; beam search reorders the cache rows itself)
        settings = kwargs.get("generation_config") or getattr(base, "generation_config", None)
        beams = kwargs.get("num_beams") or getattr(settings, "num_beams", None) or 1
        sequences = kwargs.get("num_return_sequences") or getattr(settings, "num_return_sequences", None) or 1
        expand = max(int(beams), int(sequences))
        if seq2seq:
            if kwargs.get("decoder_attention_mask") is not None:
                kwargs["decoder_attention_mask"] = _ones_before(kwargs["decoder_attention_mask"], n)
        else:
            source = input_ids if input_ids is not None else inputs_embeds
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones(batch, source.shape[1], dtype=torch.long, device=source.device)
            kwargs["attention_mask"] = _ones_before(mask, n)
        with torch.no_grad():
            kwargs["cache"] = get_prompt(peft_model, batch * expand)
        return base.generate(**_given({"input_ids": input_ids, "inputs_embeds": inputs_embeds}), **kwargs)

def register_prompt_method(name: str, encoder_cls: type) -> PromptLearningHandler:
    from ..utils.registry import register_prompt_learning_handler

    handler = PromptLearningHandler(encoder_cls)
    register_prompt_learning_handler(name, handler)
    return handler

