"""Root of the checkout: keep it off the import path for the whole pytest run.

``python -m pytest`` (and ``python -c``/``python -m`` generally) puts the current directory first on
``sys.path``. From the checkout root that makes the source folder ``kernels/`` importable as a top-level
``kernels`` module, the name of the kernel-hub package that transformers and bitsandbytes probe: transformers
then imports a second copy of ``peftfast.kernels`` under that name. The package itself is imported through
its install (``pip install -e .`` maps ``kernels/`` to ``peftfast.kernels``), so the checkout root is not
needed on the path; this file removes it before any test module is imported.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_root(entry: str) -> bool:
    try:
        return os.path.abspath(entry or os.curdir) == _ROOT
    except (OSError, ValueError):
        return False


sys.path[:] = [p for p in sys.path if not _is_root(p)]
for _name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
    # imported from the checkout before this file ran (a plugin probing the name): drop the stray copy
    # (only the checkout's own kernels/ folder: the kernel-hub package may be installed in a venv inside the checkout)
    if os.path.abspath(getattr(sys.modules[_name], "__file__", None) or os.sep).startswith(
            os.path.join(_ROOT, "kernels") + os.sep):
        del sys.modules[_name]
