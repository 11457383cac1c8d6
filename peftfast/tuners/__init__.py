"""The adapter methods. Importing this package imports each method package, which registers itself
(PEFT type -> config, tuner, prefix) in ``peftfast.utils.registry``."""
from .lora import LoraConfig, LoraModel  # first: registration order is the order errors list methods in
from .ia3 import IA3Config, IA3Model  # noqa: I001
from .prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from .p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .adaption_prompt import AdaptedAttention, AdaptionPromptConfig, AdaptionPromptModel
from .tuners_utils import BaseTuner, BaseTunerLayer

__all__ = ["BaseTuner", "BaseTunerLayer", "IA3Config", "IA3Model", "LoraConfig", "LoraModel"]
