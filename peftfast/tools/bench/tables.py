"""Plain-text tables and the small formatters every section of the bench prints with."""
from __future__ import annotations

from typing import Any


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def fmt(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [fmt(cells[0]), "-" * len(fmt(cells[0]))] + [fmt(r) for r in cells[1:]]


def mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def kb(n: float) -> str:
    return f"{n / 1e3:.1f}"


def threads_label(n: int) -> str:
    return f"{n} torch thread{'s' if n != 1 else ''}"


def verdict_word(ok: bool) -> str:
    return "met" if ok else "MISSED"
