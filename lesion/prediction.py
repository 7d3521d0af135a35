"""What the predictor says about one image: the :class:`Prediction` dataclass (importable as ``lesion.predict.Prediction``),
and how :class:`lesion.predict.Predictor` assembles one from a call's settings and the pass's outcome."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from lesion.verdict import decide

if TYPE_CHECKING:
    from lesion.preprocess import Prepared
    from lesion.similar import Similar


@dataclass
class Prediction:
    """What the model says about one image (higher OOD score = less like the training lesions)."""

    verdict: str  # "benign", "malignant", or "unknown" when the OOD detector rejects the image
    p_malignant: float  # calibrated (temperature-scaled) probability of malignancy; the verdict's
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
    similar_malignant: float = float("nan")  # share malignant among the similar_k nearest; nan when none
    similar_dx: str = ""  # the similar_k nearest's most common diagnosis
    similar_k: int = 0  # how many nearest voted; 0 when none
    # p_malignant = (1 - vote_weight) * p_network + vote_weight * similar_malignant when the checkpoint
    # weighs the vote in (lesion.similar.blended); else vote_weight is 0 and p_malignant = p_network.
    p_network: float = float("nan")  # the network's own calibrated P(malignant)
    vote_weight: float = 0.0
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


@dataclass(frozen=True)
class Settings:
    """One call's settings, checked before the pass (see :meth:`Predictor._settings`)."""

    cam_method: str
    cam_target: str | None  # what the heatmap explains; None: the verdict's side
    output: str | None  # the legacy integer target, as the name of that output
    ood_method: str
    decision_threshold: float
    ood_threshold: float
    fitted: bool  # the OOD method has fitted statistics (else every image is accepted)
    coverage: float  # of the conformal set


@dataclass(frozen=True)
class Outcome:
    """What the pass says about one image, before the verdict."""

    p_malignant: float  # the verdict's: the network's, or its blend with the similar cases' vote
    p_network: float  # the network's own
    vote_weight: float  # the vote's share of p_malignant
    probabilities: dict[str, float]  # per class name
    dx_probabilities: dict[str, float]  # per dx of a dx head
    ood_scores: dict[str, float]  # per fitted detector
    cam_target: str  # what the heatmap explains
    target: int  # its class or output index
    similar: Similar | None  # the nearest training lesions; None without an index
    output_set: list[str]  # the conformal set of the head's outputs; [] without calibration


def make_prediction(
    item: Prepared, settings: Settings, outcome: Outcome, heatmap: np.ndarray | None, timings: dict[str, float]
) -> Prediction:
    """One image's Prediction, its verdict by :func:`lesion.verdict.decide`.

    No fitted detector (nan score): accepted, there is nothing to check. A fitted detector that
    cannot score this image (nan) fails closed: the photo is not taken for a lesion.
    """
    ood_score = outcome.ood_scores.get(settings.ood_method, float("nan"))
    p, decision = outcome.p_malignant, settings.decision_threshold
    verdict, accepted = decide(p, decision, ood_score, settings.ood_threshold, fitted=settings.fitted)
    dx = outcome.dx_probabilities
    similar = outcome.similar if accepted else None  # a photo that is not a lesion resembles no case
    return Prediction(
        verdict=verdict,
        p_malignant=p,
        decision_threshold=decision,
        ood_score=ood_score,
        ood_threshold=settings.ood_threshold,
        ood_method=settings.ood_method,
        accepted=accepted,
        ood_scores=outcome.ood_scores,
        heatmap=heatmap,
        cam_method=settings.cam_method,
        target=outcome.target,
        timings=timings,
        image_width=item.original_size[0],
        image_height=item.original_size[1],
        probabilities=outcome.probabilities,
        crop_box=tuple(float(v) for v in item.crop_box),
        dx_probabilities=dx,
        dx_top=max(dx, key=dx.get) if dx and accepted else "",
        cam_target=outcome.cam_target,
        similar=[neighbour.to_dict() for neighbour in similar.neighbours] if similar else [],
        similar_malignant=similar.malignant_share if similar else float("nan"),
        similar_dx=similar.dx_vote if similar else "",
        similar_k=similar.k if similar else 0,
        p_network=outcome.p_network,
        vote_weight=outcome.vote_weight,
        dx_set=list(outcome.output_set) if accepted else [],
        set_coverage=settings.coverage if accepted and outcome.output_set else float("nan"),
    )


def set_inputs(
    outputs: Any, p_network: Sequence[float], vote_weight: float, class_names: Sequence[str], dx_names: Sequence[str]
) -> np.ndarray:
    """(N, K) what the conformal sets are drawn from: the head's calibrated outputs, the ones they were
    calibrated on (diagnoses, or benign / malignant). A benign / malignant head whose probabilities hold
    the similar cases' vote gives the network's own, (1 - p_network, p_network)."""
    if vote_weight <= 0 or dx_names:
        return np.asarray(outputs)
    p = np.asarray(p_network, dtype=np.float64)
    return np.stack([p if name == "malignant" else 1.0 - p for name in class_names], axis=1)


def output_rows(predictions: Sequence[Prediction], dx_names: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    """:func:`set_inputs` of predictions already made (the page redrawing a set, the export calibrating)."""
    return np.array(
        [
            set_inputs(
                [
                    [p.dx_probabilities.get(n, 0.0) for n in dx_names]
                    or [p.probabilities.get(n, 0.0) for n in class_names]
                ],
                [p.p_network],
                p.vote_weight,
                class_names,
                dx_names,
            )[0]
            for p in predictions
        ]
    )
