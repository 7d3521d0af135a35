"""The Train and Model pages' helpers: recipes and their measured durations, the runs table, a checkpoint's summary."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lesion.config import recipe_measurement
from lesion_app.wording import format_duration, json_default


def recipe_names() -> list[str]:
    """Recipe names in train/recipes, the demo first."""
    from lesion.config import recipes_dir

    names = sorted(path.stem for path in recipes_dir().glob("*.toml"))
    return sorted(names, key=lambda name: (name != "demo", name))


def measured_duration(recipe: str = "demo") -> str:
    """How long ``recipe`` took when it was last measured, and where (stored with the recipe)."""
    measured = recipe_measurement(recipe)
    seconds = measured.get("seconds")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "not measured yet"
    where = f" on {measured['machine']}" if measured.get("machine") else ""
    return f"{format_duration(seconds)} when we measured it{where}"


def no_model_help() -> str:
    """What a page says when there is no model yet: train the demo (with its measured duration) or name one."""
    return (
        "No model yet. Open the **Train** page and start the **demo** recipe on the bundled demo set "
        f"({measured_duration('demo')}), or set `LESION_CHECKPOINT` to a trained `model.pt` and reload."
    )


# Computed once at import: the recipe file is read when the app starts, not on every rerun.
NO_MODEL_HELP = no_model_help()


def run_rows(runs: Sequence[Any]) -> list[dict[str, Any]]:
    """The Train page's table of runs."""
    rows = []
    for run in runs:
        progress = run.progress or {}
        epochs = progress.get("epochs") or ""
        rows.append(
            {
                "run": run.name,
                "status": run.status,
                "started": run.created_text,
                "epoch": f"{progress.get('epoch', '')}/{epochs}" if epochs else progress.get("epoch", ""),
                "ROC-AUC": round(run.metrics["roc_auc"], 3) if "roc_auc" in run.metrics else None,
                "measured on": run.metrics_split,
                "message": run.error,
            }
        )
    return rows


def metrics_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """metric / validation / test rows from metrics.json (scalars only)."""
    val, test = metrics.get("val") or {}, metrics.get("test") or {}
    rows = []
    for key in [*val, *(k for k in test if k not in val)]:
        a, b = val.get(key), test.get(key)
        if isinstance(a, (int, float)) or isinstance(b, (int, float)):
            rows.append({"metric": key, "validation": _scalar(a), "test": _scalar(b)})
    return rows


def _scalar(value: Any) -> float | None:
    return round(float(value), 4) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _spread_text(spread: dict | None) -> str:
    """'4.8 % (1.2-9.6 %)': the bootstrap share of new lesions a threshold rejects, or '' when unknown."""
    if not spread or spread.get("median") is None:
        return ""
    return f"{spread['median']:.1%} ({spread['low']:.1%}-{spread['high']:.1%})"


def checkpoint_summary(checkpoint: dict[str, Any], name: str) -> dict[str, Any]:
    """Plain values the Model page shows (no tensors): thresholds, detectors, history, data.

    Takes the loaded predictor's checkpoint dict, so the page never reads the weights file again.
    """
    ood = checkpoint.get("ood") or {}
    return {
        "name": name,
        "arch": checkpoint.get("arch"),
        "head": checkpoint.get("head"),
        "image_size": checkpoint.get("image_size"),
        "created": checkpoint.get("created"),
        "decision_threshold": float(checkpoint["decision_threshold"]),
        "temperature": float(checkpoint["temperature"]),
        "ood_method": ood.get("method"),
        "ood_thresholds": {name: float(stats["threshold"]) for name, stats in (ood.get("detectors") or {}).items()},
        "ood_rejection_spread": {
            name: _spread_text(stats.get("rejection_spread")) for name, stats in (ood.get("detectors") or {}).items()
        },
        "threshold_history": list(checkpoint.get("threshold_history") or []),
        "metrics": json.loads(json.dumps(checkpoint.get("metrics") or {}, default=json_default)),
    }
