"""UndoLog: the one record of changes that every all-or-nothing operation takes back on failure."""

from __future__ import annotations

import pytest
from torch import nn

from peftfast.utils.undo import UndoLog


class Layer:
    def __init__(self):
        self.adapters = {"default"}

    def delete_adapter(self, name):
        self.adapters.discard(name)


def test_rollback_takes_back_every_kind_of_step_newest_first():
    parent = nn.Sequential(nn.Linear(2, 2))
    old = parent[0]
    layer = Layer()
    order = []
    undo = UndoLog()
    undo.replace(parent, "0", old)
    parent[0] = nn.Identity()
    undo.delete_adapter(layer, "second")
    layer.adapters.add("second")
    undo.call(lambda: order.append("first recorded"))
    undo.call(lambda: order.append("last recorded"))
    assert len(undo) == 4
    undo.rollback()
    assert parent[0] is old and layer.adapters == {"default"}
    assert order == ["last recorded", "first recorded"]
    assert len(undo) == 0
    undo.rollback()  # nothing left to take back
    assert order == ["last recorded", "first recorded"]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_the_context_rolls_back_on_any_exception_and_reraises(error):
    seen = []
    with pytest.raises(error):
        with UndoLog() as undo:
            undo.call(lambda: seen.append("undone"))
            raise error("boom")
    assert seen == ["undone"]


def test_the_context_keeps_the_changes_when_the_block_succeeds():
    seen = []
    with UndoLog() as undo:
        undo.call(lambda: seen.append("undone"))
    assert seen == [] and len(undo) == 0
