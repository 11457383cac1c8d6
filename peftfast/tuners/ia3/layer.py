"""(IA)^3 layers: PEFT's module tree (base_layer, ia3_l, is_feedforward, fan_in_fan_out) over fused ops.

An (IA)^3 adapter is a learned vector ``l`` per targeted layer. For ``y = W x + b``:

    feed-forward module:  y = W (l * x) + b        l: ia3_l[name], shape (1, in_features)
    other modules:        y = l * (W x + b)        l: ia3_l[name], shape (out_features, 1)

Several active adapters multiply their vectors. On a plain ``nn.Linear`` or GPT-2 ``Conv1D`` base the
whole layer is one call to ``peftfast.kernels.ia3.ia3_linear``, which applies ``l`` inside the matmul
(on the X tile for feed-forward modules, on the output tile otherwise) so no scaled copy of x or y is
written; other bases run as ``base_layer`` with ``ia3_scale_input`` / ``ia3_scale_output`` around it.

On ``nn.Conv2d`` / ``nn.Conv3d`` (``Conv2d`` / ``Conv3d``) ``l`` scales input or output channels:
``ia3_l[name]`` has PEFT's shape (1, channels, 1, ...), and the math is plain torch ops on every backend
(no Triton kernel for convolutions).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from ...kernels.ia3 import ia3_linear, ia3_scale_input, ia3_scale_output
from ...utils.other import transpose
from ...utils.routing import call_adapter_names
from ..adapter_layers import AdapterLayer, base_is_fusable, feature_sizes, raise_if_not_finite
from ..tuners_utils import per_sample_adapter_names, conv1d_class


class IA3Layer(AdapterLayer):
    """Bookkeeping shared by every (IA)^3 layer: the per-adapter vectors and merging into the base weight."""

    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, is_feedforward: bool, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.ia3_l = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = False
        self.in_features, self.out_features = feature_sizes(self.get_base_layer(), "(IA)^3")

    def ia3_shape(self) -> tuple[int, ...]:
        """The shape of ``ia3_l[name]`` (PEFT's, as it decides which checkpoints load)."""
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def update_layer(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        shape = self.ia3_shape()
        # Drawn even when replaced by ones, so the global RNG advances as with PEFT and seeded runs line up.
        vec = torch.randn(shape)
        if config.init_ia3_weights:
            vec = torch.ones(shape)
        device, dtype = self.adapter_device_dtype()
        self.ia3_l[adapter_name] = nn.Parameter(vec.to(device=device, dtype=dtype))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_ia3_parameters(self, adapter_name: str) -> None:
        if adapter_name in self.ia3_l:
            nn.init.constant_(self.ia3_l[adapter_name], 1.0)

    def _active_names(self) -> list[str]:
        return [n for n in self.active_adapters if n in self.ia3_l]

    def active_scale(self) -> Optional[torch.Tensor]:
        """The product of the active adapters' vectors, flattened to [in_features] or [out_features]."""
        names = self._active_names()
        if not names:
            return None
        scale = self.ia3_l[names[0]].flatten()
        for name in names[1:]:
            scale = scale * self.ia3_l[name].flatten()
        return scale

    # -- merging --------------------------------------------------------------------------------------
    # The base weight is [out, in] (nn.Linear) or [in, out] (Conv1D, fan_in_fan_out=True); ia3_l's shape,
    # transposed the same way, broadcasts over the input columns (feed-forward) or the output rows.
    def _weight_factor(self, name: str) -> torch.Tensor:
        return transpose(self.ia3_l[name].detach(), self.fan_in_fan_out)

    def _scales_bias(self) -> bool:
        return not self.is_feedforward and getattr(self.get_base_layer(), "bias", None) is not None

    def _merged(self, names: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The base weight and bias with ``names`` multiplied in, built in new tensors (one rounding per
        adapter, in the base dtype, as PEFT does). Raises ValueError naming the adapter on NaN or inf."""
        base = self.get_base_layer()
        weight, bias = base.weight.data, base.bias.data if self._scales_bias() else None
        for name in names:
            weight = (weight * self._weight_factor(name)).to(base.weight.dtype)
            if bias is not None:
                bias = (bias * self.ia3_l[name].detach().reshape(bias.shape)).to(base.bias.dtype)
            for what, t in (("weights", weight), ("bias", bias)):
                raise_if_not_finite(t, name, what, kept="the base layer was left unchanged")
        return weight, bias

    def check_merge(self, adapter_names: Optional[list[str]] = None) -> None:
        """Raise (changing nothing) if merging ``adapter_names`` would give NaN or inf weights."""
        self._merged(self.merge_names(adapter_names, warn=False))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Multiply the adapters' vectors into the base weight (and bias, for output-side modules).

        With ``safe_merge`` the products are built in copies and refused (base untouched) if any value is NaN
        or inf; otherwise the weight is scaled in place.
        """
        names = self.merge_names(adapter_names)
        if not names:
            return
        base = self.get_base_layer()
        if safe_merge:
            weight, bias = self._merged(names)
            base.weight.data = weight
            if bias is not None:
                base.bias.data = bias
        else:
            with torch.no_grad():
                for name in names:
                    base.weight.data.mul_(self._weight_factor(name))
                    if self._scales_bias():
                        base.bias.data.mul_(self.ia3_l[name].detach().reshape(base.bias.shape))
        self.merged_adapters.extend(names)

    def check_unmergeable(self) -> None:
        """Raise if a merged adapter cannot be divided back out (a zero entry in its vector)."""
        for name in self.merged_adapters:
            if name not in self.ia3_l:
                continue
            zeros = int((self.ia3_l[name] == 0).sum())
            if zeros:
                side = "input columns" if self.is_feedforward else "output rows"
                raise ValueError(
                    f"cannot unmerge (IA)^3 adapter {name!r}: its ia3_l has {zeros} zero "
                    f"entr{'y' if zeros == 1 else 'ies'}, so merging erased those {side} of the base "
                    "weight and they cannot be divided back. The adapter stays merged; reload the base "
                    "weights to undo it"
                )

    def unmerge(self) -> None:
        """Divide the merged vectors back out of the base weight (exact up to rounding; refused for zeros)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning)
            return
        self.check_unmergeable()
        base = self.get_base_layer()
        weight, bias = base.weight, base.bias if self._scales_bias() else None
        new_w, new_b = weight.data, None if bias is None else bias.data
        for name in reversed(self.merged_adapters):
            if name not in self.ia3_l:
                continue
            new_w = (new_w / self._weight_factor(name)).to(weight.dtype)
            if new_b is not None:
                new_b = (new_b / self.ia3_l[name].detach().reshape(new_b.shape)).to(bias.dtype)
        if not torch.isfinite(new_w).all() or (new_b is not None and not torch.isfinite(new_b).all()):
            raise ValueError(f"unmerging (IA)^3 adapters {self.merged_adapters} would give inf/NaN weights "
                             "(a vector entry too small for the weight dtype); the adapters stay merged")
        weight.data = new_w
        if bias is not None:
            bias.data = new_b
        self.merged_adapters.clear()

    def base_alone(self) -> bool:
        """Whether the base layer alone gives this layer's output: adapters disabled (a disabled layer with
        merged adapters is unmerged first, as PEFT does) or merged into the base weight."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return True
        return self.merged


class Linear(nn.Module, IA3Layer):
    """(IA)^3 on nn.Linear, and on transformers' Conv1D with ``fan_in_fan_out=True``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, is_feedforward: bool = False,
                 is_target_conv_1d_layer: bool = False, **kwargs: Any) -> None:
        super().__init__()
        IA3Layer.__init__(self, base_layer, is_feedforward=is_feedforward)
        self.fan_in_fan_out = config.fan_in_fan_out
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _fused_weight(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The [out, in] weight view for ``ia3_linear`` when the base is a plain Linear/Conv1D that a direct
        op call reproduces exactly (``base_is_fusable``: frozen, no hooks, forward not patched; no autocast,
        matching dtypes); None otherwise."""
        base = self.base_layer
        conv1d = conv1d_class()
        if type(base) is nn.Linear:
            weight = base.weight
        elif conv1d is not None and type(base) is conv1d:
            weight = base.weight.t()
        else:
            return None
        if not base_is_fusable(base) or weight.dtype != x.dtype or torch.is_autocast_enabled(x.device.type):
            return None
        return weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = call_adapter_names(self, kwargs)
        if self.base_alone():
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, args, kwargs)
        scale = self.active_scale()
        if scale is None:
            return self.base_layer(x, *args, **kwargs)
        weight = None if (args or kwargs) else self._fused_weight(x)
        if weight is not None:
            # x: [..., in]; weight: [out, in]; scale: [in] (feed-forward) or [out]
            return ia3_linear(x, weight, self.base_layer.bias, scale, self.is_feedforward)
        if self.is_feedforward:
            return self.base_layer(ia3_scale_input(x, scale), *args, **kwargs)
        return ia3_scale_output(self.base_layer(x, *args, **kwargs), scale)


    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str], args: tuple,
                             kwargs: dict) -> torch.Tensor:
        """Each sample scaled by its own adapter's vector (``'__base__'`` and adapters this layer does not hold:
        ones): the vectors are stacked once per call (one [N + 1, features] tensor; gradients reach each
        adapter's vector from its samples only) and gathered per row, no loop over adapters."""
        names = per_sample_adapter_names(adapter_names, x.shape[0])
        held = [n for n in dict.fromkeys(names) if n in self.ia3_l]
        if not held:
            return self.base_layer(x, *args, **kwargs)
        slots = {n: i for i, n in enumerate(held)}
        vecs = [self.ia3_l[n].flatten() for n in held]
        table = torch.stack([*vecs, torch.ones_like(vecs[0])])
        index = torch.tensor([slots.get(n, len(held)) for n in names], device=table.device)
        per_row = table[index].view(x.shape[0], *(1,) * (x.dim() - 2), -1)  # [B, 1.., features]
        if self.is_feedforward:
            return self.base_layer((x * per_row).to(x.dtype), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        return (out * per_row).to(out.dtype)


class ConvNd(nn.Module, IA3Layer):
    """(IA)^3 on ``nn.Conv2d`` / ``nn.Conv3d`` (the subclasses fix the dimension). PEFT 0.21 has no (IA)^3
    layer for ``nn.Conv1d``, so neither does peftfast (its checkpoints would not load in PEFT).

        feed-forward:  y = conv(l * x)        l: ia3_l[name], shape (1, in_channels, 1, ...)
        otherwise:     y = l * conv(x)        l: ia3_l[name], shape (1, out_channels, 1, ...)

    x: [N, in, *spatial]. Several active adapters multiply their vectors. Merging scales the weight
    [out, in / groups, *kernel] along its output rows, or (feed-forward) along the input channels each
    output row reads, which with ``groups > 1`` are that row's group's slice of ``l``; the bias is scaled
    with the output side. Plain torch ops on every backend: no Triton kernel for convolutions.
    """

    dims = 0  # spatial dimensions: set by Conv2d / Conv3d

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, is_feedforward: bool = False,
                 **kwargs: Any) -> None:
        super().__init__()
        IA3Layer.__init__(self, base_layer, is_feedforward=is_feedforward)
        weight = self.get_base_layer().weight
        if weight.dim() != self.dims + 2:
            raise ValueError(f"(IA)^3 {type(self).__name__} needs a base weight with {self.dims + 2} dimensions, "
                             f"got {weight.dim()} ({type(self.get_base_layer()).__name__})")
        self.fan_in_fan_out = config.fan_in_fan_out  # kept as PEFT does; a conv weight has one layout
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def ia3_shape(self) -> tuple[int, ...]:
        channels = self.in_features if self.is_feedforward else self.out_features
        return (1, channels) + (1,) * self.dims

    def _weight_factor(self, name: str) -> torch.Tensor:
        """``ia3_l[name]`` shaped to broadcast over the weight [out, in / groups, *kernel]."""
        vec = self.ia3_l[name].detach()
        if not self.is_feedforward:
            return vec.transpose(0, 1)  # (out, 1, 1, ...)
        base = self.get_base_layer()
        if base.groups == 1:
            return vec  # (1, in, 1, ...)
        # output row o reads input channels [g * in_g, (g + 1) * in_g) of group g = o // out_g
        in_g, out_g = base.in_channels // base.groups, base.out_channels // base.groups
        ones = (1,) * self.dims
        per_group = vec.reshape(base.groups, 1, in_g, *ones).expand(base.groups, out_g, in_g, *ones)
        return per_group.reshape(base.out_channels, in_g, *ones)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.base_alone():
            return self.base_layer(x, *args, **kwargs)
        names = self._active_names()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        scale = self.ia3_l[names[0]]
        for name in names[1:]:
            scale = scale * self.ia3_l[name]
        dtype = self.ia3_l[names[-1]].dtype  # PEFT computes in the last active adapter's dtype
        if self.is_feedforward:
            weight_dtype = self.get_base_layer().weight.dtype
            result = self.base_layer((x.to(dtype) * scale).to(weight_dtype), *args, **kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs).to(dtype) * scale
        return result.to(previous_dtype)

    def __repr__(self) -> str:
        return "ia3." + super().__repr__()


class Conv2d(ConvNd):
    """(IA)^3 on ``nn.Conv2d`` (see ``ConvNd``)."""

    dims = 2


class Conv3d(ConvNd):
    """(IA)^3 on ``nn.Conv3d`` (see ``ConvNd``)."""

    dims = 3
