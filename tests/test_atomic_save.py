"""Saves are atomic per folder: after an error, Ctrl-C or kill -9 at any point of ``save_pretrained`` every
adapter in the folder is entirely the old one or entirely the new one, and loads.

- Fault injection at every file-system call of a multi-adapter save (root adapter, two subfolder adapters, the
  model card; both serialisations, switching between them; and a first save into an empty folder), failing once
  or failing for good from that call on.
- Real SIGKILLs of a child process at random points of a save loop, then recovery.
- Two processes saving different adapters to one folder at once never leave a mixed folder.
- Save failures raise AdapterSaveError (an OSError) naming the path and the cause; a full disk keeps ENOSPC.
- Only our own temporary files are ever removed; the folder holds PEFT's files and nothing else, and PEFT loads it.
"""
from __future__ import annotations

import builtins
import errno
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings

import pytest
import safetensors.torch
import torch
import torch.nn as nn

import peftfast
from peftfast.utils import io as pio
from peftfast.utils.errors import AdapterSaveError

ADAPTERS = ["default", "a", "b"]
PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"}
TEMP_RE = re.compile(r"^\.(adapter_model\.safetensors|adapter_model\.bin|adapter_config\.json|README\.md|"
                     r"\.peftfast-save\.journal)\.[0-9a-f]{12}\.tmp$")  # what a save stages
X = torch.linspace(-1, 1, 3 * 8).reshape(3, 8)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin1 = nn.Linear(8, 8)
        self.lin2 = nn.Linear(8, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(x)))


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def make_model(seed: int, r: int):
    """Three adapters; ``r`` differs between the old and the new model, so new weights with an old config (or the
    reverse) cannot load."""
    model = quiet(peftfast.get_peft_model, Tiny(), peftfast.LoraConfig(r=r, target_modules=["lin1", "lin2"]))
    quiet(model.add_adapter, "a", peftfast.LoraConfig(r=r + 1, target_modules=["lin1"]))
    quiet(model.add_adapter, "b", peftfast.LoraConfig(r=r + 2, target_modules=["lin2"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def outputs(model) -> dict[str, torch.Tensor]:
    out = {}
    model.eval()
    with torch.no_grad():
        for name in ADAPTERS:
            model.set_adapter(name)
            out[name] = model(X).clone()
    model.set_adapter("default")
    return out


OLD, NEW = make_model(seed=1, r=2), make_model(seed=2, r=4)
OLD_OUT, NEW_OUT = outputs(OLD), outputs(NEW)


def adapter_path(folder, name: str) -> str:
    return str(folder) if name == "default" else os.path.join(str(folder), name)


def load_output(folder, name: str) -> torch.Tensor:
    model = quiet(peftfast.PeftModel.from_pretrained, Tiny(), adapter_path(folder, name))
    with torch.no_grad():
        return model(X)


def which(out: torch.Tensor, name: str, candidates: dict[str, dict[str, torch.Tensor]]) -> str:
    for label, expected in candidates.items():
        if torch.equal(out, expected[name]):
            return label
    raise AssertionError(f"adapter {name!r} is neither entirely old nor entirely new")


def tree(folder) -> dict[str, bytes]:
    out = {}
    for here, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(here, f), "rb") as fh:
                out[os.path.relpath(os.path.join(here, f), folder)] = fh.read()
    return out


def expected_files(safe: bool) -> set[str]:
    weights = "adapter_model.safetensors" if safe else "adapter_model.bin"
    files = {"README.md", "adapter_config.json", weights}
    for name in ADAPTERS[1:]:
        files |= {f"{name}/adapter_config.json", f"{name}/{weights}"}
    return files


def check_folder(folder, candidates: dict[str, tuple[dict[str, torch.Tensor], bool]], order=ADAPTERS) -> dict:
    """Load every adapter (in ``order``): each must be entirely one candidate, with exactly that candidate's files in
    its folder (no weights file of the other serialisation shadowing it); afterwards no temporary file or journal
    is left anywhere. Returns {adapter: candidate label}."""
    labels = {}
    for name in order:
        labels[name] = which(load_output(folder, name), name, {k: v[0] for k, v in candidates.items()})
    files = set(tree(folder))
    assert not [f for f in files if TEMP_RE.match(os.path.basename(f)) or pio.JOURNAL_NAME in f], files
    for name, label in labels.items():
        safe = candidates[label][1]
        prefix = "" if name == "default" else name + "/"
        mine = {f for f in files if os.path.dirname(f) == prefix.rstrip("/") and os.path.basename(f) in PEFT_FILES}
        weights = "adapter_model.safetensors" if safe else "adapter_model.bin"
        assert mine == {prefix + "adapter_config.json", prefix + weights}, (name, label, mine)
    return labels


# ---------------------------------------------------------------------------------------------------------
# fault injection at every file-system call
# ---------------------------------------------------------------------------------------------------------
class Injector:
    """Counts the file-system calls made while active; raises OSError(EIO) at call ``fail_at`` (``persist``: and at
    every later call, as a disk that went away). Weight writers write half a file before failing."""

    TARGETS = [(os, n) for n in ("replace", "rename", "unlink", "remove", "open", "fsync", "mkdir", "makedirs",
                                 "rmdir", "chmod", "stat", "lstat", "listdir", "scandir")]
    TARGETS += [(builtins, "open"), (safetensors.torch, "save_file"), (torch, "save")]

    def __init__(self, monkeypatch, fail_at: int = -1, persist: bool = False):
        self.calls, self.fail_at, self.persist, self.active, self.kinds = 0, fail_at, persist, False, []
        for mod, name in self.TARGETS:
            monkeypatch.setattr(mod, name, self._wrap(getattr(mod, name), name))

    def _should_fail(self, name: str) -> bool:
        if not self.active:
            return False
        k = self.calls
        self.calls += 1
        self.kinds.append(name)
        return k == self.fail_at or (self.persist and 0 <= self.fail_at <= k)

    def _wrap(self, real, name):
        def fake(*args, **kwargs):
            if self._should_fail(name):
                if name in ("save_file", "save"):  # a partial file, then the error
                    path = args[1]
                    real(*args, **kwargs)
                    with open(path, "rb") as f:
                        data = f.read()
                    with open(path, "wb") as f:
                        f.write(data[: len(data) // 2])
                raise OSError(errno.EIO, f"injected fault in {name}")
            return real(*args, **kwargs)

        return fake


SCENARIOS = [(True, False), (False, True)]  # (old safe_serialization, new safe_serialization)
FAULT_POINTS: dict = {}


def count_calls(tmp_path, monkeypatch, old_safe: bool, new_safe: bool) -> list[str]:
    folder = tmp_path / "count"
    quiet(OLD.save_pretrained, folder, safe_serialization=old_safe)
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    inj = Injector(monkeypatch)
    inj.active = True
    quiet(NEW.save_pretrained, folder, safe_serialization=new_safe)
    inj.active = False
    monkeypatch.undo()
    return inj.kinds


@pytest.mark.parametrize("persist", [False, True], ids=["fails-once", "fails-from-then-on"])
@pytest.mark.parametrize("old_safe,new_safe", SCENARIOS, ids=["safetensors-to-bin", "bin-to-safetensors"])
def test_fault_at_every_file_system_call(tmp_path, monkeypatch, old_safe, new_safe, persist):
    kinds = count_calls(tmp_path, monkeypatch, old_safe, new_safe)
    template = tmp_path / "old"
    quiet(OLD.save_pretrained, template, safe_serialization=old_safe)
    assert {"replace", "open", "fsync"} | (set() if new_safe else {"save"}) <= set(kinds)
    candidates = {"old": (OLD_OUT, old_safe), "new": (NEW_OUT, new_safe)}
    seen = {"old": 0, "new": 0, "committed-error": 0}
    for k in range(len(kinds)):
        folder = tmp_path / f"k{k}"
        shutil.copytree(template, folder)
        before = tree(folder)
        monkeypatch.setattr(os, "fsync", lambda fd: None)  # still a fault point, but fast (durability is not tested)
        inj = Injector(monkeypatch, fail_at=k, persist=persist)
        inj.active = True
        error = None
        try:
            quiet(NEW.save_pretrained, folder, safe_serialization=new_safe)
        except Exception as e:  # noqa: BLE001 - checked below
            error = e
        inj.active = False
        monkeypatch.undo()
        if error is not None:
            assert isinstance(error, AdapterSaveError), (k, kinds[k], repr(error))
            assert error.filename.startswith(str(folder)) and error.filename in str(error), str(error)
            assert error.__cause__ is not None  # the original error, e.g. the injected one
            if not error.committed:
                # the folder is as before, except for staged temporary files a dead disk kept us from removing
                now = {f: b for f, b in tree(folder).items() if not TEMP_RE.match(os.path.basename(f))}
                assert now == before, (k, kinds[k], set(now) ^ set(before))
            else:
                seen["committed-error"] += 1
        order = ADAPTERS if k % 2 else ADAPTERS[::-1]  # a subfolder adapter loaded first, or the root one
        labels = check_folder(folder, candidates, order)
        assert len(set(labels.values())) == 1, (k, kinds[k], labels)  # all adapters from one save
        if error is None:
            assert set(labels.values()) == {"new"}, (k, kinds[k])
        else:
            assert set(labels.values()) == {"new" if error.committed else "old"}, (k, kinds[k], labels)
        seen[labels["default"]] += 1
        assert set(tree(folder)) == expected_files(new_safe if labels["default"] == "new" else old_safe)
    FAULT_POINTS[(old_safe, new_safe, persist)] = (len(kinds), seen)
    assert seen["old"] > 0 and seen["new"] > 0
    if persist:
        assert seen["committed-error"] > 0  # faults after the commit point were completed by the next load


@pytest.mark.parametrize("persist", [False, True], ids=["fails-once", "fails-from-then-on"])
def test_fault_at_every_call_of_a_first_save(tmp_path, monkeypatch, persist):
    """Into an empty folder (the adapter subfolders are created by the save): afterwards there are either no
    adapter files at all (loading says so, and leaves no temporary file) or all the new adapters."""
    count = tmp_path / "count"
    count.mkdir()
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    inj = Injector(monkeypatch)
    inj.active = True
    quiet(NEW.save_pretrained, count)
    inj.active = False
    monkeypatch.undo()
    assert inj.kinds.count("mkdir") >= 2
    outcomes = {"nothing": 0, "new": 0}
    for k in range(len(inj.kinds)):
        folder = tmp_path / f"k{k}"
        folder.mkdir()
        monkeypatch.setattr(os, "fsync", lambda fd: None)
        fault = Injector(monkeypatch, fail_at=k, persist=persist)
        fault.active = True
        error = None
        try:
            quiet(NEW.save_pretrained, folder)
        except AdapterSaveError as e:
            error = e
        fault.active = False
        monkeypatch.undo()
        if error is None or error.committed:
            labels = check_folder(folder, {"new": (NEW_OUT, True)}, ADAPTERS[::-1])
            assert set(labels.values()) == {"new"}
            outcomes["new"] += 1
            continue
        for name in ADAPTERS[::-1]:
            with pytest.raises(FileNotFoundError):
                load_output(folder, name)
        assert not set(tree(folder)), (k, inj.kinds[k], set(tree(folder)))
        outcomes["nothing"] += 1
    assert outcomes["nothing"] > 0 and outcomes["new"] > 0


# ---------------------------------------------------------------------------------------------------------
# kill -9 at random points of a save loop
# ---------------------------------------------------------------------------------------------------------
def _child_save_loop(folder: str, models: list, serialisations: list[bool]) -> None:
    """In a forked child: save forever, alternating models and serialisations. Never returns."""
    try:
        torch.set_num_threads(1)
        i = 0
        while True:
            quiet(models[i % len(models)].save_pretrained, folder, safe_serialization=serialisations[i % 4 // 2])
            i += 1
    finally:
        os._exit(1)


def test_random_sigkills_during_saves(tmp_path):
    rng = random.Random(1234)
    folder = str(tmp_path / "killed")
    quiet(OLD.save_pretrained, folder)
    candidates_safe = {"old": OLD_OUT, "new": NEW_OUT}
    kills, left_over = 20, 0
    for _ in range(kills):
        pid = os.fork()
        if pid == 0:
            _child_save_loop(folder, [NEW, OLD], [True, False])
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        files = set(tree(folder))
        left_over += any(TEMP_RE.match(os.path.basename(f)) or pio.JOURNAL_NAME in f for f in files)
        labels = {}
        for name in ADAPTERS[::-1]:
            labels[name] = which(load_output(folder, name), name, candidates_safe)
        assert len(set(labels.values())) == 1, labels
        files = set(tree(folder))
        assert files in (expected_files(True), expected_files(False)), files
    assert left_over > 0  # some kills did land in the middle of a save


# ---------------------------------------------------------------------------------------------------------
# two processes saving to one folder at once
# ---------------------------------------------------------------------------------------------------------
def test_concurrent_saves_never_mix(tmp_path):
    folder = str(tmp_path / "shared")
    quiet(OLD.save_pretrained, folder)
    rounds, saves_per_round = 12, 3
    candidates = {"old": (OLD_OUT, True), "new": (NEW_OUT, False)}
    winners = set()
    for _ in range(rounds):
        go_r, go_w = os.pipe()
        pids = []
        for model, safe in ((OLD, True), (NEW, False)):
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(go_w)
                    os.read(go_r, 1)
                    torch.set_num_threads(1)
                    for _ in range(saves_per_round):
                        quiet(model.save_pretrained, folder, safe_serialization=safe)
                    os._exit(0)
                except BaseException:
                    os._exit(1)
            pids.append(pid)
        os.close(go_r)
        os.write(go_w, b"gg")
        os.close(go_w)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        labels = check_folder(folder, candidates)
        assert len(set(labels.values())) == 1, labels
        winners |= set(labels.values())


def test_a_held_lock_times_out_with_a_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "locked"
    quiet(OLD.save_pretrained, folder)
    before = tree(folder)
    monkeypatch.setenv("PEFTFAST_SAVE_LOCK_TIMEOUT", "0.2")
    with pio.folder_lock(str(folder)):  # another open file description: excludes this process's save too
        with pytest.raises(AdapterSaveError, match="another process is saving"):
            quiet(NEW.save_pretrained, folder)
    assert tree(folder) == before


# ---------------------------------------------------------------------------------------------------------
# one error type for save failures
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["safetensors", "torch.save", "config", "model card"])
def test_full_disk_raises_adapter_save_error(tmp_path, monkeypatch, where):
    folder = tmp_path / "full"
    quiet(OLD.save_pretrained, folder, safe_serialization=where != "torch.save")
    (folder / "README.md").write_text("# my card\n")
    before = tree(folder)
    if where == "torch.save":
        def full(obj, f, *a, **k):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")

        monkeypatch.setattr(torch, "save", full)
        target = "adapter_model.bin"
    else:
        # the staged file of each target is written through open() (safetensors: bytes from safetensors.torch.save)
        target = {"safetensors": "adapter_model.safetensors", "config": "adapter_config.json",
                  "model card": "README.md"}[where]
        real_open = builtins.open

        def full(file, mode="r", *a, **k):
            if "w" in mode and os.path.basename(str(file)).startswith("." + target + "."):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_open(file, mode, *a, **k)

        monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(AdapterSaveError) as info:
        quiet(NEW.save_pretrained, folder, safe_serialization=where != "torch.save")
    monkeypatch.undo()
    e = info.value
    assert isinstance(e, OSError) and not e.committed
    assert target in e.filename and e.filename.startswith(str(folder)) and e.filename in str(e)
    if where != "torch.save":
        assert e.errno == errno.ENOSPC
    assert ("No space left" if where != "torch.save" else "file write failed") in str(e)
    assert tree(folder) == before  # README.md included: nothing changed


def test_adapter_subfolder_name_taken_by_a_file(tmp_path):
    folder = tmp_path / "taken"
    quiet(OLD.save_pretrained, folder, selected_adapters=["default"])
    (folder / "b").write_text("not a folder")
    before = tree(folder)
    with pytest.raises(AdapterSaveError) as info:
        quiet(NEW.save_pretrained, folder)
    assert os.path.join(str(folder), "b") in str(info.value)
    assert tree(folder) == before and not (folder / "a").exists()  # no README change, no half-made subfolder


# ---------------------------------------------------------------------------------------------------------
# what is removed, what is left: PEFT's files only
# ---------------------------------------------------------------------------------------------------------
def test_only_our_own_temporary_files_are_removed(tmp_path):
    folder = tmp_path / "strays"
    quiet(OLD.save_pretrained, folder)
    ours = [".adapter_model.safetensors.0123456789ab.tmp", "a/.adapter_config.json.abcdef012345.tmp",
            ".README.md.00000000ffff.tmp", f".{pio.JOURNAL_NAME}.0123456789ab.tmp"]
    theirs = [".adapter_model.safetensors.xyz.tmp", "notes.tmp", ".adapter_model.safetensors.0123456789ab.tmp.bak",
              ".weights.0123456789ab.tmp", "a/.adapter_config.json.0123456789AB.tmp", "b/keep.txt"]
    for rel in ours + theirs:
        (folder / rel).write_text("x")
    quiet(NEW.save_pretrained, folder)
    files = set(tree(folder))
    assert not set(ours) & files
    assert set(theirs) <= files
    for rel in ours:  # and the next load cleans too
        (folder / rel).write_text("x")
    check_folder(folder, {"new": (NEW_OUT, True)})


def test_a_journal_cannot_point_outside_the_folder(tmp_path):
    folder = tmp_path / "evil"
    quiet(OLD.save_pretrained, folder)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    (folder / pio.JOURNAL_NAME).write_text(json.dumps({"version": 1, "renames": [], "removes": ["../precious.txt"]}))
    with pytest.raises(AdapterSaveError, match="journal"):
        load_output(folder, "default")
    assert outside.read_text() == "keep me"


def test_saved_folder_is_exactly_peft_layout_and_peft_loads_it(tmp_path):
    peft = pytest.importorskip("peft")
    folder = tmp_path / "peft"
    quiet(OLD.save_pretrained, folder, safe_serialization=False)
    quiet(NEW.save_pretrained, folder)  # over the other serialisation: the .bin files are gone
    assert set(tree(folder)) == expected_files(True)  # no lock file, no journal, no temp file
    for name in ADAPTERS:
        model = quiet(peft.PeftModel.from_pretrained, Tiny(), adapter_path(folder, name))
        with torch.no_grad():
            torch.testing.assert_close(model(X), NEW_OUT[name])  # PEFT computes in another order: not bitwise


def test_threads_saving_to_one_folder(tmp_path):
    """The lock also orders saves from threads of one process (each holds its own descriptor)."""
    folder = str(tmp_path / "threads")
    errors = []

    def save(model, safe):
        try:
            for _ in range(3):
                quiet(model.save_pretrained, folder, safe_serialization=safe)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=save, args=args) for args in ((OLD, True), (NEW, False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    labels = check_folder(folder, {"old": (OLD_OUT, True), "new": (NEW_OUT, False)})
    assert len(set(labels.values())) == 1


if sys.platform == "win32":  # pragma: no cover
    pytestmark = pytest.mark.skip("fork, flock and SIGKILL are POSIX")
