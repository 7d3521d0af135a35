"""The OOD page's helpers: gallery scores cached per image, the slider's range, and one assessment per threshold."""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lesion.ood import NOTEBOOK_MSP_THRESHOLD, evaluate, roc_points
from lesion.runs import ModelEntry
from lesion.verdict import accepts
from lesion_app.session_cache import PREDICT_LOCK, digest, named_bytes, remember


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
        with PREDICT_LOCK:
            predictions = predictor.predict_batch(
                [named_bytes(items[i][1], items[i][0]) for i in missing], with_heatmap=False
            )
        for i, prediction in zip(missing, predictions, strict=True):
            if isinstance(prediction, Exception):
                continue  # pages validate uploads first; an unreadable file simply has no score
            scores = {k: float(v) for k, v in (prediction.ood_scores or {}).items()}
            scores["_p_malignant"] = float(prediction.p_malignant)
            result[i] = remember(cache, keys[i], scores)
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


@dataclass(frozen=True)
class Assessment:
    """What one threshold does to the gallery, computed once per slider position."""

    evaluation: dict[str, Any]  # lesion.ood.evaluate: ROC-AUC and the accepted / rejected counts
    accepted: np.ndarray  # per gallery image, by the predictor's rule (lesion.verdict.accepts)
    roc: list[dict[str, float]]  # lesion.ood.roc_points
    operating: dict[str, float]  # this threshold's point on the ROC curve
    notebook: dict[str, Any] | None  # the notebook's max-softmax rule on the same images, when msp is fitted


def assess(values: np.ndarray, is_ood: np.ndarray, threshold: float, msp: np.ndarray | None = None) -> Assessment:
    """Score-threshold figures of the gallery: ``values`` of the chosen detector, ``is_ood`` per image."""
    lesions, photos = values[~is_ood], values[is_ood]
    evaluation = evaluate(lesions, photos, threshold)
    operating = {
        "lesions rejected": evaluation["lesions_rejected"] / max(len(lesions), 1),
        "OOD photos rejected": evaluation["ood_rejected"] / max(len(photos), 1),
    }
    notebook = None if msp is None else evaluate(msp[~is_ood], msp[is_ood], NOTEBOOK_MSP_THRESHOLD)
    return Assessment(evaluation, accepts(values, threshold), roc_points(lesions, photos), operating, notebook)
