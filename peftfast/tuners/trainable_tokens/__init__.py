"""Trainable tokens: a few rows of an embedding trained, the rest frozen; the package registers the method."""
from ...utils.other import TrainableTokensWrapper
from ...utils.registry import register_load_checked_fields, register_peft_method, register_trainable_tokens_layer
from .config import TrainableTokensConfig
from .layer import TrainableTokensLayer
from .model import TrainableTokensModel

register_trainable_tokens_layer(TrainableTokensLayer)

register_peft_method(name="trainable_tokens", config_cls=TrainableTokensConfig, model_cls=TrainableTokensModel,
                     prefix="trainable_tokens_", is_mixed_compatible=False)
register_load_checked_fields("trainable_tokens", ("target_modules", "token_indices"))

__all__ = ["TrainableTokensConfig", "TrainableTokensLayer", "TrainableTokensModel", "TrainableTokensWrapper"]
