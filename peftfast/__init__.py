"""peftfast: Hugging Face PEFT's API with fused Triton kernels underneath.

``import peftfast as peft`` and existing PEFT code keeps working for the methods listed in README.md.

Layers, bottom up: ``kernels`` (Triton + PyTorch references, no peftfast imports) -> ``utils`` (types,
the method registry, save/load) -> ``config`` -> ``tuners`` (each method registers itself on import) ->
``peft_model`` (PeftModel and the task wrappers) -> ``mapping`` (get_peft_model and PEFT's tables).
``zoo`` builds the tiny models used by the tests, the demo and the benchmarks.
"""
from . import source_tree

source_tree.attach(__name__)  # run from a clone: map its kernels/ to peftfast.kernels, hide it as `kernels`

from .version import __version__ as __version__  # noqa: E402

from .config import PeftConfig, PeftConfigMixin, PromptLearningConfig
from .mapping import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    get_peft_config,
    get_peft_model,
    inject_adapter_in_model,
)
from .peft_model import (
    TunerLayerStatus,
    TunerModelStatus,
    get_layer_status,
    get_model_status,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .mixed_model import PeftMixedModel
from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .tuners import BdLoraConfig, IA3Config, IA3Model, LoraConfig, LoraModel, KasaConfig, VeloraConfig
from .tuners import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from .tuners import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .tuners import PrefixEncoder, PrefixTuningConfig
from .tuners import AdaLoraConfig, AdaLoraModel, LoHaConfig, LoHaModel, LoKrConfig, LoKrModel
from .tuners import AdaptionPromptConfig, AdaptionPromptModel
from .tuners import TrainableTokensConfig, TrainableTokensModel
from . import helpers  # noqa: E402  ``peft.helpers`` is loaded by ``import peft``
from .utils import (
    PeftType,
    TaskType,
    cast_mixed_precision_params,
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING", "PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING",
    "IA3Config", "IA3Model",
    "PromptEmbedding", "PromptTuningConfig", "PromptTuningInit",
    "PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType",
    "PrefixEncoder", "PrefixTuningConfig",
    "AdaLoraConfig", "AdaLoraModel", "LoHaConfig", "LoHaModel", "LoKrConfig", "LoKrModel",
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "AdaptionPromptConfig", "AdaptionPromptModel", "TrainableTokensConfig", "TrainableTokensModel",
    "BdLoraConfig", "KasaConfig", "VeloraConfig", "LoraConfig", "LoraModel", "PeftConfig", "PeftConfigMixin", "PromptLearningConfig", "PeftMixedModel", "PeftModel", "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "PeftType", "TaskType",
    "TunerLayerStatus", "TunerModelStatus", "get_base_model_state_dict", "get_layer_status", "get_model_status",
    "cast_mixed_precision_params", "get_peft_config", "get_peft_model", "get_peft_model_state_dict",
    "inject_adapter_in_model", "load_peft_weights", "prepare_model_for_kbit_training", "set_peft_model_state_dict",
]

# PEFT's error and warning base classes, and the counterpart of get_base_model_state_dict.
from .utils.errors import NoMatchingPeftModuleError, PeftError, PeftWarning  # noqa: E402
from .utils import set_base_model_state_dict  # noqa: E402

__all__ += ["NoMatchingPeftModuleError", "PeftError", "PeftWarning", "set_base_model_state_dict"]
from . import integrations  # noqa: E402  Trainer, transformers' adapter API: see peftfast/integrations/

integrations.install()
