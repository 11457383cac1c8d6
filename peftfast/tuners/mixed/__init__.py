"""The mixed-adapter tuner: adapters of several weight-space methods (LoRA, LoHa, LoKr, AdaLoRA) on one model."""
from .model import COMPATIBLE_TUNER_TYPES, MixedModel

__all__ = ["COMPATIBLE_TUNER_TYPES", "MixedModel"]
