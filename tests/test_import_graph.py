"""The package's shape stays as issue 14 left it: no import cycle (lazy imports inside
functions count too), the on-device runtime imports nothing from the build side, and no
module grows past 400 lines. Read from the source with `ast`, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import vlm_export

ROOT = Path(vlm_export.__file__).parent
BUILD_SIDE = ("vlm_export.families", "vlm_export.export", "vlm_export.quantize", "vlm_export.engines",
              "vlm_export.build", "vlm_export.cli")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str:
    while name and name not in mods:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module → vlm_export modules it imports anywhere in its body (a package's own
    __init__ only when a name, not a submodule, is taken from it)."""
    edges = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                subs = {f"{base}.{a.name}" for a in node.names}
                targets |= subs if subs <= set(mods) else subs | {base}
        edges[name] = {r for t in targets if t.startswith("vlm_export") and (r := _resolve(t, mods)) and r != name}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle() -> None:
    assert _cycles(_edges(_modules())) == []


def test_cycle_finder_finds_a_cycle() -> None:
    """The control: the finder is not blind."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_runtime_imports_nothing_from_the_build_side() -> None:
    edges = _edges(_modules())
    leaks = sorted((m, t) for m, targets in edges.items() if m.startswith("vlm_export.runtime")
                   for t in targets if t.startswith(BUILD_SIDE))
    assert leaks == []
    assert "vlm_export.engines.plan" in edges["vlm_export.cli.engine"]  # the edge finder sees lazy imports


def test_no_module_over_400_lines() -> None:
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in _modules().items()}
    assert {n: s for n, s in sizes.items() if s > 400} == {}
