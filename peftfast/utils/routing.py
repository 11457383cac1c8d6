"""PEFT's ``adapter_names`` (a mixed batch: one adapter per sample, or per token) handed to the modules that take
them for one call of a PEFT model.

During the call they are held in a context variable with the ids of the modules the tuner routes them to
(``routed_call``); such a module reads them with ``call_adapter_names``. PEFT registers a forward pre-hook on every
such module for each call instead; here nothing is registered per call, so concurrent calls from several threads (a
threaded server) each see their own names, and no hook dict changes while another thread's forward iterates it.
Only a training call leaves hooks when it returns (``RecomputeAdapterNames``), for its backward's recomputation
under activation checkpointing; ``route_adapter_names`` and ``earlier_routing`` (around every call of a tuner,
``BaseTuner._enable_peft_forward_hooks``) manage them.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterable, Optional

import torch
from torch import nn

_CALL: ContextVar[Optional[tuple[frozenset, Any]]] = ContextVar("peftfast_adapter_names", default=None)
# routed calls in progress in any thread: while there are none, a module's forward reads no context variable (which
# torch.compile cannot trace: a model compiled with fullgraph=True keeps tracing without a mixed call)
_ACTIVE = [0]
_LOCK = threading.Lock()


def check_names_cover_batch(args: tuple, kwargs: dict) -> None:
    """A PEFT model's call with ``adapter_names``: raise unless it has one entry per sample of the batch the call
    gives (``input_ids``, ``inputs_embeds``, or a first positional tensor of token ids of two or more dimensions;
    nothing is checked when none of them is there), as PEFT's layers require. Inside the call a layer may see the batch
    repeated (generate's beams and returned sequences) and repeats each sample's entry to match
    (``per_sample_adapter_names``); a list of the wrong length at the call itself is refused before anything runs,
    not repeated."""
    names = kwargs.get("adapter_names")
    if not isinstance(names, (list, tuple)) or not names or not (
            all(isinstance(n, str) for n in names)
            or all(isinstance(n, (list, tuple)) and len(n) == len(names[0]) for n in names)):
        return  # not a list of names, or of equally long lists of names: the tuner's own check says what is allowed
    inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if not isinstance(inputs, torch.Tensor) and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2 \
            and not args[0].is_floating_point() and not args[0].is_complex():
        inputs = args[0]  # token ids by position (a float input may be sequence-first: nn.MultiheadAttention's)
    if isinstance(inputs, torch.Tensor) and inputs.dim() >= 1 and inputs.shape[0] != len(names):
        raise ValueError(f"adapter_names has {len(names)} entries for a batch of {inputs.shape[0]}; give one adapter "
                         "name per sample ('__base__' for none), or per token one list of names per sample (PEFT: "
                         "the length of `adapter_names` should be the same as the number of inputs)")


def call_adapter_names(module: nn.Module, kwargs: dict) -> Any:
    """The ``adapter_names`` for this forward of ``module``: its own keyword (popped from ``kwargs``), else those of
    the PEFT model's call in progress when it routes them to ``module``; None otherwise."""
    names = kwargs.pop("adapter_names", None)
    if names is None and _ACTIVE[0]:
        routed = _CALL.get()
        if routed is not None and id(module) in routed[0]:
            names = routed[1]
    return names


@contextmanager
def routed_call(modules: Iterable[nn.Module], adapter_names: Any):
    """``adapter_names`` for ``modules`` during the block (in this thread / context only)."""
    token = _CALL.set((frozenset(map(id, modules)), adapter_names))
    with _LOCK:
        _ACTIVE[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE[0] -= 1
        _CALL.reset(token)


# -- after a training call: the names again for its backward's recomputation ------------------------------------
class RecomputeAdapterNames:
    """The forward pre-hook a training call with ``adapter_names`` leaves on the modules it routed them to: inside a
    backward pass, where activation checkpointing recomputes the checkpointed blocks' forward, it hands them the
    call's names again (without them the recomputation computes other activations: wrong gradients, or checkpoint's
    mismatch error). A forward through one of the modules outside a backward and outside the tuner's own calls
    (``paused``: those drop or keep the routing themselves) bypasses the routing, e.g. a later training call on the
    base model itself: that ends it for good (``expired``, its hooks removed), since that forward's recomputation
    must not see these names. A class, not a closure, so a model holding it can still be pickled."""

    def __init__(self, adapter_names: Any) -> None:
        self.adapter_names = adapter_names
        self.expired = False
        self.paused = 0
        self.handles: list = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __call__(self, module: nn.Module, args: tuple, kw: dict):
        if not self.expired and not self.paused and "adapter_names" not in kw:
            if torch._C._current_graph_task_id() != -1:  # in a backward: a recomputation of the call's forward
                kw["adapter_names"] = self.adapter_names
            else:
                self.expired = True
                self.remove()
        return args, kw


@contextmanager
def earlier_routing(tuner: nn.Module):
    """Around each call through the tuner's forward hooks: the routing an earlier training call with
    ``adapter_names`` left for its backward's recomputation (``route_adapter_names``) is removed when this call
    records gradients (its own recomputation must not see those names), and kept, idle, through a call without
    them (evaluation, a reference model's forward under ``disable_adapter``, generate): the training call's
    backward may still come."""
    hook = tuner.__dict__.get("_recompute_routing")
    if hook is None:
        yield
        return
    if torch.is_grad_enabled():
        del tuner.__dict__["_recompute_routing"]
        hook.remove()
        yield
        return
    hook.paused += 1
    try:
        yield
    finally:
        hook.paused -= 1


@contextmanager
def route_adapter_names(tuner: nn.Module, modules: Iterable[nn.Module], adapter_names: Any):
    """``adapter_names`` for ``modules`` during one call of ``tuner``'s model (``utils/routing.py``: a context
    variable, nothing registered: ``routed_call``), inside ``earlier_routing``. A training call that records gradients may be
    recomputed in its backward (activation checkpointing, reentrant or not): when it returns, its names are left on
    the modules for that recomputation only (``RecomputeAdapterNames``), until the next call that records
    gradients. The backward of such a call must come before the next one (as in any training loop, gradient
    accumulation included)."""
    modules = list(modules)
    keep = tuner.training and torch.is_grad_enabled()
    with routed_call(modules, adapter_names):
        yield
    if keep:
        hook = RecomputeAdapterNames(adapter_names)
        hook.handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
        tuner.__dict__["_recompute_routing"] = hook
