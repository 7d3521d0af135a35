"""Binary metrics on P(malignant), calibration, and the decision threshold.

Numpy in, plain Python out: every value is a float, an int, a list, a dict or None, so a
result goes straight into metrics.json, a checkpoint or an event. A metric that is undefined
for the data (ROC-AUC with one class, precision with no positive prediction) is None, never
NaN. An image is called malignant when ``p_malignant >= threshold``, the convention of
scikit-learn's ``roc_curve`` and so of :func:`choose_threshold`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from lesion.verdict import called_malignant

FALLBACK_THRESHOLD = 0.5
# The headline figures of a run, in the order every report shows them (metrics.json's ``headline``,
# the model list, the model card, ``python -m train.evaluate``).
HEADLINE_METRICS = (
    "roc_auc",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "accuracy",
    "precision",
    "f1",
    "pr_auc",
)
# Thresholds are kept strictly inside (0, 1) so "p >= threshold" always means something.
_EPS = 1e-6


def _arrays(y_true: Any, p_malignant: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(p_malignant, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} probabilities")
    return y, p


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.size) and 0 < int(y.sum()) < y.size


def _roc(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ROC point (no points dropped), highest threshold first."""
    return roc_curve(y, p, drop_intermediate=False)


def sensitivity_at_specificity(y_true: Any, p_malignant: Any, specificity: float = 0.9) -> float | None:
    """Best sensitivity among thresholds whose specificity is at least ``specificity``."""
    y, p = _arrays(y_true, p_malignant)
    if not _both_classes(y):
        return None
    fpr, tpr, _ = _roc(y, p)
    ok = (1.0 - fpr) >= specificity - 1e-12
    return float(tpr[ok].max()) if ok.any() else None


def specificity_at_sensitivity(y_true: Any, p_malignant: Any, sensitivity: float = 0.9) -> float | None:
    """Best specificity among thresholds whose sensitivity is at least ``sensitivity``."""
    y, p = _arrays(y_true, p_malignant)
    if not _both_classes(y):
        return None
    fpr, tpr, _ = _roc(y, p)
    ok = tpr >= sensitivity - 1e-12
    return float((1.0 - fpr[ok]).max()) if ok.any() else None


def reliability_bins(y_true: Any, p_malignant: Any, bins: int = 15) -> dict[str, list]:
    """Equal-width bins over P(malignant) in [0, 1]: per non-empty bin, mean P, observed rate, count."""
    y, p = _arrays(y_true, p_malignant)
    index = np.clip((p * bins).astype(int), 0, bins - 1)  # p == 1.0 belongs to the last bin
    counts = np.bincount(index, minlength=bins)
    sum_p = np.bincount(index, weights=p, minlength=bins)
    sum_y = np.bincount(index, weights=y, minlength=bins)
    used = counts > 0
    return {
        "mean_p": (sum_p[used] / counts[used]).tolist(),
        "observed": (sum_y[used] / counts[used]).tolist(),
        "count": counts[used].astype(int).tolist(),
    }


def expected_calibration_error(y_true: Any, p_malignant: Any, bins: int = 15) -> float:
    """Binary ECE of P(malignant): sum over equal-width bins of (share of images) x |rate - mean P|.

    This is the reliability of the malignant-class probability itself (what the app shows),
    not the top-label confidence ECE of multi-class papers; the two differ for two classes
    only in how images are binned. Empty input gives 0.0.
    """
    y, _ = _arrays(y_true, p_malignant)
    if y.size == 0:
        return 0.0
    table = reliability_bins(y_true, p_malignant, bins)
    gaps = np.abs(np.asarray(table["observed"]) - np.asarray(table["mean_p"]))
    return float(np.sum(np.asarray(table["count"]) * gaps) / y.size)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def binary_metrics(y_true: Any, p_malignant: Any, threshold: float, dx: Sequence[str] | None = None) -> dict[str, Any]:
    """Threshold and ranking metrics for benign (0) vs malignant (1); JSON-ready, None where undefined.

    ``recall_per_dx`` gives, per diagnosis, the share of its images given their correct label
    (sensitivity for malignant diagnoses, specificity for benign ones); ``pr_auc`` is average precision.
    """
    y, p = _arrays(y_true, p_malignant)
    predicted = called_malignant(p, threshold).astype(int)
    tp = int(np.sum((predicted == 1) & (y == 1)))
    tn = int(np.sum((predicted == 0) & (y == 0)))
    fp = int(np.sum((predicted == 1) & (y == 0)))
    fn = int(np.sum((predicted == 0) & (y == 1)))
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    defined = [v for v in (sensitivity, specificity) if v is not None]
    both = _both_classes(y)
    result: dict[str, Any] = {
        "n": int(y.size),
        "n_malignant": int(y.sum()),
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, y.size),
        # Like scikit-learn: the mean recall over the classes present.
        "balanced_accuracy": float(np.mean(defined)) if defined else None,
        "precision": _ratio(tp, tp + fp),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": float(roc_auc_score(y, p)) if both else None,
        "pr_auc": float(average_precision_score(y, p)) if y.sum() > 0 else None,
        "sens_at_90_spec": sensitivity_at_specificity(y, p, 0.9),
        "spec_at_90_sens": specificity_at_sensitivity(y, p, 0.9),
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "recall_per_dx": {},
        "n_per_dx": {},
        "ece": expected_calibration_error(y, p) if y.size else None,
    }
    if dx is not None:
        names = np.asarray([str(d) for d in dx])
        if names.shape != y.shape:
            raise ValueError(f"{names.size} diagnoses but {y.size} labels")
        correct = predicted == y
        for name in sorted(set(names.tolist())):
            mask = names == name
            result["recall_per_dx"][name] = float(correct[mask].mean())
            result["n_per_dx"][name] = int(mask.sum())
    for key, value in result.items():
        if isinstance(value, float):
            result[key] = _finite(value)
    return result


def _nll(logits: torch.Tensor, labels: torch.Tensor, log_t: float) -> float:
    return float(torch.nn.functional.cross_entropy(logits / math.exp(log_t), labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, low: float = 0.05, high: float = 20.0) -> float:
    """The temperature T in [low, high] that minimises the NLL of softmax(logits / T).

    A grid over log T finds the basin, then a golden-section search refines it: deterministic,
    no learning rate to tune, and bounded where perfectly separated logits would push T to 0.
    Returns 1.0 when there is nothing to fit.
    """
    logits = logits.detach().to("cpu", torch.float64)
    labels = labels.detach().to("cpu", torch.long)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[0] != labels.shape[0]:
        return 1.0
    grid = np.linspace(math.log(low), math.log(high), 61)
    losses = [_nll(logits, labels, g) for g in grid]
    best = int(np.argmin(losses))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = _nll(logits, labels, c), _nll(logits, labels, d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = _nll(logits, labels, c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = _nll(logits, labels, d)
    return float(math.exp((a + b) / 2))


def choose_threshold(y_true: Any, p_malignant: Any, rule: str = "youden", target_sensitivity: float = 0.9) -> float:
    """Decision threshold on P(malignant) from validation predictions.

    ``youden``: the ROC threshold maximising sensitivity + specificity - 1 (the highest on ties).
    ``sensitivity``: the highest ROC threshold whose sensitivity reaches ``target_sensitivity``.
    Always a float strictly inside (0, 1); 0.5 when the data cannot decide (one class, no data).
    """
    if rule not in ("youden", "sensitivity"):
        raise ValueError(f"unknown threshold rule {rule!r}; choose youden or sensitivity")
    y, p = _arrays(y_true, p_malignant)
    finite = np.isfinite(p)
    y, p = y[finite], p[finite]
    if not _both_classes(y):
        return FALLBACK_THRESHOLD
    fpr, tpr, thresholds = _roc(y, p)
    # roc_curve's first point is "call nothing malignant" with an infinite threshold: not usable.
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    if rule == "youden":
        index = int(np.argmax(tpr - fpr))  # argmax takes the first, i.e. highest, threshold on ties
    else:
        reached = np.flatnonzero(tpr >= target_sensitivity - 1e-12)
        index = int(reached[0])  # tpr reaches 1.0 at the last point, so this is never empty
    return float(np.clip(thresholds[index], _EPS, 1.0 - _EPS))


def hanley_mcneil_interval(auc: float, n_positive: int, n_negative: int, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of a ROC-AUC from its value and the class counts (Hanley & McNeil, 1982).

    The standard error uses the exponential approximation Q1 = A/(2-A), Q2 = 2A^2/(1+A); the
    interval is the normal one, clipped to [0, 1]. It needs no per-image scores, so it can be
    given for any run's metrics.json; it is slightly narrower than a bootstrap on small sets.
    """
    if not 0.0 <= auc <= 1.0 or n_positive < 1 or n_negative < 1:
        raise ValueError(f"need an AUC in [0, 1] and both classes; got {auc}, {n_positive}, {n_negative}")
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    variance = (auc * (1.0 - auc) + (n_positive - 1) * (q1 - auc * auc) + (n_negative - 1) * (q2 - auc * auc)) / (
        n_positive * n_negative
    )
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    half = z * math.sqrt(max(variance, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def dx_metrics(dx_true: Sequence[str], dx_probabilities: Any, names: Sequence[str]) -> dict[str, Any]:
    """Multi-class figures of a dx head: the predicted diagnosis is the most probable output.

    ``balanced_accuracy`` is the mean per-dx recall over the diagnoses present in ``dx_true``
    (scikit-learn's ``balanced_accuracy_score``; the ISIC 2018 task 3 measure). ``confusion`` is
    ``[true][predicted]`` in ``names`` order. Images whose true dx is not among ``names`` cannot be
    scored and are counted in ``n_unscored``. JSON-ready; None where a figure is undefined.
    """
    names = [str(n) for n in names]
    truth = np.asarray([str(d) for d in dx_true])
    probabilities = np.asarray(dx_probabilities, dtype=np.float64).reshape(len(truth), -1)
    if probabilities.shape[1] != len(names):
        raise ValueError(f"{probabilities.shape[1]} probability columns but {len(names)} diagnosis names")
    scored = np.isin(truth, names)
    position = {name: i for i, name in enumerate(names)}
    y = np.asarray([position[t] for t in truth[scored]], dtype=int)
    predicted = probabilities[scored].argmax(axis=1) if scored.any() else np.zeros(0, dtype=int)
    confusion = np.zeros((len(names), len(names)), dtype=int)
    np.add.at(confusion, (y, predicted), 1)
    support, called, hits = confusion.sum(axis=1), confusion.sum(axis=0), np.diag(confusion)
    recall = {name: _ratio(hits[i], support[i]) for i, name in enumerate(names)}
    precision = {name: _ratio(hits[i], called[i]) for i, name in enumerate(names)}
    defined = [value for value in recall.values() if value is not None]
    return {
        "names": names,
        "n": int(scored.sum()),
        "n_unscored": int((~scored).sum()),
        "balanced_accuracy": float(np.mean(defined)) if defined else None,
        "accuracy": _ratio(int(hits.sum()), int(scored.sum())),
        "recall": recall,
        "precision": precision,
        "support": {name: int(support[i]) for i, name in enumerate(names)},
        "confusion": confusion.tolist(),
    }


def roc_auc_interval(
    y_true: Any,
    p_malignant: Any,
    groups: Sequence[Any] | None = None,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the ROC-AUC, resampling whole ``groups`` (lesions) when given.

    Images of one lesion are not independent, so resampling lesions rather than images keeps the
    interval honest. Resamples with one class only are skipped; None when fewer than half remain.
    """
    values = _lesion_bootstrap(y_true, [p_malignant], groups, resamples, seed)
    return None if values is None else _percentile_interval(values[:, 0], level, resamples)


def roc_auc_difference_interval(
    y_true: Any,
    p_a: Any,
    p_b: Any,
    groups: Sequence[Any] | None = None,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Paired bootstrap interval of ROC-AUC(p_a) - ROC-AUC(p_b) on the same images, resampling ``groups``.

    Both models are scored on the same resampled lesions, so what the split's luck does to both
    cancels; an interval that contains 0 means the data cannot tell the two apart.
    """
    values = _lesion_bootstrap(y_true, [p_a, p_b], groups, resamples, seed)
    return None if values is None else _percentile_interval(values[:, 0] - values[:, 1], level, resamples)


def mean_roc_auc_difference_interval(
    samples: Sequence[tuple[Any, Any, Any, Sequence[Any] | None]],
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Bootstrap interval of the MEAN paired ROC-AUC difference over several independent splits.

    ``samples`` holds one ``(y_true, p_a, p_b, groups)`` per split (per seed): each split's lesions
    are resampled on their own, as in :func:`roc_auc_difference_interval`, and each round averages
    the splits' differences. The splits are independent, so the mean's interval is narrower than any
    one split's; it still only covers the test lesions' luck, not what a new seed would train.
    """
    rounds = []
    for index, (y_true, p_a, p_b, groups) in enumerate(samples):
        values = _lesion_bootstrap(y_true, [p_a, p_b], groups, resamples, seed + index)
        if values is None:
            return None
        rounds.append(values[:, 0] - values[:, 1])
    return _percentile_interval(np.mean(rounds, axis=0), level, resamples) if rounds else None


def _lesion_bootstrap(
    y_true: Any, scores: list[Any], groups: Sequence[Any] | None, resamples: int, seed: int
) -> np.ndarray | None:
    """ROC-AUC of each score on resamples of whole groups (images when None); None with one class."""
    y = _arrays(y_true, scores[0])[0]
    if not _both_classes(y):
        return None
    columns = [_arrays(y_true, score)[1] for score in scores]
    keys = np.asarray(groups if groups is not None else np.arange(y.size))
    return _bootstrap_aucs(y, columns, keys, resamples, seed)


def _percentile_interval(values: np.ndarray, level: float, resamples: int) -> tuple[float, float] | None:
    """The central ``level`` interval of the finite bootstrap values; None when fewer than half are finite."""
    values = values[np.isfinite(values)]
    if len(values) < resamples / 2:
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _bootstrap_aucs(y: np.ndarray, scores: list[np.ndarray], keys: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """ROC-AUC of each score on ``resamples`` resamples of whole groups, (resamples, len(scores)); nan for one class."""
    if keys.shape != y.shape:
        raise ValueError(f"{keys.size} groups but {y.size} labels")
    _, members = np.unique(keys, return_inverse=True)
    ranks = [np.unique(p, return_inverse=True)[1] for p in scores]  # tied probabilities share a rank
    n_groups = int(members.max()) + 1
    rng = np.random.default_rng(seed)
    values = np.full((resamples, len(scores)), np.nan)
    for r in range(resamples):
        # A resample of lesions is a count per lesion; each image weighs its lesion's count.
        weight = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)[members].astype(np.float64)
        for column, rank in enumerate(ranks):
            positive = np.bincount(rank, weights=weight * y, minlength=rank.max() + 1)
            negative = np.bincount(rank, weights=weight * (1 - y), minlength=rank.max() + 1)
            if positive.sum() and negative.sum():
                # Mann-Whitney: each positive beats the negatives below it and ties with those beside it.
                below = np.cumsum(negative) - negative
                values[r, column] = np.sum(positive * (below + 0.5 * negative)) / (positive.sum() * negative.sum())
    return values


def prediction_dx_metrics(
    predictions: Sequence[Any], dx_true: Sequence[str], dx_names: Sequence[str]
) -> dict[str, Any] | None:
    """:func:`dx_metrics` of predictions (each with ``dx_probabilities``); None for a binary model (no dx names)."""
    if not dx_names:
        return None
    table = [[prediction.dx_probabilities[name] for name in dx_names] for prediction in predictions]
    return dx_metrics(dx_true, np.array(table), dx_names)
