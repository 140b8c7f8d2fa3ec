"""The shape of the shipped code: no import cycle among its modules, no runtime module over 300 lines."""
import ast
import os

import pytest

from tests.conftest import REPO

PACKAGES = {"fastdllm_rt": "fastdllm_rt", "evalbridge": "evalbridge", "kernels": "fastdllm_kernels"}
MAX_LINES = 300


def _modules():
    """{module name: path} for every .py file of the shipped packages (kernels/ installs as fastdllm_kernels)."""
    out = {}
    for folder, name in PACKAGES.items():
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, f), os.path.join(REPO, folder))[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    out[".".join([name, *rel])] = os.path.join(root, f)
    return out


def _imports(module: str, path: str, known) -> set:
    """Modules of ``known`` that ``module`` imports anywhere in its file (also inside functions)."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_cycles() -> list[list[str]]:
    """Every strongly connected group of more than one module in the import graph (Tarjan's algorithm)."""
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "fastdllm_rt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "c.py").write_text("import fastdllm_rt.a\n")
    monkeypatch.setitem(globals(), "REPO", str(tmp_path))
    assert import_cycles() == [["fastdllm_rt.a", "fastdllm_rt.b"]]


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import cycles (a module that imports, directly or not, one that imports it): " + \
        "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("module, path", sorted(
    (m, p) for m, p in _modules().items() if m.startswith("fastdllm_rt")))
def test_runtime_modules_stay_short(module, path):
    with open(path) as f:
        n = sum(1 for _ in f)
    assert n <= MAX_LINES, f"{path} has {n} lines; split it by what it does (most modules stay under {MAX_LINES})"
