"""LoraConfig: PEFT's fields, defaults and JSON layout.

Every field PEFT 0.21 writes to adapter_config.json is declared here, so a PEFT checkpoint loads
without warnings. Fields for features peftfast does not implement (LoftQ, EVA, ...) are
accepted at their defaults and refused with a clear message otherwise, because silently ignoring
them would change the model's math.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Union

from ...config import ConfigError, PeftConfig
from ...utils.peft_types import PeftType
from .velora import VeloraConfig

# field -> (default as PEFT writes it, what it would enable)
UNSUPPORTED_LORA_FIELDS: dict[str, tuple[Any, str]] = {
    "loftq_config": ({}, "LoftQ initialisation"),
    "eva_config": (None, "EVA initialisation"),
    "corda_config": (None, "CorDA initialisation"),
    "lora_ga_config": (None, "LoRA-GA initialisation"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA)"),
    "use_qalora": (False, "QA-LoRA"),
    "monteclora_config": (None, "MonteCLoRA"),
    "layer_replication": (None, "layer replication"),
    "arrow_config": (None, "Arrow routing"),
    "megatron_config": (None, "Megatron parallel layers"),
}

BIAS_MODES = ("none", "all", "lora_only")

# init_lora_weights values implemented here: True, False and these strings (plus "pissa_niter_<N>")
SUPPORTED_INITS = ("gaussian", "pissa", "olora", "orthogonal", "mica")
# PEFT's other initialisations, refused by name (each needs data, a preprocessing pass or a variant of the layer)
REFUSED_INITS: dict[str, str] = {
    "loftq": "LoftQ (quantise-and-approximate initialisation)",
    "eva": "EVA (data-driven initialisation from activations)",
    "corda": "CorDA (initialisation from a preprocessing pass over data)",
    "lora_ga": "LoRA-GA (initialisation from estimated gradients)",
}


def _pissa_niter(init: Any) -> Optional[int]:
    """N of ``'pissa_niter_N'`` (N >= 0), else None."""
    if not isinstance(init, str) or not init.startswith("pissa_niter_"):
        return None
    tail = init[len("pissa_niter_"):]
    return int(tail) if tail.isdigit() else None


@dataclass
class BdLoraConfig:
    """BD-LoRA (PEFT's ``BdLoraConfig``): which targeted layers get a block-diagonal factor.

    ``target_modules_bd_a`` / ``target_modules_bd_b``: substrings of a targeted module's name; a match makes that
    layer's lora_A (row-sharded layers: out / down projections) or lora_B (column-sharded: q, k, v, up, gate)
    block-diagonal with ``nblocks`` blocks. ``match_strict``: every targeted layer must match one of the lists.
    """

    target_modules_bd_a: Optional[list[str]] = field(default=None)
    target_modules_bd_b: Optional[list[str]] = field(default=None)
    nblocks: int = field(default=1)
    match_strict: bool = field(default=True)

    def __post_init__(self) -> None:
        for name in ("target_modules_bd_a", "target_modules_bd_b"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ConfigError(f"BdLoraConfig.{name} must be a list of module-name substrings or None, "
                                  f"got {value!r}")
        overlap = set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or [])
        if overlap:
            raise ConfigError(f"Found overlapping modules in target_modules_bd lists: {sorted(overlap)} are in both "
                              f"{self.target_modules_bd_a} (A) and {self.target_modules_bd_b} (B).")
        if not isinstance(self.nblocks, int) or isinstance(self.nblocks, bool) or self.nblocks < 1:
            raise ConfigError(f"BdLoraConfig.nblocks must be a positive integer, got {self.nblocks!r}")


@dataclass
class KasaConfig:
    """KaSA (knowledge-aware singular-value adaptation; PEFT's ``KasaConfig``), enabled by ``kasa_config``.

    Adding a KaSA adapter to a linear layer replaces its base weight by the rank ``min(in, out) - r`` SVD
    approximation (its ``r`` smallest singular components dropped, for good: disabling or unloading the adapter does
    not bring them back), and the adapter's update is ``scaling * B diag(lora_diag) A`` with ``lora_diag`` a trained
    r-vector. ``beta`` and ``gamma`` weigh the paper's two regularisers, ``beta * sum(lora_diag^2)`` and
    ``gamma * (||B^T B - I||_F + ||A A^T - I||_F)``, which ``LoraModel._get_kasa_loss()`` returns for adding to the
    task loss (they act only there).
    """

    beta: float = field(default=1e-4)
    gamma: float = field(default=1e-3)

    def __post_init__(self) -> None:
        for name in ("beta", "gamma"):
            value = getattr(self, name)
            if not _is_number(value):
                raise ConfigError(f"KasaConfig.{name} must be a finite number, got {value!r}")
            if value < 0:
                raise ConfigError(f"`{name}` must be non-negative, got {value}.")


@dataclass
class LoraRuntimeConfig:
    """PEFT's runtime-only LoRA options (never written to adapter_config.json).

    ``ephemeral_gpu_offload``: adapters kept on the CPU have DoRA's initial norms computed on the GPU
    (when one is available), the result placed back on the CPU.
    """

    ephemeral_gpu_offload: bool = field(default=False)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter: ``W x + (alpha / r) * B A dropout(x)``.

    Args mirror ``peft.LoraConfig``: ``r`` (rank), ``lora_alpha``, ``lora_dropout``, ``target_modules``
    (list of names, a full-match regex, or ``'all-linear'``), ``exclude_modules``, ``fan_in_fan_out``
    (True for GPT-2's Conv1D), ``bias`` ('none', 'all', 'lora_only'), ``use_rslora`` (scale by
    alpha/sqrt(r)), ``modules_to_save``, ``init_lora_weights`` (True, False, 'gaussian', 'pissa',
    'pissa_niter_<N>', 'olora', 'orthogonal', 'mica'), ``lora_bias`` (a trainable bias on lora_B),
    ``velora_config`` (a ``VeloraConfig``: VeLoRA's compressed activations for lora_A, see ``velora.py``),
    ``layers_to_transform``, ``layers_pattern``, ``rank_pattern``, ``alpha_pattern``, ``target_parameters``
    (names of ``nn.Parameter`` s to adapt directly, e.g. 3-D MoE expert weights; see ``lora/param.py``).
    """

    r: int = field(default=8, metadata={"help": "Lora attention dimension"})
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    lora_alpha: int = field(default=8, metadata={"help": "Lora alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "Lora dropout"})
    fan_in_fan_out: bool = field(default=False)
    bias: Literal["none", "all", "lora_only"] = field(default="none")
    use_rslora: bool = field(default=False)
    modules_to_save: Optional[list[str]] = field(default=None)
    init_lora_weights: bool | Literal["gaussian", "pissa", "olora", "orthogonal"] | str = field(default=True)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)
    megatron_config: Optional[dict] = field(default=None)
    megatron_core: Optional[str] = field(default="megatron.core")
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(default=None)
    loftq_config: Union[dict, Any] = field(default_factory=dict)
    eva_config: Optional[Any] = field(default=None)
    corda_config: Optional[Any] = field(default=None)
    lora_ga_config: Optional[Any] = field(default=None)
    use_dora: bool = field(default=False)
    velora_config: Optional[VeloraConfig] = field(default=None)
    alora_invocation_tokens: Optional[list[int]] = field(default=None)
    use_qalora: bool = field(default=False)
    qalora_group_size: int = field(default=16)
    monteclora_config: Optional[Any] = field(default=None)
    layer_replication: Optional[list[tuple[int, int]]] = field(default=None)
    lora_bias: bool = field(default=False)
    target_parameters: Optional[list[str]] = field(default=None)
    use_bdlora: Optional[BdLoraConfig] = field(default=None)
    arrow_config: Optional[Any] = field(default=None)
    kasa_config: Optional[KasaConfig] = field(default=None)
    ensure_weight_tying: bool = field(default=False)
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("runtime_config", None)  # runtime only, as in PEFT
        return out

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LORA
        if isinstance(self.runtime_config, dict):
            self.runtime_config = LoraRuntimeConfig(**self.runtime_config)
        if isinstance(self.use_bdlora, dict):  # as read back from adapter_config.json
            self.use_bdlora = BdLoraConfig(**self.use_bdlora)
        elif self.use_bdlora is not None and not isinstance(self.use_bdlora, BdLoraConfig):
            raise ConfigError(f"use_bdlora must be a BdLoraConfig, a dict or None, got {type(self.use_bdlora).__name__}")
        if isinstance(self.velora_config, dict):  # as read back from adapter_config.json
            unknown = sorted(set(self.velora_config) - set(VeloraConfig.__dataclass_fields__))
            if unknown:
                raise ConfigError(f"velora_config has unknown fields {unknown}; VeloraConfig takes num_groups, scale "
                                  "and init_type")
            self.velora_config = VeloraConfig(**self.velora_config)
        elif self.velora_config is not None and not isinstance(self.velora_config, VeloraConfig):
            raise ConfigError(f"velora_config must be a VeloraConfig, a dict or None, got "
                              f"{type(self.velora_config).__name__}")
        if isinstance(self.kasa_config, dict):  # as read back from adapter_config.json
            known = {f.name for f in fields(KasaConfig)}
            self.kasa_config = KasaConfig(**{k: v for k, v in self.kasa_config.items() if k in known})
        elif self.kasa_config is not None and not isinstance(self.kasa_config, KasaConfig):
            raise TypeError("`KasaConfig` must be a `KasaConfig`, a dict, or None.")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set, frozenset)):
                setattr(self, name, set(value))
            elif value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a list of module names, a regex string or None, "
                                  f"got {type(value).__name__}")
        self._validate()
        if (self.use_rslora and (self.rank_pattern or self.alpha_pattern)
                and str(self.init_lora_weights).lower().startswith(("pissa", "olora"))):
            warnings.warn("Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of "
                          "modified base weights (PiSSA/OLoRA) means that you won't be able to pass "
                          "`path_initial_model_for_weight_conversion` to `save_pretrained` to restore the initial "
                          "values of the base weights; to do that, do not use rslora with rank_pattern/alpha_pattern",
                          UserWarning, stacklevel=3)

    def _validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be a positive finite number, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {', '.join(map(repr, BIAS_MODES))}, got {self.bias!r}")
        init = self.init_lora_weights
        if isinstance(init, str) and init in REFUSED_INITS:
            raise ConfigError(
                f"init_lora_weights={init!r} asks for {REFUSED_INITS[init]}, which peftfast does not implement; "
                f"supported: True, False, {', '.join(map(repr, SUPPORTED_INITS))}, 'pissa_niter_<N>'"
            )
        if isinstance(init, str) and init.lower() == "olora":  # PEFT accepts any case for OLoRA ("OLoRA")
            init = "olora"
        if not (init is True or init is False or init in SUPPORTED_INITS or _pissa_niter(init) is not None):
            raise ConfigError(
                f"init_lora_weights={init!r} is not supported by peftfast; "
                f"supported: True, False, {', '.join(map(repr, SUPPORTED_INITS))}, 'pissa_niter_<N>' (N iterations "
                "of the randomised SVD)"
            )
        if self.use_bdlora is not None and self.use_dora:
            raise ConfigError("use_bdlora cannot be combined with use_dora (PEFT: invalid or unsupported variant "
                              "combination ('use_bdlora', 'use_dora')); use one of them")
        if self.velora_config is not None:
            other = [name for name, on in (("use_dora", self.use_dora), ("use_bdlora", self.use_bdlora is not None),
                                           ("init_lora_weights='mica'", init == "mica"),
                                           ("kasa_config", self.kasa_config is not None)) if on]
            if other:
                raise ConfigError(f"velora_config cannot be combined with {other[0]} (PEFT: invalid or unsupported "
                                  "variant combination); use one of them")
        if self.kasa_config is not None:
            clash = [name for name, on in (("use_dora", self.use_dora), ("use_bdlora", self.use_bdlora is not None),
                                           ("init_lora_weights='mica'", init == "mica")) if on]
            if clash:
                raise ConfigError(f"kasa_config cannot be combined with {', '.join(clash)} (PEFT: invalid or "
                                  "unsupported variant combination); use one of them")
        if self.lora_bias:
            if init not in (True, False):
                raise ConfigError(f"The argument lora_bias=True is only supported with init_lora_weights=True or "
                                  f"False, got init_lora_weights={init} instead.")
            if self.use_dora:
                raise ConfigError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False")
        for key, pattern in (("rank_pattern", self.rank_pattern or {}), ("alpha_pattern", self.alpha_pattern or {})):
            if not isinstance(pattern, dict):
                raise ConfigError(f"{key} must be a dict of module-name pattern -> value, got {type(pattern).__name__}")
            for name, value in pattern.items():
                ok = (isinstance(value, int) and not isinstance(value, bool) and value > 0) if key == "rank_pattern" \
                    else (_is_number(value) and value > 0)
                if not ok:
                    raise ConfigError(f"{key}[{name!r}] must be a positive "
                                      f"{'integer' if key == 'rank_pattern' else 'number'}, got {value!r}")
        if isinstance(self.target_parameters, str):
            raise TypeError("`target_parameters` must be a list of strings or None. (Got the string "
                            f"{self.target_parameters!r}; wrap it in a list, e.g. [{self.target_parameters!r}])")
        if self.target_parameters is not None:
            if not isinstance(self.target_parameters, (list, tuple, set, frozenset)) or \
                    not all(isinstance(n, str) and n for n in self.target_parameters):
                raise TypeError(f"`target_parameters` must be a list of strings or None, got "
                                f"{self.target_parameters!r}")
            params = self.target_parameters
            self.target_parameters = sorted(params) if isinstance(params, (set, frozenset)) else list(params)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("layers_to_transform cannot be used when target_modules is a regex string")
        if isinstance(self.target_modules, str) and self.layers_pattern:
            raise ConfigError("layers_pattern cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern requires layers_to_transform to be set as well")
        if self.use_dora and self.megatron_config:
            raise ConfigError("DoRA does not support megatron_core (megatron_config is set); set use_dora=False")
        for name, (default, feature) in UNSUPPORTED_LORA_FIELDS.items():
            value = getattr(self, name)
            if not (value == default or (default is None and value in ({}, [], False))):
                raise ConfigError(
                    f"{name}={value!r} asks for {feature}, which peftfast does not implement; "
                    f"remove it or set it to {default!r}"
                )
