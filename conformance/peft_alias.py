"""pytest plugin: serve ``import peft`` / ``import peft.X`` from peftfast.

Load with ``-p peft_alias`` (``conformance/`` on ``sys.path``). It installs a ``sys.meta_path``
finder before any test module is imported:

* ``peft``      -> a view of ``peftfast``
* ``peft.X.Y``  -> a view of ``peftfast.X.Y``

A view is a module object whose attribute reads, writes and deletes go to the peftfast module
(so ``mock.patch("peft.tuners.tuners_utils.f", ...)`` patches peftfast's module), while child
views stay on the view (the import system sets ``peft.tuners`` = view, which must not overwrite
``peftfast.tuners``). Classes and functions are peftfast's own objects.

Where peftfast lacks a submodule or a name that PEFT's tests import, two modes:

* ``PEFT_ALIAS_MODE=strict``: the import fails as it would for a user (``ModuleNotFoundError`` /
  ``ImportError``); a test file that imports such a name at module level does not collect.
* ``PEFT_ALIAS_MODE=stub`` (default): the missing module or name becomes a placeholder; calling
  it gives a placeholder value, and any use of that value (attribute, call) raises ``PeftfastMissing``
  naming the missing object, so collection proceeds and each test that needs it fails with a
  countable cause. Every missing name is recorded (``missing_names()``).

peftfast itself is not modified.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

SOURCE = "peft"
TARGET = "peftfast"
MODE = os.environ.get("PEFT_ALIAS_MODE", "stub")

_MISSING: set[str] = set()


def missing_names() -> list[str]:
    return sorted(_MISSING)


class PeftfastMissing(NotImplementedError):
    """A PEFT name that peftfast does not provide was used."""


class _MissingValue:
    """What calling a missing name returns (so module-level ``KasaConfig()`` collects); any use of it raises."""

    def __init__(self, qualname):
        object.__setattr__(self, "_peft_name", qualname)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise PeftfastMissing(f"peftfast lacks {object.__getattribute__(self, '_peft_name')}")

    def __call__(self, *a, **k):
        raise PeftfastMissing(f"peftfast lacks {object.__getattribute__(self, '_peft_name')}")

    def __repr__(self):
        return f"<missing in peftfast: {object.__getattribute__(self, '_peft_name')}()>"


class _MissingMeta(type):
    def __call__(cls, *args, **kwargs):
        return _MissingValue(cls._peft_name)

    def __getattr__(cls, name):
        if name.startswith("_"):  # probes such as mock's _mock_name, dunders
            raise AttributeError(name)
        return _missing(f"{cls._peft_name}.{name}")

    def __repr__(cls):
        return f"<missing in peftfast: {cls._peft_name}>"

    def __instancecheck__(cls, obj):
        return False

    def __subclasscheck__(cls, sub):
        return sub is cls


def _missing(qualname: str):
    _MISSING.add(qualname)
    short = qualname.rsplit(".", 1)[-1]
    return _MissingMeta(short, (), {"_peft_name": qualname, "__module__": qualname.rsplit(".", 1)[0]})


def _infer_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# Test-support helpers that PEFT's test modules call at import time (class bodies, parametrize
# lists). Without them no test of the file collects, so where peftfast lacks them they are
# served here; each use is recorded under "shimmed" in the report. They detect the environment
# only and carry no adapter behaviour.
SHIMS = {"peft.utils.infer_device": _infer_device}
SHIM_MODULES = ("peft.import_utils",)  # served from real peft's file, loaded standalone
_SHIMMED: set[str] = set()


def shimmed_names() -> list[str]:
    return sorted(_SHIMMED)


def _peft_name(name: str) -> str:
    return SOURCE + name[len(TARGET):]


class _AliasModule(types.ModuleType):
    """A view of a peftfast module under its peft name."""

    def __init__(self, name: str, target: types.ModuleType | None):
        super().__init__(name)
        object.__setattr__(self, "_alias_target", target)
        if target is not None:
            for attr in ("__file__", "__doc__"):
                if hasattr(target, attr):
                    object.__setattr__(self, attr, getattr(target, attr))
            if hasattr(target, "__path__"):
                object.__setattr__(self, "__path__", [])  # a package: submodules go through the finder

    def __getattr__(self, name):
        target = object.__getattribute__(self, "_alias_target")
        if name.startswith("__") and name.endswith("__"):
            if target is not None and name not in ("__path__", "__spec__", "__loader__"):
                return getattr(target, name)
            raise AttributeError(name)
        if target is not None:
            try:
                return getattr(target, name)
            except AttributeError:
                pass
            # a submodule not imported yet: import it through the alias
            full = f"{self.__name__}.{name}"
            if "__path__" in self.__dict__ and importlib.util.find_spec(TARGET + full[len(SOURCE):]) is not None:
                return importlib.import_module(full)
        qual = f"{self.__name__}.{name}"
        if qual in SHIMS:
            _SHIMMED.add(qual)
            object.__setattr__(self, name, SHIMS[qual])
            return SHIMS[qual]
        if MODE == "strict":
            raise AttributeError(f"module {self.__name__!r} (peftfast) has no attribute {name!r}")
        value = _missing(qual)
        object.__setattr__(self, name, value)
        return value

    def __setattr__(self, name, value):
        target = object.__getattribute__(self, "_alias_target")
        if isinstance(value, _AliasModule) or target is None or name.startswith("__"):
            object.__setattr__(self, name, value)
        else:
            setattr(target, name, value)

    def __delattr__(self, name):
        if name in self.__dict__:
            object.__delattr__(self, name)
        else:
            target = object.__getattribute__(self, "_alias_target")
            delattr(target, name)

    def __dir__(self):
        target = object.__getattribute__(self, "_alias_target")
        return sorted(set(dir(target) if target is not None else []) | set(self.__dict__))


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target_name: str | None):
        self.target_name = target_name

    def create_module(self, spec):
        target = importlib.import_module(self.target_name) if self.target_name else None
        return _AliasModule(spec.name, target)

    def exec_module(self, module):
        pass


def _real_peft_file_spec(fullname):
    """Spec that loads real peft's file for ``fullname`` as a standalone module (no ``peft`` import)."""
    import site

    rel = fullname.split(".")[1:]
    for base in site.getsitepackages():
        path = os.path.join(base, "peft", *rel) + ".py"
        if os.path.exists(path):
            return importlib.util.spec_from_file_location(fullname, path)
    return None


class PeftAliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != SOURCE and not fullname.startswith(SOURCE + "."):
            return None
        real = TARGET + fullname[len(SOURCE):]
        try:
            found = importlib.util.find_spec(real)
        except ModuleNotFoundError:
            found = None
        if found is None and fullname in SHIM_MODULES:
            real_spec = _real_peft_file_spec(fullname)
            if real_spec is not None:
                _SHIMMED.add(fullname + " (module)")
                return real_spec
        if found is None:
            if MODE == "strict":
                return None  # -> ModuleNotFoundError, as for a user
            _MISSING.add(fullname + " (module)")
            spec = importlib.machinery.ModuleSpec(fullname, _AliasLoader(None), is_package=True)
            return spec
        is_pkg = found.submodule_search_locations is not None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(real), is_package=is_pkg)


def install() -> None:
    for name in [m for m in sys.modules if m == SOURCE or m.startswith(SOURCE + ".")]:
        del sys.modules[name]  # a real peft imported earlier (e.g. by a plugin) must not leak in
    if not any(isinstance(f, PeftAliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, PeftAliasFinder())


install()  # at plugin import time, before any conftest or test module is imported


def pytest_report_header(config):
    return f"peft alias: peft -> {TARGET} (mode={MODE})"
