"""Out-of-distribution detectors: is this photo like the lesions the model was trained on?

Every detector maps (penultimate features, logits) to a score where HIGHER means LESS like the
training lesions; an image is rejected when its score is above the detector's threshold.
Thresholds are fitted so that a chosen share (``keep``, 95 % by default) of VALIDATION lesions
is accepted, so every detector is compared at the same cost to real lesions.

- ``msp``: 1 - max softmax (Hendrycks & Gimpel 2017), the notebook's baseline. With two classes
  the max softmax never drops below 0.5, so this score lives in [0, 0.5] and separates little;
  over the C outputs of a dx head it lives in [0, 1 - 1/C] (the max over diagnoses, not over sides).
- ``energy``: -T * logsumexp(logits / T) with T = 1 (Liu et al. 2020), over all of the head's outputs.
- ``mahalanobis``: minimum over classes (diagnoses, for a dx head) of the Mahalanobis distance to the class mean, with one
  covariance shared by the classes (Lee et al. 2018), shrunk towards a scaled identity
  (Ledoit-Wolf) because a few hundred images cannot estimate a 2048 x 2048 covariance.
- ``knn``: cosine distance to the k-th nearest L2-normalised training feature (Sun et al. 2022).

Logits are the raw network outputs (before temperature scaling): the detectors are fitted and
applied on the same quantity, so calibration never shifts an OOD threshold.

Fitted statistics are tensors and plain values only, so they live in a ``weights_only`` checkpoint.
These are our own short implementations; pytorch-ood is not a dependency.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.covariance import ledoit_wolf_shrinkage
from sklearn.metrics import roc_auc_score

#: The notebook rejected images whose max softmax was below 0.8; in score units (1 - max softmax,
#: higher = more OOD) that is "reject when score > 0.2".
NOTEBOOK_MSP_THRESHOLD = 0.2
ENERGY_TEMPERATURE = 1.0
KNN_BANK_SIZE = 4096
KNN_SEED = 0

Stats = dict[str, Any]


# --- scorers: (stats, features, logits) -> scores (N,), higher = more OOD ----------------------


def _score_msp(stats: Stats, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.softmax(logits.float(), dim=1).max(dim=1).values


def _score_energy(stats: Stats, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    temperature = float(stats.get("temperature", ENERGY_TEMPERATURE))
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=1)


def _score_mahalanobis(stats: Stats, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    means = stats["means"].float().to(features.device)  # (C, D)
    precision = stats["precision"].float().to(features.device)  # (D, D)
    centred = features.float()[:, None, :] - means[None, :, :]  # (N, C, D)
    squared = torch.einsum("ncd,de,nce->nc", centred, precision, centred)
    # Rounding can make a distance of ~0 slightly negative; clamp before the square root.
    return squared.clamp_min(0).sqrt().min(dim=1).values


def _score_knn(stats: Stats, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    bank = stats["bank"].float().to(features.device)  # (M, D), rows already L2-normalised
    k = min(int(stats["k"]), bank.shape[0])
    similarity = torch.nn.functional.normalize(features.float(), dim=1) @ bank.T  # (N, M)
    kth = similarity.topk(k, dim=1).values[:, -1]
    return 1.0 - kth


SCORERS: dict[str, Callable[[Stats, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "msp": _score_msp,
    "energy": _score_energy,
    "mahalanobis": _score_mahalanobis,
    "knn": _score_knn,
}


def score(method: str, stats: Stats, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """OOD scores (N,) for ``method``: higher = less like the training lesions."""
    if method not in SCORERS:
        raise ValueError(f"unknown OOD method {method!r}; choose one of {', '.join(SCORERS)}")
    return SCORERS[method](stats, features, logits)


# --- fitting -------------------------------------------------------------------------------


def _fit_msp(features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, k: int) -> Stats:
    return {}


def _fit_energy(features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, k: int) -> Stats:
    return {"temperature": ENERGY_TEMPERATURE}


def fit_mahalanobis(features: torch.Tensor, labels: torch.Tensor, shrinkage: float | None = None) -> Stats:
    """Class means and the precision of the shared (shrunk) within-class covariance.

    ``shrinkage`` None estimates the Ledoit-Wolf coefficient from the data; 0 keeps the plain
    covariance (plus a tiny ridge so it can always be inverted).
    """
    x = features.double()
    classes = torch.unique(labels)
    means = torch.stack([x[labels == c].mean(dim=0) for c in classes])
    centred = x - means[torch.searchsorted(classes, labels)]
    if shrinkage is None:
        shrinkage = float(ledoit_wolf_shrinkage(centred.numpy(), assume_centered=True)) if len(x) > 1 else 1.0
    covariance = centred.T @ centred / max(len(x), 1)
    dim = covariance.shape[0]
    scale = float(torch.trace(covariance)) / dim or 1.0
    covariance = (1 - shrinkage) * covariance + shrinkage * scale * torch.eye(dim, dtype=x.dtype)
    covariance += 1e-6 * scale * torch.eye(dim, dtype=x.dtype)
    precision = torch.linalg.inv(covariance)
    precision = (precision + precision.T) / 2  # exact symmetry despite rounding
    # Means are indexed by position; record which label each row belongs to.
    return {
        "means": means.float(),
        "precision": precision.float(),
        "classes": classes.tolist(),
        "shrinkage": float(shrinkage),
    }


def _fit_mahalanobis(features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, k: int) -> Stats:
    return fit_mahalanobis(features, labels)


def _fit_knn(features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, k: int) -> Stats:
    rows = features.shape[0]
    if rows > KNN_BANK_SIZE:
        # A seeded choice, so refitting on the same features gives the same bank.
        generator = torch.Generator().manual_seed(KNN_SEED)
        keep = torch.randperm(rows, generator=generator)[:KNN_BANK_SIZE].sort().values
        features = features[keep]
    bank = torch.nn.functional.normalize(features.float(), dim=1)
    # float16 halves the checkpoint; cosine similarities change by ~1e-3 at most.
    return {"bank": bank.half(), "k": int(k)}


FITTERS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], Stats]] = {
    "msp": _fit_msp,
    "energy": _fit_energy,
    "mahalanobis": _fit_mahalanobis,
    "knn": _fit_knn,
}


def keep_threshold(scores: torch.Tensor, keep: float) -> float:
    """The score at the ``keep`` quantile: images with score <= it are accepted."""
    return float(torch.quantile(scores.double().flatten(), keep))


def fit_detectors(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    train_logits: torch.Tensor,
    val_features: torch.Tensor,
    val_logits: torch.Tensor,
    keep: float = 0.95,
    k: int = 10,
) -> dict[str, dict]:
    """Fit every detector on training features and set its threshold on validation lesions.

    Returns ``{name: {"threshold": float, ...stats}}`` for msp, energy, mahalanobis and knn; each
    threshold accepts ``keep`` of the validation lesions.
    """
    if not 0 < keep < 1:
        raise ValueError(f"keep must lie in (0, 1); got {keep}")
    if len(val_features) == 0:
        raise ValueError("fitting OOD thresholds needs at least one validation image")
    train_features, train_logits = train_features.detach().cpu().float(), train_logits.detach().cpu().float()
    val_features, val_logits = val_features.detach().cpu().float(), val_logits.detach().cpu().float()
    train_labels = train_labels.detach().cpu().long()
    detectors: dict[str, dict] = {}
    for name, fit in FITTERS.items():
        stats = fit(train_features, train_labels, train_logits, k)
        stats["threshold"] = keep_threshold(score(name, stats, val_features, val_logits), keep)
        detectors[name] = stats
    return detectors


# --- evaluation ----------------------------------------------------------------------------


def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).ravel()


def evaluate(lesion_scores: Any, ood_scores: Any, threshold: float) -> dict[str, float | int]:
    """How well scores separate OOD images (positive) from lesions, and what ``threshold`` does.

    ``fpr_at_95_tpr`` is the share of OOD images accepted when the threshold accepts 95 % of
    the lesions given here (the usual OOD benchmark number; lower is better).
    """
    lesions, ood = _as_numpy(lesion_scores), _as_numpy(ood_scores)
    result: dict[str, float | int] = {"roc_auc": float("nan"), "fpr_at_95_tpr": float("nan")}
    if len(lesions) and len(ood):
        truth = np.r_[np.zeros(len(lesions)), np.ones(len(ood))]
        result["roc_auc"] = float(roc_auc_score(truth, np.r_[lesions, ood]))
        at_95 = float(np.quantile(lesions, 0.95))
        result["fpr_at_95_tpr"] = float(np.mean(ood <= at_95))
    result.update(
        threshold=float(threshold),
        lesions_accepted=int(np.sum(lesions <= threshold)),
        lesions_rejected=int(np.sum(lesions > threshold)),
        ood_accepted=int(np.sum(ood <= threshold)),
        ood_rejected=int(np.sum(ood > threshold)),
    )
    return result


def decision_table(
    names: Sequence[str], scores: Any, threshold: float, kinds: Sequence[str] | None = None
) -> list[dict]:
    """One row per named image: name, kind (e.g. lesion / ood), score, accepted."""
    values = _as_numpy(scores)
    kinds = list(kinds) if kinds is not None else [""] * len(values)
    return [
        {"name": name, "kind": kind, "score": float(value), "accepted": bool(value <= threshold)}
        for name, kind, value in zip(names, kinds, values, strict=True)
    ]
