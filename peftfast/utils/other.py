"""Helpers shared by the tuners and save/load: module lookup, modules_to_save, per-sample adapter names,
recognising adapter layers, dtype casting."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .constants import EMBEDDING_LAYER_NAMES  # noqa: F401  PEFT's import path: peft.utils.other
from .errors import AdapterError
from .registry import trainable_tokens_layer_class
from .routing import call_adapter_names


def get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """(parent, module, name-in-parent) for the dotted path ``key``."""
    parent_key, _, target_name = key.rpartition(".")
    parent = model.get_submodule(parent_key) if parent_key else model
    return parent, model.get_submodule(key), target_name


_get_submodules = get_submodules  # PEFT's name for it, which user code imports from peft.utils


def per_sample_adapter_names(adapter_names: list[str], batch: int) -> list[str]:
    """PEFT's ``adapter_names`` has one entry per input sample; generate() with beams (or any caller that
    repeats each sample k times, e.g. the decoder of a seq2seq model) sees a batch k times as large."""
    n = len(adapter_names)
    if n == batch:
        return list(adapter_names)
    if n and batch % n == 0:
        k = batch // n
        return [name for name in adapter_names for _ in range(k)]
    raise ValueError(f"adapter_names has {n} entries for a batch of {batch}; give one adapter name per sample")


_TOKENWISE = (nn.Linear, nn.Embedding)


def mixed_parts(x: torch.Tensor, adapter_names: list, run, module: nn.Module, what: str) -> torch.Tensor:
    """A wrapped module's output for a mixed batch: ``run(name, part)`` on each adapter's samples of ``x`` (names
    per sample, repeated when the batch is), or, for names per token (one list per sample), on each adapter's
    tokens of ``x`` [batch, tokens, ...] -- only where ``module`` works token by token (a linear layer, an
    embedding; transformers' Conv1D), which ``what`` names in the error otherwise."""
    per_token = bool(adapter_names) and isinstance(adapter_names[0], (list, tuple))
    if per_token:
        shape = (len(adapter_names), len(adapter_names[0]))
        if not (isinstance(module, _TOKENWISE) or type(module).__name__ == "Conv1D") or tuple(x.shape[:2]) != shape:
            raise ValueError(f"adapter_names per token ({shape[0]} samples x {shape[1]} tokens) reached {what} "
                             f"({type(module).__name__}) with an input of shape {tuple(x.shape)}: per-token names "
                             "apply to linear and embedding modules over all the tokens of the call; give one adapter "
                             "name per sample for this model")
        names, rows = [n for per in adapter_names for n in per], x.reshape(shape[0] * shape[1], *x.shape[2:])
    else:
        names, rows = per_sample_adapter_names(adapter_names, x.shape[0]), x
    out = None
    for name in dict.fromkeys(names):  # each adapter's rows (samples or tokens) at once
        idx = [i for i, n in enumerate(names) if n == name]
        part = run(name, rows[idx])
        if out is None:
            out = part.new_empty((rows.shape[0],) + tuple(part.shape[1:]))
        out[idx] = part
    return out.view(*shape, *out.shape[1:]) if per_token else out


def embed_scale(base: nn.Module) -> Optional[torch.Tensor]:
    """The ``embed_scale`` of an embedding that multiplies its output by it in forward (Gemma's scaled word
    embeddings), which adapters producing embedding rows (LoRA, trainable tokens) apply to their rows too, as PEFT
    does: a number (as a tensor in the weight's dtype) or a one-element tensor; None otherwise (another shape is
    warned about and not applied, as in PEFT)."""
    scale = getattr(base, "embed_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
    if isinstance(scale, torch.Tensor):
        if scale.numel() == 1:
            return scale
        warnings.warn(f"The base embedding's embed_scale has shape {tuple(scale.shape)}, not one element: the "
                      "adapter's rows are not scaled by it", UserWarning)
    return None


def is_adapter_layer(module: nn.Module) -> bool:
    """Whether ``module`` is an adapter layer (a BaseTunerLayer of any method), recognised by the class attribute
    every adapter layer declares, so that this bottom layer needs no import of the tuners."""
    return isinstance(getattr(type(module), "adapter_layer_names", None), tuple) and \
        not isinstance(module, AuxiliaryTrainingWrapper)


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


class AuxiliaryTrainingWrapper(nn.Module):
    """A module replaced by a wrapper that trains (part of) it for each adapter outside of any adapter layer:
    ``ModulesToSaveWrapper`` (a full copy) and the trainable-tokens wrapper (a few rows). ``original_attr`` names
    the child through which the original module's tensors are reached; ``unwrapped()`` is what replaces the
    wrapper on unload."""

    original_attr: str = "original_module"

    def unwrapped(self, adapter_name: Optional[str] = None) -> nn.Module:
        raise NotImplementedError


def module_names_tied_with_embedding(model: nn.Module) -> list[str]:
    """Names of the modules whose ``weight`` is the very tensor of ``model``'s input embedding (an LM head tied to
    it), for a model whose config says ``tie_word_embeddings=True``; [] otherwise. Modules inside adapter layers or
    wrappers are reported under the name of the outermost one."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False) or \
            not hasattr(model, "get_input_embeddings"):
        return []
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return []
    while hasattr(embedding, "base_layer") or hasattr(embedding, "token_adapter"):
        embedding = getattr(embedding, "token_adapter", None) or embedding.base_layer
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, nn.Parameter):
        return []
    inner = ("base_layer", "token_adapter", "original_module", "modules_to_save")
    names = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if module is embedding or module._parameters.get("weight") is not weight:
            continue
        parts = name.split(".")
        while parts and parts[-1] in inner:
            parts.pop()
        if any(p in inner for p in parts):
            continue
        outer = ".".join(parts)
        if outer and model.get_submodule(outer) is not model.get_input_embeddings():
            names.add(outer)
    return sorted(names)


class ModulesToSaveWrapper(AuxiliaryTrainingWrapper):
    """Keeps the original module frozen and trains a full copy of it per adapter (PEFT's ``modules_to_save``).

    ``original_module`` runs when adapters are disabled or the active adapter has no copy here.
    """

    # PEFT's bookkeeping names (status reports read them): the per-adapter copies; a wrapper never merges.
    adapter_layer_names: tuple[str, ...] = ("modules_to_save",)
    other_param_names: tuple[str, ...] = ()
    merged_adapters: list[str] = []

    def __init__(self, module_to_save: nn.Module, adapter_name: str, tied_module: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.update(adapter_name, tied_module=tied_module)
        self.set_adapter(adapter_name)

    # -- state ---------------------------------------------------------------------------------------
    @property
    def _adapters(self) -> set[str]:  # PEFT's attribute: the adapters with a copy here
        return set(self.modules_to_save.keys())

    def _get_available_adapters(self) -> set[str]:  # PEFT's name
        return self._adapters

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    def _active_module(self) -> nn.Module:
        if self._disable_adapters:
            return self.original_module
        for name in self._active_adapter:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("original_module", "modules_to_save"):
                raise
            active = self.__dict__.get("_active_adapter")
            if isinstance(active, str) and not self._disable_adapters and active not in self.modules_to_save:
                # set directly to one name (PEFT keeps a str here) that has no copy: a broken state, not a fallback
                raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}': its active adapter "
                                     f"{active!r} has no copy here (copies: {sorted(self.modules_to_save)})") from None
            return getattr(self._active_module(), name)

    def update(self, adapter_name: str, tied_module: Optional[nn.Module] = None) -> None:
        """Add a trainable copy of the original module for ``adapter_name`` (frozen until activated). With
        ``tied_module`` (``ensure_weight_tying``: an LM head tied to the embedding), the copy's weight is that
        module's weight, so that both train one tensor."""
        memo = {}
        if tied_module is not None:
            weight = getattr(self.original_module, "weight", None)
            if weight is None or tuple(tied_module.weight.shape) != tuple(weight.shape):
                raise ValueError(f"cannot tie the copy of a {type(self.original_module).__name__} to a "
                                 f"{type(tied_module).__name__}: their weights differ in shape")
            memo[id(weight)] = tied_module.weight
        new = copy.deepcopy(self.original_module, memo)
        new.requires_grad_(False)
        self.modules_to_save[adapter_name] = new

    def check_can_activate(self, adapter_names: str | Iterable[str]) -> None:
        """A module trained in full cannot run two adapters' copies at once: at most one of ``adapter_names`` may
        have a copy here (PEFT's rule, and its message)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        owners = [n for n in names if n in self.modules_to_save]
        if len(owners) > 1:
            raise AdapterError(f"Only one adapter can be set at a time for ModulesToSaveWrapper: adapters "
                               f"{', '.join(owners)} each have their own copy of this module (modules_to_save); "
                               "activate at most one of them together with other adapters")

    def set_adapter(self, adapter_names: str | Iterable[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.check_can_activate(names)
        self.original_module.requires_grad_(False)
        for key, module in self.modules_to_save.items():
            module.requires_grad_(key in names and not inference_mode)
        self._active_adapter = [n for n in names if n in self.modules_to_save]

    def enable_adapters(self, enabled: bool) -> None:
        """Disabled: the original module runs and no copy trains; enabled: the active copies train again."""
        if enabled:
            for key, module in self.modules_to_save.items():
                module.requires_grad_(key in self._active_adapter)
        else:
            self.modules_to_save.requires_grad_(False)
        self._disable_adapters = not enabled

    def set_requires_grad(self, adapter_names: str | Iterable[str], requires_grad: bool = True) -> None:
        """Switch gradients of the named adapters' copies on or off, whatever is active (PEFT's method)."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for key, module in self.modules_to_save.items():
            if key in names:
                module.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self._active_adapter = [n for n in self._active_adapter if n != adapter_name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = call_adapter_names(self, kwargs)
        if adapter_names is None or self._disable_adapters:
            return self._active_module()(*args, **kwargs)
        # One adapter per sample (or per token): each part through its adapter's copy ('__base__': the original).
        def run(name: str, part: torch.Tensor) -> torch.Tensor:
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            return module(part, *args[1:], **kwargs)

        return mixed_parts(args[0], adapter_names, run, self.original_module, "modules_to_save")

    def unwrapped(self, adapter_name: Optional[str] = None) -> nn.Module:
        """The module that replaces this wrapper on unload: the adapter's copy, or the original."""
        if adapter_name is not None and adapter_name in self.modules_to_save:
            return self.modules_to_save[adapter_name]
        return self._active_module()


class TrainableTokensWrapper(AuxiliaryTrainingWrapper):
    """``LoraConfig(trainable_token_indices=...)``: the module is replaced by this wrapper; its ``token_adapter``
    (a TrainableTokensLayer, which the tuner drives like its other layers) holds each adapter's rows. Attribute
    reads fall through to the wrapped module; ``weight`` is the weight with the active adapters' rows in place."""

    original_attr = "token_adapter"

    def __init__(self, module_to_save: nn.Module, adapter_name: str, token_indices: list[int],
                 tied_adapter: Optional[nn.Module] = None, init_weights: bool = True) -> None:
        super().__init__()
        self.token_adapter = trainable_tokens_layer_class()(module_to_save, adapter_name, tied_adapter=tied_adapter)
        self.token_adapter.update_layer(adapter_name, tied_adapter=tied_adapter, token_indices=token_indices,
                                        init_weights=init_weights)

    @property
    def original_module(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def _adapters(self) -> set[str]:  # PEFT's attribute: the adapters with rows here
        return set(self.token_adapter.trainable_tokens_delta.keys())

    @property
    def active_adapters(self) -> list[str]:
        return [n for n in self.token_adapter.active_adapters if n in self._adapters]

    @property
    def disable_adapters(self) -> bool:
        return self.token_adapter.disable_adapters

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "token_adapter":
                raise
            layer = self._modules["token_adapter"]
            if name == "weight":
                if layer.disable_adapters or layer.merged:
                    return layer.get_base_layer().weight
                return layer.get_merged_weights(layer.active_adapters)
            return getattr(layer.get_base_layer(), name)

    def set_adapter(self, adapter_names: str | Iterable[str], inference_mode: bool = False) -> None:
        self.token_adapter.set_adapter(adapter_names, inference_mode=inference_mode)

    def enable_adapters(self, enabled: bool) -> None:
        self.token_adapter.enable_adapters(enabled)

    def set_requires_grad(self, adapter_names: str | Iterable[str], requires_grad: bool = True) -> None:
        self.token_adapter.set_requires_grad(adapter_names, requires_grad=requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        self.token_adapter.delete_adapter(adapter_name)

    def _get_available_adapters(self) -> set[str]:  # PEFT's name
        return self._adapters

    def update(self, adapter_name: str, token_indices: list[int], init_weights: bool = True) -> None:
        self.token_adapter.update_layer(adapter_name, token_indices=token_indices, init_weights=init_weights)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.token_adapter(x, *args, **kwargs)

    def unwrapped(self, adapter_name: Optional[str] = None) -> nn.Module:
        """The module that replaces this wrapper on unload (merging, if asked, is the tuner's job)."""
        return self.token_adapter.get_base_layer()


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast frozen floating-point parameters to ``dtype`` and trainable ones to fp32 (for mixed-precision training).

    Matches PEFT: trainable (adapter) parameters stay/are cast to float32, everything else that is floating point
    and not a quantised storage is cast to ``dtype``. (PEFT also converts quantised storage: int8 weights, and
    4-bit weights packed in a float ``quant_storage``, whose bytes are then scrambled; here they are left alone.)
    """
    for p in model.parameters():
        if not p.requires_grad:
            if p.is_floating_point() and p.__class__.__name__ != "Params4bit":
                p.data = p.data.to(dtype)
        else:
            p.data = p.data.to(torch.float32)


def fsdp_auto_wrap_policy(model: nn.Module):
    """An auto-wrap policy for FSDP1 (``FullyShardedDataParallel(auto_wrap_policy=...)``, accelerate's FSDP plugin)
    over a PEFT model: one FSDP unit per transformer block, plus one per trainable leaf module (the adapter
    matrices), so that trainable and frozen parameters never share a flat parameter. That is what lets a QLoRA
    base stored in bf16 (``bnb_4bit_quant_storage``) be sharded next to float32 adapters.

    Blocks are the classes named by the ``_no_split_modules`` of the transformers models inside ``model``, or by
    the comma-separated class names in the environment variable ``FSDP_TRANSFORMER_CLS_TO_WRAP`` (as in PEFT).
    """
    import os

    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    if names is not None:
        wanted = {n.strip() for n in names.split(",") if n.strip()}
    else:
        wanted = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    blocks = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    missing = wanted - {c.__name__ for c in blocks}
    if names is not None and missing:
        raise TypeError(f"FSDP_TRANSFORMER_CLS_TO_WRAP names {sorted(missing)}, which no module of the model is; "
                        f"module classes present: {sorted({type(m).__name__ for m in model.modules()})}")
    blocks = tuple(blocks)

    def policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if recurse:
            return True  # look inside every module
        weight = getattr(module, "weight", None)
        trainable_leaf = next(module.children(), None) is None and isinstance(weight, torch.Tensor) and \
            weight.requires_grad
        return isinstance(module, blocks) or trainable_leaf

    return policy


def _has_quantized_layers(model: nn.Module) -> bool:
    import sys

    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return True
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return False
    kinds = tuple(c for c in (getattr(bnb.nn, "Linear4bit", None), getattr(bnb.nn, "Linear8bitLt", None)) if c)
    return any(isinstance(m, kinds) for m in model.modules())


def output_requires_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    """A forward hook: the module's output requires a gradient (a plain function, so the model still pickles)."""
    output.requires_grad_(True)


def require_input_grads(model: nn.Module) -> None:
    """PEFT's preparation for gradient checkpointing: unless ``model`` is quantised, the output of its input
    embeddings requires a gradient (transformers' ``enable_input_require_grads``, or a forward hook on
    ``get_input_embeddings()``), so a checkpointed block whose inputs are frozen still back-propagates into the
    adapters; nothing when the model has neither."""
    if any(getattr(model, flag, False) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")):
        return
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif hasattr(model, "get_input_embeddings"):
        model.get_input_embeddings().register_forward_hook(output_requires_grad)


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict] = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """Get a 4/8-bit model ready for adapter training, as PEFT does.

    Freezes every parameter, upcasts the non-quantised fp16/bf16 parameters (norms, embeddings, head) to fp32
    for stable training, and for a quantised model turns on gradient checkpointing, making the embedding outputs
    require grad so checkpointed blocks still receive gradients with the reentrant implementation.
    The model is detected as quantised from ``is_loaded_in_4bit/8bit`` or, when those flags are missing, from its
    bitsandbytes layer types. ``auto_clear_cache`` empties the CUDA cache after the upcast, as PEFT does.

    Unlike PEFT, it also switches off bitsandbytes' CPU inference repack on every ``Linear4bit``: an eval-mode
    forward without grad would rewrite the 4-bit storage with bf16-rounded scales into a layout whose product
    gives no gradient to its input, so later training steps would silently lose the gradient path through
    every layer without an adapter.
    """
    import inspect

    kwargs = dict(gradient_checkpointing_kwargs or {})
    quantized = _has_quantized_layers(model)
    for p in model.parameters():
        p.requires_grad = False
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and p.__class__.__name__ != "Params4bit":
            p.data = p.data.to(torch.float32)
    if auto_clear_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if quantized:
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes Linear4bit
                module.support_avx512bf16_for_cpu = False
    if quantized and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(output_requires_grad)
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable(); pass "
                             "use_gradient_checkpointing=False or use a transformers model")
        takes_kwargs = "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters
        enable(gradient_checkpointing_kwargs=kwargs) if takes_kwargs else enable()
    return model


@torch.no_grad()
def copy_rank_blocks(dest: torch.Tensor, src: torch.Tensor, groups: int) -> None:
    """``dest`` (rank R along dim 0) := zeros, with ``src`` (rank r <= R) in it: with ``groups`` > 1 the rank is
    ``groups`` blocks (one per group of a grouped convolution), and block i of ``src`` goes to the start of block i
    of ``dest``. Both ranks must be divisible by ``groups``."""
    dest.zero_()
    big, small = dest.shape[0] // groups, src.shape[0] // groups
    for g in range(groups):
        dest[g * big:g * big + small].copy_(src[g * small:(g + 1) * small])
