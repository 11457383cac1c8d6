"""AdaLoRA layers: PEFT's module tree (lora_A, lora_E, lora_B, ranknum) over the fused LoRA ops.

An AdaLoRA adapter is LoRA in SVD form, per layer and adapter:

    A: [r, in]   E: [r, 1] (the singular values)   B: [out, r]   ranknum: [1] (frozen, the initial r)
    y = base(x) + (drop(x) @ (A * E)^T @ B^T) * scaling / (ranknum + 1e-5)

which is LoRA with ``A' = A * E`` (E folded into A's rows) and the scale ``scaling / (ranknum + 1e-5)``.
So the forward is one call of ``peftfast.kernels.lora_linear_fused`` over a plain frozen ``nn.Linear``
(one GEMM adds the adapter on the Triton backend) or of ``lora_linear`` on another base's output
(GPT-2's ``Conv1D``); autograd takes A' 's gradient back to A and E (``dA = dA' * E``,
``dE = sum_k dA' * A``), and dropout is the op's seed-based mask (none is saved for backward).
The rank allocator prunes a rank by zeroing its entry of E, so a pruned rank costs nothing in the
output but keeps its slot until the adapter is saved (then the file holds only the kept ranks).

Merging comes from ``AdditiveAdapterLayer`` (``get_delta_weight``). ``nn.Conv2d`` bases keep PEFT's
math in torch ops (the delta reshaped to the kernel and one extra convolution). bitsandbytes bases: ``bnb.py``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.lora import lora_linear
from ...kernels.lora_fused import lora_linear_fused
from ...utils.other import transpose
from ..additive import AdditiveAdapterLayer, LowRankAdapters, autocast_base, dropout_p
from ..adapter_layers import base_is_fusable, feature_sizes

# PEFT's guard against a zero rank count in the scale.
RANKNUM_EPS = 1e-5


class AdaLoraLayer(AdditiveAdapterLayer):
    adapter_layer_names = ("lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ParameterDict({})
        self.lora_B = nn.ParameterDict({})
        self.lora_embedding_A = nn.ParameterDict({})
        self.lora_embedding_B = nn.ParameterDict({})
        self.lora_E = nn.ParameterDict({})
        self.ranknum = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = feature_sizes(self.get_base_layer(), "AdaLoRA")
        # adapter -> (ranknum's version counter, its value): the scale is read without a device sync per forward
        self._ranknum_cache: dict[str, tuple[int, float]] = {}

    def a_columns(self) -> int:
        """Columns of lora_A: the base's input features (times the kernel size for a convolution)."""
        return self.in_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: Any, **kwargs: Any) -> None:
        """(Re)create adapter ``adapter_name`` with rank ``r`` (0 allowed: a fully pruned layer)."""
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"`r` should be a positive integer or 0, but the value passed is {r!r}")
        lora_dropout = config.lora_dropout
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        # drawn in PEFT's order (A, E, B, ranknum, then the init), so a seeded run draws what PEFT's does
        a = torch.randn(r, self.a_columns())
        e = torch.randn(r, 1)
        b = torch.randn(self.out_features, r)
        torch.randn(1)  # PEFT draws ranknum's storage before filling it
        if config.init_lora_weights:
            nn.init.zeros_(e)
            nn.init.normal_(a, mean=0.0, std=0.02)
            nn.init.normal_(b, mean=0.0, std=0.02)
        device, dtype = self.adapter_device_dtype()
        # only the new adapter's flags are set: the other adapters keep theirs (a frozen loaded one stays frozen)
        trainable = adapter_name in self.active_adapters and not getattr(config, "inference_mode", False)
        self.lora_A[adapter_name] = nn.Parameter(a.to(device=device, dtype=dtype), requires_grad=trainable)
        self.lora_B[adapter_name] = nn.Parameter(b.to(device=device, dtype=dtype), requires_grad=trainable)
        self.lora_E[adapter_name] = nn.Parameter(e.to(device=device, dtype=dtype), requires_grad=trainable)
        rank_device = device
        if device.type == "meta":  # low_cpu_mem_usage: checkpoints do not hold ranknum, so it is made here
            weight = getattr(self.get_base_layer(), "weight", None)
            rank_device = weight.device if weight is not None else torch.device("cpu")
        self.ranknum[adapter_name] = nn.Parameter(torch.full((1,), float(r), device=rank_device, dtype=dtype),
                                                  requires_grad=False)
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)

    def scale(self, adapter: str) -> float:
        """``scaling / (ranknum + 1e-5)``, the factor of the adapter's product (ranknum read once per change)."""
        ranknum = self.ranknum[adapter]
        cached = self._ranknum_cache.get(adapter)
        if cached is None or cached[0] != ranknum._version:
            # at least fp32 (PEFT keeps ranknum in fp32 on 16-bit models), fp64 on a float64 model
            wide = ranknum.detach().to(torch.promote_types(ranknum.dtype, torch.float32))
            cached = (ranknum._version, float((wide + RANKNUM_EPS).item()))
            self._ranknum_cache[adapter] = cached
        return float(self.scaling[adapter]) / cached[1]

    def folded_a(self, adapter: str) -> torch.Tensor:
        """``A * E``: [r, in], E folded into A's rows (differentiable in both)."""
        return self.lora_A[adapter] * self.lora_E[adapter]

    def delta_matrix(self, adapter: str) -> torch.Tensor:
        """``B @ (A * E) * scaling / (ranknum + 1e-5)`` ([out, a_columns]) in the adapter's dtype, as PEFT."""
        return (self.lora_B[adapter] @ self.folded_a(adapter)) * self.scaling[adapter] \
            / (self.ranknum[adapter] + RANKNUM_EPS)

    def active_names(self) -> list[str]:
        """The active adapters this layer holds with a rank above zero."""
        return [n for n in self.active_adapters if n in self.lora_A and self.r.get(n, 0) > 0]

    def base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs)

    def disabled_forward(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """The base output when adapters are disabled (merged ones unmerged first) or merged; None otherwise."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError("AdaLoRA does not support adapter_names (one adapter per sample), as in PEFT; "
                             "use set_adapter() instead")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_forward(x, *args, **kwargs)
        if self.merged:
            return self.base_forward(x, *args, **kwargs)
        return None


class SVDLinear(nn.Module, AdaLoraLayer):
    """AdaLoRA on nn.Linear, and on transformers' Conv1D (``fan_in_fan_out``)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: float = 1,
                 fan_in_fan_out: bool = False, **kwargs: Any) -> None:
        super().__init__()
        AdaLoraLayer.__init__(self, base_layer)
        self.get_base_layer().weight.requires_grad = False
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config=config)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return transpose(self.delta_matrix(adapter), self.fan_in_fan_out)

    def adapter_bundle(self, names: list[str]) -> LowRankAdapters:
        drop = self.lora_dropout._modules
        return LowRankAdapters([self.folded_a(n) for n in names], [self.lora_B[n] for n in names],
                               [self.scale(n) for n in names], [dropout_p(drop[n]) for n in names]).under_autocast()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        special = self.disabled_forward(x, args, kwargs)
        if special is not None:
            return special
        names = self.active_names()
        base = self.base_layer
        if names and not args and not kwargs and type(base) is nn.Linear and base_is_fusable(base):
            # a plain frozen nn.Linear: the base GEMM and the adapters in one op (one GEMM on the Triton backend)
            return lora_linear_fused(*autocast_base(x, base.weight, base.bias), *self.adapter_bundle(names),
                                     self.training)
        result = self.base_forward(x, *args, **kwargs)
        return lora_linear(x, result, *self.adapter_bundle(names), self.training) if names else result

    def __repr__(self) -> str:
        return "adalora." + super().__repr__()


class SVDConv2d(nn.Module, AdaLoraLayer):
    """AdaLoRA on nn.Conv2d: A is [r, in * kh * kw] and the delta is reshaped to the kernel (PEFT's math, torch
    ops on every backend: there is no Triton kernel for convolutions)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: float = 1,
                 **kwargs: Any) -> None:
        super().__init__()
        AdaLoraLayer.__init__(self, base_layer)
        self.get_base_layer().weight.requires_grad = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config=config)

    def a_columns(self) -> int:
        base = self.get_base_layer()
        return self.in_features * base.kernel_size[0] * base.kernel_size[1]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return self.delta_matrix(adapter).reshape(self.get_base_layer().weight.shape)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        special = self.disabled_forward(x, args, kwargs)
        if special is not None:
            return special
        result = self.base_forward(x, *args, **kwargs)
        base = self.get_base_layer()
        for name in self.active_names():
            x = x.to(self.lora_A[name].dtype)
            delta = self.get_delta_weight(name)
            result = result + F.conv2d(self.lora_dropout[name](x), delta, stride=base.stride, padding=base.padding,
                                       dilation=base.dilation, groups=base.groups).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "adalora." + super().__repr__()
