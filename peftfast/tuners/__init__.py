"""The adapter methods. Importing this package imports each method package, which registers itself
(PEFT type -> config, tuner, prefix) in ``peftfast.utils.registry``."""
from .lora import BdLoraConfig, LoraConfig, LoraModel, KasaConfig, VeloraConfig  # first: registration order is the order errors list methods in
from .ia3 import IA3Config, IA3Model  # noqa: I001
from .prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from .p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .adalora import AdaLoraConfig, AdaLoraModel  # noqa: I001
from .loha import LoHaConfig, LoHaModel  # noqa: I001
from .lokr import LoKrConfig, LoKrModel  # noqa: I001
from .mixed import MixedModel  # noqa: I001  (after the methods it mixes)
from .adaption_prompt import AdaptedAttention, AdaptionPromptConfig, AdaptionPromptModel
from .trainable_tokens import TrainableTokensConfig, TrainableTokensModel  # noqa: I001
from .tuners_utils import BaseTuner, BaseTunerLayer

__all__ = ["BdLoraConfig", "KasaConfig", "VeloraConfig", "AdaLoraConfig", "AdaLoraModel", "BaseTuner", "BaseTunerLayer", "IA3Config", "IA3Model", "LoHaConfig",
           "LoHaModel", "LoKrConfig", "LoKrModel", "LoraConfig", "LoraModel", "MixedModel", "PrefixEncoder", "PrefixTuningConfig",
           "PromptEmbedding", "PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType",
           "PromptTuningConfig", "PromptTuningInit", "TrainableTokensConfig", "TrainableTokensModel"]
