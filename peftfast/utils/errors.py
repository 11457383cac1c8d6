"""The errors peftfast raises for bad configurations and adapter operations.

They live at the bottom of the package so that every layer can raise and catch them (save/load in
``utils`` catches what the tuners raise) without importing upward. All but AdapterSaveError (an OSError) are
ValueErrors, as PEFT's errors for the same situations are. ``peftfast.config`` re-exports ConfigError and
``peftfast.tuners.tuners_utils`` re-exports AdapterError, where users have always found them.

Messages often quote what the user passed (a name, a field value, a list of target modules). A message is capped at
``MAX_MESSAGE_CHARS`` characters (its head and tail are kept, the middle is replaced by a note saying how much was
cut), and ``short_repr`` quotes one value in bounded size, so a 100 MB input never becomes a 100 MB message.
"""
from __future__ import annotations

import itertools
from typing import Any

MAX_MESSAGE_CHARS = 2000
MAX_QUOTED_CHARS = 200


def cap_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` itself when it has at most ``limit`` characters, else its head and tail around a note saying
    how many characters were cut."""
    if len(message) <= limit:
        return message
    keep = max(limit - len(f" ...[{len(message)} characters cut]... "), 0)
    head = keep * 3 // 4
    note = f" ...[{len(message) - keep} characters cut]... "
    return message[:head] + note + message[len(message) - (keep - head):]


_CONTAINERS = (list, tuple, set, frozenset, dict)


def _leaf_repr(value: Any, limit: int) -> str:
    if isinstance(value, (str, bytes)):
        text = repr(value[: limit + 1])
        return cap_message(text, limit) + (f" (length {len(value)})" if len(value) > limit else "")
    if isinstance(value, _CONTAINERS):
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        return cap_message(repr(value), limit)
    except Exception as e:  # a hostile __repr__
        return f"<{type(value).__name__} whose repr failed: {type(e).__name__}>"


def _is_small(value: Any, limit: int) -> bool:
    """Whether ``value``'s repr is surely short: few nodes, short strings (walked without recursion, at most
    ``limit`` steps)."""
    size, stack = 0, [value]
    while stack:
        item = stack.pop()
        size += 1
        if size > limit:
            return False
        if isinstance(item, (str, bytes)):
            size += len(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, _CONTAINERS):
            stack.extend(item)
        elif not isinstance(item, (int, float, bool, type(None))):
            return False
    return size <= limit


def _leaf_repr_plain(value: Any, limit: int) -> str:
    try:
        return cap_message(repr(value), limit)
    except Exception as e:  # a hostile __repr__
        return f"<{type(value).__name__} whose repr failed: {type(e).__name__}>"


def short_repr(value: Any, limit: int = MAX_QUOTED_CHARS) -> str:
    """``repr(value)`` in about ``limit`` characters, without ever building the repr of a huge string or container:
    strings are cut before quoting, containers show their first 20 items one level deep."""
    if not isinstance(value, _CONTAINERS):
        return _leaf_repr(value, limit)
    if _is_small(value, limit):
        return _leaf_repr_plain(value, limit)
    items = list(itertools.islice(value.items() if isinstance(value, dict) else value, 20))
    if isinstance(value, dict):
        parts = [f"{_leaf_repr(k, 40)}: {_leaf_repr(v, 40)}" for k, v in items]
    else:
        parts = [_leaf_repr(v, 40) for v in items]
    more = f", ... ({len(value)} items)" if len(value) > len(items) else ""
    return cap_message(f"{type(value).__name__}[{', '.join(parts)}{more}]", limit)


class CappedMessage(Exception):
    """Mixin: the message (first argument) is capped at MAX_MESSAGE_CHARS characters."""

    def __init__(self, *args: Any) -> None:
        if args and isinstance(args[0], str):
            args = (cap_message(args[0]),) + args[1:]
        super().__init__(*args)


class ConfigError(CappedMessage, ValueError):
    """An adapter configuration is invalid or cannot be used by peftfast."""


class ConfigKeysMissingError(ConfigError, TypeError):
    """A file offered as adapter_config.json lacks the keys every adapter config has (``peft_type``): it is not
    an adapter config. A TypeError as well, as PEFT raises for the same file."""


class PeftError(Exception):
    """PEFT's base error class (``peft.PeftError``): code that catches it keeps working."""


class NoMatchingPeftModuleError(CappedMessage, PeftError, ValueError):
    """An adapter's ``target_modules`` matched no module of the model (PEFT's error of the same name)."""


class UnsupportedTargetError(CappedMessage, ValueError, TypeError):
    """A targeted module's type is not one the method adapts (a ValueError as for LoRA in PEFT, and a TypeError as
    PEFT raises it for LoHa / LoKr)."""


class PeftWarning(UserWarning):
    """PEFT's base warning class (``peft.PeftWarning``)."""


class AdapterError(CappedMessage, ValueError):
    """An adapter name or adapter operation is not valid for this model."""


class AdapterSaveError(OSError):
    """Saving adapter files failed (disk full, no permission, a folder name taken by a file, a rename refused,
    another process holding the folder's save lock past the timeout, ...).

    ``filename`` is the path being written when it failed, ``errno`` the cause's errno where known (e.g.
    ``errno.ENOSPC`` for a full disk), ``__cause__`` the original exception. When ``committed`` is False the
    folder was left exactly as before the save; when True every new file had been fully written and the save
    was committed, but moving the files into place failed: the next save or load of the folder completes it.
    Unlike the other errors here it is an OSError (what a failed file write raises), not a ValueError.
    """

    def __init__(self, path: str, cause: object, errno: "int | None" = None, committed: bool = False):
        message = cap_message(f"could not save adapter files to {path}: {cause}")
        super().__init__(message)
        self.errno = errno
        self.strerror = str(cause)
        self.filename = path
        self.committed = committed
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (type(self), (self.filename, self.strerror, self.errno, self.committed))
