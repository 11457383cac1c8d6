"""Saving a PiSSA / OLoRA adapter as a plain LoRA adapter of the unmodified base model
(``save_pretrained(..., path_initial_model_for_weight_conversion=<folder of the adapter as initialised>)``).

PiSSA and OLoRA move part of the base weight into the adapter at initialisation: the model holds
``W_res = W - s B0 A0`` and trains ``A, B`` from ``A0, B0``. After training the model computes
``W_res + s B A = W + s (B A - B0 A0)``, which is a LoRA adapter of twice the rank over the original ``W``:
``A' = [A; A0]`` (rows), ``B' = [B, -B0]`` (columns). The saved config doubles ``r`` (and ``rank_pattern``)
and scales ``lora_alpha`` (and ``alpha_pattern``) so that the scaling stays ``s``: x2, or x sqrt(2) with
rsLoRA, whose scaling is ``alpha / sqrt(r)``. That is impossible to express with rsLoRA and per-module
ranks or alphas together (the scale of each module is not stored), which is refused, as in PEFT.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import torch

from ...config import PeftConfig
from ...utils.peft_types import PeftType

_CONVERTIBLE_INITS = ("pissa", "olora", "true")


def check_convertible(config: Any, adapter_name: str) -> None:
    """Refuse (before anything is written) what cannot be converted; warn for an adapter that never moved weights."""
    if PeftType(config.peft_type) != PeftType.LORA:
        raise ValueError(f"Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                         f"for {PeftType(config.peft_type).value} adapters (adapter {adapter_name!r}); only LoRA "
                         "adapters initialised with PiSSA or OLoRA can be converted")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                         "when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True` "
                         f"(adapter {adapter_name!r}): the converted adapter's per-module scales cannot be stored")
    if not str(config.init_lora_weights).lower().startswith(_CONVERTIBLE_INITS):
        warnings.warn(f"`path_initial_model_for_weight_conversion` only works for converting a PiSSA/OLoRA adapter "
                      f"to a LoRA adapter; adapter {adapter_name!r} was initialised with "
                      f"init_lora_weights={config.init_lora_weights!r}", UserWarning, stacklevel=3)


def read_initial_weights(path: str | os.PathLike, config: Any) -> dict[str, torch.Tensor]:
    """The adapter tensors saved in ``path`` right after initialisation (checkpoint keys, as saved)."""
    from ...utils.save_and_load import load_adapter_weights

    path = os.fspath(path)
    initial_config = PeftConfig.from_pretrained(path)
    if PeftType(initial_config.peft_type) != PeftType.LORA:
        raise ValueError(f"path_initial_model_for_weight_conversion={path!r} holds a "
                         f"{PeftType(initial_config.peft_type).value} adapter; it must be the LoRA adapter saved "
                         "right after get_peft_model, before training")
    return load_adapter_weights(path, initial_config)


def convert_state(state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                  path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``state`` (trained PiSSA/OLoRA tensors) as LoRA tensors of twice the rank over the original base weights."""
    out = dict(state)
    for key, value in state.items():
        if "lora_A" not in key and "lora_B" not in key:
            continue
        if key not in initial:
            raise ValueError(f"path_initial_model_for_weight_conversion={os.fspath(path)!r} has no tensor {key!r}: "
                             "it must be this adapter as saved right after get_peft_model, before training")
        start = initial[key].to(device=value.device, dtype=value.dtype)
        if "lora_A" in key:
            out[key] = torch.cat([value, start], dim=0)
        else:
            out[key] = torch.cat([value, -start], dim=1)
    return out


def converted_config(config: Any) -> Any:
    """The config of the converted adapter: plain LoRA init, twice the rank, the same scaling."""
    config = copy.deepcopy(config)
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= 2 ** 0.5 if config.use_rslora else 2
    if config.rank_pattern:
        config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    if config.alpha_pattern:
        config.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return config
