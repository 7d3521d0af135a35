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
