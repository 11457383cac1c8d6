"""Atomic file writes: a save that is interrupted never replaces a good file with a broken one.

``atomic_save(folder)`` is the save transaction behind ``PeftModel.save_pretrained`` (see its docstring);
``recover_folder`` is what every local load calls first. The helpers below it write single files.

Each file is written under a temporary name in its destination folder, flushed to disk, and renamed
over the destination (a rename within one file system is atomic). ``atomic_write_many`` stages
several files first and renames them only once every one of them has been written, so a failure
while producing any file (out of disk, an exception, a kill before the renames) leaves every
destination as it was.
"""
from __future__ import annotations

import contextlib
import errno as errno_codes
import json
import os
import re
import secrets
import time
from typing import Callable, Iterator, Optional

from .errors import AdapterSaveError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no folder lock
    fcntl = None

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
    """Remove temporary files while cleaning up after an error: never raise over that error (a file that cannot be
    removed now is removed by the next save or load of the folder)."""
    for tmp in paths:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def atomic_write_many(writes: list[tuple[str, Callable[[str], None]]]) -> None:
    """For each (path, write): ``write(tmp_path)`` to a temporary file beside ``path``; once all succeeded,
    rename each over its ``path``. On any error every temporary file is removed and no ``path`` is touched."""
    with contextlib.ExitStack() as locks:  # a save transaction cleaning these folders leaves our files alone
        for directory in sorted({os.path.dirname(os.path.abspath(p)) for p, _ in writes}):
            locks.enter_context(folder_lock(directory))
        _write_many_locked(writes)


def _write_many_locked(writes: list[tuple[str, Callable[[str], None]]]) -> None:
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


# ---------------------------------------------------------------------------------------------------------
# Save transactions
# ---------------------------------------------------------------------------------------------------------
JOURNAL_NAME = ".peftfast-save.journal"
# The only names a transaction writes. Stray temporary files are removed only when they match this pattern
# exactly (a leading dot, one of these names, 12 hex digits, ".tmp"): never a file that is not ours.
_OWN_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", "README.md", JOURNAL_NAME)
_TEMP_RE = re.compile(r"^\.(" + "|".join(re.escape(n) for n in _OWN_NAMES) + r")\.[0-9a-f]{12}" + re.escape(TMP_SUFFIX)
                      + r"$")
LOCK_TIMEOUT_S = 120.0  # PEFTFAST_SAVE_LOCK_TIMEOUT overrides
SKIP = object()  # returned by a SaveTransaction writer: leave that file as it is


def _lock_timeout() -> float:
    try:
        return float(os.environ.get("PEFTFAST_SAVE_LOCK_TIMEOUT", LOCK_TIMEOUT_S))
    except ValueError:
        return LOCK_TIMEOUT_S


@contextlib.contextmanager
def folder_lock(folder: str, timeout: Optional[float] = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` itself (its directory file descriptor: no lock file is created, so
    the folder's contents stay exactly PEFT's). Waits up to ``timeout`` seconds, then raises AdapterSaveError."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    timeout = _lock_timeout() if timeout is None else timeout
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except (BlockingIOError, InterruptedError):
                if time.monotonic() >= deadline:
                    raise AdapterSaveError(folder, f"another process is saving to this folder and did not finish "
                                                   f"within {timeout:g} s (PEFTFAST_SAVE_LOCK_TIMEOUT)",
                                           errno_codes.EWOULDBLOCK) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _errno_of(exc: BaseException) -> Optional[int]:
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    text = str(exc)
    m = re.search(r"(?:os error|code:)\s*(\d+)", text)
    if m:
        return int(m.group(1))
    if "No space left on device" in text:
        return errno_codes.ENOSPC
    return None


def _is_io_failure(exc: BaseException) -> bool:
    """Errors a file write raises: OSError, safetensors' SafetensorError, torch's writer RuntimeError."""
    return isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError"


def _save_error(path: str, exc: BaseException, committed: bool = False, prefix: str = "") -> AdapterSaveError:
    if isinstance(exc, AdapterSaveError) and not prefix:
        return exc
    return AdapterSaveError(path, f"{prefix}{type(exc).__name__}: {exc}", _errno_of(exc), committed=committed)


def _is_own_temp(name: str) -> bool:
    return _TEMP_RE.match(name) is not None


def _safe_rel(rel: object) -> str:
    """A journal entry: a relative path of at most two parts, no '..', no absolute path."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        raise ValueError(f"bad path {rel!r}")
    parts = rel.split("/")
    if len(parts) > 2 or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad path {rel!r}")
    return rel


def _read_journal(root: str) -> tuple[list[tuple[str, str]], list[str]]:
    with open(os.path.join(root, JOURNAL_NAME), encoding="utf-8") as f:
        data = json.load(f)
    renames = []
    for tmp, dst in data["renames"]:
        tmp, dst = _safe_rel(tmp), _safe_rel(dst)
        if not _is_own_temp(os.path.basename(tmp)) or os.path.basename(dst) not in _OWN_NAMES \
                or os.path.dirname(tmp) != os.path.dirname(dst):
            raise ValueError(f"bad rename {tmp!r} -> {dst!r}")
        renames.append((tmp, dst))
    removes = []
    for rel in data["removes"]:
        rel = _safe_rel(rel)
        if os.path.basename(rel) not in _OWN_NAMES:
            raise ValueError(f"bad removal {rel!r}")
        removes.append(rel)
    return renames, removes


def _apply(root: str, renames: list[tuple[str, str]], removes: list[str]) -> None:
    """Carry out a committed journal: idempotent, so a crash at any point is finished by running it again."""
    dirs = {root}
    for tmp, dst in renames:
        try:
            os.replace(os.path.join(root, tmp), os.path.join(root, dst))
        except FileNotFoundError:  # renamed before the crash
            pass
        dirs.add(os.path.dirname(os.path.join(root, dst)))
    for rel in removes:
        path = os.path.join(root, rel)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        dirs.add(os.path.dirname(path))
    for d in sorted(dirs):
        _fsync_dir(d)
    os.unlink(os.path.join(root, JOURNAL_NAME))
    _fsync_dir(root)


def _own_temps(folder: str) -> list[str]:
    try:
        return [n for n in os.listdir(folder) if _is_own_temp(n)]
    except OSError:
        return []


def _subfolders(root: str) -> list[str]:
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    out = []
    for e in entries:
        try:
            if e.is_dir(follow_symlinks=False):
                out.append(e.path)
        except OSError:
            pass
    return out


def _try_lock(folder: str) -> Optional[int]:
    """A descriptor holding ``folder``'s lock, or None if it is held elsewhere (or cannot be opened)."""
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _clean_stray_temps(folders: list[str], held: frozenset = frozenset()) -> None:
    """Remove our temporary files left in each folder by saves that died.

    A live save stages files into a folder X only while holding the lock of X (X is its root) or of X's parent
    (X is one of its adapter subfolders), so X is cleaned only while both locks are held here; the ones not already
    in ``held`` are tried without waiting (no deadlock), and X is skipped when one is busy: a later save or load
    cleans it."""
    for folder in dict.fromkeys(os.path.abspath(f) for f in folders):
        names = _own_temps(folder)
        if not names:
            continue
        fds: list[int] = []
        try:
            for lock in dict.fromkeys((os.path.dirname(folder), folder)):
                if lock in held or not lock:
                    continue
                fd = _try_lock(lock)
                if fd is None:
                    break
                fds.append(fd)
            else:
                # with both locks held no save can be staging here; a save that died after its commit point
                # still needs its staged files: finish it first
                for root in dict.fromkeys((os.path.dirname(folder), folder)):
                    if root:
                        _roll_forward_locked(root)
                for name in _own_temps(folder):
                    try:
                        os.unlink(os.path.join(folder, name))
                    except FileNotFoundError:
                        pass
        finally:
            for fd in fds:
                os.close(fd)


def _has_journal(root: str) -> bool:
    """Whether ``root`` holds a committed journal; an error other than 'no such file' propagates (guessing 'no'
    would let the staged files it names be removed as strays)."""
    try:
        os.lstat(os.path.join(root, JOURNAL_NAME))
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _roll_forward_locked(root: str) -> None:
    """With ``root``'s lock held: finish a save whose journal was committed there."""
    if _has_journal(root):
        try:
            renames, removes = _read_journal(root)
        except (ValueError, KeyError, TypeError) as e:
            raise AdapterSaveError(os.path.join(root, JOURNAL_NAME),
                                   f"unreadable save journal ({type(e).__name__}: {e}); remove it by hand") from None
        _apply(root, renames, removes)


def recover_folder(folder: str) -> None:
    """Called before reading adapter files from a local ``folder``: complete or undo an interrupted save there.

    The folder may be a save root or an adapter subfolder of one (``root/<adapter name>``), so a journal in the
    parent is completed too; stray temporary files of ours in the folder and its subfolders are removed. Nothing
    is locked or written unless a journal or such a file is found. A folder that cannot be written (read-only
    media) is read as it is.
    """
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        return
    try:
        for root in dict.fromkeys((os.path.dirname(folder), folder)):
            if _has_journal(root):
                with folder_lock(root):
                    _roll_forward_locked(root)
        _clean_stray_temps([folder] + _subfolders(folder))
    except PermissionError:
        pass
    except AdapterSaveError:
        raise
    except OSError as e:
        raise _save_error(folder, e, prefix="recovering an interrupted save: ") from e


class SaveTransaction:
    """All-or-nothing save of several files into ``root`` and its immediate subfolders.

    ``write(path, writer)`` (``writer(tmp)`` writes the file; returning SKIP leaves it as it is), ``write_text``
    and ``remove(path)`` plan; ``commit()`` runs it:

    1. take an exclusive lock on ``root`` (other saves wait, up to PEFTFAST_SAVE_LOCK_TIMEOUT seconds);
    2. finish a committed save that died in ``root``; remove stray temporary files of dead saves (matched by
       exact name) in ``root`` and the subfolders written;
    3. stage every file: ``writer(tmp)`` into ``.<name>.<12 hex>.tmp`` beside its destination, fsync;
    4. write the journal (the planned renames and removals) as a temporary file, fsync, rename it to
       ``.peftfast-save.journal``: the commit point;
    5. rename every staged file into place, remove the planned removals, fsync the folders, delete the journal.

    An error or kill before 4 leaves every file as it was (the next save or load removes any staged file left by
    a kill); after 4, the next save or load (or the rest of 5) finishes the save. Errors raised while writing
    (OSError, SafetensorError, torch's writer errors) become AdapterSaveError naming the path and the cause; other
    exceptions (and KeyboardInterrupt) propagate unchanged once the staged files are removed.
    """

    def __init__(self, root: str, lock_timeout: Optional[float] = None):
        self.root = os.path.abspath(os.fspath(root))
        self.lock_timeout = lock_timeout
        self._writes: list[tuple[str, Callable[[str], None]]] = []
        self._removes: list[str] = []

    def _rel(self, path: str) -> str:
        path = os.path.abspath(os.fspath(path))
        rel = os.path.relpath(path, self.root).replace(os.sep, "/")
        try:
            return _safe_rel(rel)
        except ValueError:
            raise ValueError(f"{path} is not in {self.root} or one of its immediate subfolders") from None

    def write(self, path: str, writer: Callable[[str], None]) -> None:
        self._rel(path)
        if os.path.basename(path) not in _OWN_NAMES:
            raise ValueError(f"a save transaction writes only {', '.join(_OWN_NAMES[:-1])}; got {path}")
        self._writes.append((os.path.abspath(path), writer))

    def write_text(self, path: str, text: "str | Callable[[], Optional[str]]") -> None:
        """Write ``text``; a callable is called while the folder is locked and its None leaves the file as it is."""
        def writer(tmp: str) -> object:
            content = text() if callable(text) else text
            if content is None:
                return SKIP
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(content)
            return None

        self.write(path, writer)

    def remove(self, path: str) -> None:
        """Remove ``path`` (if it exists) as part of the save, after the new files are in place."""
        self._rel(path)
        if os.path.basename(path) not in _OWN_NAMES:
            raise ValueError(f"a save transaction removes only its own file names; got {path}")
        self._removes.append(os.path.abspath(path))

    def commit(self) -> None:
        root = self.root
        current = root
        try:
            os.makedirs(root, exist_ok=True)
            lock = folder_lock(root, self.lock_timeout)
            lock.__enter__()
        except Exception as e:
            if _is_io_failure(e):
                raise _save_error(current, e) from e
            raise
        try:
            self._commit_locked()
        except BaseException as e:
            lock.__exit__(type(e), e, e.__traceback__)
            raise
        lock.__exit__(None, None, None)

    def _commit_locked(self) -> None:
        root = self.root
        current = root
        staged: list[tuple[str, str]] = []
        created: list[str] = []
        try:
            _roll_forward_locked(root)
            _clean_stray_temps([root] + [os.path.dirname(p) for p, _ in self._writes], held=frozenset({root}))
            for path, writer in self._writes:
                current = path
                folder = os.path.dirname(path)
                if folder != root and not os.path.isdir(folder):
                    os.mkdir(folder)  # raises FileExistsError where a file has the adapter's name
                    created.append(folder)
                tmp = _temp_path(path)
                staged.append((tmp, path))
                mode = os.stat(tmp).st_mode
                if writer(tmp) is SKIP:
                    staged.pop()
                    _discard([tmp])
                    continue
                os.chmod(tmp, mode)  # some writers (safetensors) recreate the file as 0600
                _fsync_file(tmp)
            for folder in dict.fromkeys(os.path.dirname(tmp) for tmp, _ in staged):
                _fsync_dir(folder)  # the staged files' names are durable before the journal names them
            current = os.path.join(root, JOURNAL_NAME)
            plan = {"version": 1,
                    "renames": [[self._rel(tmp), self._rel(dst)] for tmp, dst in staged],
                    "removes": [self._rel(p) for p in dict.fromkeys(self._removes)]}
            journal_tmp = _temp_path(current)
            staged.append((journal_tmp, current))
            with open(journal_tmp, "w", encoding="utf-8") as f:
                json.dump(plan, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(journal_tmp, current)  # the commit point
        except BaseException as e:
            _discard([tmp for tmp, _ in staged])
            for folder in reversed(created):
                try:
                    os.rmdir(folder)
                except OSError:
                    pass
            if isinstance(e, Exception) and _is_io_failure(e):
                raise _save_error(current, e) from e
            raise
        renames = [(self._rel(tmp), self._rel(dst)) for tmp, dst in staged[:-1]]
        try:
            _apply(root, renames, plan["removes"])
        except Exception as first:
            try:  # a transient failure (EINTR, a busy file on some systems): finish it now if we can
                _apply(root, renames, plan["removes"])
            except Exception as e:
                raise _save_error(root, e, committed=True,
                                  prefix="the save was committed but moving its files into place failed; the next "
                                         "save or load of this folder completes it: ") from first


@contextlib.contextmanager
def atomic_save(root: str, lock_timeout: Optional[float] = None) -> Iterator[SaveTransaction]:
    """``with atomic_save(folder) as tx: tx.write(...); tx.remove(...)`` commits on leaving the block without an
    exception (see SaveTransaction)."""
    tx = SaveTransaction(root, lock_timeout)
    yield tx
    tx.commit()
