"""Shared fixtures: the repository's paths, and one small model trained by the real CLI.

``trained_run`` runs ``python -m train`` as a subprocess once per test session (resnet18, 64 px,
120 demo images, 2 epochs, no pretrained weights: about 20 s on 2 cores) and yields the run folder.
Tests that need a complete model use it instead of building checkpoints by hand.
"""

from __future__ import annotations

import os
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
    "--recipe=demo",
    "--arch=resnet18",
    "--weights=none",
    "--image_size=64",
    "--epochs=2",
    "--batch_size=16",
    "--max_images=120",
    "--num_workers=0",
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


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decoded-image cache for the whole session (tests never write to ~/.cache)."""
    path = tmp_path_factory.mktemp("image-cache")
    os.environ["LESION_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A complete run folder (model.pt and all) produced by the real training CLI."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    result = run_cli([f"--data={DEMO}", f"--out={run_dir}", f"--cache_dir={cache_dir}", *TINY_TRAINING])
    assert result.returncode == 0, f"training failed:\n{result.stdout}\n{result.stderr}"
    assert (run_dir / "model.pt").is_file()
    return run_dir


@pytest.fixture(scope="session")
def trained_model(trained_run: Path) -> Path:
    """The checkpoint of ``trained_run``."""
    return trained_run / "model.pt"
