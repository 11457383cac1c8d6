"""The package's layering, checked on the source.

- Every module imports on its own in a fresh interpreter (an import cycle or a dependence on
  import order fails here, whichever module a user happens to import first), and no modules import
  each other around a loop, counting imports inside functions (the usual way to hide a cycle).
- ``kernels/`` (installed as ``peftfast.kernels``) never imports ``peftfast``, and
  ``peftfast/utils/`` never imports ``peftfast/tuners``, at module level or inside functions.
- No file of the project reaches another module's private names: no ``from x import _name`` and no
  ``x._name`` where ``x`` is a project module. PEFT's private names that user code imports from
  ``peft`` (``_get_submodules``) are kept as public aliases and listed in PEFT_PRIVATE_ALIASES.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the dotted package it is installed as.
PACKAGES = {"peftfast": "peftfast", "kernels": "peftfast.kernels", "tests": "tests", "bench": "bench"}

# PEFT's private names that users import from peft (e.g. ``from peft.utils import _get_submodules``): peftfast
# keeps them importable as aliases of the public names, so they may cross files.
PEFT_PRIVATE_ALIASES = {"_get_submodules"}

# Private names reached across files today by code this layer does not own (adapter layers, kernels, tools,
# bench and their tests), as (file, module, name). Each entry is a file to fix by giving the name a public home;
# the list must only shrink, and any new crossing fails the test.
KNOWN_PRIVATE_CROSSINGS: set[tuple[str, str, str]] = set()  # none left: keep it that way


@dataclass(frozen=True)
class Source:
    path: Path
    module: str  # dotted name as installed
    is_package: bool

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


def sources(*folders: str) -> list[Source]:
    out = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if ".venv" in path.parts or "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            out.append(Source(path, ".".join([PACKAGES[folder], *parts]), is_package))
    return out


PROJECT_MODULES = {s.module: s for s in sources(*PACKAGES)}


def absolute(source: Source, node: ast.ImportFrom) -> str:
    """The absolute module named by ``from <module> import ...`` in ``source``."""
    if not node.level:
        return node.module or ""
    base = source.module.split(".")
    if not source.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(source: Source) -> list[tuple[int, str]]:
    """Every module ``source`` imports, anywhere in the file (function bodies included), as (line, dotted name).
    ``from pkg import name`` counts as importing ``pkg.name`` too, since ``name`` may be a submodule."""
    tree = ast.parse(source.path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = absolute(source, node)
            out.append((node.lineno, module))
            out.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names)
    return out


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_crossings(source: Source) -> list[tuple[int, str, str]]:
    """(line, project module, private name) for each private name ``source`` takes from another project module."""
    tree = ast.parse(source.path.read_text(encoding="utf-8"))
    bound: dict[str, str] = {}  # local name -> project module it stands for
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in PROJECT_MODULES:
                    bound[alias.asname] = alias.name
                elif not alias.asname:
                    top = alias.name.split(".")[0]
                    if top in PROJECT_MODULES:
                        bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            module = absolute(source, node)
            if module not in PROJECT_MODULES:
                continue
            for alias in node.names:
                full = f"{module}.{alias.name}"
                if full in PROJECT_MODULES:
                    bound[alias.asname or alias.name] = full
                if is_private(alias.name) and module != source.module and alias.name not in PEFT_PRIVATE_ALIASES:
                    out.append((node.lineno, module, alias.name))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and is_private(node.attr)) or node.attr in PEFT_PRIVATE_ALIASES:
            continue
        chain, value = [], node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in bound:
            continue
        module = ".".join([bound[value.id], *reversed(chain)])
        if module in PROJECT_MODULES and module != source.module:
            out.append((node.lineno, module, node.attr))
    return out


# ------------------------------------------------------------------------------------------------------
# each module imports alone
# ------------------------------------------------------------------------------------------------------
# ``peftfast.__main__`` runs the CLI when imported; ``peftfast.cli`` is the module it runs and is checked instead.
IMPORTABLE = sorted(s.module for s in sources("peftfast", "kernels") if not s.module.endswith(".__main__"))

# One interpreter imports the third-party libraries once (torch, triton, transformers: seconds each), then forks a
# child per module; each child starts with no peftfast module loaded and imports just that one.
FORK_SERVER = r"""
import os, sys, traceback
import torch, triton, transformers, safetensors, huggingface_hub  # noqa: F401
assert not any(m == "peftfast" or m.startswith("peftfast.") for m in sys.modules)
failures = []
for module in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 0
        try:
            __import__(module)
        except BaseException:
            os.write(write, traceback.format_exc()[-2000:].encode())
            code = 1
        os.close(write)
        os._exit(code)
    os.close(write)
    err = b""
    while chunk := os.read(read, 65536):
        err += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failures.append(f"{module}:\n{err.decode(errors='replace')}")
print("\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    assert "peftfast.kernels.lora" in IMPORTABLE and "peftfast.utils.registry" in IMPORTABLE
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", FORK_SERVER, *IMPORTABLE], cwd=ROOT / "tests", env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, "modules that do not import on their own:\n" + done.stdout + done.stderr[-3000:]


def test_the_import_check_catches_a_module_that_fails_alone(tmp_path):
    """A cycle that breaks only when entered from one side: importing cyclic_a first fails, cyclic_b first works
    (so each module really starts from a fresh interpreter state)."""
    (tmp_path / "cyclic_a.py").write_text("import cyclic_b\nX = 1\n")
    (tmp_path / "cyclic_b.py").write_text("from cyclic_a import X\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", FORK_SERVER, "cyclic_b", "cyclic_a"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stdout.startswith("cyclic_a:") and "\ncyclic_b:" not in done.stdout


# ------------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------------
def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("source", sources("kernels"), ids=lambda s: s.rel)
def test_kernels_never_import_peftfast(source):
    """Relative imports between kernel files are fine; any absolute ``peftfast`` import (even of
    ``peftfast.kernels``, which would run the package's __init__) or a relative one leaving kernels/ is not."""
    tree = ast.parse(source.path.read_text(encoding="utf-8"))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [(node.lineno, a.name) for a in node.names if under(a.name, "peftfast")]
        elif isinstance(node, ast.ImportFrom):
            module = absolute(source, node)
            if (not node.level and under(module, "peftfast")) or (node.level and not under(module, "peftfast.kernels")):
                bad.append((node.lineno, module))
    assert not bad, f"{source.rel} imports peftfast (kernels sit below it): {bad}"


@pytest.mark.parametrize("source", [s for s in sources("peftfast") if under(s.module, "peftfast.utils")],
                         ids=lambda s: s.rel)
def test_utils_never_import_tuners(source):
    bad = [(line, m) for line, m in imported_modules(source) if under(m, "peftfast.tuners")]
    assert not bad, f"{source.rel} imports peftfast.tuners (utils sit below the tuners): {bad}"


def import_graph(folders: tuple[str, ...] = ("peftfast", "kernels")) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (a lazy import inside a function closes a
    cycle as surely as one at the top). ``from pkg import name`` is an edge to ``pkg.name`` when that is a module,
    else to ``pkg``. The implicit import of a module's parent packages is not an edge."""
    graph: dict[str, set[str]] = {}
    for source in sources(*folders):
        edges: set[str] = set()
        for node in ast.walk(ast.parse(source.path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in PROJECT_MODULES)
            elif isinstance(node, ast.ImportFrom):
                module = absolute(source, node)
                for alias in node.names:
                    full = f"{module}.{alias.name}"
                    if full in PROJECT_MODULES:
                        edges.add(full)
                    elif module in PROJECT_MODULES:
                        edges.add(module)
        graph[source.module] = edges - {source.module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_even_through_imports_inside_functions():
    found = cycles(import_graph())
    assert not found, f"import cycles (modules importing each other, directly or around a loop): {found}"
    for module in ("peftfast.config", "peftfast.peft_model"):
        assert "peftfast.mapping" not in import_graph()[module], f"{module} imports mapping"


def test_the_cycle_check_finds_a_lazy_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_layer_checks_see_imports_inside_functions(tmp_path):
    probe = Source(tmp_path / "probe.py", "peftfast.utils.probe", False)
    probe.path.write_text("def f():\n    from ..tuners.tuners_utils import BaseTuner\n    import peftfast.tuners.lora\n")
    assert [m for _, m in imported_modules(probe)] == [
        "peftfast.tuners.tuners_utils", "peftfast.tuners.tuners_utils.BaseTuner", "peftfast.tuners.lora"]


# ------------------------------------------------------------------------------------------------------
# private names
# ------------------------------------------------------------------------------------------------------
def test_no_private_name_crosses_files():
    found = {(s.rel, module, name) for s in PROJECT_MODULES.values() for _, module, name in private_crossings(s)}
    new = sorted(found - KNOWN_PRIVATE_CROSSINGS)
    assert not new, ("private names reached across files (give them a public name in a shared module): "
                     + "; ".join(f"{f}: {m}.{n}" for f, m, n in new))
    fixed = sorted(KNOWN_PRIVATE_CROSSINGS - found)
    assert not fixed, "no longer crossing, remove from KNOWN_PRIVATE_CROSSINGS: " + "; ".join(map(str, fixed))


def test_the_private_name_check_sees_both_spellings(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("import peftfast.utils.other as o\nfrom peftfast.config import _jsonable\n"
                    "from peftfast.utils import _get_submodules\nx = o._secret\ny = o.public\n")
    probe = Source(path, "tests.probe", False)
    assert sorted((m, n) for _, m, n in private_crossings(probe)) == [
        ("peftfast.config", "_jsonable"), ("peftfast.utils.other", "_secret")]


