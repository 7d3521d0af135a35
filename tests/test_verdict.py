"""lesion.verdict: the accept rule and the verdict, the one rule the predictor, the OOD page and evaluation share."""

from __future__ import annotations

import math

import numpy as np
import torch

from lesion import ood
from lesion.verdict import accepts, decide, side, verdict


def test_a_score_above_the_threshold_is_rejected_and_one_at_it_accepted():
    assert accepts(torch.tensor([0.1, 0.5, 0.9]).numpy(), 0.5).tolist() == [True, True, False]
    assert accepts(0.5, 0.5) is True and accepts(0.51, 0.5) is False


def test_nan_fails_closed_only_for_a_fitted_detector():
    assert accepts(math.nan, 1.0) is False  # the detector in use could not score the photo
    assert accepts(math.nan, math.nan, fitted=False) is True  # no detector: nothing to check
    assert accepts(np.array([math.nan, 0.0]), 1.0).tolist() == [False, True]


def test_the_verdict_is_the_side_of_the_decision_threshold_unless_rejected():
    assert side(0.5, 0.5) == "malignant" and side(0.49, 0.5) == "benign"
    assert verdict(0.9, 0.5, accepted=False) == "unknown"
    assert decide(0.7, 0.5, ood_score=0.1, ood_threshold=0.2) == ("malignant", True)
    assert decide(0.7, 0.5, ood_score=0.3, ood_threshold=0.2) == ("unknown", False)
    assert decide(0.1, 0.5, ood_score=math.nan, ood_threshold=math.nan, fitted=False) == ("benign", True)


def test_offline_evaluation_counts_by_the_same_rule():
    lesions, photos = np.array([0.1, math.nan, 0.3]), np.array([math.nan, 0.2, 0.5])
    result = ood.evaluate(lesions, photos, threshold=0.3)
    assert result["lesions_accepted"] == int(accepts(lesions, 0.3).sum()) == 2
    assert result["ood_accepted"] == int(accepts(photos, 0.3).sum()) == 1


def test_called_malignant_is_the_same_rule_for_numbers_and_arrays():
    from lesion.verdict import called_malignant

    assert called_malignant(0.5, 0.5) is True and called_malignant(0.4999, 0.5) is False
    assert called_malignant(np.array([0.2, 0.5, 0.9]), 0.5).tolist() == [False, True, True]
