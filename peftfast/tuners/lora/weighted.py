"""``LoraModel.add_weighted_adapter``: a new LoRA adapter combined from existing ones (PEFT's method).

For adapters i with weights w_i, scalings s_i and factors (A_i [r_i, in], B_i [out, r_i]) on a layer:

    cat                  A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1 | B_2 | ...]        (rank sum r_i, exact)
    linear, ties, dare_linear, dare_ties, magnitude_prune
                         A = merge_i(sign(w_i s_i) sqrt|w_i s_i| A_i), B = merge_i(sqrt|w_i s_i| B_i)
                         (A and B merged separately with the merge_utils function; same rank required)
    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
                         D = merge_i(w_i * s_i B_i A_i) (full [out, in] deltas), truncated SVD of D at
                         ``svd_rank`` (default: the largest rank): B = U_r S_r, A = Vh_r, optionally clamped
                         to the ``svd_clamp`` quantile of their entries

The new adapter's config is the first adapter's with r = lora_alpha = the new rank and the union of target
modules; it is added inactive and frozen. Everything is checked before the model changes, and a failure
while the weights are computed takes the new adapter out again (the model is left as it was).
"""
from __future__ import annotations

import math
import operator
from dataclasses import replace
from functools import reduce
from typing import Any, Optional

import torch

from ...utils import merge_utils
from ...utils.other import ModulesToSaveWrapper
from ...utils.save_and_load import snapshot_state
from ...utils.undo import UndoLog
from ..additive import low_rank_delta
from .bdlora import dense_factor
from .layer import ConvNd, LoraLayer

SAME_RANK_TYPES = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = SAME_RANK_TYPES + ("cat",) + SVD_TYPES
DENSITY_TYPES = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                 "magnitude_prune", "magnitude_prune_svd")
SIGN_TYPES = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")


def _merge(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: Optional[float],
           sign_method: str) -> torch.Tensor:
    """The merge_utils function of combination ``kind`` ('svd' variants name their merge before '_svd')."""
    base = kind[:-4] if kind.endswith("_svd") else kind
    if base in ("linear", "svd"):
        return merge_utils.task_arithmetic(tensors, weights)
    if base == "ties":
        return merge_utils.ties(tensors, weights, density, sign_method)
    if base == "dare_linear":
        return merge_utils.dare_linear(tensors, weights, density)
    if base == "dare_ties":
        return merge_utils.dare_ties(tensors, weights, density, sign_method)
    if base == "magnitude_prune":
        return merge_utils.magnitude_prune(tensors, weights, density)
    raise ValueError(f"Invalid combination_type: {kind}")


def check_weighted_adapter(model: Any, adapters: list[str], weights: list[float], combination_type: str,
                           svd_rank: Optional[int], density: Optional[float],
                           majority_sign_method: str) -> tuple[str, int, Any]:
    """(combination type, new rank, new target_modules), or the error PEFT gives (ValueError / TypeError)."""
    if isinstance(adapters, str) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    for adapter in adapters:
        if adapter not in model.peft_config:
            raise ValueError(f"Adapter {adapter} does not exist; available adapters: "
                             f"{', '.join(model.peft_config)}")
    kasa = [a for a in adapters if getattr(model.peft_config[a], "kasa_config", None) is not None]
    if kasa:
        raise ValueError(f"add_weighted_adapter does not support KaSA adapters ({', '.join(kasa)}): their update "
                         "B diag(lora_diag) A is made against a truncated base weight, which a new adapter would "
                         "truncate again; combine adapters without kasa_config")
    if len(weights) != len(adapters):
        raise ValueError(f"weights must have one entry per adapter: got {len(weights)} weights for "
                         f"{len(adapters)} adapters")
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    clashing = [w for w in wrappers if sum(a in w.modules_to_save for a in adapters) > 1]
    if clashing:
        raise ValueError("Cannot add weighted adapters if they target the same module with modules_to_save, but "
                         f"found {len(clashing)} such instance(s).")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Invalid combination_type: {combination_type}; supported: {', '.join(COMBINATION_TYPES)}")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    ranks = [c.r if not c.rank_pattern else max(c.r, *c.rank_pattern.values())
             for c in (model.peft_config[a] for a in adapters)]
    if combination_type in SAME_RANK_TYPES:
        if len(set(ranks)) != 1:
            raise ValueError("All adapters must have the same r value when using combination_type linear, ties, "
                             f"dare_ties or dare_linear (ranks: {dict(zip(adapters, ranks))}); use 'cat' or an "
                             "svd combination for different ranks")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0):
            raise ValueError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")
        new_rank = svd_rank or max(ranks)
    if combination_type in DENSITY_TYPES:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density:
            raise ValueError(f"combination_type {combination_type!r} needs density, a number in [0, 1] (the "
                             f"fraction of entries kept), got {density!r}")
    if combination_type in SIGN_TYPES and majority_sign_method not in merge_utils.MAJORITY_SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {merge_utils.MAJORITY_SIGN_METHODS}, got "
                         f"{majority_sign_method!r}")
    types = {type(model.peft_config[a].target_modules) for a in adapters}
    if len(types) > 1:
        raise ValueError("all adapter configs should follow the same target modules type. Combining adapters with "
                         "`target_modules` type being a mix of list/set and string is not supported.")
    (kind,) = types
    if kind is str:
        targets: Any = "|".join(f"({model.peft_config[a].target_modules})" for a in adapters)
    elif kind is set:
        targets = reduce(operator.or_, (model.peft_config[a].target_modules for a in adapters))
    else:
        raise TypeError(f"Invalid type {kind} found in target_modules")
    return combination_type, new_rank, targets


def _factors(layer: LoraLayer, adapter: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) parameters of ``adapter`` on ``layer`` (embedding layers: lora_embedding_A/B), or None."""
    if adapter in layer.lora_A:
        return dense_factor(layer.lora_A[adapter]), dense_factor(layer.lora_B[adapter])  # BD-LoRA: block_diag
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return None


def _fill_cat(layer, adapters, weights, a_new, b_new) -> None:
    parts = [(f, w, layer.scaling[n]) for n, w in zip(adapters, weights) if (f := _factors(layer, n)) is not None]
    if not parts:
        raise ValueError("No matching LoRAs found for this layer")
    a_cat = torch.cat([f[0].data * w * s for f, w, s in parts], dim=0)
    b_cat = torch.cat([f[1].data for f, _, _ in parts], dim=1)
    a_new.data[: a_cat.shape[0]] = a_cat
    b_new.data[:, : b_cat.shape[1]] = b_cat


def _fill_factorwise(layer, kind, adapters, weights, a_new, b_new, density, sign_method) -> None:
    w_a, w_b, As, Bs = [], [], [], []
    for name, w in zip(adapters, weights):
        f = _factors(layer, name)
        if f is None:
            continue
        ws = w * layer.scaling[name]
        # the sign goes on A only; sqrt splits |w s| between both factors
        w_a.append(math.copysign(math.sqrt(abs(ws)), 1.0 if ws >= 0 else -1.0))
        w_b.append(math.sqrt(abs(ws)))
        As.append(f[0].data)
        Bs.append(f[1].data)
    dtype = As[0].dtype
    a = _merge(kind, As, torch.tensor(w_a).to(As[0].device), density, sign_method)
    b = _merge(kind, Bs, torch.tensor(w_b).to(Bs[0].device), density, sign_method)
    a_new.data, b_new.data = a.to(dtype), b.to(dtype)


def _fill_svd(layer, kind, adapters, weights, new_rank, a_new, b_new, density, sign_method, clamp,
              full_matrices, driver) -> None:
    if isinstance(layer, ConvNd) and layer.get_base_layer().groups > 1:
        raise ValueError(f"add_weighted_adapter with {kind!r} does not support a convolution with groups > 1")
    # The deltas are merged in the base weight's layout (Conv1D and embedding weights are [in, out]), as PEFT
    # merges them: random pruning draws its mask in that order. The SVD takes [out, in * prod(kernel)].
    transposed = bool(getattr(layer, "fan_in_fan_out", False)) or any(n in layer.lora_embedding_A for n in adapters)
    deltas, valid = [], []
    for name, w in zip(adapters, weights):
        f = _factors(layer, name)
        if f is None:
            continue
        a, b = f
        d = low_rank_delta(b.data.flatten(1), a.data.flatten(1), layer.scaling[name], b.dtype)
        deltas.append(d.T if transposed else d)
        valid.append(w)
    if not deltas:
        raise ValueError("No matching LoRAs found for this layer")
    delta = _merge(kind, deltas, torch.tensor(valid).to(deltas[0].device), density, sign_method)
    delta = delta.T if transposed else delta
    if new_rank > min(delta.shape):
        raise ValueError(f"svd_rank={new_rank} is larger than a {type(layer.get_base_layer()).__name__} layer allows: "
                         f"its combined delta [{delta.shape[0]}, {delta.shape[1]}] has rank at most {min(delta.shape)}; "
                         f"use svd_rank <= {min(delta.shape)} (or a combination without svd)")
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])
    vh = vh[:new_rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    if isinstance(layer, ConvNd):
        u, vh = u.reshape(b_new.shape), vh.reshape(a_new.shape)
    a_new.data, b_new.data = vh, u


def add_weighted_adapter(model: Any, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None,
                         svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                         svd_driver: Optional[str] = None, density: Optional[float] = None,
                         majority_sign_method: str = "total") -> None:
    """See the module docstring; ``model`` is a ``LoraModel``. An existing ``adapter_name`` is left alone."""
    if adapter_name in model.peft_config:
        return
    kind, new_rank, targets = check_weighted_adapter(model, list(adapters), list(weights), combination_type,
                                                     svd_rank, density, majority_sign_method)
    with UndoLog() as undo:
        undo.call(snapshot_state([model], objects=tuple(model.peft_config.values())))
        model.peft_config[adapter_name] = replace(model.peft_config[adapters[0]], r=new_rank, lora_alpha=new_rank,
                                                  target_modules=targets, alpha_pattern={}, rank_pattern={})
        # made in the base's dtype, as PEFT's add_weighted_adapter makes it (no cast to float32): 'cat' fills it in
        # place (16-bit on a 16-bit model), the other combinations replace its tensors (the sources' dtype)
        model.inject_adapter(model.model, adapter_name, autocast_adapter_dtype=False)
        for name, p in model.model.named_parameters():
            if f".{adapter_name}." in f".{name}.":
                p.requires_grad_(False)
        for key, layer in model.model.named_modules():
            if model.prefix in key or not isinstance(layer, LoraLayer):
                continue
            new = _factors(layer, adapter_name)
            if new is None:
                continue
            a_new, b_new = new
            a_new.data = a_new.data * 0.0
            b_new.data = b_new.data * 0.0
            if kind == "cat":
                _fill_cat(layer, adapters, weights, a_new, b_new)
            elif kind in SVD_TYPES:
                _fill_svd(layer, kind, adapters, weights, new_rank, a_new, b_new, density, majority_sign_method,
                          svd_clamp, svd_full_matrices, svd_driver)
            else:
                _fill_factorwise(layer, kind, adapters, weights, a_new, b_new, density, majority_sign_method)


__all__ = ["COMBINATION_TYPES", "add_weighted_adapter", "check_weighted_adapter"]
