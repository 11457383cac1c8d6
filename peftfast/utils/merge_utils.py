"""Merging several task tensors into one: the functions behind ``add_weighted_adapter`` (PEFT's
``peft.utils.merge_utils``, same names and signatures).

Task tensors ``t_i`` (same shape) with weights ``w_i``:

    task_arithmetic   sum_i w_i t_i
    magnitude_prune   sum_i w_i top_k(|t_i|)(t_i)                   (k = density * numel, per tensor)
    dare_linear       sum_i w_i bernoulli(density)(t_i) / density   (random drop, rescaled)
    ties              disjoint_merge of magnitude-pruned w_i t_i    (majority sign per entry)
    dare_ties         disjoint_merge of DARE-pruned w_i t_i

``disjoint_merge``: per entry, the mean of the weighted tensors whose sign agrees with the majority sign
(``calculate_majority_sign_mask``: the sign of the sum, 'total', or of the count of signs, 'frequency';
ties go to +). Random pruning draws ``torch.bernoulli`` over a tensor filled with ``density``, one draw per
tensor in order, so a fixed torch seed gives the masks PEFT draws.
"""
from __future__ import annotations

import warnings
from typing import Literal

import torch

__all__ = ["reshape_weight_task_tensors", "magnitude_based_pruning", "random_pruning", "prune",
           "calculate_majority_sign_mask", "disjoint_merge", "task_arithmetic", "magnitude_prune", "ties",
           "dare_linear", "dare_ties"]

MAJORITY_SIGN_METHODS = ("total", "frequency")


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` [n] viewed as [n, 1, ..., 1] to broadcast over stacked ``task_tensors`` [n, *shape]."""
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density * numel)`` largest-magnitude entries set to 0."""
    keep = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[flat.abs().topk(keep).indices] = 1
    return tensor * mask.view(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """``tensor`` with each entry kept with probability ``density`` (one Bernoulli draw per entry), divided by
    ``density`` when ``rescale`` (so the expectation is unchanged)."""
    kept = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return kept / density if rescale else kept


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"],
          rescale: bool = False) -> torch.Tensor:
    """Prune ``tensor`` to a fraction ``density`` of its entries by ``method`` ('magnitude' or 'random');
    ``density >= 1`` keeps everything (with a warning)."""
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return tensor
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise ValueError(f"Unknown method {method}; use 'magnitude' or 'random'")


def calculate_majority_sign_mask(tensor: torch.Tensor,
                                 method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """Boolean mask [n, *shape] of the entries of stacked ``tensor`` whose sign is the majority sign over dim 0
    ('total': the sign of the sum; 'frequency': the sign of the count of signs; 0 counts as +)."""
    sign = tensor.sign()
    if method == "total":
        votes = tensor.sum(dim=0)
    elif method == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise RuntimeError(f'Unimplemented mask method "{method}"; use one of {MAJORITY_SIGN_METHODS}')
    return sign == torch.where(votes >= 0, 1, -1)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean over dim 0 of the entries selected by ``majority_sign_mask`` (0 where none is)."""
    total = (task_tensors * majority_sign_mask).sum(dim=0)
    return total / majority_sign_mask.sum(dim=0).clamp(min=1.0)


def _weighted(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(task_tensors, dim=0)
    return stacked * reshape_weight_task_tensors(stacked, weights)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_i weights[i] * task_tensors[i]``."""
    return _weighted(task_tensors, weights).sum(dim=0)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Task arithmetic over the magnitude-pruned tensors."""
    return task_arithmetic([prune(t, density, method="magnitude") for t in task_tensors], weights)


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES: magnitude-prune each tensor, elect a sign per entry, average the weighted entries of that sign."""
    pruned = torch.stack([prune(t, density, method="magnitude") for t in task_tensors], dim=0)
    mask = calculate_majority_sign_mask(pruned, method=majority_sign_method)
    return disjoint_merge(pruned * reshape_weight_task_tensors(pruned, weights), mask)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: task arithmetic over randomly pruned, rescaled tensors."""
    return task_arithmetic([prune(t, density, method="random", rescale=True) for t in task_tensors], weights)


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """DARE pruning followed by TIES' sign election and disjoint merge."""
    pruned = torch.stack([prune(t, density, method="random", rescale=True) for t in task_tensors], dim=0)
    mask = calculate_majority_sign_mask(pruned, method=majority_sign_method)
    return disjoint_merge(pruned * reshape_weight_task_tensors(pruned, weights), mask)
