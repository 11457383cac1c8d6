"""AdaLoraModel: injects AdaLoRA layers, allocates ranks during training, adds the orthogonal regulariser.

Training loop (as with PEFT)::

    loss = model(**batch).loss          # includes orth_reg_weight * mean_l ||P_l P_l^T - I||_F over A and B
    loss.backward()
    optimizer.step()
    model.base_model.update_and_allocate(step)
    optimizer.zero_grad()

The regulariser is added to ``outputs.loss`` by ``AdaLoraModel.forward`` and, for calls through
``PeftModel`` (which call the base model directly), by a forward hook on the base model held for the
duration of the call (``_enable_peft_forward_hooks``).

Checkpoints are PEFT's: the saved tensors hold only the ranks ``rank_pattern`` kept (``ranknum`` is not
saved), and loading first shrinks each layer to its kept ranks (``resize_modules_by_rank_pattern``); the
two hooks ``adapter_state_dict_to_save`` / ``prepare_adapter_load`` are what ``peftfast.utils.save_and_load``
calls for them.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn

from ...utils.constants import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING
from ...utils.errors import ConfigError
from ..adapter_layers import Dispatcher, create_new_module
from ..tuners_utils import BaseTuner, BaseTunerLayer, bnb_linear_classes, check_single_bias_adapter, conv1d_class
from .bnb import dispatch_bnb
from .allocator import RankAllocator, adalora_triplets
from .config import AdaLoraConfig, strip_adapter_from_pattern_key
from .layer import AdaLoraLayer, SVDConv2d, SVDLinear


def dispatch_default(target: nn.Module, adapter_name: str, lora_config: AdaLoraConfig, **kwargs: Any):
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, nn.Conv2d):
        return SVDConv2d(target, adapter_name, config=lora_config, **kwargs)
    if isinstance(base, nn.Linear):
        if lora_config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                          "Setting fan_in_fan_out to False.", UserWarning)
            lora_config.fan_in_fan_out = False
        return SVDLinear(target, adapter_name, config=lora_config, fan_in_fan_out=False, **kwargs)
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(base, conv1d):
        if not lora_config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                          "Setting fan_in_fan_out to True.", UserWarning)
            lora_config.fan_in_fan_out = True
        return SVDLinear(target, adapter_name, config=lora_config, fan_in_fan_out=True, **kwargs)
    return None


def _kept(mask: Any) -> torch.Tensor:
    if isinstance(mask, torch.Tensor):
        return mask.view(-1).bool()
    if isinstance(mask, (list, tuple)):
        return torch.tensor([bool(b) for b in mask], dtype=torch.bool)
    raise TypeError(f"Unexpected type of rank_idx: a rank_pattern entry must be a list of bools, got "
                    f"{type(mask).__name__}")


def _module_key(pattern_key: str, adapter_name: str) -> str:
    """'x.q_proj.lora_E.<adapter>' or 'x.q_proj.lora_E' -> 'x.q_proj'."""
    parts = pattern_key.split(".")
    return ".".join(parts[:-2] if parts[-1] == adapter_name and len(parts) > 2 else parts[:-1])


def _find_layer(model: nn.Module, key: str) -> AdaLoraLayer:
    """The AdaLoRA layer named ``key`` in ``model``, or under a wrapper's prefix (``base_model.model.``)."""
    for name, module in model.named_modules():
        if isinstance(module, AdaLoraLayer) and (name == key or name.endswith("." + key)):
            return module
    raise ConfigError(f"rank_pattern names {key!r}, which is not an AdaLoRA layer of this model: its keys must be "
                      "the lora_E parameters of this adapter's layers (as AdaLoRA's rank allocation writes them, "
                      "e.g. 'model.layers.0.self_attn.q_proj.lora_E')")


class AdaLoraModel(BaseTuner):
    """Creates an AdaLoRA model from a pretrained transformers model (same surface as ``peft.AdaLoraModel``)."""

    prefix = "lora_"
    tuner_layer_cls = AdaLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING
    # first match wins: quantised linears subclass nn.Linear, so their dispatcher goes first
    dispatchers: tuple[Dispatcher, ...] = (dispatch_bnb, dispatch_default)

    def __init__(self, model: nn.Module, config: Any, adapter_name: str = "default", **kwargs: Any) -> None:
        super().__init__(model, config, adapter_name, **kwargs)
        trainable = [name for name, c in self.peft_config.items() if not c.inference_mode]
        if len(trainable) > 1:
            raise ValueError("AdaLoraModel supports only 1 trainable adapter. When using multiple adapters, set "
                             "inference_mode to True for all adapters except the one you want to train.")
        if not self.peft_config[adapter_name].inference_mode:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = RankAllocator(self.model, self.peft_config[adapter_name], adapter_name)

    def _supported_types(self) -> tuple[type, ...]:
        conv1d = conv1d_class()
        return (nn.Linear, nn.Conv2d) + ((conv1d,) if conv1d else ()) + bnb_linear_classes()

    def _check_new_adapter_config(self, config: AdaLoraConfig) -> None:
        check_single_bias_adapter(self)
        trainable = [name for name, c in self.peft_config.items() if not c.inference_mode]
        if len(trainable) > 1:
            raise ValueError(f"{type(self).__name__} supports only 1 trainable adapter. When using multiple "
                             "adapters, set inference_mode to True for all adapters except the one you want to "
                             f"train (trainable now: {', '.join(trainable)}).")

    def _create_and_replace(self, config: AdaLoraConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str) -> None:
        if isinstance(target, AdaLoraLayer):
            target.update_layer(adapter_name, config.init_r, config.lora_alpha, config=config)
            return
        new_module = create_new_module(self.dispatchers, target, adapter_name, "AdaLoRA",
                                       "Linear, Conv1D, Conv2d, bitsandbytes Linear4bit/Linear8bitLt",
                                       lora_config=config, r=config.init_r, lora_alpha=config.lora_alpha)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        setattr(parent, target_name, new_module)

    # -- the orthogonal regulariser --------------------------------------------------------------------
    def orth_regularization(self) -> Optional[torch.Tensor]:
        """``mean over A and B of every layer of ||P P^T - I||_F`` (A: P P^T, B: P^T P) for the trainable adapter;
        None without one."""
        name = getattr(self, "trainable_adapter_name", None)
        if name is None:
            return None
        total, count = 0, 0
        for _, layer in adalora_triplets(self.model, name):
            for p, left in ((layer.lora_A[name], True), (layer.lora_B[name], False)):
                cov = p @ p.T if left else p.T @ p
                eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
                total = total + torch.norm(cov - eye, p="fro")
                count += 1
        return total / count if count else None

    def add_orth_loss(self, outputs: Any) -> Any:
        loss = getattr(outputs, "loss", None)
        name = getattr(self, "trainable_adapter_name", None)
        if name is None or not isinstance(loss, torch.Tensor):
            return outputs
        weight = self.peft_config[name].orth_reg_weight
        if weight < 0:
            raise ValueError("orth_reg_weight should be greater than or equal to 0. ")
        reg = self.orth_regularization()
        outputs.loss = loss + weight * (reg if reg is not None else 0)
        return outputs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.add_orth_loss(self.model.forward(*args, **kwargs))

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        if kwargs.get("adapter_names") is not None:
            raise ValueError("AdaLoRA does not support adapter_names (one adapter per sample), as in PEFT")
        handle = self.model.register_forward_hook(lambda module, inputs, outputs: self.add_orth_loss(outputs))
        try:
            yield
        finally:
            handle.remove()

    # -- rank allocation -------------------------------------------------------------------------------
    def update_and_allocate(self, global_step: int) -> None:
        """Update the sensitivities and prune ranks to the step's budget; call after ``loss.backward()`` and before
        ``optimizer.zero_grad()``, every step."""
        name = getattr(self, "trainable_adapter_name", None)
        if name is None:
            raise ValueError("update_and_allocate needs a trainable AdaLoRA adapter; this model's adapters are all "
                             "in inference mode")
        config = self.peft_config[name]
        boundary = config.total_step - config.tfinal
        if global_step < boundary:
            _, rank_pattern = self.rankallocator.update_and_allocate(self.model, global_step)
            if rank_pattern:
                config.rank_pattern = rank_pattern
        elif global_step == boundary:
            _, rank_pattern = self.rankallocator.update_and_allocate(self.model, global_step, force_mask=True)
            config.rank_pattern = rank_pattern
            self.rankallocator.reset_ipt()
        else:
            if not config.rank_pattern:
                raise ValueError(f"update_and_allocate({global_step}) is past total_step - tfinal = {boundary} but "
                                 "no rank_pattern was allocated yet")
            self.rankallocator.mask_using_rank_pattern(self.model, config.rank_pattern)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not supported for AdaLoRA (as in PEFT); use LoRA."""
        raise TypeError(f"{type(self).__name__} does not support add_weighted_adapter method.")

    # -- checkpoints -----------------------------------------------------------------------------------
    def resize_modules_by_rank_pattern(self, rank_pattern: dict, adapter_name: str) -> None:
        resize_modules_by_rank_pattern(self.model, self.peft_config[adapter_name], rank_pattern, adapter_name)

    @staticmethod
    def resize_state_dict_by_rank_pattern(rank_pattern: dict, state_dict: dict[str, torch.Tensor],
                                          adapter_name: str) -> dict[str, torch.Tensor]:
        """Keep only the ranks ``rank_pattern`` keeps in ``state_dict`` (checkpoint keys, with or without the
        ``base_model.model.`` prefix)."""
        for pattern_key, mask in rank_pattern.items():
            keep = _kept(mask)
            rank = int(keep.sum())
            module = _module_key(pattern_key, adapter_name)
            for attr in ("lora_E", "lora_A", "lora_B"):
                suffix = f"{module}.{attr}"
                for key in [k for k in state_dict if k == suffix or k.endswith("." + suffix)]:
                    t = state_dict[key]
                    if attr == "lora_B":
                        state_dict[key] = t[:, keep.to(t.device)] if rank != t.shape[1] else t
                    else:
                        state_dict[key] = t[keep.to(t.device)] if rank != t.shape[0] else t
        return state_dict

    @classmethod
    def adapter_state_dict_to_save(cls, model: nn.Module, config: AdaLoraConfig, adapter_name: str,
                                   state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors written for ``adapter_name``: the kept ranks only (PEFT's files)."""
        if not config.rank_pattern:
            return state_dict
        pattern = {strip_adapter_from_pattern_key(k): v for k, v in config.rank_pattern.items()}
        return cls.resize_state_dict_by_rank_pattern(pattern, dict(state_dict), adapter_name)

    @classmethod
    def prepare_adapter_load(cls, model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
        """Before weights are loaded into ``adapter_name``: shrink each layer to the ranks of ``rank_pattern``."""
        if config.rank_pattern:
            resize_modules_by_rank_pattern(model, config, config.rank_pattern, adapter_name)


def resize_modules_by_rank_pattern(model: nn.Module, config: AdaLoraConfig, rank_pattern: dict,
                                   adapter_name: str) -> None:
    """Recreate each layer of ``rank_pattern`` with its kept ranks (their current values, ranknum kept). A layer
    already at its kept rank is left as it is; any other size is an error (raised before any layer changes)."""
    plan = []
    for pattern_key, mask in rank_pattern.items():
        keep = _kept(mask)
        layer = _find_layer(model, _module_key(pattern_key, adapter_name))
        if adapter_name not in layer.lora_A:
            raise KeyError(f"rank_pattern names {pattern_key!r}, whose layer has no adapter {adapter_name!r}")
        current, rank = layer.lora_A[adapter_name].shape[0], int(keep.sum())
        if current == rank:
            continue  # already at its kept ranks
        if current != keep.numel():
            raise ValueError(f"rank_pattern[{pattern_key!r}] has {keep.numel()} entries but the layer has rank "
                             f"{current} (init_r={config.init_r}); the pattern does not fit this adapter")
        plan.append((layer, keep, rank))
    for layer, keep, rank in plan:
        keep = keep.to(layer.lora_A[adapter_name].device)
        e = layer.lora_E[adapter_name][keep].detach()
        a = layer.lora_A[adapter_name][keep].detach()
        b = layer.lora_B[adapter_name][:, keep].detach()
        ranknum = layer.ranknum[adapter_name].detach().clone()
        layer.update_layer(adapter_name, rank, config.lora_alpha, config=config)
        with torch.no_grad():
            if rank > 0:
                layer.lora_E[adapter_name].copy_(e)
                layer.lora_A[adapter_name].copy_(a)
                layer.lora_B[adapter_name].copy_(b)
                layer.ranknum[adapter_name].copy_(ranknum)
