"""lesion.plots: every figure is a real, non-empty PNG, even for degenerate splits."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from lesion.plots import PLOT_NAMES, plot_calibration, plot_confusion, plot_curves, plot_pr, plot_roc, save_all_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("L"))
    assert width > 200 and height > 200
    assert pixels.std() > 5  # something was drawn, not a blank canvas


def _events() -> list[dict]:
    events = [{"event": "start", "config": {}}]
    for epoch in range(1, 4):
        events.append({"event": "step", "epoch": epoch, "loss": 0.5})
        events.append(
            {
                "event": "epoch",
                "epoch": epoch,
                "train_loss": 1 / epoch,
                "val_loss": 1.1 / epoch,
                "val_roc_auc": 0.6 + epoch / 10,
            }
        )
    events.append({"event": "epoch", "epoch": 3, "train_loss": 0.3, "val_loss": 0.35, "val_roc_auc": None})  # resumed
    return events


def test_save_all_plots_writes_five_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    p = np.clip(0.35 * y + 0.65 * rng.random(120), 0, 1)
    confusion = {"tn": 40, "fp": 20, "fn": 10, "tp": 50}
    paths = save_all_plots(tmp_path / "run", y, p, p**1.2, 0.5, confusion, _events(), split="test")
    assert [p.name for p in paths] == [f"{name}.png" for name in PLOT_NAMES]
    assert all(p.parent == tmp_path / "run" / "plots" for p in paths)
    for path in paths:
        _assert_png(path)
    assert not list((tmp_path / "run" / "plots").glob("*.tmp"))


def test_degenerate_inputs_still_draw(tmp_path: Path) -> None:
    y = np.zeros(10, dtype=int)
    p = np.linspace(0, 1, 10)
    for path in (
        plot_roc(y, p, tmp_path / "roc.png", threshold=0.5, split="val"),
        plot_pr(y, p, tmp_path / "pr.png", split="val"),
        plot_calibration(y, p, p, tmp_path / "cal.png", split="val"),
        plot_confusion({"tn": 0, "fp": 0, "fn": 0, "tp": 0}, tmp_path / "cm.png"),
        plot_curves([], tmp_path / "curves.png"),
    ):
        _assert_png(path)


def test_no_pyplot_state_leaks(tmp_path: Path) -> None:
    plot_roc([0, 1, 0, 1], [0.1, 0.9, 0.4, 0.6], tmp_path / "roc.png")
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or not pyplot.get_fignums()
