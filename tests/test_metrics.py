"""lesion.metrics against scikit-learn and hand computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn import metrics as sk

from lesion.metrics import (
    binary_metrics,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
)


@pytest.fixture
def scored() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = 1 / (1 + np.exp(-(2.0 * (y - 0.5) + rng.normal(0, 1.2, 300))))
    return y, p


def test_binary_metrics_match_sklearn(scored) -> None:
    y, p = scored
    m = binary_metrics(y, p, 0.4)
    predicted = (p >= 0.4).astype(int)
    tn, fp, fn, tp = sk.confusion_matrix(y, predicted).ravel()
    assert m["confusion"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert m["n"] == 300 and m["n_malignant"] == int(y.sum()) and m["threshold"] == 0.4
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, predicted))
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, predicted))
    assert m["precision"] == pytest.approx(sk.precision_score(y, predicted))
    assert m["sensitivity"] == pytest.approx(sk.recall_score(y, predicted))
    assert m["specificity"] == pytest.approx(sk.recall_score(y, predicted, pos_label=0))
    assert m["f1"] == pytest.approx(sk.f1_score(y, predicted))
    assert m["roc_auc"] == pytest.approx(sk.roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(sk.average_precision_score(y, p))
    json.dumps(m, allow_nan=False)


def test_hand_computed_small_case() -> None:
    y = [0, 0, 0, 1, 1]
    p = [0.1, 0.6, 0.3, 0.8, 0.4]
    m = binary_metrics(y, p, 0.5, dx=["nv", "bkl", "nv", "mel", "bcc"])
    assert m["confusion"] == {"tn": 2, "fp": 1, "fn": 1, "tp": 1}
    assert m["sensitivity"] == 0.5 and m["specificity"] == pytest.approx(2 / 3) and m["precision"] == 0.5
    assert m["recall_per_dx"] == {"bcc": 0.0, "bkl": 0.0, "mel": 1.0, "nv": 1.0}
    assert m["n_per_dx"] == {"bcc": 1, "bkl": 1, "mel": 1, "nv": 2}
    # ROC points (fpr, tpr): (0,.5) (1/3,.5) (1/3,1) ... -> best sensitivity at spec >= 0.9 is 0.5.
    assert m["sens_at_90_spec"] == 0.5
    assert m["spec_at_90_sens"] == pytest.approx(2 / 3)


def test_one_class_gives_none_not_nan() -> None:
    m = binary_metrics([0, 0, 0], [0.2, 0.7, 0.1], 0.5, dx=["nv", "nv", "df"])
    assert m["roc_auc"] is None and m["pr_auc"] is None and m["sensitivity"] is None
    assert m["sens_at_90_spec"] is None and m["spec_at_90_sens"] is None
    assert m["specificity"] == pytest.approx(2 / 3) and m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["precision"] == 0.0 and m["f1"] == 0.0
    json.dumps(m, allow_nan=False)
    m = binary_metrics([1, 1], [0.2, 0.3], 0.5)
    assert m["precision"] is None and m["f1"] == 0.0 and m["specificity"] is None and m["pr_auc"] == 1.0
    empty = binary_metrics([], [], 0.5)
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["ece"] is None
    json.dumps(empty, allow_nan=False)


def test_sens_spec_helpers_against_brute_force(scored) -> None:
    y, p = scored
    cuts = np.concatenate([np.unique(p), [np.inf]])
    sens = np.array([(p[y == 1] >= t).mean() for t in cuts])
    spec = np.array([(p[y == 0] < t).mean() for t in cuts])
    for target in (0.5, 0.8, 0.9, 0.95):
        assert sensitivity_at_specificity(y, p, target) == pytest.approx(sens[spec >= target].max())
        assert specificity_at_sensitivity(y, p, target) == pytest.approx(spec[sens >= target].max())


def test_ece_definition_by_hand() -> None:
    # Two bins used out of 2: [0, .5) holds p = .1, .2 (rate 0.5), [.5, 1] holds .9, 1.0 (rate 1).
    y = [0, 1, 1, 1]
    p = [0.1, 0.2, 0.9, 1.0]
    expected = 0.5 * abs(0.5 - 0.15) + 0.5 * abs(1.0 - 0.95)
    assert expected_calibration_error(y, p, bins=2) == pytest.approx(expected)
    table = reliability_bins(y, p, bins=2)
    assert table["count"] == [2, 2] and table["observed"] == [0.5, 1.0]
    rng = np.random.default_rng(1)
    q = rng.random(200_000)
    assert expected_calibration_error(rng.random(q.size) < q, q) < 0.01  # calibrated by construction
    assert expected_calibration_error(rng.random(q.size) < q, q**3) > 0.1


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_known_temperature(true_t: float) -> None:
    generator = torch.Generator().manual_seed(0)
    calibrated = torch.randn(20_000, 2, generator=generator) * 2.0
    labels = torch.multinomial(torch.softmax(calibrated, dim=1), 1, generator=generator).squeeze(1)
    fitted = fit_temperature(calibrated * true_t, labels)
    assert fitted == pytest.approx(true_t, rel=0.06)


def test_fit_temperature_degenerate_inputs_stay_finite() -> None:
    assert fit_temperature(torch.empty(0, 2), torch.empty(0, dtype=torch.long)) == 1.0
    separable = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])
    t = fit_temperature(separable, torch.tensor([0, 1]))
    assert math.isfinite(t) and 0.05 <= t < 1.0


def test_youden_threshold_is_best_on_roc(scored) -> None:
    y, p = scored
    t = choose_threshold(y, p, "youden")
    assert 0 < t < 1

    def youden(cut: float) -> float:
        return (p[y == 1] >= cut).mean() + (p[y == 0] < cut).mean() - 1

    assert youden(t) == pytest.approx(max(youden(c) for c in np.unique(p)))


def test_sensitivity_rule_highest_threshold_reaching_target(scored) -> None:
    y, p = scored
    for target in (0.8, 0.9, 0.95):
        t = choose_threshold(y, p, "sensitivity", target)
        assert (p[y == 1] >= t).mean() >= target
        higher = p[p > t]
        if higher.size:  # the next higher cut misses the target
            assert (p[y == 1] >= higher.min()).mean() < target


def test_threshold_fallbacks() -> None:
    assert choose_threshold([0, 0, 0], [0.1, 0.2, 0.3]) == 0.5
    assert choose_threshold([], []) == 0.5
    assert choose_threshold([1, 1], [0.9, 0.8], "sensitivity") == 0.5
    t = choose_threshold([0, 1], [0.0, 1.0])
    assert 0 < t < 1
    with pytest.raises(ValueError, match="unknown threshold rule"):
        choose_threshold([0, 1], [0.2, 0.8], "magic")


def test_hanley_mcneil_interval_matches_a_bootstrap_and_narrows_with_more_data() -> None:
    from sklearn.metrics import roc_auc_score

    from lesion.metrics import hanley_mcneil_interval

    rng = np.random.default_rng(0)
    y = np.array([0] * 70 + [1] * 60)
    p = np.where(y == 1, rng.normal(1.2, 1.0, y.size), rng.normal(0.0, 1.0, y.size))
    auc = roc_auc_score(y, p)
    low, high = hanley_mcneil_interval(auc, 60, 70)
    assert low < auc < high
    boots = []
    for _ in range(1000):
        index = np.concatenate([rng.choice(70, 70), 70 + rng.choice(60, 60)])
        boots.append(roc_auc_score(y[index], p[index]))
    # The normal interval's half width is 1.96 standard errors; the bootstrap's spread agrees within 25 %.
    assert (high - low) / 2 / 1.96 == pytest.approx(np.std(boots), rel=0.25)
    assert hanley_mcneil_interval(auc, 600, 700)[1] - hanley_mcneil_interval(auc, 600, 700)[0] < (high - low) / 2
    assert hanley_mcneil_interval(1.0, 5, 5) == (1.0, 1.0)
    with pytest.raises(ValueError):
        hanley_mcneil_interval(0.8, 0, 10)
