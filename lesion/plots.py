"""Figures of a run, as PNG files: ROC, precision-recall, calibration, confusion matrices, curves.

Each function draws on its own :class:`matplotlib.figure.Figure` (Agg canvas, never pyplot),
so nothing leaks between calls or threads, and returns the path it wrote. Titles name the
split the numbers come from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from lesion.files import PLOTS_DIR, atomic_write
from lesion.labels import CLASS_NAMES
from lesion.metrics import expected_calibration_error, reliability_bins
from lesion.verdict import called_malignant

PLOT_NAMES = ("roc", "pr", "calibration", "confusion", "curves")
_DPI = 110


def _figure(width: float = 5.0, height: float = 4.5) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    # Written beside the target and renamed, so the app never shows half a PNG.
    path = Path(path)
    try:
        with atomic_write(path, "wb") as stream:
            figure.savefig(stream, format="png")
    finally:
        figure.clear()
    return path


def _arrays(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(y).astype(int).ravel(), np.asarray(p, dtype=np.float64).ravel()


def _one_class_note(axes: Any, y: np.ndarray) -> bool:
    """Write why a curve is missing; True when the split has only one class."""
    if y.size and 0 < y.sum() < y.size:
        return False
    axes.text(0.5, 0.5, "undefined: this split has\nonly one class", ha="center", va="center")
    return True


def plot_roc(y: Any, p: Any, path: str | Path, threshold: float | None = None, split: str = "test") -> Path:
    """ROC curve with its AUC; the operating point at ``threshold`` when given."""
    y, p = _arrays(y, p)
    figure = _figure()
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    title = f"ROC curve ({split} split, n={y.size})"
    if not _one_class_note(axes, y):
        fpr, tpr, _ = roc_curve(y, p)
        axes.plot(fpr, tpr, linewidth=2, label=f"model (AUC {roc_auc_score(y, p):.3f})")
        if threshold is not None:
            called = called_malignant(p, threshold)
            sens = called[y == 1].mean()
            fpr_at = called[y == 0].mean()
            axes.plot([fpr_at], [sens], "o", color="crimson", label=f"threshold {threshold:.3f}")
        axes.legend(loc="lower right")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (false positive rate)", ylabel="sensitivity")
    axes.set_title(title)
    return _save(figure, path)


def plot_pr(y: Any, p: Any, path: str | Path, split: str = "test") -> Path:
    """Precision-recall curve with average precision and the prevalence baseline."""
    y, p = _arrays(y, p)
    figure = _figure()
    axes = figure.add_subplot()
    if not _one_class_note(axes, y):
        precision, recall, _ = precision_recall_curve(y, p)
        axes.plot(recall, precision, linewidth=2, label=f"model (AP {average_precision_score(y, p):.3f})")
        axes.axhline(y.mean(), linestyle="--", color="grey", linewidth=1, label=f"prevalence {y.mean():.2f}")
        axes.legend(loc="lower left")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall (sensitivity)", ylabel="precision")
    axes.set_title(f"Precision-recall ({split} split, n={y.size})")
    return _save(figure, path)


def plot_calibration(
    y: Any, p_before: Any, p_after: Any, path: str | Path, split: str = "test", bins: int = 10
) -> Path:
    """Reliability diagram of P(malignant) before and after temperature scaling, with ECE."""
    y, before = _arrays(y, p_before)
    _, after = _arrays(y, p_after)
    figure = _figure(5.0, 5.5)
    top, bottom = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    for name, values, marker in (("before", before, "s"), ("after", after, "o")):
        if y.size == 0:
            continue
        table = reliability_bins(y, values, bins)
        ece = expected_calibration_error(y, values, bins)
        top.plot(table["mean_p"], table["observed"], marker=marker, label=f"{name} scaling (ECE {ece:.3f})")
    top.set(ylim=(0, 1), ylabel="observed share malignant")
    top.legend(loc="upper left")
    top.set_title(f"Calibration ({split} split, n={y.size})")
    edges = np.linspace(0, 1, bins + 1)
    bottom.hist([before, after], bins=edges, label=["before", "after"])
    bottom.set(xlim=(0, 1), xlabel="predicted P(malignant)", ylabel="images")
    return _save(figure, path)


def plot_confusion(confusion: dict[str, int], path: str | Path, split: str = "test") -> Path:
    """2 x 2 confusion matrix: counts and the share of each true class."""
    matrix = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]], dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    figure = _figure(4.5, 4.0)
    axes = figure.add_subplot()
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, column), count in np.ndenumerate(matrix):
        colour = "white" if shares[row, column] > 0.6 else "black"
        axes.text(column, row, f"{int(count)}\n{shares[row, column]:.0%}", ha="center", va="center", color=colour)
    axes.set_xticks([0, 1], labels=list(CLASS_NAMES))
    axes.set_yticks([0, 1], labels=list(CLASS_NAMES))
    axes.set(xlabel="predicted", ylabel="true")
    axes.set_title(f"Confusion matrix ({split} split, n={int(matrix.sum())})")
    return _save(figure, path)


def plot_dx_confusion(dx: dict[str, Any], path: str | Path, split: str = "test") -> Path:
    """Diagnosis confusion matrix (rows true, columns predicted): counts and the share of each true dx.

    ``dx`` is :func:`lesion.metrics.dx_metrics`'s result; the title gives its balanced accuracy.
    """
    names = list(dx["names"])
    matrix = np.asarray(dx["confusion"], dtype=float).reshape(len(names), len(names))
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    side = 2.0 + 0.65 * len(names)
    figure = _figure(side + 0.6, side)
    axes = figure.add_subplot()
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, column), count in np.ndenumerate(matrix):
        colour = "white" if shares[row, column] > 0.6 else "black"
        axes.text(
            column, row, f"{int(count)}\n{shares[row, column]:.0%}", ha="center", va="center", color=colour, fontsize=8
        )
    ticks = list(range(len(names)))
    axes.set_xticks(ticks, labels=names)
    axes.set_yticks(ticks, labels=names)
    axes.set(xlabel="predicted diagnosis", ylabel="true diagnosis")
    balanced = dx.get("balanced_accuracy")
    note = f", balanced accuracy {balanced:.3f}" if isinstance(balanced, float) else ""
    axes.set_title(f"Diagnosis confusion ({split} split, n={int(matrix.sum())}{note})", fontsize=9)
    return _save(figure, path)


def _epochs(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last ``epoch`` event of each epoch (a resumed run may repeat one), in order."""
    latest: dict[int, dict[str, Any]] = {}
    for event in events:
        if event.get("event") == "epoch" and event.get("epoch") is not None:
            latest[int(event["epoch"])] = event
    return [latest[k] for k in sorted(latest)]


def _series(epochs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(e["epoch"], e[key]) for e in epochs if isinstance(e.get(key), (int, float))]
    return [x for x, _ in pairs], [v for _, v in pairs]


def plot_curves(events: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Train / validation loss and validation ROC-AUC per epoch, from the run's ``epoch`` events."""
    epochs = _epochs(events)
    figure = _figure(8.0, 3.8)
    loss_axes, auc_axes = figure.subplots(1, 2)
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        xs, ys = _series(epochs, key)
        if xs:
            loss_axes.plot(xs, ys, marker="o", label=label)
    xs, ys = _series(epochs, "val_roc_auc")
    if xs:
        auc_axes.plot(xs, ys, marker="o", color="tab:green", label="validation ROC-AUC")
    if not epochs:
        for axes in (loss_axes, auc_axes):
            axes.text(0.5, 0.5, "no completed epoch yet", ha="center", va="center", transform=axes.transAxes)
    loss_axes.set(xlabel="epoch", ylabel="loss")
    loss_axes.set_title("Loss (train and validation splits)")
    auc_axes.set(xlabel="epoch", ylabel="ROC-AUC")
    auc_axes.set_title("ROC-AUC (validation split)")
    for axes in (loss_axes, auc_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    return _save(figure, path)


def save_all_plots(
    run_dir: str | Path,
    y: Any,
    p_before: Any,
    p_after: Any,
    threshold: float,
    confusion: dict[str, int],
    events: Sequence[dict[str, Any]],
    split: str = "test",
) -> list[Path]:
    """Write run_dir/plots/{roc,pr,calibration,confusion,curves}.png; ROC and PR use ``p_after``."""
    folder = Path(run_dir) / PLOTS_DIR
    return [
        plot_roc(y, p_after, folder / "roc.png", threshold=threshold, split=split),
        plot_pr(y, p_after, folder / "pr.png", split=split),
        plot_calibration(y, p_before, p_after, folder / "calibration.png", split=split),
        plot_confusion(confusion, folder / "confusion.png", split=split),
        plot_curves(events, folder / "curves.png"),
    ]
