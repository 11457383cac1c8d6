"""Run a function right after a module is imported (or now, when it already is).

``when_imported("transformers.trainer", patch)`` calls ``patch(module)`` once the module has executed, whichever
import reaches it first, or immediately when it is already in ``sys.modules``. Nothing is imported to do this: a
finder placed first on ``sys.meta_path`` answers only for the watched names, asks the other finders for the real
spec and wraps its loader so that the callbacks run after the module's own code. Unwatched imports pass through
untouched.
"""
from __future__ import annotations

import importlib.abc
import sys
import threading
from typing import Any, Callable

Callback = Callable[[Any], None]

_lock = threading.RLock()
_callbacks: dict[str, list[Callback]] = {}


class PostImportLoader(importlib.abc.Loader):
    """The real loader, plus the callbacks registered for the module once it has executed."""

    def __init__(self, loader: Any, fullname: str) -> None:
        self.loader = loader
        self.fullname = fullname

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        run_callbacks(self.fullname, module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, is_package, ... for inspect and pkgutil
        return getattr(self.loader, name)


class PostImportFinder(importlib.abc.MetaPathFinder):
    """Answers only for watched module names; every other import goes to the finders after it."""

    def __init__(self) -> None:
        self.searching: set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _callbacks or fullname in self.searching:
            return None
        self.searching.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self.searching.discard(fullname)
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = PostImportLoader(spec.loader, fullname)
        return spec


FINDER = PostImportFinder()


def run_callbacks(fullname: str, module: Any) -> None:
    with _lock:
        pending = _callbacks.get(fullname, [])
        _callbacks[fullname] = []
    for callback in pending:
        callback(module)


def when_imported(fullname: str, callback: Callback) -> None:
    """Call ``callback(module)`` once ``fullname`` is imported; now if it already is. Each callback runs once."""
    with _lock:
        if FINDER not in sys.meta_path:
            sys.meta_path.insert(0, FINDER)
        module = sys.modules.get(fullname)
        if module is None:
            _callbacks.setdefault(fullname, []).append(callback)
            return
    callback(module)
