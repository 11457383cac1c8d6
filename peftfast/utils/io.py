"""Atomic file writes: a save that is interrupted never replaces a good file with a broken one.

Each file is written under a temporary name in its destination folder, flushed to disk, and renamed
over the destination (a rename within one file system is atomic). ``atomic_write_many`` stages
several files first and renames them only once every one of them has been written, so a failure
while producing any file (out of disk, an exception, a kill before the renames) leaves every
destination as it was.
"""
from __future__ import annotations

import os
import secrets
from typing import Callable

TMP_SUFFIX = ".tmp"


def _temp_path(path: str) -> str:
    """Create an empty temporary file beside ``path`` with the permissions a plain open() would give it."""
    directory = os.path.dirname(os.path.abspath(path))
    for _ in range(100):
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}{TMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, unlike mkstemp's 0600
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every platform (e.g. Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(paths: list[str]) -> None:
    for tmp in paths:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def atomic_write_many(writes: list[tuple[str, Callable[[str], None]]]) -> None:
    """For each (path, write): ``write(tmp_path)`` to a temporary file beside ``path``; once all succeeded,
    rename each over its ``path``. On any error every temporary file is removed and no ``path`` is touched."""
    staged: list[tuple[str, str]] = []
    try:
        for path, write in writes:
            tmp = _temp_path(path)
            staged.append((tmp, path))
            mode = os.stat(tmp).st_mode
            write(tmp)
            os.chmod(tmp, mode)  # some writers (safetensors) recreate the file as 0600
            _fsync_file(tmp)
    except BaseException:
        _discard([tmp for tmp, _ in staged])
        raise
    done = 0
    try:
        for tmp, path in staged:
            os.replace(tmp, path)
            done += 1
    finally:
        _discard([tmp for tmp, _ in staged[done:]])
    for directory in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for _, p in staged):
        _fsync_dir(directory)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    atomic_write_many([(path, write)])


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)
