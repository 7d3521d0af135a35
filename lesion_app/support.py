"""Plain helpers behind the app's pages: wording, sample galleries, session caches of predictions, tables.

Nothing here imports Streamlit: a page passes in its ``st.session_state`` (any mutable mapping)
where a cache is needed, so every function can be tested without a browser or an app. The charts
live in :mod:`lesion_app.charts`, the pages' "no model yet" guard in :mod:`lesion_app.guards`.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lesion.config import recipe_measurement
from lesion.files import SPLIT_FILE
from lesion.images import MAX_BYTES, load_image
from lesion.labels import DX_NAMES
from lesion.runs import PROJECT_ROOT, ModelEntry

DISCLAIMER = (
    "Demonstration only — not a diagnosis. This tool is not a medical device; "
    "a skin lesion that worries you belongs in front of a dermatologist."
)
VERDICT_TEXT = {"benign": "Benign", "malignant": "Malignant", "unknown": "Not a skin lesion"}
VERDICT_DETAIL = {
    "benign": "The model leans towards a benign lesion.",
    "malignant": "The model leans towards a malignant lesion.",
    "unknown": "The model was not trained on photos like this, so it gives no benign/malignant answer.",
}
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
UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "heic", "heif"]
SAMPLES_DIR = PROJECT_ROOT / "assets" / "samples"
# Side of the longest edge images are shown and heatmaps are kept at: enough for the page,
# and a 50-megapixel phone photo does not keep 200 MB of heatmap in a session.
DISPLAY_SIDE = 1024
CACHE_ENTRIES = 64

# With this variable set, training and saving a threshold need the presenter's password.
ADMIN_ENV = "LESION_ADMIN_PASSWORD"
ADMIN_SESSION_KEY = "presenter_unlocked"
LOCKED_HELP = (
    "Visitors can predict and explore; training and saving a threshold need the presenter's password (sidebar)."
)

# One model is shared by every session (st.cache_resource); Grad-CAM needs gradients through
# it, so predictions are serialised. On a CPU they would compete for the same cores anyway.
_PREDICT_LOCK = threading.Lock()


# ---------------------------------------------------------------------------- presenter and visitors


def admin_password() -> str | None:
    """$LESION_ADMIN_PASSWORD, or None when unset or empty (then everything stays open, for local use)."""
    return os.environ.get(ADMIN_ENV) or None


def password_matches(given: str, expected: str) -> bool:
    """Compare in constant time, so the answer's timing tells nothing about the password."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def may_change(session: MutableMapping[str, Any]) -> bool:
    """Whether this browser session may train or save a threshold: always without a password set,
    otherwise once the presenter has unlocked it."""
    return admin_password() is None or session.get(ADMIN_SESSION_KEY) is True


# ---------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sample:
    """A bundled image the pages offer."""

    name: str  # file stem, e.g. ISIC_0000169 or car_image1
    path: Path
    kind: str  # "lesion" or "ood"
    caption: str  # what the gallery shows under the image
    label: str = ""  # benign / malignant for lesions, category for OOD photos


def list_samples(samples_dir: Path = SAMPLES_DIR) -> list[Sample]:
    """The bundled sample lesions (with diagnosis) and the non-lesion photos, in file order."""
    samples: list[Sample] = []
    labels = samples_dir / "lesions" / "labels.csv"
    if labels.is_file():
        with labels.open(newline="", encoding="utf-8") as stream:
            for row in csv.DictReader(stream):
                path = samples_dir / "lesions" / f"{row['image_id']}.jpg"
                if path.is_file():
                    dx = DX_NAMES.get(row["dx"], row["dx"])
                    samples.append(
                        Sample(
                            row["image_id"], path, "lesion", f"{row['image_id']}: {dx} ({row['label']})", row["label"]
                        )
                    )
    index = samples_dir / "ood" / "index.csv"
    if index.is_file():
        with index.open(newline="", encoding="utf-8") as stream:
            for row in csv.DictReader(stream):
                path = samples_dir / "ood" / row["file"]
                if path.is_file():
                    samples.append(
                        Sample(
                            path.stem,
                            path,
                            "ood",
                            f"{path.stem}: {row['category']} photo (not a lesion)",
                            row["category"],
                        )
                    )
    return samples


def training_folds(run_dir: Path | None) -> dict[str, str]:
    """image_id -> fold (train / val / test) from a run's split.csv; {} when there is none."""
    if run_dir is None or not (Path(run_dir) / SPLIT_FILE).is_file():
        return {}
    with (Path(run_dir) / SPLIT_FILE).open(newline="", encoding="utf-8") as stream:
        return {row["image_id"]: row.get("fold", "") for row in csv.DictReader(stream) if row.get("image_id")}


# ---------------------------------------------------------------------------- images and predictions


def digest(data: bytes) -> str:
    """sha256 of an image's bytes: the cache key that survives renaming and re-uploading."""
    return hashlib.sha256(data).hexdigest()


def display_image(data: bytes, name: str) -> Image.Image:
    """The image as the page shows it (EXIF-rotated RGB, longest side at most DISPLAY_SIDE).

    Raises InvalidImage with a plain message for anything that is not a usable image.
    """
    image = load_image(_named_bytes(data, name))
    if max(image.size) > DISPLAY_SIDE:
        image = image.copy()
        image.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.LANCZOS)
    return image


def _named_bytes(data: bytes, name: str) -> Any:
    # A BytesIO carrying the name, so InvalidImage messages name the uploaded file.
    if len(data) > MAX_BYTES:
        return bytes(data)  # load_image refuses it with the size in the message
    stream = io.BytesIO(data)
    stream.name = name
    return stream


def cached_display(cache: MutableMapping[Any, Any], data: bytes, name: str) -> Image.Image:
    """:func:`display_image`, decoded once per image content (a 12-megapixel photo takes a while)."""
    key = ("display", digest(data))
    if key not in cache:
        return _remember(cache, key, display_image(data, name))
    return cache[key]


def _resize_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if heatmap.shape == (size[1], size[0]):
        return heatmap
    resized = Image.fromarray(np.asarray(heatmap, dtype=np.float32)).resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def display_box(prediction: Any, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """The network's view (``Prediction.crop_box``, original pixels) in the shown image's pixels."""
    box = getattr(prediction, "crop_box", None)
    width, height = getattr(prediction, "image_width", 0), getattr(prediction, "image_height", 0)
    if box is None or not width or not height:
        return None
    sx, sy = size[0] / width, size[1] / height
    left, top, right, bottom = box
    return (left * sx, top * sy, right * sx, bottom * sy)


def count_predict_call(name: str) -> None:
    """Append a line to $LESION_PREDICT_COUNTER (used by bench/app.py to prove a rerun did not predict)."""
    path = os.environ.get("LESION_PREDICT_COUNTER")
    if path:
        with open(path, "a", encoding="utf-8") as stream:
            stream.write(f"{time.time():.3f}\t{name}\n")


def _remember(cache: MutableMapping[Any, Any], key: Any, value: Any) -> Any:
    cache[key] = value
    if isinstance(cache, OrderedDict):
        cache.move_to_end(key)
        while len(cache) > CACHE_ENTRIES:
            cache.popitem(last=False)
    return value


def cached_prediction(
    cache: MutableMapping[Any, Any],
    predictor: Any,
    model: ModelEntry,
    data: bytes,
    name: str,
    cam_method: str,
    display: Image.Image,
    cam_target: str | None = None,
) -> Any:
    """The Prediction for these image bytes, this model file (path + mtime), CAM method and target.

    Computed once; moving a slider or switching the view reads it from ``cache``. The heatmap
    kept is resized to ``display``'s size (the prediction itself saw the full-resolution file).
    ``cam_target`` None explains the verdict (see :meth:`lesion.predict.Predictor.predict`).
    """
    key = ("prediction", digest(data), str(model.path), model.mtime, cam_method, cam_target)
    if key in cache:
        if isinstance(cache, OrderedDict):
            cache.move_to_end(key)
        return cache[key]
    with _PREDICT_LOCK:
        count_predict_call(name)
        prediction = predictor.predict(_named_bytes(data, name), cam_method=cam_method, cam_target=cam_target)
    if prediction.heatmap is not None:
        prediction.heatmap = _resize_heatmap(prediction.heatmap, display.size)
    return _remember(cache, key, prediction)


def result_row(name: str, prediction: Any) -> dict[str, Any]:
    """One line of the results table."""
    return {
        "image": name,
        "verdict": VERDICT_TEXT.get(prediction.verdict, prediction.verdict),
        "P(malignant)": round(float(prediction.p_malignant), 3),
        "most likely diagnosis": next((row["diagnosis"] for row in top_diagnoses(prediction, 1)), ""),
        "decision threshold": round(float(prediction.decision_threshold), 3),
        "OOD score": _round(prediction.ood_score),
        "OOD threshold": _round(prediction.ood_threshold),
        "OOD method": prediction.ood_method or "",
    }


def top_diagnoses(prediction: Any, count: int = 3) -> list[dict[str, Any]]:
    """The ``count`` most probable diagnoses in plain words, most probable first.

    Empty for a binary model and for a rejected photo: a photo that is not a lesion gets no diagnosis.
    """
    if not getattr(prediction, "accepted", False) or not getattr(prediction, "dx_probabilities", None):
        return []
    ranked = sorted(prediction.dx_probabilities.items(), key=lambda item: item[1], reverse=True)[:count]
    return [{"diagnosis": DX_NAMES.get(dx, dx), "code": dx, "probability": float(p)} for dx, p in ranked]


def cam_target_label(target: str | None) -> str:
    """The "Heatmap explains:" choices in words.

    None, the default, is the evidence for the verdict's side, as before the dx head: malignant for
    a malignant verdict, benign for a benign one (so it is not labelled "malignant").
    """
    if target is None:
        return "the verdict (default)"
    if target in ("malignant", "benign"):
        return target
    return DX_NAMES.get(target, target)


def cam_target_choices(predictor: Any) -> list[str | None]:
    """None (the verdict, the default), malignant, benign, then each diagnosis of a dx model."""
    return [None, "malignant", "benign", *getattr(predictor, "dx_names", [])]


def diagnosis_chart(rows: Sequence[dict[str, Any]]) -> Any:
    """A small horizontal Altair bar chart of :func:`top_diagnoses`."""
    import altair as alt
    import pandas as pd

    frame = pd.DataFrame(rows)
    return (
        alt.Chart(frame)
        .mark_bar(color="#457b9d")
        .encode(
            x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"), title=None),
            y=alt.Y("diagnosis:N", sort="-x", title=None),
            tooltip=[alt.Tooltip("diagnosis:N"), alt.Tooltip("probability:Q", format=".1%")],
        )
        .properties(height=30 * len(frame) + 10)
    )


def _round(value: Any, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def result_json(name: str, prediction: Any, model: ModelEntry) -> bytes:
    """The downloadable JSON: the prediction (without the heatmap pixels) and the model it came from."""
    payload = prediction.to_dict() if hasattr(prediction, "to_dict") else {}
    payload = {key: value for key, value in payload.items() if key != "heatmap"}
    payload = {"image": name, "model": str(model.path), "disclaimer": DISCLAIMER, **payload}
    return json.dumps(payload, indent=2, default=_plain).encode("utf-8")


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# ---------------------------------------------------------------------------- OOD page


def cached_ood_scores(
    cache: MutableMapping[Any, Any],
    predictor: Any,
    model: ModelEntry,
    items: Sequence[tuple[str, bytes]],
) -> list[dict[str, float] | None]:
    """{detector: score} for each of ``items`` in order (None where unreadable), scoring only images not seen before.

    In order, not by name: two uploads may share a file name. Keyed by image digest and model path
    (not mtime): saving a threshold rewrites the file but not the weights, so the scores stay valid
    and the slider never waits for the network.
    """
    keys = [("ood", digest(data), str(model.path), _weights_id(predictor)) for _, data in items]
    result: list[dict[str, float] | None] = [cache.get(key) for key in keys]
    missing = [i for i, scores in enumerate(result) if scores is None]
    if missing:
        with _PREDICT_LOCK:
            for i in missing:
                count_predict_call(items[i][0])
            predictions = predictor.predict_batch(
                [_named_bytes(items[i][1], items[i][0]) for i in missing], with_heatmap=False
            )
        for i, prediction in zip(missing, predictions, strict=True):
            if isinstance(prediction, Exception):
                continue  # pages validate uploads first; an unreadable file simply has no score
            scores = {k: float(v) for k, v in (prediction.ood_scores or {}).items()}
            scores["_p_malignant"] = float(prediction.p_malignant)
            result[i] = _remember(cache, keys[i], scores)
    return result


def _weights_id(predictor: Any) -> str:
    """Identifies the weights: the checkpoint's creation time survives threshold saves."""
    checkpoint = getattr(predictor, "checkpoint", None)
    if isinstance(checkpoint, dict):
        return str(checkpoint.get("created", ""))
    return str(checkpoint or "")


def slider_range(scores: Iterable[float], thresholds: Iterable[float]) -> tuple[float, float, float]:
    """(min, max, step) for a threshold slider covering every score and threshold, with a margin."""
    values = [float(v) for v in [*scores, *thresholds] if v is not None and np.isfinite(v)]
    if not values:
        return 0.0, 1.0, 0.01
    low, high = min(values), max(values)
    margin = (high - low) * 0.05 or abs(high) * 0.05 or 0.05
    low, high = low - margin, high + margin
    step = _nice_step((high - low) / 400)
    return float(np.floor(low / step) * step), float(np.ceil(high / step) * step), step


def _nice_step(raw: float) -> float:
    exponent = np.floor(np.log10(raw)) if raw > 0 else -3
    for factor in (1, 2, 5, 10):
        step = factor * 10**exponent
        if step >= raw:
            return float(step)
    return float(10 ** (exponent + 1))


# ---------------------------------------------------------------------------- train and model pages


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
        "metrics": json.loads(json.dumps(checkpoint.get("metrics") or {}, default=_plain)),
    }
