"""LoKrModel: injects LoKr layers into nn.Linear, nn.Conv1d and nn.Conv2d modules (PEFT's surface)."""
from __future__ import annotations

from torch import nn

from ...utils.constants import TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING
from ..lycoris_utils import LycorisTuner
from .layer import Conv1d, Conv2d, Linear, LoKrLayer


class LoKrModel(LycorisTuner):
    """Creates a Low-Rank Kronecker Product model from a pretrained model (same surface as ``peft.LoKrModel``)."""

    prefix = "lokr_"
    method = "LoKr"
    tuner_layer_cls = LoKrLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING
    layers_mapping = {nn.Conv2d: Conv2d, nn.Conv1d: Conv1d, nn.Linear: Linear}
