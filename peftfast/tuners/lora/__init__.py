"""LoRA: low-rank adapters ``W x + (B A x) * scaling``; the package registers the method on import."""
from ...utils.registry import register_load_checked_fields, register_peft_method
from .bdlora import BlockDiagonalLinear
from .config import BdLoraConfig, KasaConfig, LoraConfig, LoraRuntimeConfig
from .layer import Conv1d, Conv2d, Conv3d, ConvNd, Embedding, Linear, LoraLayer, MultiheadAttention
from .grouped import reserve_mixed_batch_rank
from .model import LoraModel
from . import layer as _layer
from .param import ParamWrapper

_layer.ParamWrapper = ParamWrapper  # PEFT's place for it too: peft.tuners.lora.layer.ParamWrapper
from .velora import VeloraConfig

register_peft_method(name="lora", config_cls=LoraConfig, model_cls=LoraModel, prefix="lora_",
                     is_mixed_compatible=True)
register_load_checked_fields("lora", ("r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern",
                                      "alpha_pattern", "bias", "modules_to_save"))

__all__ = ["BdLoraConfig", "BlockDiagonalLinear", "LoraRuntimeConfig", "Conv1d", "Conv2d", "Conv3d", "ConvNd", "Embedding", "Linear", "LoraConfig", "LoraLayer", "LoraModel", "KasaConfig", "VeloraConfig", "ParamWrapper",
           "MultiheadAttention", "reserve_mixed_batch_rank"]
