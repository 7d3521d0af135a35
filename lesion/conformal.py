"""Prediction sets for the diagnosis: split-conformal adaptive prediction sets (APS, and RAPS's penalty).

A single top diagnosis hides how unsure the model is. A conformal set says instead "with 90 %
confidence: melanoma or nevus", and on images exchangeable with the calibration images the true
diagnosis is in the set at least 90 % of the time (Angelopoulos & Bates 2021, "A gentle
introduction to conformal prediction", sections 1-2; Romano et al. 2020 for APS; Angelopoulos et al.
2021 for RAPS).

How it works here:

- **Score** of an image and a class: the calibrated probabilities sorted in decreasing order, summed
  down to and including that class (APS without randomisation, so a photo always gets the same set),
  plus RAPS's penalty ``lam * max(0, rank - k_reg)`` (rank 1 = the top class). RAPS is the default:
  its penalty is chosen on the validation split itself (:func:`tune`: the smallest sets that keep
  the coverage over 100 seeded random halves), since plain APS on a few hundred images gives large
  sets and more coverage than asked.
- **Calibration** (:func:`calibrate`): the score of the true class of every validation image, kept
  sorted in the checkpoint, so the presenter can choose the coverage at prediction time.
- **Set** (:func:`prediction_set`): every class whose score is at most the ``ceil((n + 1) * coverage) / n``
  empirical quantile of the calibration scores. The top class is always in it (a set is never empty;
  that can only raise the coverage). Asking for more coverage than ``n`` calibration images can
  promise (``coverage > n / (n + 1)``) gives every class.

A binary head gets a set over benign and malignant the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

METHODS = ("aps", "raps")
DEFAULT_METHOD = "raps"
DEFAULT_COVERAGE = 0.9
#: RAPS's penalty is chosen on the calibration split itself (:func:`tune`), from these values.
LAMBDAS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
K_REGS = (0, 1, 2)
TUNING_REPEATS = 100


def class_scores(probabilities: Any, lam: float = 0.0, k_reg: int = 0) -> np.ndarray:
    """(n, K) conformity scores: each class's cumulative probability in the decreasing order, plus the penalty."""
    p = np.atleast_2d(np.asarray(probabilities, dtype=np.float64))
    order = np.argsort(-p, axis=1, kind="stable")
    sorted_p = np.take_along_axis(p, order, axis=1)
    cumulative = np.cumsum(sorted_p, axis=1)
    if lam > 0:
        ranks = np.arange(1, p.shape[1] + 1)
        cumulative = cumulative + lam * np.maximum(0, ranks - k_reg)
    scores = np.empty_like(cumulative)
    np.put_along_axis(scores, order, cumulative, axis=1)
    return scores


def _quantile_of(scores: np.ndarray, coverage: float) -> float:
    n = len(scores)
    rank = math.ceil((n + 1) * coverage - 1e-9)
    return float("inf") if rank > n else float(np.sort(scores)[rank - 1])


def _sets(probabilities: np.ndarray, threshold: float, lam: float, k_reg: int) -> np.ndarray:
    """(n, K) membership: score at most ``threshold``, and the top class always."""
    member = class_scores(probabilities, lam, k_reg) <= threshold
    member[np.arange(len(member)), probabilities.argmax(axis=1)] = True
    return member


def tune(probabilities: np.ndarray, labels: np.ndarray, coverage: float = DEFAULT_COVERAGE, seed: int = 0) -> dict:
    """RAPS's (lambda, k_reg): the smallest mean set at ``coverage`` over seeded random halves of the calibration images.

    Each repeat calibrates on one half and measures on the other; a setting qualifies when its mean
    coverage is at least ``coverage`` - 0.01. Ties go to the smaller penalty.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    halves = [rng.permutation(n) for _ in range(TUNING_REPEATS)]
    found = []
    for lam in LAMBDAS:
        for k_reg in K_REGS if lam > 0 else (0,):
            covered, sizes = [], []
            for order in halves:
                fit, held = order[: n // 2], order[n // 2 :]
                fit_scores = class_scores(probabilities[fit], lam, k_reg)[np.arange(len(fit)), labels[fit]]
                member = _sets(probabilities[held], _quantile_of(fit_scores, coverage), lam, k_reg)
                covered.append(member[np.arange(len(held)), labels[held]].mean())
                sizes.append(member.sum(axis=1).mean())
            found.append((float(np.mean(sizes)), lam, k_reg, float(np.mean(covered))))
    qualified = [row for row in found if row[3] >= coverage - 0.01] or found
    size, lam, k_reg, covered = min(qualified, key=lambda row: (round(row[0], 6), row[1], row[2]))
    return {"lambda": lam, "k_reg": k_reg, "tuning_mean_size": size, "tuning_coverage": covered}


def calibrate(
    probabilities: Any, labels: Sequence[int], names: Sequence[str], method: str = DEFAULT_METHOD, seed: int = 0
) -> dict[str, Any]:
    """The checkpoint's ``conformal`` entry: sorted scores of the true class of each calibration image.

    ``probabilities`` (n, K) are the calibrated outputs in ``names`` order; ``labels`` the index of
    each image's true output. Images without one (a negative label: a diagnosis the head lacks) are
    left out and counted. RAPS first tunes its penalty on the same images (:func:`tune`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown conformal method {method!r}; choose one of {', '.join(METHODS)}")
    p = np.atleast_2d(np.asarray(probabilities, dtype=np.float64))
    y = np.asarray(labels, dtype=np.int64)
    if p.shape[0] != y.shape[0] or p.shape[1] != len(names):
        raise ValueError(f"{p.shape} probabilities for {y.shape[0]} labels and {len(names)} names")
    used = y >= 0
    if not used.any():
        raise ValueError("no calibration image has a label among the head's outputs")
    p, y = p[used], y[used]
    tuned = tune(p, y, seed=seed) if method == "raps" and len(y) >= 10 else {"lambda": 0.0, "k_reg": 0}
    scores = class_scores(p, tuned["lambda"], tuned["k_reg"])[np.arange(len(y)), y]
    return {
        "method": method,
        **tuned,
        "names": [str(name) for name in names],
        "scores": sorted(float(s) for s in scores),
        "left_out": int((~used).sum()),
        "calibrated_on": "val",
        "default_coverage": DEFAULT_COVERAGE,
    }


def check_coverage(coverage: float) -> float:
    coverage = float(coverage)
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"the coverage must be between 0 and 1 (e.g. 0.9), not {coverage}")
    return coverage


def quantile(entry: dict[str, Any], coverage: float) -> float:
    """The score threshold for ``coverage``: the ceil((n+1)·coverage)-th smallest calibration score (inf beyond n)."""
    return _quantile_of(np.asarray(entry["scores"], dtype=np.float64), check_coverage(coverage))


def prediction_sets(entry: dict[str, Any], probabilities: Any, coverage: float) -> list[list[str]]:
    """Per image, the names of the classes in its set, most probable first (the top class always)."""
    p = np.atleast_2d(np.asarray(probabilities, dtype=np.float64))
    member = _sets(p, quantile(entry, coverage), float(entry.get("lambda", 0.0)), int(entry.get("k_reg", 0)))
    names = entry["names"]
    return [
        [names[j] for j in np.argsort(-row_p, kind="stable") if row_m[j]]
        for row_p, row_m in zip(p, member, strict=True)
    ]


def prediction_set(entry: dict[str, Any], probabilities: Any, coverage: float) -> list[str]:
    """The set of one image (``probabilities``: its K calibrated outputs)."""
    return prediction_sets(entry, [probabilities], coverage)[0]


def check_entry(entry: Any, names: Sequence[str]) -> str:
    """What is wrong with a checkpoint's ``conformal`` entry ('' when usable) for a head with ``names``."""
    if not isinstance(entry, dict):
        return "its conformal entry is not a table"
    if entry.get("method") not in METHODS:
        return f"its conformal method {entry.get('method')!r} is unknown"
    if list(entry.get("names") or []) != list(names):
        return "its conformal entry names other outputs than the head"
    scores = entry.get("scores")
    if not isinstance(scores, list) or not scores or not all(isinstance(s, (int, float)) for s in scores):
        return "its conformal scores are not a list of numbers"
    if not all(math.isfinite(s) for s in scores) or any(b < a for a, b in zip(scores, scores[1:], strict=False)):
        return "its conformal scores are not finite and sorted"
    for key in ("lambda", "k_reg"):
        if not isinstance(entry.get(key, 0), (int, float)) or entry.get(key, 0) < 0:
            return f"its conformal {key} is not a non-negative number"
    return ""


def set_metrics(sets: Sequence[Sequence[str]], truth: Sequence[str], coverage: float) -> dict[str, Any]:
    """Empirical coverage and mean set size, overall and per true class (classes the sets can name only)."""
    per: dict[str, dict[str, Any]] = {}
    for chosen, true in zip(sets, truth, strict=True):
        row = per.setdefault(str(true), {"n": 0, "covered": 0, "size": 0})
        row["n"] += 1
        row["covered"] += str(true) in chosen
        row["size"] += len(chosen)
    n = sum(row["n"] for row in per.values())
    if not n:
        return {"nominal_coverage": coverage, "n": 0}
    return {
        "nominal_coverage": coverage,
        "n": n,
        "coverage": sum(row["covered"] for row in per.values()) / n,
        "mean_size": sum(row["size"] for row in per.values()) / n,
        "per_class": {
            name: {"n": row["n"], "coverage": row["covered"] / row["n"], "mean_size": row["size"] / row["n"]}
            for name, row in sorted(per.items())
        },
    }


def set_in_words(names: Sequence[str], coverage: float, total: int | None = None) -> str:
    """The set in plain words: "With 90 % confidence: melanoma or melanocytic nevus." ('' for no set)."""
    from lesion.labels import DX_NAMES

    if not names:
        return ""
    words = [DX_NAMES.get(name, name) for name in names]
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    text = f"With {coverage:.0%} confidence: {listed}."
    if total is not None and len(names) >= total > 2:
        text += " The model cannot narrow it down at this confidence."
    return text


def true_classes(dx: Sequence[str], labels: Sequence[int], by_diagnosis: bool) -> list[str]:
    """Each image's true class in a head's terms: its diagnosis, or benign / malignant for a binary head."""
    return [str(d) for d in dx] if by_diagnosis else ["malignant" if y else "benign" for y in labels]


def measure(entry: dict[str, Any], sets: Sequence[Sequence[str]], truth: Sequence[str], coverage: float) -> dict:
    """:func:`set_metrics` over the images whose true class the head names, with the calibration named."""
    scored = [(row, true) for row, true in zip(sets, truth, strict=True) if true in entry["names"]]
    return {
        "method": entry["method"],
        "calibrated_on": f"val ({len(entry['scores'])} images)",
        **set_metrics([row for row, _ in scored], [true for _, true in scored], coverage),
    }
