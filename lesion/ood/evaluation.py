"""How well a detector's scores separate OOD photos from lesions, and what a threshold accepts.

A photo is accepted by the rule of :func:`lesion.verdict.accepts`, the predictor's own: a NaN score
(the detector could not score the image) is rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lesion.ood.base import as_numpy
from lesion.verdict import accepts


def ranked(*groups: Any) -> list[np.ndarray]:
    """The score arrays with every non-finite score replaced by a finite one that ranks the same.

    NaN (a detector that could not score the image, which the predictor rejects) and +inf rank
    above every finite score, -inf below: ROC figures count them as the predictor decides them,
    and scikit-learn, which refuses non-finite scores, can compute them.
    """
    arrays = [as_numpy(g) for g in groups]
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.array([])
    top = float(finite.max()) if len(finite) else 0.0
    bottom = float(finite.min()) if len(finite) else 0.0
    span = top - bottom or abs(top) or 1.0
    out = []
    for a in arrays:
        a = a.copy()
        a[np.isnan(a) | (a == np.inf)] = top + span
        a[a == -np.inf] = bottom - span
        out.append(a)
    return out


def evaluate(lesion_scores: Any, ood_scores: Any, threshold: float) -> dict[str, float | int]:
    """How well scores separate OOD images (positive) from lesions, and what ``threshold`` does.

    ``fpr_at_95_tpr`` is the share of OOD images accepted when the threshold accepts 95 % of
    the lesions given here (the usual OOD benchmark number; lower is better). A NaN score counts
    as rejected, as the predictor decides it.
    """
    lesions, ood = as_numpy(lesion_scores), as_numpy(ood_scores)
    result: dict[str, float | int] = {"roc_auc": float("nan"), "fpr_at_95_tpr": float("nan")}
    if len(lesions) and len(ood):
        truth = np.r_[np.zeros(len(lesions)), np.ones(len(ood))]
        from sklearn.metrics import roc_auc_score

        ranked_lesions, ranked_ood = ranked(lesions, ood)  # NaN ranks as rejected
        result["roc_auc"] = float(roc_auc_score(truth, np.r_[ranked_lesions, ranked_ood]))
        at_95 = float(np.quantile(ranked_lesions, 0.95))
        result["fpr_at_95_tpr"] = float(np.mean(ranked_ood <= at_95))
    lesions_accepted, ood_accepted = accepts(lesions, threshold), accepts(ood, threshold)
    result.update(
        threshold=float(threshold),
        lesions_accepted=int(np.sum(lesions_accepted)),
        lesions_rejected=int(np.sum(~lesions_accepted)),
        ood_accepted=int(np.sum(ood_accepted)),
        ood_rejected=int(np.sum(~ood_accepted)),
    )
    return result


def roc_points(lesion_scores: Sequence[float], ood_scores: Sequence[float]) -> list[dict[str, float]]:
    """ROC curve of "OOD vs lesion": share of lesions rejected (x) vs share of OOD photos rejected (y)."""
    from sklearn.metrics import roc_curve

    if not len(lesion_scores) or not len(ood_scores):
        return []
    truth = np.r_[np.zeros(len(lesion_scores)), np.ones(len(ood_scores))]
    fpr, tpr, _ = roc_curve(truth, np.concatenate(ranked(lesion_scores, ood_scores)))  # NaN: rejected
    return [{"lesions rejected": float(x), "OOD photos rejected": float(y)} for x, y in zip(fpr, tpr, strict=True)]
