"""The trainable-tokens layer: a few rows of an embedding (or of an LM head tied to it) trained, the rest frozen.

Each adapter keeps the trained rows (``trainable_tokens_delta[name]``, one row per entry of ``token_indices``)
and a copy of the rows it replaces (``trainable_tokens_original[name]``, not saved) so that unmerging restores
them. The trained rows *replace* the base rows, they are not added to them.

An embedding's forward never copies the full matrix: it looks up the base rows and swaps in the trained rows where
the input hits one of the indices (embeddings with ``max_norm``, ``scale_grad_by_freq`` or ``sparse`` use a full
copy, as PEFT does). A linear head runs one GEMM on a copy of its weight with the rows swapped in.

A layer can be *tied* to another one (an LM head whose weight is the input embedding's): it then has no rows of
its own and reads those of the layer it is tied to, so training one trains both.

``LoraConfig(trainable_token_indices=...)`` uses this layer inside ``peftfast.utils.other.TrainableTokensWrapper``
(state-dict keys ``<module>.token_adapter.trainable_tokens_delta``), next to the LoRA layers of the same adapter.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...utils.other import embed_scale, mixed_parts
from ...utils.routing import call_adapter_names
from ..buffer_dict import BufferDict
from ..tuners_utils import BaseTunerLayer, bnb_linear_classes, creation_device
from .config import TrainableTokensConfig


def supports_trainable_tokens(module: nn.Module) -> bool:
    """An nn.Embedding, or a plain (not quantised) nn.Linear such as an LM head."""
    if isinstance(module, nn.Embedding):
        return True
    return isinstance(module, nn.Linear) and not isinstance(module, bnb_linear_classes())


class TrainableTokensLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")
    # Merging writes rows (it replaces, never adds), so merging into a weight shared with a tied module is exact.
    merge_replaces_rows = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Optional[TrainableTokensConfig] = None,
                 tied_adapter: Optional["TrainableTokensLayer"] = None, **kwargs: Any) -> None:
        super().__init__()
        if not supports_trainable_tokens(base_layer):
            raise TypeError(f"trainable tokens can only be applied to nn.Embedding or (tied LM head) nn.Linear "
                            f"layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        # In a list, so that the layer tied to is not a submodule (its rows are saved once, under its own name).
        self._tied_adapter = [tied_adapter] if tied_adapter is not None else []
        if tied_adapter is None:
            self.trainable_tokens_delta = nn.ParameterDict({})
            self.trainable_tokens_original = BufferDict({}, persistent=False)
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.trainable_tokens_delta = tied_adapter.trainable_tokens_delta
            self.trainable_tokens_original = tied_adapter.trainable_tokens_original
            self.token_indices = tied_adapter.token_indices
        base = self.get_base_layer()
        if isinstance(base, nn.Embedding):
            self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def tied_adapter(self) -> Optional["TrainableTokensLayer"]:
        return self._tied_adapter[0] if self._tied_adapter else None

    def _num_rows(self) -> int:
        base = self.get_base_layer()
        return base.num_embeddings if isinstance(base, nn.Embedding) else base.out_features

    def _row_dim(self) -> int:
        base = self.get_base_layer()
        return base.embedding_dim if isinstance(base, nn.Embedding) else base.in_features

    def update_layer(self, adapter_name: str, config: Optional[TrainableTokensConfig] = None,
                     tied_adapter: Optional["TrainableTokensLayer"] = None, **kwargs: Any) -> None:
        """Add ``adapter_name``'s rows (``config.token_indices``, or ``token_indices=`` in kwargs). A tied layer
        follows the layer it is tied to and adds nothing."""
        if tied_adapter is not None or self.tied_adapter is not None:
            return
        indices = list(config.token_indices) if config is not None else list(kwargs["token_indices"])
        init_weights = config.init_weights if config is not None else kwargs.get("init_weights", True)
        rows = self._num_rows()
        bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < rows]
        if bad:
            raise ValueError(f"token indices {bad} are out of range for {type(self.get_base_layer()).__name__} with "
                             f"{rows} rows (allowed: 0 to {rows - 1})")
        if len(set(indices)) != len(indices):
            raise ValueError(f"token indices {indices} list a token more than once; give each token once")
        weight = self.get_base_layer().weight
        index = torch.tensor(indices, dtype=torch.long, device=weight.device)
        originals = weight.detach().index_select(0, index).clone()
        if init_weights:
            values = originals.clone()
        else:
            values = torch.randn(originals.shape, dtype=weight.dtype, device=weight.device)
        device = creation_device(weight.device)
        if device.type == "meta":
            values = values.to("meta")
        self.token_indices[adapter_name] = indices
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values, requires_grad=True)
        self.trainable_tokens_original[adapter_name] = originals

    # -- which rows ----------------------------------------------------------------------------------
    def _check_overlapping_tokens(self, adapter_names: list[str]) -> None:
        """Two adapters replacing the same row at once have no defined result: refuse (PEFT's rule and message)."""
        seen: set[int] = set()
        for name in dict.fromkeys(self.merged_adapters + list(adapter_names)):
            indices = set(self.token_indices.get(name, ()))
            if seen & indices:
                raise ValueError(f"Token indices of adapter {name} are already defined and would result in undefined "
                                 "merging behavior. Only disjunct token indices are currently supported.")
            seen |= indices

    def _rows(self, adapter_names: Iterable[str], like: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(indices, trained rows) of the given adapters that have rows here, concatenated."""
        names = [n for n in adapter_names if n in self.trainable_tokens_delta]
        if not names:
            return torch.empty(0, dtype=torch.long, device=like.device), None
        index = torch.tensor([i for n in names for i in self.token_indices[n]], dtype=torch.long, device=like.device)
        rows = torch.cat([self.trainable_tokens_delta[n].to(dtype=like.dtype, device=like.device) for n in names])
        return index, rows

    def get_merged_weights(self, active_adapters: Iterable[str]) -> torch.Tensor:
        """The base weight with the adapters' rows swapped in (a new tensor; the base weight is untouched)."""
        weight = self.get_base_layer().weight
        index, rows = self._rows(active_adapters, weight)
        return weight if rows is None else weight.index_copy(0, index, rows)

    # -- merging -------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = [n for n in self._adapters_to_merge(adapter_names) if n in self.trainable_tokens_delta]
        if not names:
            return
        self._check_overlapping_tokens(names)
        weight = self.get_base_layer().weight
        if safe_merge:
            for name in names:
                if not torch.isfinite(self.trainable_tokens_delta[name]).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        with torch.no_grad():
            for name in names:
                index = torch.tensor(self.token_indices[name], dtype=torch.long, device=weight.device)
                weight.data.index_copy_(0, index, self.trainable_tokens_delta[name].detach().to(weight.dtype))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning)
            return
        weight = self.get_base_layer().weight
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                index = torch.tensor(self.token_indices[name], dtype=torch.long, device=weight.device)
                weight.data.index_copy_(0, index, self.trainable_tokens_original[name].to(weight))

    # -- forward -------------------------------------------------------------------------------------
    def _embedding_needs_full_weight(self, base: nn.Embedding) -> bool:
        return base.max_norm is not None or base.scale_grad_by_freq or base.sparse

    def _forward_rows(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        index, rows = self._rows(adapter_names, base.weight)
        if rows is None:
            return self.base_layer(x, *args, **kwargs)
        if isinstance(base, nn.Embedding):
            if self._embedding_needs_full_weight(base):
                out = F.embedding(x, base.weight.index_copy(0, index, rows), padding_idx=base.padding_idx,
                                  max_norm=base.max_norm, norm_type=base.norm_type,
                                  scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
                return self._scaled(out, base)
            out = self.base_layer(x, *args, **kwargs)
            # position of each input id among the trained rows (-1: a frozen row)
            where = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=x.device)
            where[index.to(x.device)] = torch.arange(index.numel(), device=x.device)
            pos = where[x]
            hit = pos >= 0
            trained = self._scaled(F.embedding(pos.clamp(min=0), rows), base)
            if base.padding_idx is not None:  # the padding row receives no gradient, as in F.embedding
                trained = torch.where((x == base.padding_idx).unsqueeze(-1), trained.detach(), trained)
            return torch.where(hit.unsqueeze(-1), trained.to(out.dtype), out)
        # a linear head (tied to the embedding): one GEMM with the rows swapped into the weight, so that untrained
        # rows give exactly the base output
        return F.linear(x, base.weight.index_copy(0, index, rows), base.bias)

    @staticmethod
    def _scaled(out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """Embeddings that scale their output in forward (Gemma's ``embed_scale``): the swapped-in rows too."""
        scale = embed_scale(base)
        return out if scale is None else out * scale.to(out.dtype)

    def forward_adapters(self, x: torch.Tensor, active_adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or not active_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        self._check_overlapping_tokens(active_adapters)
        return self._forward_rows(x, active_adapters, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = call_adapter_names(self, kwargs)
        if adapter_names is None or self.disable_adapters:
            return self.forward_adapters(x, self.active_adapters, *args, **kwargs)
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")
        # one adapter per sample or per token ('__base__': no adapter): each part with its adapter's rows
        return mixed_parts(x, adapter_names, lambda name, part: self.forward_adapters(
            part, [] if name == "__base__" else [name], *args, **kwargs), self.base_layer, "trainable tokens")
