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
_MARK = torch.zeros((), requires_grad=True)
# training calls whose names a recomputation can get (the backward of a call with names more than this many training
# calls after its forward is refused); also how many calls without adapter_names end the routing
KEPT_CALLS = 8


def sequence_mark() -> Optional[int]:
    """The autograd sequence number this thread gives its next graph node (nodes a forward creates in between two
    marks have numbers strictly between them); None while compiling."""
    if torch.compiler.is_compiling():
        return None
    with torch.enable_grad():
        return _MARK.view(()).grad_fn._sequence_nr()


def _recomputed_node_number() -> Optional[int]:
    """The sequence number of the graph node the backward is running (reentrant checkpointing: the checkpoint's own
    node; otherwise the node whose saved tensor is being recomputed), None where torch does not tell."""
    current = getattr(torch._C, "_current_autograd_node", None)
    node = current() if current is not None else None
    return node._sequence_nr() if node is not None else None


class RecomputeAdapterNames:
    """The forward pre-hook the training calls with ``adapter_names`` leave on the modules they routed them to:
    inside a backward pass, where activation checkpointing recomputes the checkpointed blocks' forward, it hands the
    recomputation the names of the call whose forward created the graph node being run (each call recorded as the
    range of autograd sequence numbers its forward used; ``sequence_mark``), so two training calls before one
    backward each get their own names, and a call without names none (without them the recomputation computes other
    activations: wrong gradients, or checkpoint's mismatch error). A forward through one of the modules outside a
    backward and outside the tuner's own calls (``paused``: those record their range themselves) bypasses the
    routing, e.g. a later training call on the base model itself: that ends it for good (``expired``, its hooks
    removed). A class, not a closure, so a model holding it can still be pickled."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []  # (first, last, ids of the routed modules, names or None), oldest first
        self.forgotten: list[tuple] = []  # (first, last) of calls with names no longer kept
        self.expired = False
        self.paused = 0
        self.handles: dict[int, Any] = {}

    def record(self, first: Optional[int], last: Optional[int], modules: list, adapter_names: Any) -> None:
        """One training call of the tuner's model (``adapter_names`` None: a call without them)."""
        dropped = self.calls[:-(KEPT_CALLS - 1)]
        self.forgotten = (self.forgotten + [c[:2] for c in dropped if c[3] is not None and c[0] is not None])[-1024:]
        self.calls = self.calls[-(KEPT_CALLS - 1):] + [(first, last, frozenset(map(id, modules)), adapter_names)]
        for m in modules:
            if id(m) not in self.handles:
                self.handles[id(m)] = m.register_forward_pre_hook(self, with_kwargs=True)

    def pending(self) -> bool:
        """Whether a kept call had names (else nothing is left to hand a recomputation)."""
        return any(call[3] is not None for call in self.calls)

    def end(self) -> None:
        """For good: the hooks removed, nothing kept."""
        self.expired = True
        for handle in self.handles.values():
            handle.remove()
        self.handles = {}
        self.calls, self.forgotten = [], []

    def names_for(self, module: nn.Module) -> Any:
        number = _recomputed_node_number()
        for first, last, ids, names in reversed(self.calls):
            if number is None or first is None or first < number < last:
                return names if id(module) in ids else None
        if number is not None and any(first < number < last for first, last in self.forgotten):
            raise RuntimeError(f"This backward recomputes (activation checkpointing) the forward of a training call "
                               f"with adapter_names made more than {KEPT_CALLS} training calls ago, whose names are "
                               "no longer kept; run each call's backward within that many training calls")
        return None  # a node of a forward no kept call made

    def __call__(self, module: nn.Module, args: tuple, kw: dict):
        if not self.expired and not self.paused and "adapter_names" not in kw:
            if torch._C._current_graph_task_id() != -1:  # in a backward: a recomputation of a call's forward
                names = self.names_for(module)
                if names is not None:
                    kw["adapter_names"] = names
            else:
                self.end()
        return args, kw


@contextmanager
def earlier_routing(tuner: nn.Module):
    """Around each call through the tuner's forward hooks, while training calls with ``adapter_names`` have left
    their routing for their backward's recomputation (``route_adapter_names``): the hooks stay idle during the call;
    a call that records gradients without names is recorded too (its recomputation must see no names), and once the
    kept calls (``KEPT_CALLS``) are all such calls the routing is removed. A call without gradients (evaluation, a
    reference model's forward under ``disable_adapter``, generate) changes nothing: the training calls' backward
    may still come."""
    hook = tuner.__dict__.get("_recompute_routing")
    if hook is None or hook.expired:
        yield
        return
    record = torch.is_grad_enabled()
    first = sequence_mark() if record else None
    kept = hook.calls[-1] if hook.calls else None
    hook.paused += 1
    try:
        yield
    finally:
        hook.paused -= 1
    if record and not hook.expired and (hook.calls[-1] if hook.calls else None) is kept:  # no names this call
        hook.record(first, sequence_mark(), [], None)
        if not hook.pending():
            hook.end()
            tuner.__dict__.pop("_recompute_routing", None)


@contextmanager
def route_adapter_names(tuner: nn.Module, modules: Iterable[nn.Module], adapter_names: Any):
    """``adapter_names`` for ``modules`` during one call of ``tuner``'s model (a context variable, nothing
    registered: ``routed_call``), inside ``earlier_routing``. A training call that records gradients may be
    recomputed in its backward (activation checkpointing, reentrant or not): when it returns, its names are left on
    the modules for that recomputation (``RecomputeAdapterNames``), told apart from those of the other calls by the
    autograd sequence numbers its forward used: the backward of several calls may come in any order, within
    ``KEPT_CALLS`` training calls of its forward."""
    modules = list(modules)
    keep = tuner.training and torch.is_grad_enabled()
    first = sequence_mark() if keep else None
    with routed_call(modules, adapter_names):
        yield
    if keep:
        hook = tuner.__dict__.get("_recompute_routing")
        if hook is None or hook.expired:
            hook = tuner.__dict__["_recompute_routing"] = RecomputeAdapterNames()
        hook.record(first, sequence_mark(), modules, adapter_names)
