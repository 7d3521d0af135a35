"""The Predict page's helpers: the image as shown, the cached prediction, the results table and the JSON download."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from typing import Any

import numpy as np
from PIL import Image

from lesion.images import IMAGE_EXTENSIONS, load_image
from lesion.labels import DX_NAMES
from lesion.runs import ModelEntry
from lesion_app.batcher import batcher
from lesion_app.gallery import sample_digests
from lesion_app.session_cache import SHARED, digest, named_bytes, recall, remember
from lesion_app.wording import DISCLAIMER, VERDICT_TEXT, json_default

#: What the uploaders accept: the image types the library reads.
UPLOAD_TYPES = [extension.lstrip(".") for extension in IMAGE_EXTENSIONS]
# Side of the longest edge images are shown and heatmaps are kept at: enough for the page,
# and a 50-megapixel phone photo does not keep 200 MB of heatmap in a session.
DISPLAY_SIDE = 1024


def display_image(data: bytes, name: str) -> Image.Image:
    """The image as the page shows it (EXIF-rotated RGB, longest side at most DISPLAY_SIDE).

    Raises InvalidImage with a plain message for anything that is not a usable image.
    """
    image = load_image(named_bytes(data, name))
    if max(image.size) > DISPLAY_SIDE:
        image = image.copy()
        image.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.LANCZOS)
    return image


def cached_display(cache: MutableMapping[Any, Any], data: bytes, name: str) -> Image.Image:
    """:func:`display_image`, decoded once per image content (a 12-megapixel photo takes a while).

    Kept in the session's ``cache``; a bundled sample also in the server's shared one (decoded once for the room).
    """
    key = ("display", digest(data))
    if key in cache:
        return cache[key]
    shared = key[1] in sample_digests()
    shown = SHARED.get(key) if shared else None
    if shown is None:
        shown = display_image(data, name)
        if shared:
            SHARED.put(key, shown)
    return remember(cache, key, shown)


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

    Computed once, in a batch with other sessions' images (:mod:`lesion_app.batcher`); moving a slider
    or switching the view reads it from ``cache``. A bundled sample's is kept in the server's shared cache
    too, for every visitor who picks it (an upload's stays in its own session). The heatmap kept is resized to ``display``'s size (the prediction itself saw
    the full-resolution file). ``cam_target`` None explains the verdict (see
    :meth:`lesion.predict.Predictor.predict`). InvalidImage for an unreadable image, as ``predict``.
    """
    key = ("prediction", digest(data), str(model.path), model.mtime, cam_method, cam_target)
    if (hit := recall(cache, key)) is not None:
        return hit
    shared = key[1] in sample_digests()
    if shared and (hit := SHARED.get(key)) is not None:
        return remember(cache, key, hit)
    prediction = batcher().predict(predictor, named_bytes(data, name), cam_method=cam_method, cam_target=cam_target)
    if prediction.heatmap is not None:
        prediction.heatmap = _resize_heatmap(prediction.heatmap, display.size)
    if shared:
        SHARED.put(key, prediction)
    return remember(cache, key, prediction)


def upload_key(upload: Any) -> str:
    """A stable name for one uploaded file across reruns (Streamlit's file id; the name if there is none)."""
    return f"upload-{getattr(upload, 'file_id', None) or upload.name}"


def toggle_pick(session: MutableMapping[str, Any], name: str) -> None:
    """The gallery checkbox of sample ``name`` changed: add it to, or drop it from, ``session["picked"]``.

    The picks are kept apart from the checkboxes' own state, in the order they were made.
    """
    picked = [other for other in session.get("picked", []) if other != name]
    if session.get(f"sample-{name}"):
        picked.append(name)
    session["picked"] = picked


def newest_first(arrivals: list[tuple[Any, ...]], arrived: MutableMapping[str, int]) -> list[tuple[Any, ...]]:
    """``arrivals`` (each starting with its key) with the latest upload or pick first.

    ``arrived`` (kept in the session) maps a key to the run it first appeared in; keys no longer there
    are forgotten, so a sample unticked and ticked again counts as new. Arrivals of the same run keep
    their order (several photos uploaded at once read top to bottom).
    """
    keys = {arrival[0] for arrival in arrivals}
    for gone in [key for key in arrived if key not in keys]:
        del arrived[gone]
    run = max(arrived.values(), default=0) + 1
    for arrival in arrivals:
        arrived.setdefault(arrival[0], run)
    return sorted(arrivals, key=lambda arrival: -arrived[arrival[0]])


def result_row(name: str, prediction: Any) -> dict[str, Any]:
    """One line of the results table."""
    return {
        "image": name,
        "verdict": VERDICT_TEXT.get(prediction.verdict, prediction.verdict),
        "P(malignant)": round(float(prediction.p_malignant), 3),
        "most likely diagnosis": next((row["diagnosis"] for row in top_diagnoses(prediction, 1)), ""),
        "diagnosis set": " or ".join(DX_NAMES.get(name, name) for name in getattr(prediction, "dx_set", None) or []),
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


def _round(value: Any, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def result_json(name: str, prediction: Any, model: ModelEntry) -> bytes:
    """The downloadable JSON: the prediction (without the heatmap pixels) and the model it came from."""
    payload = prediction.to_dict() if hasattr(prediction, "to_dict") else {}
    payload = {key: value for key, value in payload.items() if key != "heatmap"}
    payload = {"image": name, "model": str(model.path), "disclaimer": DISCLAIMER, **payload}
    return json.dumps(payload, indent=2, default=json_default).encode("utf-8")


def with_coverage(predictor: Any, prediction: Any, coverage: float) -> Any:
    """The prediction with its diagnosis set at ``coverage``, from its own probabilities (no new pass).

    A rejected photo, or a model without calibration, keeps its empty set.
    """
    from dataclasses import replace

    from lesion.conformal import prediction_set
    from lesion.prediction import output_rows

    if not getattr(prediction, "accepted", False) or getattr(predictor, "conformal", None) is None:
        return prediction
    if coverage == prediction.set_coverage:
        return prediction
    row = output_rows([prediction], predictor.dx_names, predictor.class_names)[0]
    names = prediction_set(predictor.conformal, row, coverage)
    return replace(prediction, dx_set=names, set_coverage=float(coverage))


def set_text(predictor: Any, prediction: Any) -> str:
    """The diagnosis set in plain words ('' when there is none)."""
    from lesion.conformal import set_in_words

    if not getattr(prediction, "dx_set", None):
        return ""
    total = len(predictor.dx_names or predictor.class_names)
    return set_in_words(prediction.dx_set, prediction.set_coverage, total)


def similar_cases(prediction: Any, pictures: Any) -> list[dict[str, Any]]:
    """The similar cases to show: caption in plain words, and the picture when the data folder is here."""
    cases = []
    for case in getattr(prediction, "similar", None) or []:
        cases.append(
            {
                "image_id": case["image_id"],
                "caption": f"{DX_NAMES.get(case['dx'], case['dx'])} ({case['label']})",
                "picture": pictures.get(case["image_id"]) if pictures is not None else None,
                "similarity": case["similarity"],
            }
        )
    return cases


def report_pdf(
    name: str,
    prediction: Any,
    shown: Image.Image,
    blended: Image.Image | None,
    facts: Any,
    pictures: Any,
) -> bytes:
    """The one-page PDF report of the prediction as the page shows it (:func:`lesion.report.render_report`)."""
    from lesion.report import render_report

    thumbnails = pictures.for_prediction(prediction) if pictures is not None else ()
    heatmap = blended if prediction.accepted else None
    return render_report(prediction, shown, facts, name=name, heatmap_image=heatmap, thumbnails=thumbnails)
