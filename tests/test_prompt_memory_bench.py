"""The bench's prompt-method memory rows: bytes saved for backward by one training step, peftfast vs PEFT."""
import pytest

pytest.importorskip("peft")

from peftfast.tools.bench.memory import memory_lines, prompt_memory_rows  # noqa: E402


def test_prompt_memory_rows():
    rows = prompt_memory_rows()
    by = {(r["method"], r["path"]): r for r in rows}
    assert sorted(by) == [(m, p) for m in ("prefix_tuning", "prompt_tuning") for p in ("peft", "peftfast")]
    for method in ("prefix_tuning", "prompt_tuning"):
        ours, theirs = by[method, "peftfast"], by[method, "peft"]
        assert ours["saved_bytes"] > 0 and ours["saved_tensors"] > 0
        # the same tensors are kept: the prefix is concatenated into the cache by the model in both libraries
        assert ours["saved_bytes"] == theirs["saved_bytes"], (method, ours["saved_bytes"], theirs["saved_bytes"])
    # 16 virtual tokens in front of 48: prompt tuning saves the longer sequence's activations in every layer
    assert by["prompt_tuning", "peftfast"]["saved_bytes"] > by["prefix_tuning", "peftfast"]["saved_bytes"]
    text = "\n".join(memory_lines(rows, {}))
    assert "prefix_tuning" in text and "prompt_tuning" in text and "1.000" in text
