"""Layering: ``lesion`` (library) <- ``train`` (command lines) and ``lesion_app`` <- ``app_pages`` <- ``streamlit_app.py``.

The library never imports Streamlit, chart packages, the command lines or the app; the command lines never
import the app; the app's support code never imports the pages. Subpackages (``lesion.ood``, ``lesion.data``)
are walked like the flat modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def imported_modules(path: Path, skip_main_guard: bool = False) -> set[str]:
    """Top-level names of every module a file imports (at any depth of the file).

    ``skip_main_guard`` leaves out what an ``if __name__ == "__main__":`` block imports.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if skip_main_guard:
        tree.body = [
            node for node in tree.body if not (isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))
        ]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def library_files() -> list[Path]:
    """Every module of the library, in subpackages too."""
    return sorted((REPO / "lesion").rglob("*.py"))


def module_name(path: Path) -> str:
    """``lesion/ood/layers.py`` -> ``lesion.ood.layers``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_library_files_include_the_subpackages() -> None:
    names = {module_name(p) for p in library_files()}
    assert {"lesion.ood", "lesion.ood.registry", "lesion.data", "lesion.data.split", "lesion.verdict"} <= names


def test_no_library_module_imports_streamlit() -> None:
    offenders = [str(p) for p in library_files() if "streamlit" in imported_modules(p)]
    assert offenders == []
    # The app's charts live in lesion_app/charts.py, not in the library.
    assert [str(p) for p in library_files() if "altair" in imported_modules(p)] == []
    assert "altair" in imported_modules(REPO / "lesion_app" / "charts.py")


def test_each_layer_imports_only_the_layers_below_it() -> None:
    above = {
        "lesion": {"train", "lesion_app", "app_pages", "streamlit_app", "streamlit", "bench", "tests"},
        "train": {"lesion_app", "app_pages", "streamlit_app", "streamlit", "bench", "tests"},
        "lesion_app": {"app_pages", "streamlit_app", "train", "bench", "tests"},
        "app_pages": {"streamlit_app", "bench", "tests"},
    }
    offenders = []
    for layer, forbidden in above.items():
        for path in sorted((REPO / layer).rglob("*.py")):
            imports = imported_modules(path)
            if path == REPO / "lesion" / "predict.py":
                # Its __main__ guard runs the command line of train.predict (python -m lesion.predict).
                imports = imported_modules(path, skip_main_guard=True)
            offenders += [f"{path.relative_to(REPO)} imports {name}" for name in sorted(imports & forbidden)]
    assert offenders == []


def test_importing_every_library_module_leaves_streamlit_unloaded() -> None:
    modules = sorted(module_name(p) for p in library_files())
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
    """lesion module -> the lesion modules it imports anywhere in the file (lazy imports included).

    Modules are named below ``lesion`` (``predict``, ``ood``, ``ood.layers``); an import names the
    longest known module it reaches (``from lesion.ood.base import X`` -> ``ood.base``).
    """
    modules = {
        module_name(p).removeprefix("lesion."): p for p in library_files() if p != REPO / "lesion" / "__init__.py"
    }
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
                parts = target.split(".")[1:] if target.startswith("lesion.") else []
                known = next(
                    (".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules), None
                )
                if known and known != name:
                    edges.add(known)
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
    assert {"training", "finalize", "loaders", "checkpoint", "ood", "ood.layers"} <= set(
        graph
    )  # the parser saw the modules
    assert "finalize" in graph["training"] and "loaders" in graph["finalize"]  # ...and their imports
    assert "ood.packing" in graph["ood.layers"] and "ood" in graph["predict"]  # ...in subpackages too
    assert find_cycle(graph) == []


def test_the_apps_helpers_run_without_streamlit() -> None:
    # Only the pages' guard touches Streamlit and only charts.py draws: the rest is testable without an app.
    streamlit = [p.name for p in sorted((REPO / "lesion_app").glob("*.py")) if "streamlit" in imported_modules(p)]
    altair = [p.name for p in sorted((REPO / "lesion_app").glob("*.py")) if "altair" in imported_modules(p)]
    assert streamlit == ["guards.py"] and altair == ["charts.py"]
