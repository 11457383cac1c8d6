"""Test helper: the tensors autograd keeps for backward."""
from __future__ import annotations

import torch


def record_saved(fn):
    """(fn(), the tensors handed to autograd's saved-tensor hook while fn ran, in order)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved
