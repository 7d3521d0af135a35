"""Layering: the library never imports Streamlit; only streamlit_app.py and app_pages/ do."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module a file imports (at any depth of the file)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_library_module_imports_streamlit() -> None:
    offenders = [p.name for p in sorted((REPO / "lesion").glob("*.py")) if "streamlit" in imported_modules(p)]
    assert offenders == []
    # The app's charts live in lesion_app/charts.py, not in the library.
    assert [p.name for p in sorted((REPO / "lesion").glob("*.py")) if "altair" in imported_modules(p)] == []
    assert "altair" in imported_modules(REPO / "lesion_app" / "charts.py")


def test_importing_every_library_module_leaves_streamlit_unloaded() -> None:
    modules = sorted(f"lesion.{p.stem}" for p in (REPO / "lesion").glob("*.py") if p.stem != "__init__")
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('streamlit' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_no_legacy_pages_folder_beside_the_app() -> None:
    # A pages/ folder beside streamlit_app.py switches Streamlit to its legacy multipage mode on a
    # server's first run, which skips the entry script (no sidebar, no model): st.navigation only.
    assert not (REPO / "pages").exists()


def test_the_app_layer_does_import_streamlit() -> None:
    # The check above would pass vacuously if the parser missed imports: it must see the app's.
    for path in [REPO / "streamlit_app.py", *sorted((REPO / "app_pages").glob("*.py"))]:
        assert "streamlit" in imported_modules(path), path


def library_import_graph() -> dict[str, set[str]]:
    """lesion module -> the lesion modules it imports anywhere in the file (lazy imports included)."""
    modules = {p.stem: p for p in (REPO / "lesion").glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # "from lesion import data" names a module; "from lesion.x import y" names lesion.x.
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                if parts[0] == "lesion" and len(parts) > 1 and parts[1] in modules and parts[1] != name:
                    edges.add(parts[1])
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules (first repeated last), or [] when the graph is acyclic."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_sees_a_cycle_through_a_lazy_import() -> None:
    # The detector itself: a two-module cycle and a longer one are found, a chain is not.
    assert find_cycle({"training": {"finalize"}, "finalize": {"training"}}) == ["finalize", "training", "finalize"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_library_import_graph_has_no_cycle() -> None:
    graph = library_import_graph()
    assert {"training", "finalize", "loaders", "checkpoint"} <= set(graph)  # the parser saw the modules
    assert "finalize" in graph["training"] and "loaders" in graph["finalize"]  # ...and their imports
    assert find_cycle(graph) == []
