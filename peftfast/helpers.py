"""PEFT's ``peft.helpers`` context managers and checks that apply to the methods peftfast implements."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Union

from torch import nn

from .config import PeftConfig
from .tuners.lora import dora
from .tuners.lora.layer import LoraLayer
from .tuners.tuners_utils import BaseTunerLayer

__all__ = ["DoraCaching", "check_if_peft_model", "disable_input_dtype_casting", "rescale_adapter_scale"]


def check_if_peft_model(model_name_or_path: str) -> bool:
    """Whether ``model_name_or_path`` (a local folder or Hub repo id) holds a PEFT adapter config."""
    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:  # any failure (missing file, offline Hub, bad JSON) means "not a PEFT model", as in PEFT
        return False
    return True


@contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: Union[float, int]) -> Iterator[None]:
    """Multiply every LoRA layer's ``scaling`` by ``multiplier`` inside the ``with`` block (wise-ft for
    multipliers in [0, 1]); the previous values are restored on exit, also when the block raises."""
    if not isinstance(multiplier, (float, int)):
        raise TypeError(f"Argument multiplier should be of type float, got {type(multiplier)}")
    original = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            original[module] = module.scaling.copy()
            module.scaling = {k: v * multiplier for k, v in module.scaling.items()}
    if not original:
        raise ValueError("scaling is only supported for models with `LoraLayer`s")
    try:
        yield
    finally:
        for module, scaling in original.items():
            module.scaling = scaling


@contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Turn off casting of adapter inputs to the adapter weights' dtype inside the ``with`` block (for hooks that
    manage dtypes themselves, e.g. diffusers' layerwise casting); each layer's flag is restored on exit."""
    if not active:
        yield
        return
    original = {}
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            original[module] = module.cast_input_dtype_enabled
            module.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for module, value in original.items():
            module.cast_input_dtype_enabled = value


class DoraCaching:
    """Keep DoRA's weight norms between forwards while the model is in eval mode (faster inference, one [out]
    vector per DoRA adapter and layer kept in memory).

    ``with DoraCaching(): model(inputs)`` turns it on inside the block (the previous setting is restored on exit);
    ``DoraCaching()(enabled=True)`` turns it on for good, ``DoraCaching()(enabled=False)`` off. In train mode
    nothing is cached, and switching a layer to train mode empties its cache. A norm is reused only while the base
    weight, the factors and the scaling are unchanged (``peftfast.tuners.lora.dora``), so editing weights in eval
    mode does not give stale outputs.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.prev_value: Union[bool, None] = None

    def __enter__(self) -> None:
        self.prev_value = dora.ENABLE_DORA_CACHING
        dora.ENABLE_DORA_CACHING = self.enabled

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        dora.ENABLE_DORA_CACHING = self.prev_value
        self.prev_value = None

    def __call__(self, enabled: bool = True) -> None:
        dora.ENABLE_DORA_CACHING = enabled
