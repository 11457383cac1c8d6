"""LoRA layers: the module tree of PEFT (base_layer, lora_A, lora_B, scaling, ...) over fused ops.

One forward for all active adapters of a layer: the adapter math is a single call to
``peftfast.kernels.lora.lora_linear`` (fused Triton kernels on CUDA, the PyTorch reference
elsewhere), not a Python loop of nn.Linear calls. Dropout modules are kept in ``lora_dropout``
so the module tree matches PEFT's, but the op applies dropout itself from a seed, so no mask is
kept for backward. The active adapters reach the op as one ``LowRankAdapters`` bundle
(``adapter_bundle``), unpacked into its per-argument lists.

Merging, unmerging and safe merging come from ``peftfast.tuners.additive.AdditiveAdapterLayer``:
each layer here only says what its delta is (``get_delta_weight``).

Convolutions (``Conv1d`` / ``Conv2d`` / ``Conv3d``) keep PEFT's math in plain torch ops on every
backend: there is no Triton kernel for them (the adapter is two small convolutions next to the base
one, and the base convolution itself is not ours to fuse). So does ``MultiheadAttention``, whose
adapters act through the projection weights the attention op reads.
"""
from __future__ import annotations

import math
import operator
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.lora import lora_linear
from ...kernels.lora_fused import dora_linear_fused, dora_row_norm_fused, lora_linear_fused
from ...kernels.lora_grouped_embedding import lora_grouped_embedding
from ...utils.errors import PeftWarning
from ...utils.steps import optimizer_steps
from ...utils.other import copy_rank_blocks, embed_scale, transpose
from ...utils.routing import call_adapter_names
from ..additive import (AdditiveAdapterLayer, LowRankAdapters, QuantizedAdditiveLayer, autocast_base, autocast_dtype,
                        dropout_p, low_rank_delta)
from ..adapter_layers import CONV_CLASSES, base_is_fusable, feature_sizes, raise_if_not_finite
from ..tuners_utils import creation_device, per_sample_adapter_names
from .grouped import AdapterStore, grouped_delta, grouped_linear, may_fuse, reserved_rank, shared_plan
from .bdlora import BlockDiagonalLinear, dense_factor
from .dora import DoraMagnitude, FrozenNormCache, compute_dtype, dora_row_norm, exact_row_norm, tensor_version
from ..buffer_dict import BufferDict
from .velora import VeloraConfig, VeloraProjection, batch_average_projection, group_dim, unit_projection

# what ``Linear._plain_adapters_key`` reads per factor, and the types it accepts
_VERSION, _SHAPE, _DATA_PTR = operator.attrgetter("_version"), operator.attrgetter("shape"), torch.Tensor.data_ptr
_LINEAR_ONLY, _NUMBER_TYPES = {nn.Linear}, {float, int}

# PEFT's per-adapter VeLoRA state on a layer, created with its first VeLoRA adapter (``_velora_init``)
VELORA_NAMES = ("lora_velora_embed", "lora_velora_initialized", "lora_velora_num_groups", "lora_velora_init_type",
                "lora_velora_scale")


# (parameter, tensor it held) for each base weight an initialisation replaced (PiSSA, OLoRA), while a
# ``base_weight_changes()`` block is open: lets the caller put them back when adding the adapter fails
_BASE_WEIGHT_LOG: ContextVar[Optional[list]] = ContextVar("peftfast_lora_base_weight_log", default=None)


def log_base_weight(param: nn.Parameter) -> None:
    """``param.data`` is about to be replaced: remember the tensor it holds now (no copy)."""
    log = _BASE_WEIGHT_LOG.get()
    if log is not None:
        log.append((param, param.data))


def log_base_child(parent: nn.Module, name: str) -> None:
    """Child ``name`` of a base module is about to be replaced (MultiheadAttention's out_proj): remember it."""
    log = _BASE_WEIGHT_LOG.get()
    if log is not None:
        log.append((parent, name, getattr(parent, name)))


@contextmanager
def base_weight_changes() -> Iterator[None]:
    """Base weights replaced inside this block (by PiSSA / OLoRA initialisation) get their old tensors back
    when the block raises, and so do base modules whose children were wrapped (MultiheadAttention)."""
    log: list = []
    token = _BASE_WEIGHT_LOG.set(log)
    try:
        yield
    except BaseException:
        for entry in reversed(log):
            if len(entry) == 3:
                setattr(*entry)
            else:
                entry[0].data = entry[1]
        raise
    finally:
        _BASE_WEIGHT_LOG.reset(token)


class LoraLayer(AdditiveAdapterLayer):
    supports_bd_lora = False  # whether a factor may be block-diagonal (BD-LoRA): Linear
    supports_velora = False  # whether an adapter may be VeLoRA (velora_config): Linear
    # PEFT's names: every per-adapter container is listed here, so delete_adapter leaves no trace of an adapter.
    # lora_magnitude_vector holds the magnitude of each DoRA adapter (``.dora``).
    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "use_rslora", "lora_bias")
    # PEFT's files name a DoRA magnitude 'x.lora_magnitude_vector' (no '.weight'), as before it became a module
    checkpoint_flat_containers = ("lora_magnitude_vector",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict({})
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self.lora_embedding_A = nn.ParameterDict({})
        self.lora_embedding_B = nn.ParameterDict({})
        self.lora_magnitude_vector = nn.ModuleDict()
        self.use_dora: dict[str, bool] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = self._feature_sizes()
        # PEFT's runtime option: compute DoRA's initial norms on the GPU for adapters kept on the CPU
        self.ephemeral_gpu_offload: bool = bool(kwargs.pop("ephemeral_gpu_offload", False))
        self.kwargs = kwargs
        # adapter -> containers (of adapter_layer_names) whose entry for it never trains: MiCA's lora_B
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}
        self._dora_w_sq = FrozenNormCache()  # ||W_o||^2 of a frozen float base
        self._dora_merged_norms: dict[str, torch.Tensor] = {}  # the norm each merged DoRA adapter was merged with

    def _feature_sizes(self) -> tuple[int, int]:
        """(in_features, out_features) of the base layer (``ParamWrapper``: of the targeted parameter)."""
        return feature_sizes(self.get_base_layer(), "LoRA", embedding=True)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights: bool | str = True, use_rslora: bool = False, use_dora: bool = False,
                     lora_bias: bool = False, bd_lora: Optional[tuple[str, int]] = None, use_kasa: bool = False,
                     velora: Optional[VeloraConfig] = None, **kwargs: Any) -> None:
        """Add (or re-create) adapter ``adapter_name``. ``bd_lora``: ('A' or 'B', nblocks) for BD-LoRA, the factor
        made block-diagonal (``bdlora.py``); ``velora``: a ``VeloraConfig`` for VeLoRA (``velora.py``); linear
        layers only. ``use_kasa``: a KaSA adapter (``kasa_init``)."""
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if use_kasa:
            self.check_kasa(r)
        if velora is not None and not self.supports_velora:
            kind = type(self.get_base_layer()).__name__
            what = "conv layers" if isinstance(self, ConvNd) else f"a {kind} ({type(self).__name__})"
            raise ValueError(f"VeLoRA does not support adapting {what}: velora_config supports LoRA on nn.Linear "
                             f"and Conv1D layers only; leave this {kind} out of target_modules or set "
                             "velora_config=None")
        if bd_lora is not None and not self.supports_bd_lora:
            raise ValueError(f"BD-LoRA (use_bdlora) supports LoRA on nn.Linear and Conv1D layers only, not on a "
                             f"{type(self.get_base_layer()).__name__} ({type(self).__name__}); leave this layer out of "
                             "target_modules_bd_a / target_modules_bd_b (with match_strict=False)")
        if lora_bias:
            self.check_lora_bias()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.use_dora[adapter_name] = bool(use_dora)
        self.use_rslora[adapter_name] = use_rslora
        self.lora_bias[adapter_name] = bool(lora_bias)
        self._create_adapter_weights(adapter_name, r)
        self.init_adapter_weights(adapter_name, init_lora_weights)
        self._place_adapter_weights(adapter_name)
        if bd_lora is not None:
            self._make_block_diagonal(adapter_name, *bd_lora)
        if use_dora:
            self.dora_init(adapter_name)
        elif adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        if use_kasa:
            self.kasa_init(adapter_name)
        elif self.kasa_diag(adapter_name) is not None:
            del self.lora_diag[adapter_name]
        if velora is not None:
            self._velora_init(adapter_name, velora)
        else:
            self._velora_forget(adapter_name)
        self.set_adapter(self.active_adapters)

    # -- VeLoRA (velora.py) -------------------------------------------------------------------------------
    # Per adapter: lora_velora_embed (a persistent buffer, saved with the adapter), and plain dicts for whether it
    # was set from a batch yet, num_groups, init_type and scale: PEFT's names, made with the first VeLoRA adapter.

    def _velora_init(self, adapter_name: str, config: VeloraConfig) -> None:
        if "lora_velora_scale" not in self.__dict__:
            self.lora_velora_embed = BufferDict({}, persistent=True)
            for name in VELORA_NAMES[1:]:
                setattr(self, name, {})
            self.other_param_names = tuple(self.other_param_names) + VELORA_NAMES
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        d = group_dim(self.in_features, config.num_groups)
        random = config.init_type == "random"
        if random:  # drawn after the factors, on the base weight's device and in its dtype (PEFT's order)
            embed = unit_projection(torch.randn(d, device=weight.device, dtype=dtype)).to(dtype)
        else:
            embed = torch.zeros(d, device=weight.device, dtype=dtype)
        self.lora_velora_embed[adapter_name] = embed
        self.lora_velora_initialized[adapter_name] = random
        self.lora_velora_num_groups[adapter_name] = config.num_groups
        self.lora_velora_init_type[adapter_name] = config.init_type
        self.lora_velora_scale[adapter_name] = float(config.scale)

    def _velora_forget(self, adapter_name: str) -> None:
        """Drop ``adapter_name``'s VeLoRA state (it is re-created as a plain LoRA adapter)."""
        if "lora_velora_scale" in self.__dict__:
            for name in VELORA_NAMES:
                holder = getattr(self, name)
                if adapter_name in holder:
                    del holder[adapter_name]

    def velora_adapters(self) -> dict[str, float]:
        """VeLoRA adapter -> its scale (empty when the layer has none)."""
        return self.__dict__.get("lora_velora_scale") or {}

    def _velora_update_embed(self, adapter_name: str, x: torch.Tensor) -> None:
        """Set the projection vector from the batch ``x`` (dropped-out input) as ``init_type`` says."""
        init_type = self.lora_velora_init_type[adapter_name]
        if init_type == "random" or (init_type == "batch_average_once" and self.lora_velora_initialized[adapter_name]):
            return
        with torch.no_grad():
            embed = batch_average_projection(x, self.lora_velora_num_groups[adapter_name])
            old = self.lora_velora_embed[adapter_name]
            # a new tensor, not an in-place write: a graph recorded earlier keeps the vector it used
            self.lora_velora_embed[adapter_name] = embed.to(device=old.device, dtype=old.dtype)
        self.lora_velora_initialized[adapter_name] = True

    def _velora_step(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``result + scaling * lora_B(VeLoRA-projection(dropout(x)))`` for one adapter in training: PEFT's math,
        with lora_A's input kept as [N, num_groups] for backward (``VeloraProjection``)."""
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        if self.cast_input_dtype_enabled:
            x = x.to(a.weight.dtype)
        x = self.lora_dropout[adapter_name](x)
        self._velora_update_embed(adapter_name, x)
        after_a = VeloraProjection.apply(x, a.weight, self.lora_velora_embed[adapter_name],
                                         self.lora_velora_num_groups[adapter_name],
                                         self.lora_velora_scale[adapter_name])
        return result + b(after_a) * self.scaling[adapter_name]

    def velora_training(self, names: list[str]) -> list[str]:
        """The VeLoRA adapters of ``names`` when this forward records a gradient in training (else none: a VeLoRA
        adapter is then plain LoRA)."""
        vel = self.velora_adapters()
        if not vel or not self.training or not torch.is_grad_enabled():
            return []
        return [n for n in names if n in vel]

    # -- KaSA (kasa_config): linear layers only, see Linear.kasa_init ------------------------------------------
    def check_kasa(self, r: int) -> None:
        """Raise where a KaSA adapter of rank ``r`` cannot be added here."""
        raise ValueError(f"{type(self).__name__} does not support KaSA, please set `kasa_config=None`.")

    def kasa_init(self, adapter_name: str) -> None:
        raise NotImplementedError

    def kasa_diag(self, adapter_name: str) -> Optional[nn.Parameter]:
        """``lora_diag[adapter_name]`` of a KaSA adapter, else None."""
        diag = self._modules.get("lora_diag")
        return diag[adapter_name] if diag is not None and adapter_name in diag else None

    def apply_pending_kasa(self) -> None:
        """Truncate the base weight for KaSA adapters added while it was on the meta device."""

    def _rank_above(self, target_rank: int) -> Optional[str]:
        """Hot-swap padding: the message for an adapter whose rank exceeds ``target_rank``, else None."""
        for name in self.lora_A:
            rank = self.lora_A[name].weight.shape[0]
            if rank > target_rank:
                return (f"Trying to pad the adapter to the target rank {target_rank}, but the original rank is larger "
                        f"({rank}). This is not possible.")
        return None

    # -- DoRA ---------------------------------------------------------------------------------------------
    # Every layer sees its weight as rows, one per output feature: ``dora_rows`` turns a tensor in the base
    # weight's stored layout into that [out, -1] view, ``dora_factors`` gives (A [r, -1], B [out, r]) in the
    # same orientation, so the norm of ``W + s B A`` and the merge are written once for every layer type.

    def dora_rows(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (base weight layout) as [out, -1]: a view (writes reach ``t``)."""
        raise NotImplementedError

    def dora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, -1], B [out, r]) of ``adapter``, oriented like ``dora_rows``."""
        return self.lora_A[adapter].weight.flatten(1), self.lora_B[adapter].weight.flatten(1)

    def dora_base_weight(self) -> torch.Tensor:
        """The base weight in its stored layout, as a float tensor (quantised layers: dequantised, fp32)."""
        return self.get_base_layer().weight

    def dora_magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_features,)

    def dora_norm_delta(self, adapter: str) -> Optional[torch.Tensor]:
        """The [out, -1] delta (before scaling) a layer's DoRA norm must add as a materialised tensor, for layers
        where it is not ``B @ A`` of ``dora_factors``; None elsewhere."""
        return None

    def _dora_row_norm(self, adapter: str, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       w_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
        special = self.dora_norm_delta(adapter)
        if special is not None:
            special = special.to(rows.device)
            return exact_row_norm(rows, self.scaling[adapter] * special, compute_dtype(rows, special))
        return dora_row_norm(rows, a.to(rows.device), b.to(rows.device), self.scaling[adapter], w_sq)

    @torch.no_grad()
    def dora_init(self, adapter: str) -> None:
        """Create ``lora_magnitude_vector[adapter]``: ``m = ||W + s B A||_row`` (PEFT's initialisation)."""
        a, b = self.dora_factors(adapter)
        weight = self.dora_base_weight()
        if a.is_meta:  # low_cpu_mem_usage: the checkpoint provides the magnitude (PEFT saves it)
            dtype = torch.promote_types(weight.dtype, a.dtype) if weight.is_floating_point() else a.dtype
            m = torch.empty(self.dora_magnitude_shape(), device="meta", dtype=dtype)
            self.lora_magnitude_vector[adapter] = DoraMagnitude(m)
            return
        device = a.device
        if self.ephemeral_gpu_offload and torch.cuda.is_available() and device.type == "cpu":
            device = torch.device("cuda")
        rows = self.dora_rows(weight.detach()).to(device)
        norm = None
        if type(self.get_base_layer()) is nn.Linear and self.dora_norm_delta(adapter) is None:
            # the fused forward's own norm kernel (Triton backend): a fresh adapter's m equals the norm that
            # forward computes bit for bit, so mns == 1 exactly and the base output is unchanged
            norm = dora_row_norm_fused(rows, [a.to(rows.device)], [b.to(rows.device)],
                                       [float(self.scaling[adapter])])
        if norm is None:
            norm = self._dora_row_norm(adapter, rows, a, b)
        dtype = torch.promote_types(weight.dtype, a.dtype) if weight.is_floating_point() else a.dtype
        m = norm.to(device=a.device, dtype=dtype).reshape(self.dora_magnitude_shape())
        self.lora_magnitude_vector[adapter] = DoraMagnitude(m)

    def dora_norm(self, adapter: str) -> torch.Tensor:
        """``||W + s B A||_row`` of ``adapter`` [out] (float32, float64 for float64 weights; no gradient); kept
        between forwards in eval mode under DoRA caching (``dora.py``)."""
        return self.lora_magnitude_vector[adapter].cached("weight-norm", self.dora_version(adapter),
                                                          lambda: self.computed_dora_norm(adapter))

    def dora_version(self, adapter: str, *extra: Any) -> Optional[tuple]:
        """What ``adapter``'s norm depends on (the base weight, A, B as ``tensor_version``, the scaling, ``extra``);
        None where a tensor keeps no version counter."""
        a, b = self.dora_factors(adapter)
        parts = [tensor_version(t) for t in (self.get_base_layer().weight, a, b)]
        if any(part is None for part in parts):
            return None
        return (*parts, float(self.scaling[adapter]), *extra)

    def computed_dora_norm(self, adapter: str) -> torch.Tensor:
        """``dora_norm`` computed now (no cache)."""
        a, b = self.dora_factors(adapter)
        weight = self.dora_base_weight()
        rows = self.dora_rows(weight.detach())
        w_sq = None
        if isinstance(weight, nn.Parameter) and not weight.requires_grad:
            w_sq = self._dora_w_sq.get(weight, rows, compute_dtype(rows, a, b))
        return self._dora_row_norm(adapter, rows, a, b, w_sq)

    def dora_scale(self, adapter: str) -> torch.Tensor:
        """``m / ||W + s B A||_row`` in the magnitude's shape and dtype; gradient to m only."""
        m = self.lora_magnitude_vector[adapter].weight
        return m / self.dora_norm(adapter).to(device=m.device, dtype=m.dtype).view(m.shape)

    def uses_dora(self, names: list[str]) -> bool:
        use = self.use_dora
        return any(use.get(n, False) for n in names)

    def _unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A copy of ``weight`` (the base weight now, in the layout of the merge) with every merged adapter taken
        out again: the weight DoRA's norm is defined on, whatever was merged before."""
        base = weight.clone()
        return self._remove_merged(base, list(reversed(self.merged_adapters)))

    def _remove_merged(self, weight: torch.Tensor, names: list[str]) -> torch.Tensor:
        for name in names:
            if not self.holds(name):
                continue
            delta = self.get_delta_weight(name).to(device=weight.device, dtype=weight.dtype)
            if self.use_dora.get(name, False):
                factor = self._dora_merge_factor(name, self._dora_merged_norms[name], weight)
                rows = self.dora_rows(weight)
                rows.copy_(rows / factor - self.dora_rows(delta))
            else:
                weight -= delta
        return weight

    def _dora_merge_factor(self, name: str, norm: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        m = self.lora_magnitude_vector[name].weight.detach().reshape(-1)
        return (m.to(norm.dtype) / norm).to(device=weight.device, dtype=weight.dtype).view(-1, 1)

    @torch.no_grad()
    def add_deltas(self, weight: torch.Tensor, names: list[str], subtract: bool = False,
                   check: bool = False) -> torch.Tensor:
        """As the additive layers', with DoRA's merge ``W <- (m / ||W0 + dW||_row) * (W + dW)`` (W0: the base
        weight with nothing merged, as the forward sees it) and its inverse, with the norm kept from the merge.
        A plain LoRA adapter is added or subtracted as usual."""
        self._dora_w_sq.clear()
        if not self.uses_dora(names):
            return super().add_deltas(weight, names, subtract=subtract, check=check)
        if subtract:
            self._remove_merged(weight, names)
            for name in names:
                self._dora_merged_norms.pop(name, None)
            return weight
        base_rows = self.dora_rows(self._unmerged_weight(weight))
        norms = {}
        for name in names:
            delta = self.get_delta_weight(name).to(device=weight.device, dtype=weight.dtype)
            if self.use_dora.get(name, False):
                d_rows = self.dora_rows(delta)
                norm = exact_row_norm(base_rows, d_rows, compute_dtype(base_rows, d_rows)).to(weight.dtype)
                norms[name] = norm
                rows = self.dora_rows(weight)
                rows.copy_(self._dora_merge_factor(name, norm, weight) * (rows + d_rows))
            else:
                weight += delta
            if check:
                raise_if_not_finite(weight, name)
        self._dora_merged_norms.update(norms)
        return weight

    def _create_adapter_weights(self, adapter_name: str, r: int) -> None:
        device, dtype = self.creation_device_dtype()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=self.lora_bias.get(adapter_name, False),
                                              device=device, dtype=dtype)

    def creation_device_dtype(self) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
        """Where new adapter weights are made and initialised: as in PEFT, with torch's defaults (CPU float32
        unless set otherwise; None, None), then moved to ``adapter_device_dtype()`` by ``_place_adapter_weights``,
        so a seeded run draws what PEFT's does (a 16-bit or CUDA tensor's random draws are other numbers); the meta
        device and the target dtype inside ``adapter_weights_on_meta``."""
        device, dtype = self.adapter_device_dtype()
        return (device, dtype) if device.type == "meta" else (None, None)

    def _place_adapter_weights(self, adapter_name: str) -> None:
        """The new adapter's lora_A / lora_B (modules) and embedding factors (parameters) to the base's device and
        dtype (``adapter_device_dtype``), after their initialisation."""
        device, dtype = self.adapter_device_dtype()
        for name in ("lora_A", "lora_B"):
            modules = getattr(self, name)
            if adapter_name in modules:
                modules[adapter_name].to(device=device, dtype=dtype)
        for name in ("lora_embedding_A", "lora_embedding_B"):
            params = getattr(self, name)
            if adapter_name in params:
                p = params[adapter_name]
                if p.device != device or p.dtype != dtype:
                    params[adapter_name] = nn.Parameter(p.data.to(device=device, dtype=dtype),
                                                        requires_grad=p.requires_grad)

    # -- lora_bias ------------------------------------------------------------------------------------------
    # PEFT's lora_B of an adapter with lora_bias=True carries a bias b: the adapter adds s * (B A x + b), and
    # merging adds s * b to the base layer's bias.

    def bias_names(self, names: list[str]) -> list[str]:
        """The adapters of ``names`` that carry a lora_B bias here."""
        flags = self.lora_bias
        return [n for n in names if flags.get(n, False) and n in self.lora_B]

    def add_lora_bias(self, result: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``result`` plus ``scaling * lora_B.bias`` of every adapter of ``names`` that has one (a broadcast over
        the last dimension for linears; convolutions add theirs inside lora_B)."""
        for name in self.bias_names(names):
            result = result + (self.lora_B[name].bias * self.scaling[name]).to(result.dtype)
        return result

    def _merged_bias(self, names: list[str], subtract: bool = False) -> Optional[torch.Tensor]:
        """The base bias after adding (subtracting) ``scaling * lora_B.bias`` of ``names``; None when none of them
        has a bias."""
        names = self.bias_names(names)
        if not names:
            return None
        base_bias = self.get_base_layer().bias
        new = base_bias.detach().clone()
        for name in names:
            delta = (self.lora_B[name].bias.detach() * self.scaling[name]).to(device=new.device, dtype=new.dtype)
            new = new - delta if subtract else new + delta
        return new

    def _adapters_to_merge(self, adapter_names: list[str] | None, warn: bool = True) -> list[str]:
        # asked of every layer before any is changed, so no layer is left half-merged
        names = super()._adapters_to_merge(adapter_names, warn=warn)
        if self.bias_names(names) and getattr(self.get_base_layer(), "bias", None) is None:
            raise RuntimeError(f"Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias "
                               f"(adapters {', '.join(self.bias_names(names))} on a "
                               f"{type(self.get_base_layer()).__name__} without bias); use the unmerged model")
        return names

    def check_merge(self, adapter_names: Optional[list[str]] = None) -> None:
        super().check_merge(adapter_names)
        names = self.merge_names(adapter_names, warn=False)
        new = self._merged_bias(names)
        if new is not None and not torch.isfinite(new).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {', '.join(self.bias_names(names))} "
                             "seems to be broken (its lora_B bias makes the merged bias non-finite)")

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        self.apply_pending_kasa()
        names = self.merge_names(adapter_names, warn=False)
        new = self._merged_bias(names)
        if safe_merge and new is not None and not torch.isfinite(new).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {', '.join(self.bias_names(names))} "
                             "seems to be broken (its lora_B bias makes the merged bias non-finite)")
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        if new is not None:
            self.get_base_layer().bias.data = new

    def unmerge(self) -> None:
        new = self._merged_bias(list(self.merged_adapters), subtract=True) if self.merged else None
        super().unmerge()
        if new is not None:
            self.get_base_layer().bias.data = new

    def check_lora_bias(self) -> None:
        """Called before an adapter with ``lora_bias=True`` is added: raise where the layer type has no place for
        the bias; warn (as PEFT) where the base layer has no bias to merge it into."""
        if getattr(self.get_base_layer(), "bias", None) is None:
            warnings.warn(f"`lora_bias=True` was passed but the targeted layer of type "
                          f"{type(self.get_base_layer()).__name__} has no bias. This means that merging LoRA weights "
                          "won't be possible.", PeftWarning)

    def init_adapter_weights(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        """Initialise the new adapter's weights as ``init_lora_weights`` asks. Linear layers add the
        initialisations that read (and PiSSA/OLoRA: change) the base weight; elsewhere they are refused, as in
        PEFT, for which they are unknown initialisations of these layer types."""
        if isinstance(init_lora_weights, str) and init_lora_weights != "gaussian":
            raise ValueError(f"Unknown initialization init_lora_weights={init_lora_weights!r} for LoRA on "
                             f"{type(self.get_base_layer()).__name__}: 'pissa', 'olora', 'orthogonal' and 'mica' "
                             "need a linear layer ('mica': or an embedding); here: True, False or 'gaussian'")
        self.reset_lora_parameters(adapter_name, init_lora_weights)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        if init_lora_weights is False:
            return
        if adapter_name in self.lora_A:
            if init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A[adapter_name].weight, std=1.0 / self.r[adapter_name])
            else:
                nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[adapter_name].weight)
            if getattr(self.lora_B[adapter_name], "bias", None) is not None:  # lora_bias
                nn.init.zeros_(self.lora_B[adapter_name].bias)
        if adapter_name in self.lora_embedding_A:
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])

    def base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output for ``x`` (quantised layers override this with a fused dequant-matmul)."""
        return self.base_layer(x, *args, **kwargs)

    def disabled_or_mixed_forward(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """The output when the active adapters do not simply apply: adapters disabled (the base output, merged
        adapters unmerged first) or a mixed batch (``adapter_names``, popped from ``kwargs``); None otherwise."""
        adapter_names = call_adapter_names(self, kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_forward(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        return None

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any):
        """Each sample of the batch uses its own adapter (``'__base__'`` for none), as PEFT's
        ``adapter_names``; each layer class adds one adapter with ``_with_adapter``."""
        if self.merged:
            raise ValueError("adapter_names cannot be used while adapters are merged; unmerge first")
        per_token = bool(adapter_names) and isinstance(adapter_names[0], (list, tuple))
        flat = [n for per in adapter_names for n in per] if per_token else adapter_names
        if self.uses_dora([n for n in dict.fromkeys(flat) if n != "__base__"]):
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled: a batch mixing adapters is "
                             "supported for LoRA adapters without use_dora only")
        if per_token:  # one name per token
            fused = self._grouped_fused(x, adapter_names, args, kwargs)
            if fused is not None:
                return fused
            result = self.base_forward(x, *args, **kwargs)
            out = self._grouped_mixed(x, result, adapter_names)
            if out is None:
                raise ValueError(f"adapter_names per token is supported for LoRA on linear layers, not on "
                                 f"{type(self.get_base_layer()).__name__}; give one adapter name per sample")
            return out
        adapter_names = per_sample_adapter_names(adapter_names, x.shape[0])
        fused = self._grouped_fused(x, adapter_names, args, kwargs)
        if fused is not None:
            return fused
        result = self.base_forward(x, *args, **kwargs)
        grouped = self._grouped_mixed(x, result, adapter_names)
        if grouped is not None:
            return grouped
        out = result.clone()
        for name in dict.fromkeys(adapter_names):
            if name == "__base__" or not self.holds(name):
                continue
            idx = [i for i, n in enumerate(adapter_names) if n == name]
            out[idx] = self._with_adapter(x[idx], result[idx], name)
        return out

    def _grouped_mixed(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list) -> Optional[torch.Tensor]:
        """``result`` plus each row's adapter as one grouped op (``grouped.py``), or None where the layer type
        has no grouped path (the caller then adds one adapter at a time)."""
        return None

    def _grouped_fused(self, x: torch.Tensor, adapter_names: list, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """The whole output (base layer and each row's adapter) as one fused op, or None where the layer computes
        its base output first (then ``_grouped_mixed``)."""
        return None
    # -- weights an adapter keeps frozen (MiCA: its B) -------------------------------------------------------
    def freeze_peft_weight(self, adapter_name: str, container: str) -> None:
        """``container[adapter_name]`` (e.g. lora_B) stays frozen, whatever set_adapter / set_requires_grad do."""
        names = self.frozen_peft_weight_names.get(adapter_name, ())
        if container not in names:
            self.frozen_peft_weight_names[adapter_name] = names + (container,)
        self._freeze_non_trainable_peft_weights()

    def _freeze_non_trainable_peft_weights(self) -> None:
        for adapter_name, containers in self.frozen_peft_weight_names.items():
            for container in containers:
                holder = getattr(self, container)
                if adapter_name in holder:
                    holder[adapter_name].requires_grad_(False)

    def set_adapter(self, adapter_names: Any, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self._freeze_non_trainable_peft_weights()

    def set_requires_grad(self, adapter_names: Any, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self._freeze_non_trainable_peft_weights()

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self._freeze_non_trainable_peft_weights()

    def _minor_components(self, weight: torch.Tensor, adapter_name: str) -> Optional[torch.Tensor]:
        """MiCA: the left singular vectors of ``weight`` ([rows, cols], float) for its r smallest singular values,
        [rows, r] float32; None on the meta device (a checkpoint fills the adapter in)."""
        if weight.is_meta:
            return None
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"MiCA initialisation needs a float32, float16 or bfloat16 base weight, got {weight.dtype}")
        r = self.r[adapter_name]
        if r > min(weight.shape):
            raise ValueError(f"MiCA requires `r` <= min(in_features, out_features) but got r={r} for a layer with "
                             f"weight shape {tuple(self.get_base_layer().weight.shape)} (max usable r is "
                             f"{min(weight.shape)}).")
        u, _, _ = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        return u[:, -r:]

    # -- rank padding (peftfast.utils.hotswap.prepare_model_for_compiled_hotswap) -------------------------------
    # Zero rows of A and zero columns of B add nothing to B A, so padding keeps the output; every adapter of a
    # padded layer then has the same factor shapes whatever rank is swapped in later (no recompilation).

    def rank_padding_problem(self, target_rank: int) -> Optional[str]:
        """Why the adapters here cannot be padded to ``target_rank`` (None: they can, or this layer type is not
        padded at all)."""
        return None

    def pad_ranks(self, target_rank: int) -> bool:
        """Zero-pad every adapter's lora_A / lora_B here to rank ``target_rank`` (call ``rank_padding_problem``
        first); returns whether this layer type takes part in padding."""
        return False

    def _initial_scaling(self, adapter: str) -> float:
        """lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)), the scale the adapter was made with."""
        r = math.sqrt(self.r[adapter]) if self.use_rslora.get(adapter, False) else self.r[adapter]
        return self.lora_alpha[adapter] / r

    def set_scale(self, adapter: str, scale: float) -> None:
        """The adapter's scale set to ``scale`` times its initial one (PEFT's method; an adapter not here is
        ignored)."""
        if adapter in self.scaling:
            self.scaling[adapter] = scale * self._initial_scaling(adapter)

    def scale_layer(self, scale: float) -> None:
        """Multiply the scale of each active adapter here by ``scale`` (PEFT's method)."""
        if scale == 1:
            return
        for name in self.active_adapters:
            if name in self.lora_A:
                self.scaling[name] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        """Divide the scale of each active adapter here by ``scale``; None: back to its initial scale (PEFT's)."""
        for name in self.active_adapters:
            if name in self.lora_A:
                self.scaling[name] = self._initial_scaling(name) if scale is None else self.scaling[name] / scale

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._dora_merged_norms.pop(adapter_name, None)
        self.frozen_peft_weight_names.pop(adapter_name, None)


class Linear(nn.Module, LoraLayer):
    """LoRA on nn.Linear, and on transformers' Conv1D with ``fan_in_fan_out=True``."""

    supports_bd_lora = True
    supports_velora = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, is_target_conv_1d_layer: bool = False,
                 init_lora_weights: bool | str = True, use_rslora: bool = False, use_dora: bool = False,
                 lora_bias: bool = False, bd_lora: Optional[tuple[str, int]] = None, use_kasa: bool = False,
                 velora: Optional[VeloraConfig] = None, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora=use_dora,
                          lora_bias=lora_bias, bd_lora=bd_lora, use_kasa=use_kasa, velora=velora)

    # -- KaSA ------------------------------------------------------------------------------------------------
    # A KaSA adapter (PEFT's kasa_config) is LoRA with B replaced by B diag(d), d = lora_diag[name] (trained, [r]):
    # ``kasa_b`` folds d into B, so the fused ops, merging and mixed batches run it as a plain LoRA adapter
    # (autograd takes the gradient of B and d through the fold). Adding one truncates the base weight to its
    # rank min(in, out) - r SVD approximation, once, for good (``kasa_truncate``).

    def check_kasa(self, r: int) -> None:
        if self.fan_in_fan_out:
            raise ValueError("KaSA does not support `fan_in_fan_out=True` layers (e.g. Conv1D). Please target "
                             "nn.Linear layers.")
        if isinstance(self, QuantizedAdditiveLayer):
            raise ValueError(f"{type(self).__name__} does not support KaSA (its base weight is quantised and KaSA "
                             "rewrites it), please set `kasa_config=None`.")
        k = min(self.in_features, self.out_features)
        if r >= k:
            raise ValueError(f"KaSA requires `r` ({r}) to be smaller than min(in_features, out_features) ({k}) so "
                             "that at least one singular component of the base weight is preserved after truncation.")

    def kasa_init(self, adapter_name: str) -> None:
        if "lora_diag" not in self._modules:
            self.lora_diag = nn.ParameterDict({})
            self.adapter_layer_names = type(self).adapter_layer_names + ("lora_diag",)
        r = self.r[adapter_name]
        a = self.lora_A[adapter_name].weight
        # random (B is zero at init, so the output does not change); on the meta device a checkpoint fills it in
        make = torch.empty if a.is_meta else torch.randn
        self.lora_diag[adapter_name] = nn.Parameter(make(r, device=a.device, dtype=a.dtype))
        if self.get_base_layer().weight.is_meta:
            self.__dict__.setdefault("_kasa_pending", set()).add(adapter_name)
        else:
            self.kasa_truncate(r)

    @torch.no_grad()
    def kasa_truncate(self, r: int) -> None:
        """The base weight becomes its best rank ``min(in, out) - r`` approximation (SVD in float32, float64 for a
        float64 weight), stored in its dtype."""
        param = self.get_base_layer().weight
        work = torch.float64 if param.dtype == torch.float64 else torch.float32
        u, sv, vh = torch.linalg.svd(param.detach().to(work), full_matrices=False)
        keep = min(param.shape) - r
        log_base_weight(param)
        param.data = ((u[:, :keep] * sv[:keep]) @ vh[:keep]).to(param.dtype).contiguous()

    def apply_pending_kasa(self) -> None:
        pending = self.__dict__.get("_kasa_pending")
        if not pending:
            return
        if self.get_base_layer().weight.is_meta:
            raise RuntimeError("KaSA could not apply its SVD base-weight truncation because the base weight is still "
                               "on the meta device. Materialize the base model weights before running a forward pass "
                               "or merging.")
        for name in sorted(pending):
            if name in self.r:
                self.kasa_truncate(self.r[name])
                diag = self.kasa_diag(name)
                if diag is not None and diag.is_meta:
                    weight = self.get_base_layer().weight
                    self.lora_diag[name] = nn.Parameter(torch.randn(diag.shape, device=weight.device,
                                                                    dtype=weight.dtype))
        pending.clear()

    def kasa_b(self, name: str, b: torch.Tensor) -> torch.Tensor:
        """The dense lora_B factor ``b`` of adapter ``name`` with its KaSA diagonal folded in (``b`` otherwise)."""
        diag = self.kasa_diag(name)
        return b if diag is None else b * diag.to(b.dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        delta = low_rank_delta(self.kasa_b(adapter, dense_factor(self.lora_B[adapter])),
                               dense_factor(self.lora_A[adapter]), self.scaling[adapter],
                               self.get_base_layer().weight.dtype)
        return transpose(delta, self.fan_in_fan_out)

    def _make_block_diagonal(self, adapter_name: str, side: str, nblocks: int) -> None:
        """BD-LoRA: replace lora_A (side 'A', PEFT's kaiming init) or lora_B (side 'B', zeros) of ``adapter_name``
        by a ``BlockDiagonalLinear`` with ``nblocks`` blocks."""
        device, dtype = self.adapter_device_dtype()
        r = self.r[adapter_name]
        if side == "A":
            self.lora_A[adapter_name] = BlockDiagonalLinear(self.in_features, r, nblocks, init_zero=False,
                                                            dtype=dtype, device=device)
        else:
            self.lora_B[adapter_name] = BlockDiagonalLinear(r, self.out_features, nblocks, init_zero=True,
                                                            dtype=dtype, device=device)

    # -- initialisations that read the base weight ------------------------------------------------------------
    # W below is the base weight as [out, in] (Conv1D's stored [in, out] transposed), s the adapter's scaling.

    def init_adapter_weights(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        """PEFT's initialisations of a linear adapter:

        - ``'pissa'``: W = U S V^T (SVD); A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), and the base weight
          becomes the residual W - s B A (the top-r singular part moves into the adapter).
          ``'pissa_niter_N'``: the same with ``torch.svd_lowrank(W, r, niter=N)`` (randomised).
        - ``'olora'``: W = Q R (QR); A = R[:r], B = Q[:, :r], base weight W - s B A.
        - ``'orthogonal'``: A, B from the rows of one random r x r orthogonal matrix (even r), base untouched.

        PiSSA and OLoRA change the base weight (as in PEFT): loading such an adapter onto a fresh base repeats
        the initialisation, so save and load them against the same base weight."""
        if init_lora_weights == "orthogonal":
            self._orthogonal_init(adapter_name)
        elif isinstance(init_lora_weights, str) and init_lora_weights.startswith("pissa"):
            self._pissa_init(adapter_name, init_lora_weights)
        elif isinstance(init_lora_weights, str) and init_lora_weights.lower() == "olora":
            self._olora_init(adapter_name)
        elif init_lora_weights == "mica":
            self._mica_init(adapter_name)
        else:
            LoraLayer.init_adapter_weights(self, adapter_name, init_lora_weights)

    def _float_base_weight(self, what: str) -> tuple[torch.Tensor, torch.dtype]:
        """The base weight as float32 (float64 for a float64 base) [out, in], and its stored dtype."""
        weight = self.get_base_layer().weight
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64) \
                or isinstance(self, QuantizedAdditiveLayer):
            raise TypeError(f"{what} initialisation needs a float32, float16 or bfloat16 base weight; the base layer "
                            f"({type(self.get_base_layer()).__name__}) holds {weight.dtype} (a quantised base must "
                            "be initialised in float and quantised afterwards)")
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        return transpose(weight.detach().to(work), self.fan_in_fan_out), weight.dtype

    def _check_rank(self, adapter_name: str, w: torch.Tensor, what: str) -> int:
        r = self.r[adapter_name]
        if r > min(w.shape):
            raise ValueError(f"{what} initialisation needs r <= min(in_features, out_features); got r={r} for a "
                             f"layer with weight [out, in] = {list(w.shape)}")
        return r

    def _set_factors(self, adapter_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.lora_A[adapter_name].weight.is_meta:  # low_cpu_mem_usage: a checkpoint fills them in
            return
        with torch.no_grad():
            self.lora_A[adapter_name].weight.copy_(a)
            self.lora_B[adapter_name].weight.copy_(b)

    def _pissa_init(self, adapter_name: str, init: str) -> None:
        w, dtype = self._float_base_weight("PiSSA")
        r = self._check_rank(adapter_name, w, "PiSSA")
        s = self.scaling[adapter_name]
        if init == "pissa":
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            u, sv, vh = u[:, :r], sv[:r], vh[:r]
        else:
            niter = int(init[len("pissa_niter_"):])
            u, sv, v = torch.svd_lowrank(w, r, niter=niter)
            vh = v.T
        root = torch.sqrt(sv / s)
        a, b = root[:, None] * vh, u * root[None, :]
        self._set_factors(adapter_name, a, b)
        self._residual_from(w, a, b, adapter_name, dtype)

    def _olora_init(self, adapter_name: str) -> None:
        w, dtype = self._float_base_weight("OLoRA")
        r = self._check_rank(adapter_name, w, "OLoRA")
        q, rr = torch.linalg.qr(w)
        a, b = rr[:r].contiguous(), q[:, :r].contiguous()
        self._set_factors(adapter_name, a, b)
        self._residual_from(w, a, b, adapter_name, dtype)

    def _residual_from(self, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, adapter_name: str,
                       dtype: torch.dtype) -> None:
        """The base weight becomes ``W - s B A`` (in W's float dtype, then the stored layout and dtype), with the
        factors as computed (PEFT subtracts the float32 factors, not the adapter's rounded copies)."""
        residual = w - self.scaling[adapter_name] * (b @ a)
        param = self.get_base_layer().weight
        log_base_weight(param)
        param.data = transpose(residual, self.fan_in_fan_out).to(dtype).contiguous()

    def _mica_init(self, adapter_name: str) -> None:
        """MiCA: B = the left singular vectors of W for its r smallest singular values (frozen), A = 0; the base
        weight is unchanged (B A = 0) and only A trains."""
        if isinstance(self, QuantizedAdditiveLayer):
            raise TypeError("MiCA initialisation needs a float base weight; this layer's base is quantised")
        weight = self.get_base_layer().weight
        b = self._minor_components(transpose(weight, self.fan_in_fan_out), adapter_name)
        if b is not None:
            self._set_factors(adapter_name, torch.zeros(self.r[adapter_name], self.in_features), b)
        self.freeze_peft_weight(adapter_name, "lora_B")

    def _orthogonal_init(self, adapter_name: str) -> None:
        r = self.r[adapter_name]
        if r % 2 != 0:
            raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")
        # drawn on the CPU in PEFT's order, so a seeded run gives PEFT's factors
        q, _ = torch.linalg.qr(torch.randn(r, r))
        a = torch.randn(self.in_features, r // 2).mm(q[0::2, :]).T / 10.0  # [r, in]
        b = torch.randn(r // 2, self.out_features).T.mm(q[1::2, :]) / 10.0  # [out, r]
        self._set_factors(adapter_name, a, b)

    def _active_lora(self) -> list[str]:
        return [n for n in self.active_adapters if n in self.lora_A]

    def rank_padding_problem(self, target_rank: int) -> Optional[str]:
        for name in self.lora_A:
            if type(self.lora_A[name]) is not nn.Linear or type(self.lora_B[name]) is not nn.Linear:
                return (f"adapter {name!r} has a block-diagonal factor (BD-LoRA), whose rank cannot be padded; "
                        "prepare_model_for_compiled_hotswap supports plain LoRA factors")
        return self._rank_above(target_rank)

    def pad_ranks(self, target_rank: int) -> bool:
        for name in list(self.lora_A):
            a, b = self.lora_A[name], self.lora_B[name]
            rank = a.weight.shape[0]
            if rank == target_rank:
                continue
            wa, wb = a.weight, b.weight
            new_a = nn.Linear(self.in_features, target_rank, bias=False, device=wa.device, dtype=wa.dtype)
            new_b = nn.Linear(target_rank, self.out_features, bias=b.bias is not None, device=wb.device,
                              dtype=wb.dtype)
            with torch.no_grad():
                new_a.weight.zero_()
                new_a.weight[:rank].copy_(wa)
                new_b.weight.zero_()
                new_b.weight[:, :rank].copy_(wb)
                if b.bias is not None:
                    new_b.bias.copy_(b.bias)
            new_a.weight.requires_grad_(wa.requires_grad)
            new_b.weight.requires_grad_(wb.requires_grad)
            if b.bias is not None:
                new_b.bias.requires_grad_(b.bias.requires_grad)
            self.lora_A[name], self.lora_B[name] = new_a, new_b
            diag = self.kasa_diag(name)
            if diag is not None:  # KaSA: the padded entries of the diagonal are zero too
                padded = torch.zeros(target_rank, device=diag.device, dtype=diag.dtype)
                padded[:rank] = diag.detach()
                self.lora_diag[name] = nn.Parameter(padded, requires_grad=diag.requires_grad)
        return True

    def dora_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.T if self.fan_in_fan_out else t  # Conv1D stores [in, out]

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight as ``F.linear`` takes it ([out, in]) in ``dtype``."""
        return self.dora_rows(self.dora_base_weight()).to(dtype)

    def base_bias(self) -> Optional[torch.Tensor]:
        return getattr(self.get_base_layer(), "bias", None)

    def adapter_bundle(self, names: list[str]) -> LowRankAdapters:
        """The adapters ``names`` as the LoRA ops take them (unpack into the call)."""
        # read the ModuleDicts' dicts once: this runs on every forward, and each ``self.lora_A[n]`` is two
        # Python-level lookups (Module.__getattr__, ModuleDict.__getitem__)
        a, b, drop, scaling = self.lora_A._modules, self.lora_B._modules, self.lora_dropout._modules, self.scaling
        weights_b, scalings = [], []
        for n in names:
            wb, s = self.kasa_b(n, dense_factor(b[n])), scaling[n]
            if isinstance(s, torch.Tensor):
                # a scaling kept as a tensor (prepare_model_for_compiled_hotswap): applied to B as a tensor op, so a
                # compiled graph reads its current value instead of baking a constant in (no recompilation when a
                # hotswap changes it)
                wb, s = wb * s.to(device=wb.device, dtype=wb.dtype), 1.0
            weights_b.append(wb)
            scalings.append(float(s))
        return LowRankAdapters([dense_factor(a[n]) for n in names], weights_b, scalings,
                               [dropout_p(drop[n]) for n in names]).under_autocast()

    def _lora(self, x: torch.Tensor, result: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``result`` plus the adapters ``names`` applied to ``x``: one fused op for all of them (then the
        lora_B biases of those that have one)."""
        return self.add_lora_bias(lora_linear(x, result, *self.adapter_bundle(names), self.training), names)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.apply_pending_kasa()
        special = self.disabled_or_mixed_forward(x, args, kwargs)
        if special is not None:
            return special
        names = [] if self.merged else self._active_lora()
        if names and self.adapters_wrapped(names):
            return self._wrapped_forward(x, names, args, kwargs)
        if names and self.uses_dora(names):
            return self._dora_forward(x, names, args, kwargs)
        if names and self.velora_training(names):
            return self._velora_forward(x, names, args, kwargs)
        if names and not args and not kwargs and self._fuses_with_base(x):
            return self._fused_forward(x, names)
        result = self.base_forward(x, *args, **kwargs)
        return self._lora(x, result, names) if names else result

    def adapters_wrapped(self, names: list[str]) -> bool:
        """Whether a lora_A / lora_B module of ``names`` is wrapped by FSDP (``FullyShardedDataParallel`` around it,
        or ``fully_shard`` on it, as PEFT's ``fsdp_auto_wrap_policy`` does): its weight is then whole only while
        its own forward runs, so the fused ops, which read the weights, cannot serve it."""
        a, b = self.lora_A._modules, self.lora_B._modules
        return any(type(m[n]) not in (nn.Linear, BlockDiagonalLinear) for m in (a, b) for n in names)

    def _wrapped_forward(self, x: torch.Tensor, names: list[str], args: tuple, kwargs: dict) -> torch.Tensor:
        """The base output plus each adapter of ``names`` applied by calling its modules (PEFT's way), for
        adapters wrapped by FSDP (``adapters_wrapped``)."""
        special = [n for n in names if self.use_dora.get(n, False) or self.kasa_diag(n) is not None]
        special += self.velora_training(names)
        if special:
            raise ValueError(f"Adapters {sorted(set(special))} use DoRA, KaSA or VeLoRA, whose forward reads the "
                             "adapter weights directly, but their lora_A / lora_B modules are wrapped (FSDP); wrap "
                             "the whole layer (e.g. the decoder block) instead of the adapter modules")
        result = self.base_forward(x, *args, **kwargs)
        dtype = result.dtype
        for n in names:
            a, b = self.lora_A[n], self.lora_B[n]
            scaling = self.scaling[n]
            x_a = self.lora_dropout[n](x.to(a.weight.dtype))
            result = result + (b(a(x_a)) * scaling).to(dtype)
        return result

    def _dora_forward(self, x: torch.Tensor, names: list[str], args: tuple, kwargs: dict) -> torch.Tensor:
        """The active adapters ``names`` (some with DoRA) in PEFT's order and math (see ``dora.py``).

        One DoRA adapter over a fusable nn.Linear, without dropout drawn: ``dora_linear_fused`` (on the Triton
        backend one GEMM computes ``x W^T + s B A x``, applies ``mns`` in its epilogue and adds the bias; the
        backward folds ``mns`` into the fused LoRA backward; elsewhere the fused LoRA op then PEFT's
        elementwise scale). A fusable quantised base: its fused LoRA op, then that elementwise scale. Otherwise the base output is computed once and each adapter updates it in turn.
        Both add ``(mns - 1)`` times the unbiased output to the output (PEFT's form), so a fresh adapter
        (B = 0, m = ||W||: mns == 1) leaves the base output bit for bit as it was."""
        drops = self.training and any(dropout_p(self.lora_dropout[n]) > 0 for n in names if self.use_dora[n])
        if len(names) == 1 and not drops and not args and not kwargs and self._fuses_with_base(x):
            (name,) = names
            base = self.base_layer
            if type(base) is nn.Linear:
                x, weight, bias = autocast_base(x, base.weight, base.bias)
                bundle = self.adapter_bundle(names)

                def norm_now() -> torch.Tensor:
                    # one kernel on the Triton backend (None elsewhere: dora.py's expansion)
                    norm = dora_row_norm_fused(weight, bundle.weights_a, bundle.weights_b, bundle.scalings)
                    return self.computed_dora_norm(name) if norm is None else norm

                # the op forms mns = m / norm itself (in the GEMM's epilogue on the Triton backend)
                magnitude = self.lora_magnitude_vector[name]
                norm = magnitude.cached("weight-norm", self.dora_version(name, "fused", weight.dtype), norm_now)
                m = magnitude.weight
                return dora_linear_fused(x, weight, bias, bundle.weights_a, bundle.weights_b, bundle.scalings,
                                         m.reshape(-1), norm)
            mns = self.dora_scale(name)
            y = self._fused_forward(x, names)  # a quantised base: its fused LoRA op, then the scale
            bias = self.base_bias()
            out = y * mns if bias is None else y + (mns - 1) * (y - bias.to(y.dtype))
            return out.to(y.dtype)
        result = self.base_forward(x, *args, **kwargs)
        dtype = result.dtype
        bias = self.base_bias()
        velora = set(self.velora_training(names))  # VeLoRA adapters active next to a DoRA one
        for name in names:
            if not self.use_dora[name]:
                result = self._velora_step(x, result, name) if name in velora else self._lora(x, result, [name])
                continue
            mns = self.dora_scale(name)
            a, b = self.lora_A[name], self.lora_B[name]
            drop = self.lora_dropout[name]
            if self.training and dropout_p(drop) > 0:
                # PEFT: the undropped base output stays, the dropped one is rescaled
                xd = drop(x.to(a.weight.dtype))
                base_d = F.linear(xd, self.dense_weight(xd.dtype))
                result = result + (mns - 1) * base_d + mns * (b(a(xd)) * self.scaling[name])
            else:
                unbiased = result if bias is None else result - bias.to(result.dtype)
                inner = self._lora(x, unbiased, [name])  # y - bias + s B A x, dropout-free
                result = result + (mns - 1) * unbiased + mns * (inner - unbiased)
        return result.to(dtype)

    def _velora_forward(self, x: torch.Tensor, names: list[str], args: tuple, kwargs: dict) -> torch.Tensor:
        """Training with VeLoRA adapters among ``names``: the base output, then each adapter in turn, a VeLoRA one
        through ``_velora_step`` (PyTorch ops: the fused kernels would keep x for lora_A's gradient), the others
        through the LoRA op."""
        velora = set(self.velora_training(names))
        result = self.base_forward(x, *args, **kwargs)
        dtype = result.dtype
        for name in names:
            result = self._velora_step(x, result, name) if name in velora else self._lora(x, result, [name])
        return result.to(dtype)

    def _fuses_with_base(self, x: torch.Tensor) -> bool:
        """A plain nn.Linear base that may be fused (``base_is_fusable``: frozen, no hooks, forward not
        patched) is handed to ``lora_linear_fused`` with the adapters: on the Triton backend one GEMM adds
        them (one store of y, one dX kernel), elsewhere the op runs the base matmul then ``lora_linear``
        (the op picks the backend). Anything else keeps the base module's own forward."""
        base = self.base_layer
        return type(base) is nn.Linear and base_is_fusable(base)

    def _fused_forward(self, x: torch.Tensor, names: list[str], with_bias: bool = True) -> torch.Tensor:
        base = self.base_layer
        x, weight, bias = autocast_base(x, base.weight, base.bias if with_bias else None)
        out = lora_linear_fused(x, weight, bias, *self.adapter_bundle(names), self.training)
        return self.add_lora_bias(out, names)

    def _with_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """``result`` (the base output for ``x``) plus adapter ``name`` (for mixed batches)."""
        if self.velora_training([name]):
            return self._velora_step(x, result, name).to(result.dtype)
        return self._lora(x, result, [name])

    def _synced_store(self, adapter_names: list):
        """(names, bundle, store) of the adapters a mixed batch may use, the store synced (``grouped.py``);
        names is empty when the layer holds no such adapter; None while VeLoRA adapters of the batch train (they
        take their own rows through _with_adapter, with VeLoRA's compressed input)."""
        per_token = bool(adapter_names) and isinstance(adapter_names[0], (list, tuple))
        flat = [n for per in adapter_names for n in per] if per_token else adapter_names
        velora = self.velora_training(list(dict.fromkeys(flat)))
        if velora:
            if per_token:
                raise ValueError(f"Training VeLoRA adapters ({', '.join(velora)}) with adapter_names per token is not "
                                 "supported; give one adapter name per sample")
            return None
        names = [n for n in self.lora_A._modules if not self.use_dora.get(n, False)]
        if not names:
            return names, None, None
        store = self.__dict__.get("_grouped_store")
        if store is None:
            store = self.__dict__["_grouped_store"] = AdapterStore()
        key = self._plain_adapters_key(names)
        hit = store.bundle  # (key, bundle), replaced whole: no torn read across threads
        if key is not None and hit is not None and key == hit[0]:  # nothing the bundle reads changed: reuse it
            return names, hit[1], store
        bundle = self.adapter_bundle(names)
        store.sync(names, bundle.weights_a, bundle.weights_b, bundle.scalings, bundle.dropout_ps)
        store.bundle = (key, bundle)
        return names, bundle, store

    def _plain_adapters_key(self, names: list[str]) -> Optional[tuple]:
        """What ``adapter_bundle(names)`` reads, as plain values, when its factors are the adapters' own weights
        (plain nn.Linear lora_A / lora_B, no KaSA diagonal, float scalings, autocast off): the names, and per
        adapter its factors' identities, version counters (in-place writes: an optimizer step, ``load_adapter``)
        and data pointers (``.data`` replaced), its scaling and dropout probability; and the count of optimizer
        steps (``utils/steps.py``: fused optimizers bump no version counter). Equal keys: the same bundle,
        so a mixed call skips rebuilding it (a few maps over the factors instead of ``adapter_bundle`` plus the
        store's check). None (rebuild every call, as before) for anything else, or while compiling. The store
        holds the bundle, so the identities it recorded cannot be reused by new tensors."""
        diag = self._modules.get("lora_diag")
        if (diag is not None and len(diag)) or torch.compiler.is_compiling():
            return None
        a, b, drop, scaling = self.lora_A._modules, self.lora_B._modules, self.lora_dropout._modules, self.scaling
        # read with C-level maps over flat lists: a layer among many is cold in the caches when it runs again, and
        # a Python loop over every adapter's attributes cost several times the check itself there
        mods = [a[n] for n in names] + [b[n] for n in names]
        scalings = [scaling[n] for n in names]
        if set(map(type, mods)) != _LINEAR_ONLY or not set(map(type, scalings)) <= _NUMBER_TYPES:
            return None
        weights = [m._parameters["weight"] for m in mods]
        if autocast_dtype(weights[0]) is not None:
            return None
        # fused optimizers write the weights without bumping their versions: the count of optimizer steps
        return (tuple(names), tuple(map(id, weights)), tuple(map(_VERSION, weights)), tuple(map(_DATA_PTR, weights)),
                tuple(map(_SHAPE, weights)), tuple(scalings), tuple([dropout_p(drop[n]) for n in names]),
                optimizer_steps(), reserved_rank())

    def _grouped_mixed(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list) -> Optional[torch.Tensor]:
        prepared = self._synced_store(adapter_names)
        if prepared is None:
            return None
        names, bundle, store = prepared
        if not names:
            return result
        # the base output of a plain nn.Linear without hooks is fresh, seen by no one else (``_fuses_with_base``):
        # without autograd the op adds into it (no copy of y)
        owned = (not torch.is_grad_enabled() and type(self).base_forward is LoraLayer.base_forward
                 and "base_forward" not in self.__dict__ and self._fuses_with_base(x))
        out = grouped_delta(store, x, result, adapter_names, bundle.weights_a, bundle.weights_b, self.training,
                            owned)
        return self._add_rows_lora_bias(out, adapter_names, self.bias_names(names))

    def _grouped_fused(self, x: torch.Tensor, adapter_names: list, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """A base the layer may fuse (``_grouped_base_weight``) on the Triton backend, with rows enough to fill the
        fused kernel's blocks (prefill): the base GEMM and each row's adapter in one launch (``grouped_linear``);
        None otherwise."""
        weight = None if args or kwargs else self._grouped_base_weight(x)
        if weight is None or not may_fuse(x, weight):
            return None
        prepared = self._synced_store(adapter_names)
        if prepared is None or not prepared[0]:
            return None
        names, bundle, store = prepared
        x, weight, bias = self._grouped_base_args(x, weight)
        out = grouped_linear(store, x, weight, bias, adapter_names, bundle.weights_a, bundle.weights_b,
                             self.training)
        return None if out is None else self._add_rows_lora_bias(out, adapter_names, self.bias_names(names))

    def _grouped_base_weight(self, x: torch.Tensor):
        """The weight ``_grouped_fused`` hands to ``grouped_linear`` (a plain frozen nn.Linear's, ``base_is_fusable``),
        or None: the base layer runs first."""
        base = self.base_layer
        return base.weight if type(base) is nn.Linear and base_is_fusable(base) else None

    def _grouped_base_args(self, x: torch.Tensor, weight) -> tuple:
        """(x, weight, bias) as the fused op takes them: under autocast all in its dtype (``autocast_base``)."""
        return autocast_base(x, weight, self.base_layer.bias)

    def _add_rows_lora_bias(self, out: torch.Tensor, adapter_names: list, biased: list[str]) -> torch.Tensor:
        """``out`` plus ``scaling * lora_B.bias`` on the rows (samples, or tokens for per-token names) whose adapter
        carries one (lora_bias=True); the grouped op adds the low-rank term only."""
        per_token = bool(adapter_names) and isinstance(adapter_names[0], (list, tuple))
        for name in biased:
            if per_token:
                mask = torch.tensor([[n == name for n in per] for per in adapter_names], device=out.device)
            else:
                mask = torch.tensor([n == name for n in adapter_names], device=out.device)
            mask = mask.reshape(*mask.shape, *([1] * (out.dim() - mask.dim())))
            out = out + mask.to(out.dtype) * (self.lora_B[name].bias * self.scaling[name]).to(out.dtype)
        return out

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Embedding(nn.Module, LoraLayer):
    """LoRA on nn.Embedding: ``E[x] + scaling * A^T[x] @ B^T`` with A: [r, num_embeddings], B: [dim, r]."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, init_lora_weights: bool | str = True, use_rslora: bool = False,
                 use_dora: bool = False, lora_bias: bool = False, use_kasa: bool = False,
                 velora: Optional[VeloraConfig] = None, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora=use_dora,
                          lora_bias=lora_bias, use_kasa=use_kasa, velora=velora)

    def init_adapter_weights(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        """MiCA: B [dim, r] = the minor left singular vectors of W^T [dim, num_embeddings] (frozen), A = 0. Any
        other string: the embedding's own initialisation (A zero, B normal), as in PEFT."""
        if init_lora_weights != "mica":
            self.reset_lora_parameters(adapter_name, init_lora_weights)
            return
        b = self._minor_components(self.get_base_layer().weight.T, adapter_name)
        if b is not None:
            with torch.no_grad():
                self.lora_embedding_A[adapter_name].zero_()
                self.lora_embedding_B[adapter_name].copy_(b)
        self.freeze_peft_weight(adapter_name, "lora_embedding_B")

    def check_lora_bias(self) -> None:
        raise ValueError("lora_bias=True is not supported for Embedding (as in PEFT: its adapter weights are plain "
                         "parameters with no bias); use lora_bias=False or do not target embedding layers")

    def dora_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.T  # [num_embeddings, dim]: one row per embedding dimension

    def dora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]

    def _create_adapter_weights(self, adapter_name: str, r: int) -> None:
        device, dtype = self.creation_device_dtype()
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features, device=device,
                                                                       dtype=dtype))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r, device=device,
                                                                       dtype=dtype))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        delta = low_rank_delta(self.lora_embedding_B[adapter], self.lora_embedding_A[adapter],
                               self.scaling[adapter], self.get_base_layer().weight.dtype)
        return delta.T

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(x, weight, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def _embed_scale_value(self) -> Optional[float]:
        """``embed_scale`` as a float (the grouped op folds it into each adapter's scaling), read from the device
        once per tensor and version."""
        scale = embed_scale(self.get_base_layer())
        if scale is None:
            return None
        key = (id(scale), scale._version, scale.data_ptr(), scale.device, scale.dtype)
        hit = self.__dict__.get("_embed_scale_seen")
        if hit is None or hit[0] != key:
            hit = self.__dict__["_embed_scale_seen"] = (key, float(scale.float().item()))
        return hit[1]

    def _delta_out(self, x: torch.Tensor, name: str) -> torch.Tensor:
        after_a = self._embed(x, self.lora_embedding_A[name].T)
        out = (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]
        scale = embed_scale(self.get_base_layer())  # Gemma's: the base rows are scaled, so are the adapter's (PEFT)
        return out if scale is None else out * scale.to(out.dtype)

    def _with_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """``result`` (the base output for ``x``) plus adapter ``name`` (for mixed batches)."""
        return (result + self._delta_out(x, name)).to(result.dtype)

    def _grouped_mixed(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list) -> Optional[torch.Tensor]:
        """Each token's adapter as one grouped op (``lora_grouped_embedding``: a gather of A and one batched matmul
        with B over the rows sorted by adapter). Embeddings that renormalise rows (max_norm), scale gradients by
        frequency or give sparse gradients keep one F.embedding per adapter (None)."""
        base = self.get_base_layer()
        if base.max_norm is not None or base.scale_grad_by_freq or base.sparse:
            return None
        names = [n for n in self.lora_embedding_A if not self.use_dora.get(n, False)]
        if not names:
            return result
        weights_a = [self.lora_embedding_A[n] for n in names]
        weights_b = [self.lora_embedding_B[n] for n in names]
        store = self.__dict__.get("_grouped_store")
        if store is None:
            store = self.__dict__["_grouped_store"] = AdapterStore()
        scale = self._embed_scale_value()
        scalings = [self.scaling[n] * (1.0 if scale is None else scale) for n in names]
        store.sync(names, weights_a, weights_b, scalings, [0.0] * len(names))
        index, plan = shared_plan(store, adapter_names, x.numel(), x.device, False)
        return lora_grouped_embedding(x, result, weights_a, weights_b, store.a, store.b, store.scale, index,
                                      plan=plan, padding_idx=base.padding_idx)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        special = self.disabled_or_mixed_forward(x, args, kwargs)
        if special is not None:
            return special
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_embedding_A:
                continue
            if self.use_dora.get(name, False):
                mns = self.dora_scale(name)  # PEFT: the output so far is rescaled, then the scaled adapter added
                result = mns * result + mns * self._delta_out(x, name)
            else:
                result = result + self._delta_out(x, name)
        return result.to(dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class ConvNd(nn.Module, LoraLayer):
    """LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (the subclasses below fix the dimension).

    The adapter is a pair of convolutions, as in PEFT, so the module tree and state-dict keys match:

        lora_A[name]: Conv(in, r, base kernel_size, base stride, base padding, bias=False)
        lora_B[name]: Conv(r, out, kernel 1, stride 1, groups=base groups, bias=False)
        y = base(x) + scaling * lora_B(lora_A(dropout(x)))

    x: [N, in, *spatial]; A's weight: [r, in, *kernel]; B's weight: [out, r / groups, 1, ...].
    Like PEFT, lora_A takes neither the base's dilation nor its padding_mode (so with a non-'zeros'
    padding mode the merged layer pads the delta differently from the unmerged one, exactly as PEFT's
    does); a dilated base with a kernel larger than 1 is refused here, where PEFT fails at forward time
    on mismatched shapes. With ``groups > 1`` the rank must be a multiple of ``groups`` and merging is
    refused (PEFT's rules). Runs in torch ops on every backend: no Triton kernel for convolutions.
    Several active adapters run as one stacked pair of convolutions where no dropout mask is drawn
    (``_stacked_delta_out``), instead of PEFT's pair per adapter.
    """

    dims = 0  # spatial dimensions: set by Conv1d / Conv2d / Conv3d

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, init_lora_weights: bool | str = True, use_rslora: bool = False,
                 use_dora: bool = False, lora_bias: bool = False, use_kasa: bool = False,
                 velora: Optional[VeloraConfig] = None, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        if velora is not None:
            raise ValueError(f"VeLoRA does not support adapting conv layers (here a {type(base_layer).__name__}): "
                             "velora_config supports LoRA on nn.Linear and Conv1D layers only; leave this layer out "
                             "of target_modules or set velora_config=None")
        base = self.get_base_layer()
        kind = type(self).__name__
        if base.weight.dim() != self.dims + 2:
            raise ValueError(f"LoRA {kind} needs a base weight with {self.dims + 2} dimensions, got "
                             f"{base.weight.dim()} ({type(base).__name__})")
        if any(d != 1 for d in base.dilation) and any(k != 1 for k in base.kernel_size):
            raise ValueError(
                f"LoRA does not support a {type(base).__name__} with dilation={tuple(base.dilation)} and "
                f"kernel_size={tuple(base.kernel_size)}: lora_A is built without dilation (as in PEFT), so its "
                "output would not line up with the base layer's; supported: dilation 1, or kernel size 1"
            )
        if base.groups > 1:
            warnings.warn(f"LoRA on a {type(base).__name__} with groups={base.groups}: merging is not supported "
                          "for it", UserWarning)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora=use_dora,
                          lora_bias=lora_bias, use_kasa=use_kasa, velora=velora)

    def dora_norm_delta(self, adapter: str) -> Optional[torch.Tensor]:
        """With groups > 1, PEFT's norm adds ``B.view(-1, r) @ A.view(r, -1)`` reshaped to the weight's shape (not
        the grouped convolution's own delta, which PEFT does not merge either); that [out, -1] tensor, unscaled."""
        if self.get_base_layer().groups == 1:
            return None
        a, b = self.lora_A[adapter].weight.detach(), self.lora_B[adapter].weight.detach()
        r = a.shape[0]
        return (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(self.out_features, -1)

    def dora_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1)  # [out, in * prod(kernel)]

    def dora_magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.out_features) + (1,) * self.dims  # PEFT's [1, out, 1, ...]

    def _dora_step(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """``result`` after DoRA adapter ``name`` (PEFT's math, see ``dora.py``)."""
        base = self.get_base_layer()
        mns = self.dora_scale(name)
        a = self.lora_A[name]
        drop = self.lora_dropout[name]
        if self.training and dropout_p(drop) > 0:
            xd = drop(x.to(a.weight.dtype))
            conv = getattr(F, f"conv{self.dims}d")
            base_d = conv(xd, base.weight.to(xd.dtype), None, base.stride, base.padding, base.dilation, base.groups)
            return result + (mns - 1) * base_d + mns * (self.lora_B[name](a(xd)) * self.scaling[name])
        bias = base.bias
        unbiased = result if bias is None else result - bias.view((1, -1) + (1,) * self.dims)
        out = mns * (unbiased + self._delta_out(x, name))
        return out if bias is None else out + bias.view((1, -1) + (1,) * self.dims)

    def _create_adapter_weights(self, adapter_name: str, r: int) -> None:
        base = self.get_base_layer()
        if r % base.groups != 0:
            raise ValueError(
                f"Targeting a {type(base).__name__} with groups={base.groups} and rank {r}. Currently, support is "
                "limited to conv layers where the rank is divisible by groups. Either choose a different rank or do "
                f"not target this specific layer. (adapter {adapter_name!r}: rank_pattern can set a rank divisible "
                f"by {base.groups} for this layer)"
            )
        device, dtype = self.creation_device_dtype()
        conv = CONV_CLASSES[self.dims]
        ones = (1,) * self.dims
        # Built in this order with the constructors' own init, so a seeded run draws what PEFT's does.
        self.lora_A[adapter_name] = conv(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                         bias=False, device=device, dtype=dtype)
        self.lora_B[adapter_name] = conv(r, self.out_features, ones, ones, groups=base.groups,
                                         bias=self.lora_bias.get(adapter_name, False), device=device, dtype=dtype)

    def rank_padding_problem(self, target_rank: int) -> Optional[str]:
        groups = self.get_base_layer().groups
        if target_rank % groups != 0:
            return (f"Trying to pad a {type(self.get_base_layer()).__name__} LoRA adapter with groups={groups} to "
                    f"target rank {target_rank}, but the target rank is not divisible by {groups}. Please choose a "
                    f"target rank that is divisible by {groups}.")
        return self._rank_above(target_rank)

    def pad_ranks(self, target_rank: int) -> bool:
        """As the linear layers'. With base groups g, B's g groups each read their own block of r / g rows of A's
        output, so each block of A's rows moves to the start of its padded block (``copy_rank_blocks``)."""
        groups = self.get_base_layer().groups
        conv = CONV_CLASSES[self.dims]
        for name in list(self.lora_A):
            a, b = self.lora_A[name], self.lora_B[name]
            if a.weight.shape[0] == target_rank:
                continue
            wa, wb = a.weight, b.weight
            new_a = conv(self.in_features, target_rank, a.kernel_size, a.stride, a.padding, bias=False,
                         device=wa.device, dtype=wa.dtype)
            new_b = conv(target_rank, self.out_features, b.kernel_size, b.stride, groups=b.groups,
                         bias=b.bias is not None, device=wb.device, dtype=wb.dtype)
            with torch.no_grad():
                copy_rank_blocks(new_a.weight, wa, groups)
                new_b.weight.zero_()
                new_b.weight[:, :wb.shape[1]].copy_(wb)
                if b.bias is not None:
                    new_b.bias.copy_(b.bias)
            new_a.weight.requires_grad_(wa.requires_grad)
            new_b.weight.requires_grad_(wb.requires_grad)
            if b.bias is not None:
                new_b.bias.requires_grad_(b.bias.requires_grad)
            self.lora_A[name], self.lora_B[name] = new_a, new_b
        return True

    def _refuse_grouped_merge(self) -> None:
        base = self.get_base_layer()
        if base.groups > 1:
            raise NotImplementedError(f"merging LoRA into a {type(base).__name__} with groups={base.groups} is "
                                      "not supported (as in PEFT); use the unmerged model")

    def _adapters_to_merge(self, adapter_names: list[str] | None, warn: bool = True) -> list[str]:
        # Every merge asks this of every layer before changing any of them, so a grouped conv refuses there and
        # no other layer is left merged (or rounded by an undo).
        names = super()._adapters_to_merge(adapter_names, warn=warn)
        if any(self.holds(n) for n in names):
            self._refuse_grouped_merge()
        return names

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * sum_r B[o, r] A[r, i, *k]``: [out, in, *kernel], in the adapter's dtype (as PEFT).

        B is 1x1, so the delta of any kernel size is one [out, r] @ [r, in * prod(kernel)] matmul (PEFT takes a
        matmul for 2-D 1x1 kernels and a convolution otherwise; both are this sum). Refused for groups > 1,
        where B is block-diagonal over the groups and PEFT does not merge either.
        """
        self._refuse_grouped_merge()
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        delta = low_rank_delta(b.flatten(1), a.flatten(1), self.scaling[adapter], a.dtype)
        return delta.view(b.shape[0], *a.shape[1:])

    def _delta_out(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``scaling * B(A(dropout(x)))`` for adapter ``name``; x cast to the adapter's dtype first."""
        a = self.lora_A[name]
        x = x.to(a.weight.dtype)
        return self.lora_B[name](a(self.lora_dropout[name](x))) * self.scaling[name]

    def _stacks(self, names: list[str]) -> bool:
        """Whether the adapters ``names`` can run as one pair of convolutions (``_stacked_delta_out``): several of
        them, one dtype, no dropout drawn (each adapter draws its own mask), B not grouped."""
        if len(names) < 2 or self.get_base_layer().groups != 1:
            return False
        if self.training and any(dropout_p(self.lora_dropout[n]) > 0 for n in names):
            return False
        return len({self.lora_A[n].weight.dtype for n in names} | {self.lora_B[n].weight.dtype for n in names}) == 1

    def _stacked_delta_out(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``sum_i scaling_i * B_i(A_i(x))`` in two convolutions instead of two per adapter: the A's stacked along
        their output channels read x once ([sum r, in, *kernel]); the scaled B's stacked along their input
        channels ([out, sum r, 1, ...]) sum the adapters."""
        conv = getattr(F, f"conv{self.dims}d")
        first = self.lora_A[names[0]]
        a = torch.cat([self.lora_A[n].weight for n in names])
        b = torch.cat([self.lora_B[n].weight * self.scaling[n] for n in names], dim=1)
        biases = [self.lora_B[n].bias * self.scaling[n] for n in self.bias_names(names)]
        bias = torch.stack(biases).sum(0) if biases else None  # lora_bias: s_i * b_i, summed over the adapters
        return conv(conv(x.to(a.dtype), a, None, first.stride, first.padding), b, bias)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        special = self.disabled_or_mixed_forward(x, args, kwargs)
        if special is not None:
            return special
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        dtype = result.dtype
        names = [n for n in self.active_adapters if n in self.lora_A]
        if self._stacks(names) and not self.uses_dora(names):
            return (result + self._stacked_delta_out(x, names)).to(dtype)
        for name in names:
            if self.use_dora.get(name, False):
                result = self._dora_step(x, result, name)
            else:
                result = result + self._delta_out(x, name)
        return result.to(dtype)

    def _with_adapter(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """``result`` (the base output for ``x``) plus adapter ``name`` (for mixed batches)."""
        return result + self._delta_out(x, name).to(result.dtype)

    def _grouped_mixed(self, x: torch.Tensor, result: torch.Tensor, adapter_names: list) -> Optional[torch.Tensor]:
        """Each sample's adapter in one pair of convolutions, whatever the number of adapters: the adapters' A
        (zero-padded to the largest rank) gathered per sample and run as ONE convolution with ``groups`` = batch
        (x seen as [1, batch * in, ...]), then each sample's scaled B ([out, R]) applied by one einsum; samples of
        ``__base__`` get zero weights. Gradients reach each adapter through the gather. None (one convolution pair
        per adapter) for a grouped base, per-token names, an unbatched input, dropout in training, lora_bias or
        adapters of several dtypes."""
        base = self.get_base_layer()
        names = [n for n in self.lora_A if not self.use_dora.get(n, False)]
        if (base.groups != 1 or not names or x.dim() != self.dims + 2 or isinstance(adapter_names[0], (list, tuple))
                or self.bias_names(names) or (self.training and any(dropout_p(self.lora_dropout[n]) > 0 for n in names))
                or len({self.lora_A[n].weight.dtype for n in names} | {self.lora_B[n].weight.dtype for n in names}) > 1):
            return None
        slots = {n: i for i, n in enumerate(names)}
        index = torch.tensor([slots.get(n, -1) for n in adapter_names], device=x.device)
        rank = max(self.lora_A[n].weight.shape[0] for n in names)
        a = torch.stack([F.pad(w, (0, 0) * (self.dims + 1) + (0, rank - w.shape[0]))
                         for w in (self.lora_A[n].weight for n in names)])  # [N, R, in, *kernel]
        b = torch.stack([F.pad(w.flatten(1) * self.scaling[n], (0, rank - w.shape[1]))
                         for n, w in ((n, self.lora_B[n].weight) for n in names)])  # [N, out, R], scaled
        live = (index >= 0).to(a.dtype)
        slot = index.clamp(min=0)
        a_rows = (a[slot] * live.view(-1, *([1] * (a.dim() - 1)))).flatten(0, 1)  # [batch * R, in, *kernel]
        first = self.lora_A[names[0]]
        conv = getattr(F, f"conv{self.dims}d")
        batch = x.shape[0]
        h = conv(x.to(a.dtype).reshape(1, -1, *x.shape[2:]), a_rows, None, first.stride, first.padding,
                 groups=batch)
        h = h.view(batch, rank, *h.shape[2:])
        delta = torch.einsum("br...,bor->bo...", h, b[slot])
        return result + delta.to(result.dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class Conv1d(ConvNd):
    """LoRA on ``nn.Conv1d`` (see ``ConvNd``)."""

    dims = 1


class Conv2d(ConvNd):
    """LoRA on ``nn.Conv2d`` (see ``ConvNd``)."""

    dims = 2


class Conv3d(ConvNd):
    """LoRA on ``nn.Conv3d`` (see ``ConvNd``)."""

    dims = 3


@contextmanager
def tensors_in_place(items: list[tuple[nn.Module, str, torch.Tensor]]) -> Iterator[None]:
    """Inside the block, ``module.<name>`` reads ``tensor`` for each (module, name, tensor); the original objects
    are put back on exit. The tensor goes where the attribute lives now: the module's ``_parameters`` or, where a
    wrapper such as FSDP (use_orig_params) has set a plain tensor over it, the instance ``__dict__``."""
    saved: list[tuple[dict, str, Any]] = []
    try:
        for module, name, tensor in items:
            store = module.__dict__ if name in module.__dict__ else module._parameters
            saved.append((store, name, store[name]))
            store[name] = tensor
        yield
    finally:
        for store, name, old in reversed(saved):
            store[name] = old


class MultiheadAttention(nn.Module, LoraLayer):
    """LoRA on ``nn.MultiheadAttention``: one adapter on the packed q/k/v projection, one on ``out_proj``.

    The module tree is PEFT's, so state-dict keys and checkpoints are shared both ways::

        lora.MultiheadAttention
          base_layer: nn.MultiheadAttention          (in_proj_weight [3E, E], in_proj_bias [3E])
            out_proj: lora.Linear                    (its own lora_A [r, E] / lora_B [E, r] per adapter)
          lora_A[name]: Linear(E, r), lora_B[name]: Linear(r, 3E)

    ``nn.MultiheadAttention`` never calls ``in_proj`` or ``out_proj`` as modules: its forward reads
    ``in_proj_weight`` and ``out_proj.weight`` and runs the attention op on them. So the adapters act
    through the weights: the forward runs the base module with ``in_proj_weight + dW_in`` and
    ``out_proj.weight + 2 dW_out`` in place of its weights for that one call (``tensors_in_place``: the
    parameters are put back afterwards, never re-created, and gradients reach lora_A / lora_B, and any
    trainable base weight, through the sum). dW = scaling * B @ A of each active adapter.

    The 2 on out_proj is PEFT 0.21.2's behaviour, kept so that outputs, gradients and merged weights
    agree with PEFT for the same checkpoint: its merge writes ``W_out + dW_out`` and then merges the
    out_proj layer, which adds ``dW_out`` again in place (unmerge takes both out). Its forward goes
    through that merge, so the second ``dW_out`` changes the output but, added outside autograd, not
    the gradients: lora_A / lora_B of out_proj get the gradient of ``W_out + dW_out``. Each adapter's
    merge also starts from the weight detached, so with several active adapters only the last one gets
    gradients. The forward here computes the same values and gradients (the deltas PEFT adds outside
    autograd are added detached), so training follows PEFT's step for step; merging adds 2 dW_out.

    As in PEFT: the adapters' dropout is not applied (the adapter is a weight change, not a separate
    branch); q, k and v must share the embedding size (``_qkv_same_embed_dim``); DoRA and
    ``adapter_names`` (mixed batches) are refused. ``lora_bias`` is refused too: PEFT creates a bias
    for the packed projection that its forward never uses.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, init_lora_weights: bool | str = True, use_rslora: bool = False,
                 use_dora: bool = False, lora_bias: bool = False, **kwargs: Any) -> None:
        if not getattr(base_layer, "_qkv_same_embed_dim", True):
            raise ValueError("Only same embed for query/key/value is supported as of now for MultiheadAttention: "
                             f"this one has kdim={base_layer.kdim}, vdim={base_layer.vdim} and embed_dim="
                             f"{base_layer.embed_dim} (separate q/k/v weights); LoRA needs kdim = vdim = embed_dim")
        self._refuse_unsupported(use_dora, lora_bias)
        if not isinstance(getattr(base_layer, "out_proj", None), nn.Linear):
            raise TypeError(f"out_proj must be an instance of nn.Linear for LoRA on MultiheadAttention, got "
                            f"{type(getattr(base_layer, 'out_proj', None)).__name__}")
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        # out_proj's adapter first, then the packed projection's (PEFT's order: a seeded run draws the same)
        log_base_child(base_layer, "out_proj")
        base_layer.out_proj = Linear(base_layer.out_proj, adapter_name, r=r, lora_alpha=lora_alpha,
                                     lora_dropout=lora_dropout, init_lora_weights=init_lora_weights,
                                     use_rslora=use_rslora, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora)

    @staticmethod
    def _refuse_unsupported(use_dora: bool, lora_bias: bool) -> None:
        if use_dora:
            raise ValueError("MultiheadAttention does not support DoRA (yet), please set use_dora to False (DoRA "
                             "is supported for LoRA on Linear, Conv1D, Embedding and Conv layers)")
        if lora_bias:
            raise ValueError("lora_bias=True is not supported for LoRA on MultiheadAttention (PEFT would add a bias "
                             "to the packed q/k/v projection that its forward never applies); use lora_bias=False")

    # -- the base module's attributes, as nn.MultiheadAttention has them (PEFT exposes the same) ---------------
    embed_dim = property(lambda self: self.get_base_layer().embed_dim)
    kdim = property(lambda self: self.get_base_layer().kdim)
    vdim = property(lambda self: self.get_base_layer().vdim)
    _qkv_same_embed_dim = property(lambda self: self.get_base_layer()._qkv_same_embed_dim)
    num_heads = property(lambda self: self.get_base_layer().num_heads)
    dropout = property(lambda self: self.get_base_layer().dropout)
    batch_first = property(lambda self: self.get_base_layer().batch_first)
    head_dim = property(lambda self: self.get_base_layer().head_dim)
    in_proj_weight = property(lambda self: self.get_base_layer().in_proj_weight)
    in_proj_bias = property(lambda self: self.get_base_layer().in_proj_bias)
    bias_k = property(lambda self: self.get_base_layer().bias_k)
    bias_v = property(lambda self: self.get_base_layer().bias_v)
    add_zero_attn = property(lambda self: self.get_base_layer().add_zero_attn)

    @property
    def out_proj(self) -> nn.Module:
        """The base module's own out_proj linear (not its LoRA wrapper), as on nn.MultiheadAttention."""
        return self.out_proj_layer.get_base_layer()

    @property
    def out_proj_layer(self) -> Linear:
        """The LoRA layer wrapping out_proj."""
        return self.get_base_layer().out_proj

    def merge_masks(self, *args: Any, **kwargs: Any) -> tuple[Optional[torch.Tensor], Optional[int]]:
        return self.get_base_layer().merge_masks(*args, **kwargs)

    def adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        # nn.MultiheadAttention has no ``weight``: adapters follow the packed projection weight
        w = self.get_base_layer().in_proj_weight
        return creation_device(w.device), (w.dtype if w.is_floating_point() else torch.float32)

    # -- adapters: adding or deleting one reaches the out_proj layer too. set_adapter, enable_adapters, ... do
    # not: the model calls them on every LoRA layer, out_proj's included (as in PEFT, which lets them differ).
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights: bool | str = True, use_rslora: bool = False, use_dora: bool = False,
                     lora_bias: bool = False, bd_lora: Optional[tuple[str, int]] = None, **kwargs: Any) -> None:
        self._refuse_unsupported(use_dora, lora_bias)
        super().update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora,
                             bd_lora=bd_lora)
        self.out_proj_layer.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora,
                                         bd_lora=bd_lora)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.out_proj_layer.delete_adapter(adapter_name)

    # -- deltas and merging ---------------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B @ A`` of the packed projection: [3E, E], in the dtype of ``in_proj_weight``."""
        return low_rank_delta(self.lora_B[adapter].weight, self.lora_A[adapter].weight, self.scaling[adapter],
                              self.get_base_layer().in_proj_weight.dtype)

    def merge_target(self) -> torch.Tensor:
        return self.get_base_layer().in_proj_weight

    def _out_names(self, names: list[str]) -> list[str]:
        """The adapters of ``names`` the out_proj layer holds and has not merged."""
        out = self.out_proj_layer
        return [n for n in names if out.holds(n) and n not in out.merged_adapters]

    def _add_out_deltas(self, weight: torch.Tensor, names: list[str], times: int, subtract: bool = False,
                        check: bool = False) -> torch.Tensor:
        """``weight`` (out_proj's, or a copy) plus (minus) ``times`` x each adapter's out_proj delta, in place."""
        out = self.out_proj_layer
        with torch.no_grad():
            for name in names:
                delta = out.get_delta_weight(name).to(device=weight.device, dtype=weight.dtype)
                for _ in range(times):
                    weight.sub_(delta) if subtract else weight.add_(delta)
                if check:
                    raise_if_not_finite(weight, name)
        return weight

    def check_merge(self, adapter_names: Optional[list[str]] = None) -> None:
        super().check_merge(adapter_names)
        names = self._out_names(self.merge_names(adapter_names, warn=False))
        if names:
            self._add_out_deltas(self.out_proj.weight.detach().clone(), names, times=2, check=True)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge into ``in_proj_weight`` and ``out_proj.weight`` (twice the out_proj delta, see the class
        docstring). With ``safe_merge`` both sums are checked for NaN/inf before either weight changes."""
        names = self.merge_names(adapter_names, warn=False)
        if not names:
            super().merge(adapter_names=adapter_names)  # PEFT's warnings for adapters merged already
            return
        if safe_merge:
            self.check_merge(names)
        out_names = self._out_names(names)
        super().merge(adapter_names=adapter_names)
        self._add_out_deltas(self.out_proj.weight.data, out_names, times=1)
        self.out_proj_layer.merge(adapter_names=out_names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning)
            return
        out = self.out_proj_layer
        extra = [n for n in reversed(self.merged_adapters) if n in out.merged_adapters]
        super().unmerge()
        self._add_out_deltas(self.out_proj.weight.data, extra, times=1, subtract=True)
        if out.merged:
            out.unmerge()

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                           adapter_names: Optional[list[str]]) -> nn.MultiheadAttention:
        """The plain nn.MultiheadAttention (out_proj unwrapped too), merged first when ``merge`` (PEFT's method)."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        base = self.get_base_layer()
        base.out_proj = self.out_proj
        return base

    def _restore_weights(self) -> None:
        """PEFT re-registers the base weights it swapped out for merged tensors; here they are never swapped
        (kept for code that calls it)."""

    # -- forward --------------------------------------------------------------------------------------------
    def _adapted_weights(self, names: list[str]) -> list[tuple[nn.Module, str, torch.Tensor]]:
        """(module, attribute, tensor): ``in_proj_weight`` and out_proj's weight with the adapters ``names``
        added, and where the base module reads them. Values and gradients are PEFT's (class docstring): only the
        last adapter's deltas carry gradient, out_proj's second delta none."""
        base, out_base = self.get_base_layer(), self.out_proj
        w_in, w_out = base.in_proj_weight, out_base.weight
        out = self.out_proj_layer
        for i, name in enumerate(names):
            last = i == len(names) - 1
            d_in = self.get_delta_weight(name).to(w_in.dtype)
            w_in = w_in + (d_in if last else d_in.detach())
            if out.holds(name):
                d_out = out.get_delta_weight(name).to(w_out.dtype)
                w_out = w_out + (d_out if last else d_out.detach()) + d_out.detach()
        return [(base, "in_proj_weight", w_in), (out_base, "weight", w_out)]

    def forward(self, query: torch.Tensor, *args: Any,
                **kwargs: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """nn.MultiheadAttention's forward (same arguments) with the active adapters applied:
        (attn_output, attn_weights or None), both in the dtype of ``query``."""
        if call_adapter_names(self, kwargs) is not None:
            raise TypeError("lora.MultiheadAttention does not support mixed adapter batches (adapter_names); use "
                            "set_adapter() to choose the adapter for the whole batch")
        dtype = query.dtype
        base = self.base_layer
        names = [n for n in self.active_adapters if n in self.lora_A]
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = base(query, *args, **kwargs)
        elif self.merged or not names:
            result = base(query, *args, **kwargs)
        else:
            if self.out_proj_layer.merged:
                raise ValueError("The out_proj layer of MultiheadAttention has merged adapters but "
                                 "MultiheadAttention itself has none; merge or unmerge both (merge_adapter / "
                                 "unmerge_adapter on the model) before calling it")
            with tensors_in_place(self._adapted_weights(names)):
                result = base(query, *args, **kwargs)
        attn, weights = result
        return attn.to(dtype), (None if weights is None else weights.to(dtype))

    def __repr__(self) -> str:
        return "lora." + super().__repr__()

