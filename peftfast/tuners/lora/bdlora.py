"""BD-LoRA: LoRA with a block-diagonal A or B factor (PEFT's ``use_bdlora=BdLoraConfig(...)``).

A serving engine that shards a layer over ``nblocks`` devices can apply a block-diagonal factor shard by shard
without gathering activations: row-sharded layers take a block-diagonal A, column-sharded ones a block-diagonal B.

``BlockDiagonalLinear`` stores only the diagonal blocks, as PEFT does (so the state-dict keys and shapes are
PEFT's): ``weight`` is [out, in / nblocks], block i being rows ``i*out/nb .. (i+1)*out/nb`` acting on input
features ``i*in/nb .. (i+1)*in/nb``. The LoRA op takes dense factors, so a block-diagonal factor reaches it as
``torch.block_diag`` of its blocks ([out, in], zeros off the diagonal): one small tensor per forward (r x in or
out x r), differentiable, so the gradient lands on the stored blocks only; the fused kernels then run unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class BlockDiagonalLinear(nn.Module):
    """``y = block_diag(W_1, ..., W_nb) x`` with ``weight`` = [W_1; ...; W_nb]: [out, in / nblocks], no bias."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, init_zero: bool = False,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> None:
        super().__init__()
        if nblocks < 1 or in_features % nblocks or out_features % nblocks:
            raise ValueError(f"BD-LoRA needs in_features={in_features} and out_features={out_features} divisible by "
                             f"nblocks={nblocks}; choose nblocks dividing both (the rank r is one of them)")
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks, dtype=dtype, device=device))
        if init_zero:
            nn.init.zeros_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight)  # PEFT's init (a=0), unlike nn.Linear's a=sqrt(5)

    def dense_weight(self) -> torch.Tensor:
        """The [out, in] block-diagonal matrix (zeros off the blocks)."""
        return torch.block_diag(*torch.chunk(self.weight, self.nblocks, dim=0))

    def weight_as_blockdiagonal_matrix(self) -> torch.Tensor:  # PEFT's name
        return self.dense_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., nb, in/nb] @ per-block [in/nb, out/nb] -> [..., out]
        nb = self.nblocks
        xb = x.reshape(*x.shape[:-1], nb, self.in_features // nb)
        w = self.weight.view(nb, self.out_features // nb, self.in_features // nb)
        return torch.einsum("...im,inm->...in", xb, w).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}"


def dense_factor(module: nn.Module) -> torch.Tensor:
    """The factor ``module`` (lora_A / lora_B entry) applies, as a dense [out, in] tensor."""
    if isinstance(module, BlockDiagonalLinear):
        return module.dense_weight()
    return module.weight


def bd_side(bd_config: object, target_name: str) -> Optional[str]:
    """'A', 'B' or None: which factor of the layer ``target_name`` (its full module name) is block-diagonal under
    PEFT's rule (a pattern of ``target_modules_bd_a`` / ``_bd_b`` contained in the name)."""
    in_a = any(p in target_name for p in (bd_config.target_modules_bd_a or []))
    in_b = any(p in target_name for p in (bd_config.target_modules_bd_b or []))
    if in_a and in_b:
        raise ValueError(f"Target {target_name} matches both A and B block-diagonal patterns of BdLoraConfig; a layer "
                         "can have a block-diagonal A or a block-diagonal B, not both")
    if bd_config.match_strict and not (in_a or in_b):
        raise ValueError(f"Target {target_name} matches neither A nor B block-diagonal patterns. If this is "
                         "intentional, set match_strict=False in BdLoraConfig during initialization.")
    return "A" if in_a else "B" if in_b else None
