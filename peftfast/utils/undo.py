"""The undo log behind every all-or-nothing operation.

Adding, loading or merging adapters changes a model step by step: a module is swapped for an
adapter layer, an adapter is added to a layer that already exists, a weight is overwritten. Each
step records how to take itself back; if a later step fails, ``rollback()`` takes them back in
reverse order and the model is exactly as it was. Used as a context manager the log rolls back by
itself when the block raises (``KeyboardInterrupt`` included) and is forgotten when it succeeds::

    with UndoLog() as undo:
        undo.replace(parent, "q_proj", old_module)     # about to set parent.q_proj = new layer
        parent.q_proj = new_layer
        undo.delete_adapter(layer, "second")           # about to add adapter "second" to an existing layer
        layer.update_layer("second", ...)
        undo.call(restore_snapshot)                    # anything else: a function that puts it back
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn


class UndoLog:
    """Steps that take back changes already made, replayed last-first by ``rollback()``."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], Any]] = []

    def __len__(self) -> int:
        return len(self._steps)

    def replace(self, parent: nn.Module, name: str, old: nn.Module) -> None:
        """``parent.<name>`` is about to be replaced; undoing puts ``old`` back."""
        self._steps.append(lambda: setattr(parent, name, old))

    def delete_adapter(self, layer: Any, adapter_name: str) -> None:
        """``adapter_name`` is about to be added to ``layer`` (an adapter layer or wrapper); undoing deletes it."""
        self._steps.append(lambda: layer.delete_adapter(adapter_name))

    def call(self, undo: Callable[[], Any]) -> None:
        """Any other change: ``undo()`` takes it back."""
        self._steps.append(undo)

    def rollback(self) -> None:
        """Take back every recorded change, newest first; the log is empty afterwards."""
        steps, self._steps = self._steps, []
        for step in reversed(steps):
            step()

    def forget(self) -> None:
        """Keep the changes: drop the recorded steps."""
        self._steps = []

    def __enter__(self) -> "UndoLog":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None:
            self.rollback()
        else:
            self.forget()
        return False
