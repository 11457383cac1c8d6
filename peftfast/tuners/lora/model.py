"""LoraModel: decides which LoRA layer wraps each targeted module and injects it.

The layer class comes from ``LoraModel.dispatchers``, a fixed ordered tuple (first match wins):
bitsandbytes 4-/8-bit linears, then nn.Linear / Conv1D / nn.Embedding / nn.Conv1d, 2d, 3d /
nn.MultiheadAttention.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn

from ...utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from ...utils.other import ModulesToSaveWrapper
from ..adapter_layers import Dispatcher, create_new_module
from ...utils.routing import route_adapter_names
from ..tuners_utils import BaseTuner, BaseTunerLayer, check_single_bias_adapter, conv1d_class, linear_layer_classes
from ...utils.patterns import get_pattern_key
from .bdlora import bd_side
from .bnb import dispatch_bnb
from .config import LoraConfig
from .grouped import check_adapter_names_shape
from .layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer, MultiheadAttention, base_weight_changes
from .param import check_same_target_parameters, inject_parameters
from .weighted import add_weighted_adapter

# base class -> LoRA layer for torch's convolutions
CONV_LAYERS: dict[type[nn.Module], type[LoraLayer]] = {nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}


def dispatch_default(target: nn.Module, adapter_name: str, lora_config: LoraConfig, **kwargs: Any):
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if kwargs.get("bd_lora") is not None and not isinstance(base, nn.Linear) and not (
            conv1d_class() is not None and isinstance(base, conv1d_class())):
        raise ValueError(f"BD-LoRA (use_bdlora) supports LoRA on nn.Linear and Conv1D layers only, not on a "
                         f"{type(base).__name__}; leave this layer out of target_modules_bd_a / target_modules_bd_b "
                         "(with match_strict=False)")
    if isinstance(base, nn.Embedding):
        kwargs.pop("fan_in_fan_out", None)
        return Embedding(target, adapter_name, **kwargs)
    if isinstance(base, nn.MultiheadAttention):
        kwargs.pop("fan_in_fan_out", None)
        return MultiheadAttention(target, adapter_name, **kwargs)
    for conv, layer in CONV_LAYERS.items():
        if isinstance(base, conv):
            kwargs.pop("fan_in_fan_out", None)  # ignored for convolutions, as in PEFT
            return layer(target, adapter_name, **kwargs)
    if isinstance(base, nn.Linear):
        if kwargs["fan_in_fan_out"]:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                          "Setting fan_in_fan_out to False.", UserWarning)
            kwargs["fan_in_fan_out"] = lora_config.fan_in_fan_out = False
        return Linear(target, adapter_name, **kwargs)
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(base, conv1d):
        if not kwargs["fan_in_fan_out"]:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                          "Setting fan_in_fan_out to True.", UserWarning)
            kwargs["fan_in_fan_out"] = lora_config.fan_in_fan_out = True
        return Linear(target, adapter_name, is_target_conv_1d_layer=True, **kwargs)
    return None


def routed_modules(root: nn.Module) -> list[nn.Module]:
    """The modules under ``root`` that take ``adapter_names`` in a call: LoRA layers, ModulesToSaveWrapper and
    trainable-token layers (``merge_replaces_rows``). Runs on every call with adapter_names, so it does not walk
    into a LoRA layer's adapter containers (its ``lora_*`` children: one small module per adapter, most of a model
    with many adapters, none of which can hold such a module); everything else, base_layer included, is walked."""
    found, seen, stack = [], set(), [root]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        lora = isinstance(module, LoraLayer)
        # a class attribute: looked up on the type (a missing attribute on a module costs an AttributeError)
        if lora or isinstance(module, ModulesToSaveWrapper) or getattr(type(module), "merge_replaces_rows", False):
            found.append(module)
        children = module._modules
        stack.extend(child for name, child in children.items()
                     if child is not None and not (lora and name.startswith("lora_")))
    return found


class LoraModel(BaseTuner):
    """Creates a LoRA model from a pretrained transformers model (same surface as ``peft.LoraModel``)."""

    prefix = "lora_"
    tuner_layer_cls = LoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    # First match wins: quantised linears subclass nn.Linear, so their dispatcher goes first.
    dispatchers: tuple[Dispatcher, ...] = (dispatch_bnb, dispatch_default)

    def _supported_types(self) -> tuple[type, ...]:
        return linear_layer_classes() + (nn.Embedding, nn.MultiheadAttention) + tuple(CONV_LAYERS)

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False) -> None:
        # PiSSA / OLoRA replace base weights while the adapter is added: a failure puts them back too
        with base_weight_changes():
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage)

    def _prepare_adapter_config(self, config: LoraConfig, model_config: dict) -> LoraConfig:
        # PEFT's rule: without target_modules, the model type's default modules are targeted when there is one;
        # with target_parameters and no default, only the parameters are
        if config.target_modules is None and getattr(config, "target_parameters", None):
            default = self.target_module_mapping.get(model_config.get("model_type"))
            if default is not None:
                config.target_modules = default if isinstance(default, str) else set(default)
            return config
        return BaseTuner._prepare_adapter_config(self, config, model_config)  # also called with a MixedModel as self

    def _inject_parameters(self, config: LoraConfig, model: nn.Module, adapter_name: str, undo: Any) -> list[str]:
        """LoRA on the ``nn.Parameter`` s of ``config.target_parameters`` (``lora/param.py``)."""
        return inject_parameters(self, model, config, adapter_name, undo)

    def _set_auxiliary_modules(self, model: nn.Module, config: LoraConfig, adapter_name: str, undo: Any) -> None:
        """``trainable_token_indices``: the named embeddings train only those rows (TrainableTokensWrapper)."""
        if config.trainable_token_indices is None:
            return
        from ..trainable_tokens.model import set_trainable_tokens  # (here: registers after LoRA)

        set_trainable_tokens(model, config, adapter_name, undo, activate=adapter_name in self.active_adapters)

    def _check_new_adapter_config(self, config: LoraConfig) -> None:
        check_single_bias_adapter(self)
        check_same_target_parameters(self.peft_config, config)

        # KaSA rewrites the base weights when added: an adapter without it would see them changed or not depending on
        # the order the adapters came in, so the two kinds do not share a model (PEFT's rule)
        new_kasa = getattr(config, "kasa_config", None) is not None
        for name, other in self.peft_config.items():
            if other is config:
                continue
            if (getattr(other, "kasa_config", None) is not None) is not new_kasa:
                raise ValueError(
                    "KaSA cannot be combined with adapters that don't use KaSA, since KaSA modifies the base weights: "
                    f"the new adapter {'uses' if new_kasa else 'does not use'} KaSA but adapter '{name}' "
                    f"{'does not' if new_kasa else 'does'}."
                )

    def _get_kasa_loss(self, adapter_names: Optional[Union[str, list[str]]] = None) -> Union[torch.Tensor, float]:
        """KaSA's auxiliary regularisation over every KaSA layer, for the adapters ``adapter_names`` (default: the
        active ones), to add to the task loss: per layer and adapter ``beta * sum(d^2) + gamma * (||B^T B - I||_F +
        ||A A^T - I||_F)`` (d: lora_diag; beta, gamma from its KasaConfig), in float32. 0.0 when no layer matches."""
        if adapter_names is None:
            adapter_names = self.active_adapters
        elif isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        total: Union[torch.Tensor, float] = 0.0
        for module in self.model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for name in adapter_names:
                diag = module.kasa_diag(name)
                if diag is None:
                    continue
                cfg = self.peft_config[name].kasa_config
                a = module.lora_A[name].weight.float()
                b = module.lora_B[name].weight.float()
                eye = torch.eye(diag.shape[0], device=diag.device, dtype=torch.float32)
                l2 = diag.float().pow(2).sum()
                l3 = torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye)
                total = total + cfg.beta * l2 + cfg.gamma * l3
        return total

    def _create_and_replace(self, config: LoraConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str) -> None:
        r_key = get_pattern_key(list((config.rank_pattern or {}).keys()), current_key)
        alpha_key = get_pattern_key(list((config.alpha_pattern or {}).keys()), current_key)
        r = (config.rank_pattern or {}).get(r_key, config.r)
        alpha = (config.alpha_pattern or {}).get(alpha_key, config.lora_alpha)
        kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                      fan_in_fan_out=config.fan_in_fan_out, init_lora_weights=config.init_lora_weights,
                      use_rslora=config.use_rslora, use_dora=config.use_dora, lora_bias=config.lora_bias,
                      velora=config.velora_config, use_kasa=config.kasa_config is not None,
                      ephemeral_gpu_offload=getattr(config.runtime_config, "ephemeral_gpu_offload", False))
        if config.use_bdlora is not None:
            side = bd_side(config.use_bdlora, current_key)
            if side is not None:
                kwargs["bd_lora"] = (side, config.use_bdlora.nblocks)
        if isinstance(target, LoraLayer):
            target.update_layer(adapter_name, r, alpha, config.lora_dropout, config.init_lora_weights,
                                config.use_rslora, use_dora=config.use_dora, lora_bias=config.lora_bias,
                                bd_lora=kwargs.get("bd_lora"), velora=config.velora_config,
                                use_kasa=kwargs["use_kasa"])
            return
        new_module = self._create_new_module(config, adapter_name, target, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        setattr(parent, target_name, new_module)

    def _create_new_module(self, config: LoraConfig, adapter_name: str, target: nn.Module, **kwargs: Any):
        supported = ", ".join([c.__name__ for c in linear_layer_classes()] + ["Embedding"]
                              + [c.__name__ for c in CONV_LAYERS] + ["MultiheadAttention"])
        return create_new_module(self.dispatchers, target, adapter_name, "LoRA", supported,
                                 lora_config=config, **kwargs)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """Add ``adapter_name``, combined from ``adapters`` with ``weights`` (PEFT's method and arguments; see
        ``peftfast.tuners.lora.weighted``). The new adapter is not activated. All or nothing."""
        for adapter in adapters:
            if adapter in self.peft_config and getattr(self.peft_config[adapter], "target_parameters", None):
                raise ValueError(f"add_weighted_adapter does not support targeting nn.Parameter (problematic "
                                 f"adapter '{adapter}'): its adapters use target_parameters")
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type=combination_type,
                             svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                             svd_driver=svd_driver, density=density, majority_sign_method=majority_sign_method)

    @contextmanager
    def _route_adapter_names(self, kwargs: dict):
        """Route PEFT's ``adapter_names=[...]`` (one adapter per sample, or one list of names per sample: one per
        token) to every LoRA layer for one call. Unlike PEFT, also in training: each sample's loss reaches only
        its own adapter (``grouped.py``), once ``train_mixed_batches`` is set (PEFT refuses training with
        adapter_names, and so does peftfast by default); with activation checkpointing, the backward's recomputation
        sees the same names (``route_adapter_names``)."""
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        if self.training and not getattr(self, "train_mixed_batches", False):
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode. (PEFT's rule; peftfast "
                             "can train several adapters on one mixed batch, each sample's loss reaching only its "
                             "adapter: set `model.base_model.train_mixed_batches = True` first)")
        check_adapter_names_shape(adapter_names)
        flat = [n for per in adapter_names for n in per] if isinstance(adapter_names[0], (list, tuple)) \
            else adapter_names
        unknown = sorted(set(flat) - set(self.peft_config) - {"__base__"})
        if unknown:
            raise ValueError(f"adapter_names contains unknown adapters {unknown}; available: "
                             f"{', '.join(self.peft_config)} and '__base__'")

        with route_adapter_names(self, routed_modules(self.model), adapter_names):
            yield
