"""A one-page PDF report of one prediction, for people to keep: photo, heatmap, verdict, set, similar cases.

Drawn with matplotlib's PDF backend (a Figure of its own, no pyplot state, so threads can draw at
once), fonts embedded as TrueType so the text can be searched and read back. What it holds:

- the photo and the heatmap over it (the network's view outlined);
- the verdict and the calibrated P(malignant) with the decision threshold;
- the diagnosis set and the similar-case vote in plain words, and the most similar cases;
- the OOD check;
- the model's name and its test figures; the date; the disclaimer.

A photo the OOD check rejected gets "Not a skin lesion" and none of the verdict, set or cases.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from lesion.conformal import set_in_words
from lesion.labels import DX_NAMES
from lesion.similar import blend_in_words, vote_in_words
from lesion.verdict import DISCLAIMER, VERDICT_DETAIL, VERDICT_TEXT

A4 = (8.27, 11.69)  # inches, portrait
# Pictures are drawn at most this many pixels on a side: plenty at 8 cm, and the file stays small.
PICTURE_SIDE = 600
THUMBNAIL_SIDE = 200
VERDICT_COLOURS = {"benign": "#1b7f3b", "malignant": "#b3261e", "unknown": "#8a5a00"}


@dataclass(frozen=True)
class ModelFacts:
    """What the report says about the model."""

    name: str
    description: str  # one sentence: architecture, training data
    figures: str  # its test figures, with the split they came from

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], name: str) -> ModelFacts:
        from lesion.export import describe

        test = (checkpoint.get("metrics") or {}).get("test") or {}
        parts = []
        for key, label in (("roc_auc", "ROC-AUC"), ("sensitivity", "sensitivity"), ("specificity", "specificity")):
            value = test.get(key)
            if isinstance(value, (int, float)):
                parts.append(f"{label} {value:.3f}" if key == "roc_auc" else f"{label} {value:.0%}")
        sets = test.get("sets") or {}
        if sets.get("coverage") is not None:
            parts.append(f"diagnosis sets covered {sets['coverage']:.0%} at nominal {sets['nominal_coverage']:.0%}")
        held_out = test.get("n_lesions") or test.get("n")
        figures = (
            f"Test split ({held_out} held-out {'lesions' if test.get('n_lesions') else 'images'}): " + ", ".join(parts)
            if parts
            else "No test figures are recorded in this model."
        )
        return cls(name=name, description=describe(checkpoint, with_figures=False), figures=figures + ".")


def _fitted(image: Image.Image, side: int) -> Image.Image:
    image = image.convert("RGB")
    if max(image.size) > side:
        image = image.copy()
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
    return image


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.fill(part, width) for part in text.split("\n"))


def _picture(figure: Any, box: tuple[float, float, float, float], image: Image.Image | None, title: str) -> None:
    axes = figure.add_axes(box)
    axes.set_axis_off()
    if image is not None:
        axes.imshow(image)
    else:
        axes.text(0.5, 0.5, "no picture", ha="center", va="center", fontsize=8, color="#666666")
    axes.set_title(title, fontsize=8, pad=3)


def render_report(
    prediction: Any,
    image: Image.Image,
    model: ModelFacts,
    *,
    name: str,
    heatmap_image: Image.Image | None = None,
    thumbnails: Sequence[Image.Image | None] = (),
    when: datetime | None = None,
    format: str = "pdf",
) -> bytes:
    """The PDF bytes of one prediction's report.

    ``image`` is the photo as shown; ``heatmap_image`` the photo with its heatmap laid over
    (:func:`lesion.explain.overlay`); ``thumbnails`` one picture (or None) per entry of
    ``prediction.similar``, in its order. ``format="png"`` draws the same page as a picture (a preview).
    """
    from matplotlib.backends.backend_pdf import FigureCanvasPdf
    from matplotlib.figure import Figure

    when = when or datetime.now().astimezone()
    figure = Figure(figsize=A4)
    FigureCanvasPdf(figure)
    text = figure.text
    text(0.06, 0.965, "Skin lesion photo: what the model says", fontsize=16, weight="bold", va="top")
    text(0.06, 0.935, f"{name} · {when:%Y-%m-%d %H:%M}", fontsize=9, color="#444444", va="top")
    text(0.06, 0.915, "Demonstration only — not a diagnosis", fontsize=11, weight="bold", color="#b3261e", va="top")

    accepted = bool(prediction.accepted)
    _picture(figure, (0.06, 0.615, 0.42, 0.26), _fitted(image, PICTURE_SIDE), "The photo")
    if heatmap_image is not None:
        _picture(
            figure, (0.52, 0.615, 0.42, 0.26), _fitted(heatmap_image, PICTURE_SIDE), "Where the model looked (heatmap)"
        )

    verdict = str(prediction.verdict)
    y = 0.585
    text(0.06, y, VERDICT_TEXT.get(verdict, verdict), fontsize=20, weight="bold", color=VERDICT_COLOURS.get(verdict))
    y -= 0.025
    text(0.06, y, VERDICT_DETAIL.get(verdict, ""), fontsize=10, va="top")
    y -= 0.03
    lines: list[str] = []
    if accepted:
        lines.append(
            f"{'Probability' if getattr(prediction, 'vote_weight', 0.0) else 'Calibrated probability'} of malignancy: "
            f"{prediction.p_malignant:.0%} "
            f"(called malignant from {prediction.decision_threshold:.0%})."
        )
        coverage = float(getattr(prediction, "set_coverage", float("nan")))
        if prediction.dx_set and math.isfinite(coverage):
            lines.append(set_in_words(prediction.dx_set, coverage))
        share = float(getattr(prediction, "similar_malignant", float("nan")))
        k = int(getattr(prediction, "similar_k", 0) or 0)
        formed = blend_in_words(
            float(prediction.p_malignant),
            float(getattr(prediction, "p_network", float("nan"))),
            share,
            k,
            float(getattr(prediction, "vote_weight", 0.0) or 0.0),
        )
        if formed:
            lines.append("How it was formed: " + formed)
        vote = vote_in_words(share, k)
        if vote:
            lines.append(vote)
    lines.append(_ood_words(prediction))
    for line in lines:
        wrapped = _wrap(line, 95)
        text(0.06, y, wrapped, fontsize=10, va="top")
        y -= 0.02 * (wrapped.count("\n") + 1) + 0.008

    similar = list(getattr(prediction, "similar", None) or []) if accepted else []
    if similar:
        y -= 0.01
        text(0.06, y, "The most similar confirmed cases the model was trained on", fontsize=11, weight="bold", va="top")
        width, gap = 0.14, (0.88 - 6 * 0.14) / 5
        for i, case in enumerate(similar[:6]):
            picture = thumbnails[i] if i < len(thumbnails) else None
            picture = _fitted(picture, THUMBNAIL_SIDE) if picture is not None else None
            title = f"{DX_NAMES.get(case['dx'], case['dx'])}\n{case['label']}"
            _picture(figure, (0.06 + i * (width + gap), y - 0.155, width, 0.11), picture, _wrap(title, 22))
            text(0.06 + i * (width + gap), y - 0.165, case["image_id"], fontsize=6.5, color="#555555", va="top")
        y -= 0.19

    text(0.06, 0.12, "The model", fontsize=11, weight="bold", va="top")
    about = _wrap(f"{model.name}: {model.description} {model.figures}", 110)
    text(0.06, 0.1, about, fontsize=8, va="top", color="#333333")
    text(0.06, 0.035, _wrap(DISCLAIMER, 110), fontsize=8, weight="bold", va="top", color="#b3261e")

    import matplotlib

    out = io.BytesIO()
    with matplotlib.rc_context({"pdf.fonttype": 42}):  # TrueType: the text can be searched and read back
        if format == "pdf":
            figure.savefig(out, format="pdf", metadata={"Title": f"Lesion report: {name}", "Subject": DISCLAIMER})
        else:
            figure.savefig(out, format=format, dpi=100)
    return out.getvalue()


def _ood_words(prediction: Any) -> str:
    """The OOD check in one sentence."""
    score, threshold = float(prediction.ood_score), float(prediction.ood_threshold)
    if not math.isfinite(score):
        return "This model has no check for photos unlike its training lesions."
    if prediction.accepted:
        return (
            f"Check for photos unlike the training lesions: passed ({prediction.ood_method} score "
            f"{score:.3g}, rejected above {threshold:.3g})."
        )
    return (
        f"Check for photos unlike the training lesions: failed ({prediction.ood_method} score {score:.3g}, "
        f"above {threshold:.3g}), so the model gives no benign or malignant answer, no diagnoses and no similar cases."
    )


class CasePictures:
    """Small pictures of a model's similar cases, read from its data folder once each; safe across threads."""

    def __init__(self, checkpoint: dict[str, Any], side: int = THUMBNAIL_SIDE, keep: int = 512) -> None:
        from lesion.similar import case_images

        self.paths = case_images(checkpoint)
        self.side = side
        self.keep = keep
        self._pictures: OrderedDict[str, Image.Image | None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, image_id: str) -> Image.Image | None:
        """The case's picture, at most ``side`` pixels a side; None when its file is not here or unreadable."""
        with self._lock:
            if image_id in self._pictures:
                self._pictures.move_to_end(image_id)
                return self._pictures[image_id]
        picture = None
        path = self.paths.get(image_id)
        if path is not None:
            from lesion.errors import InvalidImage
            from lesion.images import load_image

            try:
                picture = _fitted(load_image(path), self.side)
            except (InvalidImage, OSError):
                picture = None
        with self._lock:
            self._pictures[image_id] = picture
            while len(self._pictures) > self.keep:
                self._pictures.popitem(last=False)
        return picture

    def for_prediction(self, prediction: Any) -> list[Image.Image | None]:
        return [self.get(case["image_id"]) for case in getattr(prediction, "similar", None) or []]


def report_for_file(
    prediction: Any, path: str | Path, model: ModelFacts, pictures: CasePictures | None, out: str | Path
) -> Path:
    """Write the report of ``prediction`` for the image file ``path`` to ``out`` (the CLI's ``--report``)."""
    from lesion.explain import overlay
    from lesion.files import atomic_write
    from lesion.images import load_image

    image = load_image(path)
    heatmap = None
    if prediction.heatmap is not None and prediction.accepted:
        heatmap = overlay(image, prediction.heatmap, box=prediction.crop_box)
    data = render_report(
        prediction,
        image,
        model,
        name=Path(path).name,
        heatmap_image=heatmap,
        thumbnails=pictures.for_prediction(prediction) if pictures is not None else (),
    )
    with atomic_write(out, "wb") as stream:
        stream.write(data)
    return Path(out)
