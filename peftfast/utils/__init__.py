"""Helpers below the tuners: types, constants, the method registry, save/load, modules_to_save, k-bit prep.

Nothing here imports ``peftfast.tuners``; the methods reach down into this package, never the reverse.
"""
from .constants import CONFIG_NAME, INCLUDE_LINEAR_LAYERS_SHORTHAND, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .other import (
    AuxiliaryTrainingWrapper,
    ModulesToSaveWrapper,
    TrainableTokensWrapper,
    _get_submodules,
    get_submodules,
    cast_mixed_precision_params,
    prepare_model_for_kbit_training,
    transpose,
)
from .peft_types import PeftType, TaskType
from .registry import register_peft_method
from .save_and_load import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)

__all__ = [
    "CONFIG_NAME", "INCLUDE_LINEAR_LAYERS_SHORTHAND", "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME", "AuxiliaryTrainingWrapper", "ModulesToSaveWrapper", "TrainableTokensWrapper", "PeftType", "TaskType",
    "_get_submodules", "get_submodules", "cast_mixed_precision_params", "get_base_model_state_dict",
    "get_peft_model_state_dict", "load_peft_weights",
    "prepare_model_for_kbit_training", "register_peft_method", "set_base_model_state_dict", "set_peft_model_state_dict", "transpose",
]
