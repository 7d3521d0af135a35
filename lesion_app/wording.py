"""What the app says, in one place: the disclaimer, the verdicts in words, metric names, durations."""

from __future__ import annotations

from typing import Any

# The disclaimer and the verdicts in words live in the library: the PDF report says them too.
from lesion.verdict import DISCLAIMER, VERDICT_DETAIL, VERDICT_TEXT  # noqa: F401 (re-exported)

METRIC_LABELS = {
    "roc_auc": "ROC-AUC",
    "balanced_accuracy": "Balanced accuracy",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "accuracy": "Accuracy",
    "precision": "Precision",
    "f1": "F1",
    "pr_auc": "PR-AUC",
}


def format_duration(seconds: float | None) -> str:
    """'45 s', '12 min', '2 h 05 min'."""
    if seconds is None:
        return "unknown"
    seconds = max(float(seconds), 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{int(minutes // 60)} h {int(minutes % 60):02d} min"


def json_default(value: Any) -> Any:
    """``json.dumps``' fallback: arrays and tensors as lists, anything else as its text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
