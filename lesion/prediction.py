"""What the predictor says about one image: the :class:`Prediction` dataclass (importable as ``lesion.predict.Prediction``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np


@dataclass
class Prediction:
    """What the model says about one image (higher OOD score = less like the training lesions)."""

    verdict: str  # "benign", "malignant", or "unknown" when the OOD detector rejects the image
    p_malignant: float  # calibrated (temperature-scaled) probability of malignancy
    decision_threshold: float  # malignant when p_malignant >= this
    ood_score: float  # score of the active detector; nan when the checkpoint has none
    ood_threshold: float  # rejected ("unknown") when ood_score > this
    ood_method: str
    accepted: bool  # passed the OOD check
    ood_scores: dict[str, float]  # every fitted detector, from the same forward pass
    heatmap: np.ndarray | None  # (image_height, image_width) float32 in [0, 1], or None
    cam_method: str
    target: int  # class index the heatmap explains
    timings: dict[str, float]  # seconds: decode, preprocess, forward, cam, ood, similar (cases and set), total
    image_width: int  # the original image, after EXIF orientation
    image_height: int
    probabilities: dict[str, float] = field(default_factory=dict)  # calibrated, per class name
    crop_box: tuple[float, float, float, float] | None = None  # what the network saw: left, top, right, bottom
    dx_probabilities: dict[str, float] = field(default_factory=dict)  # calibrated, per dx; empty for binary models
    dx_top: str = ""  # the most probable dx; "" for a binary model or a rejected ("unknown") image
    cam_target: str = ""  # what the heatmap explains: "malignant", "benign" or a dx code
    # The nearest training lesions (image_id, dx, label, similarity), nearest first; [] when rejected
    # or when the checkpoint has no index (lesion.similar).
    similar: list[dict[str, Any]] = field(default_factory=list)
    similar_malignant: float = float("nan")  # share malignant among the 16 nearest; nan when none
    similar_dx: str = ""  # the 16 nearest's most common diagnosis
    # The conformal set (lesion.conformal): diagnoses, or benign/malignant for a binary head; [] when rejected.
    dx_set: list[str] = field(default_factory=list)
    set_coverage: float = float("nan")  # the coverage the set was asked for

    def to_dict(self, include_heatmap: bool = False) -> dict[str, Any]:
        """Plain JSON-able values (nan becomes None; the heatmap as nested lists if asked)."""

        def plain(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {key: plain(item) for key, item in value.items()}
            return value

        result = {f.name: plain(getattr(self, f.name)) for f in fields(self) if f.name != "heatmap"}
        if include_heatmap:
            result["heatmap"] = None if self.heatmap is None else self.heatmap.tolist()
        return result
