"""``pip install .`` gives a working library and command lines, away from the checkout.

``installed_package`` (tests/conftest.py) installs this checkout with pip into a folder outside it;
``trained_run`` already trains with that copy's ``python -m train`` from another folder. Here: the
copy imports from where it was installed, finds its recipes as package data, its console scripts
answer, a missing demo set is explained, and the suite itself runs from any folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lesion.data
import lesion.data.readers
from lesion.errors import DataError
from tests.conftest import REPO, run_installed


def test_the_installed_copy_imports_and_reads_recipes_from_where_it_was_installed(
    installed_package: Path, tmp_path: Path
) -> None:
    code = (
        "import json, lesion, train\n"
        "from lesion.config import build_config, recipes_dir\n"
        "print(json.dumps([lesion.__file__, train.__file__, str(recipes_dir()), build_config('demo').arch]))"
    )
    result = run_installed(["-c", code], installed_package, tmp_path, module="")
    assert result.returncode == 0, result.stderr
    lesion_file, train_file, recipes, arch = json.loads(result.stdout)
    for path in (lesion_file, train_file, recipes):
        assert Path(path).is_relative_to(installed_package), path  # not the checkout
    assert sorted(p.name for p in Path(recipes).glob("*.toml")) == [
        "bundled.toml",
        "demo.toml",
        "notebook.toml",
        "recommended.toml",
        "scratch.toml",
    ]
    assert arch == "efficientnet_lite0"


def test_console_scripts_answer_help(installed_package: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(installed_package)}
    scripts = {"lesion-train": "--image-size", "lesion-evaluate": "--checkpoint", "lesion-predict": "--heatmaps"}
    running = {
        name: subprocess.Popen(
            [sys.executable, str(installed_package / "bin" / name), "--help"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in scripts
    }
    for name, flag in scripts.items():
        out, err = running[name].communicate(timeout=300)
        assert running[name].returncode == 0, f"{name}: {err}"
        assert flag in out, name


def test_the_installed_training_run_is_complete(trained_run: Path) -> None:
    # trained_run came from the installed copy, started outside the checkout (tests/conftest.py).
    assert {"model.pt", "metrics.json", "model_card.md", "split.csv", "config.json"} <= {
        p.name for p in trained_run.iterdir()
    }


def test_a_missing_demo_set_says_to_pass_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What an installed copy sees: no assets/demo beside the package, none in the working folder.
    monkeypatch.setattr(lesion.data.readers, "PROJECT_ROOT", tmp_path / "site-packages")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="not with the installed package. Pass --data DIR"):
        lesion.data.locate_data("assets/demo")
    with pytest.raises(DataError, match="dataset folder not found: elsewhere. Pass --data DIR"):
        lesion.data.locate_data("elsewhere")
    (tmp_path / "elsewhere").mkdir()
    assert lesion.data.locate_data("elsewhere") == "elsewhere"


def test_the_suite_runs_from_another_folder(tmp_path: Path) -> None:
    # Test modules import tests.conftest / tests.helpers_model; pyproject's pythonpath makes that work
    # when pytest starts outside the repository root (collection imports every module listed).
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    modules = [str(REPO / "tests" / "test_transforms.py")]  # imports tests.conftest, like most modules
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *modules],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]  # 2 on a collection error
    assert "test_transforms.py::test_training_augmentation_is_random_but_seeded" in result.stdout
