"""AdaLoRA's RankAllocator: sensitivity EMAs, the budget schedule, and the masking of E.

Per trainable adapter, over every AdaLoRA layer ``l`` holding it (A_l: [r_l, in], E_l: [r_l, 1], B_l: [out, r_l]):

    ipt(p)       = |p * grad p|                                    per element, for p in A, E, B
    Ibar         = beta1 * Ibar + (1 - beta1) * ipt                 sensitivity, smoothed
    Ubar         = beta2 * Ubar + (1 - beta2) * |ipt - Ibar|        its uncertainty
    score(p)     = Ibar * Ubar
    S_l[i]       = score(E)[i] + mean_k score(A)[i, k] + mean_o score(B)[o, i]      one score per rank triplet

    budget(t)    = b0                                   t <= tinit                  (b0 = sum_l r_l)
                 = int((b0 - bT) * (1 - (t - tinit) / (T - tfinal - tinit))^3 + bT)  otherwise, masking when
                                                                                    t % deltaT == 0
                 = bT                                   t > T - tfinal              (bT = target_r * #layers)

Masking keeps the ``budget`` best triplets: the threshold is the (b0 - budget)-th smallest score over all
layers, and every E entry whose score is <= it is set to zero. The kept ranks become ``rank_pattern``
(key ``<module>.lora_E.<adapter>`` -> one bool per rank), PEFT's format. Parameter keys are the base model's
parameter names (as PEFT's ``named_parameters`` loop produces them), found here from the layers themselves.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .layer import AdaLoraLayer


def adalora_triplets(model: nn.Module, adapter_name: str) -> list[tuple[str, AdaLoraLayer]]:
    """(module name, layer) of every AdaLoRA layer of ``model`` holding ``adapter_name``, in module order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, AdaLoraLayer) and adapter_name in m.lora_A]


class RankAllocator:
    """The budget allocator of AdaLoRA (PEFT's ``RankAllocator``, same attributes and methods)."""

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str) -> None:
        self.peft_config = peft_config
        self.adapter_name = adapter_name
        self.beta1 = peft_config.beta1
        self.beta2 = peft_config.beta2
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in (0, 1), got {self.beta1!r} and {self.beta2!r}")
        self.reset_ipt()
        self._set_budget_scheduler(model)

    def set_total_step(self, total_step: int) -> None:
        self.peft_config.total_step = total_step

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def _set_budget_scheduler(self, model: nn.Module) -> None:
        layers = adalora_triplets(model, self.adapter_name)
        self.init_bgt = sum(layer.lora_A[self.adapter_name].shape[0] for _, layer in layers)
        self.name_set = sorted(f"{name}.%s.{self.adapter_name}" for name, _ in layers)
        self.target_bgt = self.peft_config.target_r * len(self.name_set)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        tinit, tfinal, total_step = self.peft_config.tinit, self.peft_config.tfinal, self.peft_config.total_step
        if step <= tinit:
            return self.init_bgt, False
        if step > total_step - tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff ** 3) + self.target_bgt)
        return budget, step % self.peft_config.deltaT == 0

    def _parameters(self, model: nn.Module):
        """(key, parameter) for A, B, E of every layer, keyed as PEFT's named_parameters loop keys them."""
        for name, layer in adalora_triplets(model, self.adapter_name):
            for attr in ("lora_A", "lora_B", "lora_E"):
                yield f"{name}.{attr}.{self.adapter_name}", attr, getattr(layer, attr)[self.adapter_name]

    @torch.no_grad()
    def update_ipt(self, model: nn.Module) -> None:
        for key, _, p in self._parameters(model):
            grad = p.grad
            if grad is None and p.numel() == 0:  # a layer pruned to rank 0 (a loaded rank_pattern): nothing to score
                grad = torch.zeros_like(p)
            if grad is None:
                raise ValueError(f"update_and_allocate needs the gradients of the adapter weights, but {key} has "
                                 "none: call it after loss.backward() and before optimizer.zero_grad()")
            if key not in self.ipt:
                self.ipt[key] = torch.zeros_like(p)
                self.exp_avg_ipt[key] = torch.zeros_like(p)
                self.exp_avg_unc[key] = torch.zeros_like(p)
            self.ipt[key] = (p * grad).abs().detach()
            self.exp_avg_ipt[key] = self.beta1 * self.exp_avg_ipt[key] + (1 - self.beta1) * self.ipt[key]
            self.exp_avg_unc[key] = self.beta2 * self.exp_avg_unc[key] \
                + (1 - self.beta2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs()

    def _element_score(self, key: str) -> torch.Tensor:
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    @staticmethod
    def _combine_ipt(ipt_e: torch.Tensor, ipt_ab: torch.Tensor) -> torch.Tensor:
        return ipt_e.view(-1) + ipt_ab.sum(dim=1, keepdim=False).view(-1)

    def triplet_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``<module>.lora_E.<adapter>`` -> the score of each rank triplet ([r, 1])."""
        scores: dict[str, torch.Tensor] = {}
        for name, _ in adalora_triplets(model, self.adapter_name):
            key = f"{name}.%s.{self.adapter_name}"
            if key % "lora_A" not in self.exp_avg_ipt:
                raise ValueError(f"no sensitivity recorded for {key % 'lora_A'}: update_and_allocate must see the "
                                 "gradients of every AdaLoRA layer before a budget is allocated")
            ipt_a = self._element_score(key % "lora_A").mean(dim=1, keepdim=True)
            ipt_b = self._element_score(key % "lora_B").mean(dim=0, keepdim=False).view(-1, 1)
            ipt_e = self._element_score(key % "lora_E")
            scores[key % "lora_E"] = self._combine_ipt(ipt_e, torch.cat([ipt_a, ipt_b], dim=1)).view(-1, 1)
        return scores

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        scores = self.triplet_scores(model)
        k = self.init_bgt - budget
        if k <= 0:  # the whole budget is kept
            return {key: [True] * s.shape[0] for key, s in scores.items()}
        flat = torch.cat([s.view(-1) for s in scores.values()])
        if k > flat.numel():  # PEFT: kthvalue's "selected number k out of range"
            raise ValueError(f"update_and_allocate cannot reach a budget of {budget} rank triplets from this adapter's "
                             f"{flat.numel()}: its budget schedule starts from {self.init_bgt} (init_r per layer), "
                             "but the adapter holds fewer ranks (it was loaded with a pruned rank_pattern). Resuming "
                             "AdaLoRA's rank allocation from a pruned checkpoint is not supported (nor in PEFT); "
                             "continue training it without update_and_allocate, or start from a fresh adapter")
        threshold = torch.kthvalue(flat, k=k)[0].item()
        rank_pattern: dict[str, list[bool]] = {}
        for key, layer_e in ((f"{name}.lora_E.{self.adapter_name}", layer.lora_E[self.adapter_name])
                             for name, layer in adalora_triplets(model, self.adapter_name)):
            pruned = scores[key] <= threshold
            layer_e.masked_fill_(pruned, 0.0)
            rank_pattern[key] = (~pruned).view(-1).tolist()
        return rank_pattern

    def update_and_allocate(self, model: nn.Module, global_step: int,
                            force_mask: bool = False) -> tuple[int, Optional[dict[str, list[bool]]]]:
        if global_step < self.peft_config.total_step - self.peft_config.tfinal:
            self.update_ipt(model)
        budget, mask_ind = self.budget_schedule(global_step)
        rank_pattern = self.mask_to_budget(model, budget) if mask_ind or force_mask else None
        return budget, rank_pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict[str, list[bool]]) -> None:
        """Zero the E entries of the ranks ``rank_pattern`` pruned (keys with or without the adapter name)."""
        for name, layer in adalora_triplets(model, self.adapter_name):
            full = f"{name}.lora_E.{self.adapter_name}"
            mask = rank_pattern.get(full, rank_pattern.get(f"{name}.lora_E"))
            if mask is None:
                raise KeyError(f"rank_pattern has no entry for {full}")
            e = layer.lora_E[self.adapter_name]
            keep = torch.tensor(mask, dtype=torch.bool, device=e.device).unsqueeze(-1)
            e.masked_fill_(~keep, 0.0)
