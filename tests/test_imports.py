"""The packages' import structure: no cycles, every module imports on its own, layers point one way.

The graph is read from the source with ``ast``: every ``import`` counts, the ones inside functions
too (a lazy import is still a dependency; only ``if TYPE_CHECKING:`` blocks are left out), and
importing ``a.b.c`` depends on the packages ``a.b`` and ``a`` as well (their ``__init__`` runs).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lra_kernels", "lra_ee")


def modules_of(root: Path, packages=PACKAGES) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package)}`` of every module under ``root/<package>``."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def imported_names(module: str, path: Path, is_pkg: bool) -> list[str]:
    """Every dotted name ``module`` imports (``from x import y`` gives ``x`` and ``x.y``), made absolute."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    pkg = module if is_pkg else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            names += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return names


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """``{module: modules it imports}`` within ``packages``, parent packages included (see the module docstring)."""
    mods = modules_of(root, packages)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: set() for m in mods}
    for m, (path, is_pkg) in mods.items():
        for name in imported_names(m, path, is_pkg):
            target = resolve(name)
            if target is None:
                continue
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in mods and dep != m and not m.startswith(dep + "."):  # not m's own ancestors
                    graph[m].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


# ---------------------------------------------------------------------- the detector itself
def _write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_the_detector_finds_lazy_relative_and_package_cycles(tmp_path):
    _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import x\n",
        "pkg/b.py": "def f():\n    from . import a  # lazy: still a cycle\n",
        "pkg/sub/__init__.py": "from ..c import y\n",
        "pkg/sub/d.py": "",
        "pkg/c.py": "import pkg.sub.d\n",  # importing pkg.sub.d runs pkg/sub/__init__.py
        "pkg/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .f import z\n",
        "pkg/f.py": "from .e import w\n",
    })
    found = cycles(import_graph(tmp_path, ("pkg",)))
    assert sorted(found) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub"]]


# ---------------------------------------------------------------------- the packages
def test_no_import_cycles():
    found = cycles(import_graph(ROOT))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh interpreter state of the packages (another module's import
    order never hides a missing import)."""
    mods = sorted(modules_of(ROOT))
    code = f"""
import importlib, json, sys, traceback
failed = {{}}
for name in {mods!r}:
    for m in [m for m in sys.modules if m.split(".")[0] in {PACKAGES!r}]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=3)
print(json.dumps(failed))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{k}:\n{v}" for k, v in failed.items())


def test_layers_point_one_way():
    graph = import_graph(ROOT)
    up = {m: sorted(d for d in deps if d.startswith("lra_ee"))
          for m, deps in graph.items() if m.startswith("lra_kernels")}
    assert not any(up.values()), f"lra_kernels must not import lra_ee: {({k: v for k, v in up.items() if v})}"


@pytest.mark.parametrize("module", ["lra_kernels/names.py", "lra_ee/errors.py", "lra_ee/results.py"])
def test_leaf_modules_import_nothing_of_the_packages(module):
    path = ROOT / module
    name = module[:-3].replace("/", ".")
    deps = [n for n in imported_names(name, path, False) if n.split(".")[0] in PACKAGES]
    assert not deps, f"{module} imports {deps}"


def test_names_imports_nothing_at_all():
    tree = ast.parse((ROOT / "lra_kernels" / "names.py").read_text())
    imports = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports == ["from __future__ import annotations"], imports


def test_lra_ee_uses_only_public_names_of_lra_kernels():
    private = []
    for name, (path, is_pkg) in modules_of(ROOT, ("lra_ee",)).items():
        for imported in imported_names(name, path, is_pkg):
            if imported.startswith("lra_kernels") and any(p.startswith("_") for p in imported.split(".")):
                private.append(f"{name}: {imported}")
        text = path.read_text()
        for attr in ("._require_classifier", "._exit_policy", "._run(", "._chunks(", "._act_dtype_request"):
            if attr in text:
                private.append(f"{name}: {attr}")
    assert not private, private
