"""Enumerations shared with PEFT: the values are the strings PEFT writes into adapter_config.json."""
from __future__ import annotations

import enum


class PeftType(str, enum.Enum):
    """The fine-tuning method of an adapter (``peft_type`` in adapter_config.json)."""

    PROMPT_TUNING = "PROMPT_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    ADAMSS = "ADAMSS"
    BOFT = "BOFT"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    BEFT = "BEFT"
    LILY = "LILY"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    POLY = "POLY"
    LN_TUNING = "LN_TUNING"
    VERA = "VERA"
    FROD = "FROD"
    PVERA = "PVERA"
    FOURIERFT = "FOURIERFT"
    GLORA = "GLORA"
    XLORA = "XLORA"
    HRA = "HRA"
    VBLORA = "VBLORA"
    UNILORA = "UNILORA"
    CPT = "CPT"
    MISS = "MISS"
    RANDLORA = "RANDLORA"
    ROAD = "ROAD"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    HIRA = "HIRA"
    SHIRA = "SHIRA"
    C3A = "C3A"
    WAVEFT = "WAVEFT"
    OSF = "OSF"
    DELORA = "DELORA"
    GRALORA = "GRALORA"
    CARTRIDGE = "CARTRIDGE"
    TINYLORA = "TINYLORA"
    PSOFT = "PSOFT"
    PEANUT = "PEANUT"
    SHADOW = "SHADOW"
    SUPERTUNING = "SUPERTUNING"
    DEFT = "DEFT"

    def __str__(self) -> str:  # json.dumps and f-strings give the bare value, as in PEFT's files
        return self.value


class TaskType(str, enum.Enum):
    """What the wrapped model is used for; picks the PeftModel subclass."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value
