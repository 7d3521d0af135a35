"""The rule that turns a probability and an OOD score into a verdict: the one home of both thresholds' meaning.

A photo is *accepted* (taken for a lesion) unless its OOD score is above the detector's threshold;
a detector that is fitted but could not score the photo (NaN) rejects it (fail closed), while a
model without any fitted detector accepts every photo (there is nothing to check). An accepted
photo is *malignant* when its calibrated P(malignant) is at least the decision threshold, else
*benign*; a rejected one is *unknown*. The predictor, the OOD page and the offline evaluation
(:func:`lesion.ood.evaluate`) all decide through these functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

VERDICTS = ("benign", "malignant", "unknown")
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


def accepts(scores: Any, threshold: float, *, fitted: bool = True) -> Any:
    """Whether each OOD score passes: not above ``threshold``, and not NaN for a ``fitted`` detector.

    ``scores`` is one number (a bool comes back) or an array of them (a boolean array comes back).
    """
    values = np.asarray(scores, dtype=np.float64)
    passed = ~(values > threshold)  # NaN > threshold is False: NaN passes here...
    if fitted:
        passed &= ~np.isnan(values)  # ...and is rejected here when a detector should have scored it
    return bool(passed) if passed.ndim == 0 else passed


def called_malignant(p_malignant: Any, decision_threshold: float) -> Any:
    """Whether each P(malignant) is called malignant: ``p_malignant >= decision_threshold``.

    The one place this comparison is written; a number gives a bool, an array a boolean array.
    """
    called = np.asarray(p_malignant, dtype=np.float64) >= decision_threshold
    return bool(called) if called.ndim == 0 else called


def side(p_malignant: float, decision_threshold: float) -> str:
    """ "malignant" when :func:`called_malignant`, else "benign"."""
    return "malignant" if called_malignant(p_malignant, decision_threshold) else "benign"


def verdict(p_malignant: float, decision_threshold: float, accepted: bool) -> str:
    """The verdict: "unknown" for a rejected photo, else its :func:`side`."""
    return side(p_malignant, decision_threshold) if accepted else "unknown"


def decide(
    p_malignant: float, decision_threshold: float, ood_score: float, ood_threshold: float, *, fitted: bool = True
) -> tuple[str, bool]:
    """(verdict, accepted) for one photo: :func:`accepts` on its OOD score, then :func:`verdict`."""
    accepted = accepts(ood_score, ood_threshold, fitted=fitted)
    return verdict(p_malignant, decision_threshold, accepted), accepted
