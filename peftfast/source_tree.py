"""peftfast imported straight from a clone of its repository (standard library only; runs first in ``__init__``).

``python -c``/``python -m`` put the current directory first on ``sys.path``, so from the clone root ``import
peftfast`` loads the source folder rather than the installed package. Two things then differ from an install:

- ``peftfast.kernels`` lives in the sibling folder ``kernels/`` (pyproject's ``package-dir`` maps it only in an
  install): without a mapping, ``import peftfast.kernels`` fails after a non-editable install.
- that folder is importable as a top-level module ``kernels``, the name of the Hugging Face kernel-hub package that
  bitsandbytes and transformers probe (and import) to pick kernels: they would get a second copy of our kernels.

``attach`` maps the first and hides the second, only when the folder above this package is a peftfast checkout (a
``pyproject.toml`` mapping ``peftfast.kernels`` to ``kernels``): in an install the folder above is site-packages,
where a top-level ``kernels`` is the real hub package and stays visible.
"""
from __future__ import annotations

import importlib.util
import os
import sys

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(PACKAGE_DIR)
KERNELS_DIR = os.path.join(ROOT, "kernels")


def is_checkout(root: str = ROOT) -> bool:
    try:
        with open(os.path.join(root, "pyproject.toml"), encoding="utf-8") as f:
            mapped = '"peftfast.kernels" = "kernels"' in f.read()
    except OSError:
        return False
    return mapped and os.path.isfile(os.path.join(root, "kernels", "__init__.py"))


class WithoutTopLevelKernels:
    """The path-entry finder of the checkout root, less the top-level name ``kernels``: every other module there
    (``tests``, ``bench``, scripts) stays importable."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, fullname, target=None):
        return None if fullname == "kernels" else self.finder.find_spec(fullname, target)

    def invalidate_caches(self):
        self.finder.invalidate_caches()


def path_finder(entry: str):
    """The finder ``importlib.machinery.PathFinder`` would use for ``entry`` (built by the path hooks if needed)."""
    finder = sys.path_importer_cache.get(entry)
    if finder is None:
        for hook in sys.path_hooks:
            try:
                finder = hook(entry)
                break
            except ImportError:
                continue
    return finder


def hide_top_level_kernels() -> None:
    for entry in list(sys.path):
        # PathFinder looks an empty entry up under the current directory
        key = entry or os.getcwd()
        try:
            if os.path.abspath(key) != ROOT:
                continue
        except (OSError, ValueError):
            continue
        finder = path_finder(key)
        if finder is not None and not isinstance(finder, WithoutTopLevelKernels):
            sys.path_importer_cache[key] = WithoutTopLevelKernels(finder)
    stray = sys.modules.get("kernels")
    if stray is not None and os.path.abspath(getattr(stray, "__file__", None) or os.sep).startswith(KERNELS_DIR):
        # imported from the checkout before peftfast was (a probe by another library): drop that copy
        for name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
            del sys.modules[name]


def map_kernels(package: str) -> None:
    """Import ``<package>.kernels`` from ``ROOT/kernels`` when the install does not provide it."""
    name = f"{package}.kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return  # an editable install maps it already
    spec = importlib.util.spec_from_file_location(name, os.path.join(KERNELS_DIR, "__init__.py"),
                                                  submodule_search_locations=[KERNELS_DIR])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    setattr(sys.modules[package], "kernels", module)


def attach(package: str) -> None:
    if not is_checkout():
        return
    hide_top_level_kernels()
    map_kernels(package)
