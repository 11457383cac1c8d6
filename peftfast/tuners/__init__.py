from .ia3 import IA3Config, IA3Model
from .lora import LoraConfig, LoraModel
from .tuners_utils import BaseTuner, BaseTunerLayer

__all__ = ["BaseTuner", "BaseTunerLayer", "IA3Config", "IA3Model", "LoraConfig", "LoraModel"]
