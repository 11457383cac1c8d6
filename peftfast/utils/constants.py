"""File names and per-architecture defaults, matching what PEFT uses."""
from __future__ import annotations

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.bin"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"

INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"
EMBEDDING_LAYER_NAMES = ["embed_tokens", "lm_head"]

# Modules LoRA targets when the config names none (transformers `model_type` -> module names).
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt_bigcode": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "falcon": ["query_key_value"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
}

# IA3: which modules get a learned vector, and which of those are feed-forward (scaled on the input side).
TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "opt": ["q_proj", "v_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "bert": ["key", "value", "output.dense"],
    "roberta": ["key", "value", "output.dense"],
    "xlm-roberta": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "falcon": ["query_key_value", "mlp.dense_4h_to_h"],
    "gemma": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["k_proj", "v_proj", "down_proj"],
}

TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
    "xlm-roberta": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "falcon": ["mlp.dense_4h_to_h"],
    "gemma": ["down_proj"],
    "qwen2": ["down_proj"],
}

# Layer-index containers tried when `layers_to_transform` is set without `layers_pattern`.
COMMON_LAYERS_PATTERN = ["layers", "h", "block", "blocks", "layer"]
