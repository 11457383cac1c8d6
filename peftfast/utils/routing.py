"""PEFT's ``adapter_names`` (a mixed batch: one adapter per sample, or per token) handed to the modules that take
them for one call of a PEFT model.

During the call they are held in a context variable with the ids of the modules the tuner routes them to
(``routed_call``); such a module reads them with ``call_adapter_names``. PEFT registers a forward pre-hook on every
such module for each call instead; here nothing is registered per call, so concurrent calls from several threads (a
threaded server) each see their own names, and no hook dict changes while another thread's forward iterates it.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterable, Optional

from torch import nn

_CALL: ContextVar[Optional[tuple[frozenset, Any]]] = ContextVar("peftfast_adapter_names", default=None)
# routed calls in progress in any thread: while there are none, a module's forward reads no context variable (which
# torch.compile cannot trace: a model compiled with fullgraph=True keeps tracing without a mixed call)
_ACTIVE = [0]
_LOCK = threading.Lock()


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
