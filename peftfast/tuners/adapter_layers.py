"""What the adapter layers of every method (LoRA, IA3, ...) share, whatever their math.

A method's layer wraps a base module (``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Embedding``,
``nn.Conv1d/2d/3d``, a bitsandbytes linear) and needs the same few facts about it: its feature sizes, the device and
dtype its adapter weights are created in, and whether a fused op may compute the base module
instead of calling it. The last one is a single rule here, :func:`base_is_fusable`, so the dense
LoRA, quantised LoRA and IA3 layers cannot drift apart on when a hook or a patched ``forward``
must run.

Also here: :class:`AdapterLayer`, the mixin between ``BaseTunerLayer`` and a method's layer
class (which adapters a merge touches, the finiteness check of a safe merge), and
:func:`create_new_module`, the walk over a tuner's ordered dispatchers (first match wins).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from ..kernels.runtime import records_weight_grad
from .tuners_utils import BaseTunerLayer, conv1d_class, creation_device

# torch's convolutions, by the number of spatial dimensions (a conv weight is [out, in / groups, *kernel]).
CONV_CLASSES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}

# A dispatcher returns the adapter layer for ``target`` or None; the first in a tuner's tuple to answer wins.
Dispatcher = Callable[..., Optional[nn.Module]]


class UnsupportedLayerError(TypeError, ValueError):
    """A method was asked to wrap a base module it has no layer for (a ValueError and a TypeError, as
    LoRA and IA3 raised one or the other)."""


def feature_sizes(base: nn.Module, method: str, embedding: bool = False) -> tuple[int, int]:
    """``(in_features, out_features)`` of ``base``; for an ``nn.Embedding`` (when ``embedding``),
    ``(num_embeddings, embedding_dim)``; for ``nn.Conv1d/2d/3d``, ``(in_channels, out_channels)``. Conv1D stores
    its weight [in, out]. ``nn.MultiheadAttention``: ``(embed_dim, 3 * embed_dim)``, its packed projection."""
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(base, conv1d):
        w = base.weight
        in_features, out_features = w.ds_shape if hasattr(w, "ds_shape") else w.shape  # ds_shape: DeepSpeed
        return int(in_features), int(out_features)
    if embedding and isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if isinstance(base, tuple(CONV_CLASSES.values())):
        return int(base.in_channels), int(base.out_channels)
    if isinstance(base, nn.MultiheadAttention):  # the packed q/k/v projection: [3 * embed_dim, embed_dim]
        return int(base.embed_dim), 3 * int(base.embed_dim)
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return int(base.in_features), int(base.out_features)
    supported = "Linear, Conv1D" + (", Embedding" if embedding else "") + ", Conv1d/Conv2d/Conv3d"
    raise UnsupportedLayerError(f"{method} does not support layers of type {type(base).__name__}; "
                                f"supported: {supported}")


def adapter_device_dtype(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where adapter weights for a float ``base`` live: its weight's device and dtype (float32 for a
    weight that is not floating point, CPU float32 for a base without one); the meta device inside
    :func:`adapter_weights_on_meta`."""
    w = getattr(base, "weight", None)
    if w is None:
        return creation_device(torch.device("cpu")), torch.float32
    return creation_device(w.device), (w.dtype if w.is_floating_point() else torch.float32)


def base_is_fusable(module: nn.Module) -> bool:
    """Whether a fused op may compute ``module``'s output instead of calling it.

    Calling a module can do more than its class's ``forward``: its own or global forward, forward-pre,
    backward and backward-pre hooks (accelerate's offloading, activation probes, DeepSpeed), and an
    instance-level ``forward`` patched over the class's. A fused op skips all of them, so any of them
    rules it out, as does a ``weight`` that requires grad while autograd records (the fused ops compute no
    weight gradient; under ``no_grad`` nothing asks for one: FSDP's views of a flat parameter require grad even
    for a frozen weight, and inference through them then runs the same ops as without FSDP). Callers add what only
    they know (the base's exact type, dtypes, the backend). Runs on every forward, so it reads torch's hook dicts
    directly.
    """
    weight = module._parameters.get("weight")  # not ``module.weight``: that is a Python-level __getattr__
    return not (
        (weight is not None and records_weight_grad(weight))
        or module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks
        or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks
        or "forward" in module.__dict__
    )


def raise_if_not_finite(t: Optional[torch.Tensor], adapter: str, what: str = "weights",
                        kept: str = "the base weights were left unchanged") -> None:
    """The check of a safe merge: refuse (ValueError naming the adapter) a merged tensor with NaN or inf."""
    if t is not None and not torch.isfinite(t).all():
        raise ValueError(f"NaNs detected in the merged {what}. The adapter {adapter} seems to be broken; "
                         f"{kept}")


def create_new_module(dispatchers: Iterable[Dispatcher], target: nn.Module, adapter_name: str, method: str,
                      supported: str, **kwargs: Any) -> nn.Module:
    """The layer of the first dispatcher that answers for ``target``. Each dispatcher gets its own copy of
    ``kwargs`` (they adjust it, e.g. ``fan_in_fan_out``)."""
    for dispatcher in dispatchers:
        new_module = dispatcher(target, adapter_name, **dict(kwargs))
        if new_module is not None:
            return new_module
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    raise ValueError(f"target module of type {type(base).__name__} is not supported by {method}; "
                     f"supported: {supported}")


class AdapterLayer(BaseTunerLayer):
    """Mixin of every method's adapter layer, between ``BaseTunerLayer`` and the method's own class."""

    def adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Device and dtype of new adapter weights (quantised bases override: their compute dtype)."""
        return adapter_device_dtype(self.get_base_layer())

    def holds(self, adapter: str) -> bool:
        """Whether this layer has trainable weights for ``adapter``."""
        return any(adapter in getattr(self, name) for name in self.adapter_layer_names)

    def merge_names(self, adapter_names: Optional[list[str]], warn: bool = True) -> list[str]:
        """The adapters a merge of ``adapter_names`` (default: the active ones) changes this layer by, in
        order; those merged already are skipped (with PEFT's warning when ``warn``)."""
        return [n for n in self._adapters_to_merge(adapter_names, warn=warn) if self.holds(n)]
