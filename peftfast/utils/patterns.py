"""Regexes from configs (``target_modules``, ``exclude_modules``, ``layers_pattern``), matched in bounded time.

A config's regex is matched against every module name of the model. Python's ``re`` cannot be interrupted, and a
pattern with nested quantifiers (``(a+)+$``, ``(.*a){20}``) can backtrack for hours on one module name. So the syntax
is checked by ``re`` (the language PEFT uses: a pattern ``re`` rejects raises ``re.error`` as in PEFT), and the
matching runs in the ``regex`` package (a dependency of transformers), which reads the same patterns the same way
(its VERSION0 mode is ``re``-compatible) and takes a timeout. One pattern gets ``REGEX_BUDGET_S`` seconds in all
for the names of one model; past that the config is refused with ConfigError. Patterns longer than
``MAX_PATTERN_CHARS`` are refused before compiling.
"""
from __future__ import annotations

import re
import time
from typing import Optional

import regex

from .errors import ConfigError, short_repr

REGEX_BUDGET_S = 1.0
MAX_PATTERN_CHARS = 10_000


class BoundedPattern:
    """``pattern`` compiled once; ``fullmatch`` / ``match`` share one time budget across all calls."""

    def __init__(self, pattern: str, what: str = "target_modules", budget_s: float = REGEX_BUDGET_S) -> None:
        if not isinstance(pattern, str):
            raise ConfigError(f"{what} must be a regex string here, got {type(pattern).__name__}")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise ConfigError(f"{what} regex is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS} are "
                              f"allowed (peftfast.utils.patterns.MAX_PATTERN_CHARS): {short_repr(pattern)}")
        re.compile(pattern)  # the syntax PEFT accepts; re.error as in PEFT
        try:
            self._compiled = regex.compile(pattern, flags=regex.VERSION0)
        except regex.error as e:
            raise ConfigError(f"{what} regex {short_repr(pattern)} is valid for Python's re but cannot be compiled "
                              f"for time-bounded matching ({e}); rewrite it without that construct") from None
        self.pattern = pattern
        self.what = what
        self.budget_s = budget_s
        self._spent = 0.0

    def _run(self, method: str, text: str, pos: Optional[int] = None) -> Optional[regex.Match]:
        left = self.budget_s - self._spent
        start = time.perf_counter()
        try:
            if left <= 0:
                raise TimeoutError
            return getattr(self._compiled, method)(text, timeout=left)
        except TimeoutError:
            raise ConfigError(
                f"{self.what} regex {short_repr(self.pattern)} took more than {self.budget_s:g} s to match the "
                f"model's module names (nested quantifiers such as '(a+)+' backtrack exponentially); matching is "
                f"bounded (peftfast.utils.patterns.REGEX_BUDGET_S): simplify the pattern or list the module names"
            ) from None
        finally:
            self._spent += time.perf_counter() - start

    def fullmatch(self, text: str) -> Optional[regex.Match]:
        return self._run("fullmatch", text)

    def match(self, text: str) -> Optional[regex.Match]:
        return self._run("match", text)


def get_pattern_key(pattern_keys, key: str, what: str = "rank_pattern / alpha_pattern") -> str:
    """The first of ``pattern_keys`` (rank_pattern / alpha_pattern keys, regexes) that matches the end of ``key``
    at a dotted boundary, else ``key`` itself (PEFT's rule); each match is time-bounded like the others here."""
    for pattern in pattern_keys:
        if BoundedPattern(rf"(.*\.)?({pattern})$", what).match(key):
            return pattern
    return key
