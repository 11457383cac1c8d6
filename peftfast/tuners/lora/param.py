"""LoRA on an ``nn.Parameter`` (``LoraConfig(target_parameters=[...])``): PEFT's ``lora.ParamWrapper``.

Some weights live in no ``nn.Linear``: the experts of a mixture-of-experts block are often one 3-D tensor
``[experts, out, in]`` (or ``[experts, in, out]`` when the module sets ``is_transposed = True``) used with
batched matmuls. ``target_parameters`` names such tensors (``'mlp.experts.gate_up_proj'``; an entry matches a
parameter's full name or a dotted suffix of it), and each one gets a low-rank delta of its own shape:

    2-D parameter [out, in]:           delta = s * B A
    3-D parameter, expert e:           delta[e] = s * B_e A_e   ([out, in], transposed for ``is_transposed``)

The module holding the parameter is wrapped by a ``ParamWrapper`` (module tree and state-dict keys as PEFT's:
``<module>.lora_A.<adapter>.weight`` ...). Its forward runs the wrapped module with the parameter read as
``W + sum of the active adapters' deltas``: the sum is placed in the instance ``__dict__`` of the module for
the duration of the call, where attribute lookup finds it before ``nn.Module``'s parameter table, so the
module's own forward (whatever it does with the tensor) sees the adapted weight and gradients reach lora_A,
lora_B (and W when it trains). The parameter itself, its registration and its order are never touched.

Factor layout (PEFT's, so checkpoints load both ways): lora_A is ``nn.Linear(in, r * experts)`` whose rows
are expert-major (``A.view(experts, r, in)``), lora_B is ``nn.Linear(r * experts, out)`` whose columns are
rank-major (``B.view(out, r, experts)``). Several parameters of one module are targeted by nesting wrappers
(the later one outside, ``<module>.base_layer.lora_A...`` for the inner one), so every adapter that uses
``target_parameters`` must target the same parameters (refused otherwise, as in PEFT).

Not supported here (refused with an error, as in PEFT): ``lora_dropout > 0`` (dropout acts on the input,
which a delta on the weight cannot express), ``use_dora``, ``lora_bias``, ``fan_in_fan_out``, VeLoRA, KaSA, per-sample
``adapter_names``, initialisations other than True / False / 'gaussian', and ``add_weighted_adapter``.
Parameters under ``torch.nn.utils.parametrize`` are refused too.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...utils.other import ModulesToSaveWrapper, get_submodules, is_adapter_layer
from ...utils.patterns import get_pattern_key
from ...utils.routing import call_adapter_names
from ..tuners_utils import creation_device
from .layer import LoraLayer

if TYPE_CHECKING:
    from ...utils.undo import UndoLog
    from .config import LoraConfig

_STANDARD_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ParamWrapper(nn.Module, LoraLayer):
    """LoRA on one ``nn.Parameter`` (named ``parameter_name``) of the wrapped module; see the module docstring.

    ``in_features`` / ``out_features`` are the sizes of one expert's matrix ([out, in]), ``num_experts`` is 1
    for a 2-D parameter. Reading ``module.<parameter_name>`` outside this layer's forward gives the base tensor
    without the adapters (as in PEFT).
    """

    # checkpoint keys keep the nesting of wrappers: which parameter a tensor adapts is told by its depth
    checkpoint_keeps_nesting = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, r: int = 0,
                 lora_alpha: float = 1, lora_dropout: float = 0.0, fan_in_fan_out: bool = False,
                 init_lora_weights: bool | str = True, use_rslora: bool = False, use_dora: bool = False,
                 lora_bias: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self.parameter_name = parameter_name
        if fan_in_fan_out:
            raise ValueError("lora.ParamWrapper does not work with fan_in_fan_out: the orientation of a targeted "
                             "parameter comes from its shape (2-D: [out, in]; 3-D: [experts, out, in], or "
                             "[experts, in, out] when the module sets is_transposed=True); use "
                             "fan_in_fan_out=False")
        kwargs.pop("is_target_conv_1d_layer", None)
        LoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora,
                          use_dora=use_dora, lora_bias=lora_bias)

    # -- the targeted parameter -----------------------------------------------------------------------------
    def get_param(self) -> torch.Tensor:
        """The targeted parameter as the wrapped module holds it (without the adapters)."""
        return self.get_base_layer()._parameters[self.parameter_name]

    def merge_target(self) -> torch.Tensor:
        return self.get_param()

    def _feature_sizes(self) -> tuple[int, int]:
        base = self.get_base_layer()
        name = self.parameter_name
        if parametrize.is_parametrized(base, name):
            raise ValueError(f"target_parameters: parameter {name!r} of {type(base).__name__} is parametrized "
                             "(torch.nn.utils.parametrize), which LoRA on nn.Parameter does not support; remove the "
                             "parametrization or target another parameter")
        param = base._parameters.get(name)
        if param is None:
            raise ValueError(f"target_parameters: {type(base).__name__} has no parameter {name!r}")
        shape = tuple(getattr(param, "ds_shape", param.shape))  # ds_shape: DeepSpeed ZeRO-3's real shape
        self.is_transposed = bool(getattr(base, "is_transposed", False))
        if len(shape) == 2:
            self.num_experts = 1
            out_features, in_features = shape
        elif len(shape) == 3:
            self.num_experts = shape[0]
            in_features, out_features = (shape[1], shape[2]) if self.is_transposed else (shape[2], shape[1])
        else:
            raise ValueError(f"lora.ParamWrapper was initialized with {len(shape)} dimensional Parameter, but only "
                             f"2d and 3d are supported. ({name!r} of {type(base).__name__} has shape "
                             f"{list(shape)}; 2-D: [out, in], 3-D: [experts, out, in] or, with is_transposed, "
                             "[experts, in, out])")
        self._param_ndim = len(shape)
        return int(in_features), int(out_features)

    def adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        param = self.get_param()
        dtype = param.dtype if param.dtype in _STANDARD_FLOATS else torch.float32
        return creation_device(param.device), dtype

    # -- adapters -------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights: bool | str = True, use_rslora: bool = False, use_dora: bool = False,
                     lora_bias: bool = False, bd_lora: Optional[tuple[str, int]] = None, **kwargs: Any) -> None:
        if lora_dropout:
            raise ValueError("lora.ParamWrapper does not work with lora_dropout != 0: dropout acts on the layer's "
                             "input, which a delta on the parameter cannot express; use lora_dropout=0 with "
                             "target_parameters")
        if use_dora:
            raise ValueError("lora.ParamWrapper does not work with LoRA variants like DoRA (use_dora=True); use "
                             "use_dora=False with target_parameters")
        if lora_bias:
            raise ValueError("lora.ParamWrapper does not work with lora_bias=True: a targeted parameter has no "
                             "bias of its own to merge into; use lora_bias=False with target_parameters")
        if bd_lora is not None:
            raise ValueError("BD-LoRA (use_bdlora) is not supported with target_parameters; leave the targeted "
                             "parameters out of target_modules_bd_a / target_modules_bd_b")
        if kwargs.get("velora") is not None:
            raise ValueError("lora.ParamWrapper does not work when `velora_config` is set.")
        if kwargs.get("use_kasa"):
            raise ValueError("lora.ParamWrapper does not work when `kasa_config` is set.")
        super().update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora,
                             use_dora=False, lora_bias=False)

    def _create_adapter_weights(self, adapter_name: str, r: int) -> None:
        device, dtype = self.creation_device_dtype()
        rank = r * self.num_experts
        self.lora_A[adapter_name] = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B[adapter_name] = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)

    def init_adapter_weights(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        if isinstance(init_lora_weights, str) and init_lora_weights != "gaussian":
            raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported with target_parameters "
                             "(LoRA on nn.Parameter); supported: True, False, 'gaussian'")
        self.reset_lora_parameters(adapter_name, init_lora_weights)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B_e @ A_e`` for every expert, shaped like the parameter; in its dtype (float32 for a
        parameter in another format), computed in float32 for half-precision factors."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        compute = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        experts = self.num_experts
        a3 = a.to(compute).reshape(experts, -1, a.shape[-1])  # [E, r, in]
        b3 = b.to(compute).reshape(b.shape[0], -1, experts).permute(2, 0, 1)  # [E, out, r]
        delta = torch.bmm(b3, a3) * self.scaling[adapter]  # [E, out, in]
        if self._param_ndim == 2:
            delta = delta[0]
        elif self.is_transposed:
            delta = delta.transpose(1, 2)
        param = self.get_param()
        dtype = param.dtype if param.dtype in _STANDARD_FLOATS else torch.float32
        return delta.to(device=param.device, dtype=dtype)

    def check_lora_bias(self) -> None:
        raise ValueError("lora.ParamWrapper does not work with lora_bias=True")

    # -- forward --------------------------------------------------------------------------------------------
    @contextmanager
    def _adapted_parameter(self, names: list[str]) -> Iterator[None]:
        """Inside the block, the wrapped module's attribute ``parameter_name`` reads ``W + sum of the deltas``."""
        base = self.get_base_layer()
        param = base._parameters[self.parameter_name]
        delta = self.get_delta_weight(names[0])
        for name in names[1:]:
            delta = delta + self.get_delta_weight(name)
        if param.dtype in _STANDARD_FLOATS:
            adapted = param + delta
        else:  # e.g. float8: add in float32, clamp to the format's range, store back in it (as PEFT)
            info = torch.finfo(param.dtype)
            adapted = (param.to(delta.dtype) + delta).clamp(info.min, info.max).to(param.dtype)
        shadow = base.__dict__
        if self.parameter_name in shadow:
            raise RuntimeError(f"lora.ParamWrapper: {type(base).__name__}.{self.parameter_name} is already "
                               "replaced for this call (the same parameter wrapped twice)")
        shadow[self.parameter_name] = adapted
        try:
            yield
        finally:
            shadow.pop(self.parameter_name, None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if call_adapter_names(self, kwargs) is not None:
            raise ValueError("lora.ParamWrapper does not support mixed adapter batches (adapter_names): the adapters "
                             "change a parameter of the whole module, not a per-sample output; use set_adapter()")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        names = [] if self.merged else [n for n in self.active_adapters if n in self.lora_A]
        if not names:
            return self.base_layer(*args, **kwargs)
        with self._adapted_parameter(names):
            return self.base_layer(*args, **kwargs)

    def __repr__(self) -> str:
        rep = nn.Module.__repr__(self)
        idx = rep.find("(") + 1
        return f"lora.{rep[:idx]}\n  parameter_name='{self.parameter_name}',{rep[idx:]}"


# -- injection ---------------------------------------------------------------------------------------------------

def _strip_base_layer(name: str) -> str:
    """'a.experts.base_layer.base_layer' -> 'a.experts': the module's name before any wrapper was added."""
    return ".".join(p for p in name.split(".") if p != "base_layer")


def _excluded_modules(model: nn.Module) -> set[str]:
    """Modules that hold adapter tensors, not base-model ones: everything inside an adapter layer but its chain of
    ``base_layer`` s, everything inside a modules_to_save wrapper."""
    out: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            out.update(f"{prefix}.{s}" if prefix else s for s, _ in module.named_modules() if s)
        elif is_adapter_layer(module):
            for suffix, _ in module.named_modules():
                if suffix and any(p != "base_layer" for p in suffix.split(".")):
                    out.add(f"{prefix}.{suffix}" if prefix else suffix)
    return out


def _existing_wrapper(module: nn.Module, parameter_name: str) -> Optional[ParamWrapper]:
    while isinstance(module, ParamWrapper):
        if module.parameter_name == parameter_name:
            return module
        module = module.base_layer
    return None


def inject_parameters(tuner: Any, model: nn.Module, config: "LoraConfig", adapter_name: str,
                      undo: "UndoLog") -> list[str]:
    """Wrap (or add ``adapter_name`` to the existing wrapper of) every parameter ``config.target_parameters``
    names; every change goes into ``undo``. Returns the targeted parameters' names (without ``base_layer``)."""
    targets = sorted(set(config.target_parameters or ()))
    if not targets:
        return []
    excluded = _excluded_modules(model)
    found: list[str] = []
    for module_name, module in list(model.named_modules()):
        if module_name in excluded or is_adapter_layer(module) or isinstance(module, ModulesToSaveWrapper):
            continue
        plain = _strip_base_layer(module_name)
        for param_name, param in list(module._parameters.items()):
            if param is None:
                continue
            key = f"{plain}.{param_name}" if plain else param_name
            if key not in targets and not any(key.endswith("." + t) for t in targets):
                continue
            if not module_name:
                raise ValueError(f"Targeting an nn.Parameter on the top-level module is not supported (parameter "
                                 f"'{param_name}'). Its module cannot be replaced by a wrapper; move the parameter "
                                 "into a submodule")
            _wrap_parameter(tuner, model, config, adapter_name, module, plain, param_name, key, undo)
            found.append(key)
    return found


def _wrap_parameter(tuner: Any, model: nn.Module, config: "LoraConfig", adapter_name: str, module: nn.Module,
                    plain: str, param_name: str, key: str, undo: "UndoLog") -> None:
    outer = model.get_submodule(plain)
    if is_adapter_layer(outer) and not isinstance(outer, ParamWrapper):
        raise ValueError(
            f"Trying to wrap an `nn.Parameter` of layer '{plain}' of type {type(module).__name__}, which is not a "
            "valid target. Make sure that this layer is not also targeted with `target_modules`. For some models, "
            "PEFT will do this automatically, try setting `target_modules=[]` to prevent it. (It is already a "
            f"{type(outer).__name__} adapter layer.)")
    for field_name in ("velora_config", "kasa_config"):  # PEFT refuses both on a targeted parameter
        if getattr(config, field_name, None) is not None:
            raise ValueError(f"lora.ParamWrapper does not work when `{field_name}` is set (parameter {key!r}); "
                             f"use {field_name}=None with target_parameters")
    r_key = get_pattern_key(list((config.rank_pattern or {}).keys()), key)
    alpha_key = get_pattern_key(list((config.alpha_pattern or {}).keys()), key)
    r = (config.rank_pattern or {}).get(r_key, config.r)
    alpha = (config.alpha_pattern or {}).get(alpha_key, config.lora_alpha)
    existing = _existing_wrapper(outer, param_name)
    if existing is not None:
        if adapter_name in existing.lora_A:
            raise ValueError(f"target_parameters: {key!r} is targeted twice by adapter {adapter_name!r}")
        undo.delete_adapter(existing, adapter_name)
        existing.update_layer(adapter_name, r, alpha, config.lora_dropout, config.init_lora_weights,
                              config.use_rslora, use_dora=config.use_dora, lora_bias=config.lora_bias)
        return
    parent, target, target_name = get_submodules(model, plain)
    new = ParamWrapper(target, adapter_name, param_name, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                       fan_in_fan_out=config.fan_in_fan_out, init_lora_weights=config.init_lora_weights,
                       use_rslora=config.use_rslora, use_dora=config.use_dora, lora_bias=config.lora_bias,
                       ephemeral_gpu_offload=getattr(config.runtime_config, "ephemeral_gpu_offload", False))
    if adapter_name not in tuner.active_adapters:
        new.requires_grad_(False)
    undo.replace(parent, target_name, target)
    setattr(parent, target_name, new)


def check_same_target_parameters(peft_config: dict, config: Any) -> None:
    """PEFT's rule: every adapter that uses target_parameters targets the same set of parameters (the nesting of
    wrappers, and so the checkpoint keys, must be the same for all of them)."""
    targets = getattr(config, "target_parameters", None)
    if not targets:
        return
    for name, other in peft_config.items():
        if other is config:
            continue
        theirs = getattr(other, "target_parameters", None)
        if theirs and set(theirs) != set(targets):
            raise ValueError(
                "When using multiple adapters with `target_parameters`, all adapters must target the same set of "
                f"parameters, but got {sorted(targets)} for the new adapter and {sorted(theirs)} for adapter "
                f"'{name}'.")

