"""Similar confirmed cases: the training lesions nearest to a photo in the network's own feature space.

Dermatologists explain a call by the cases it resembles. The checkpoint's ``similar`` entry holds
an embedding of every training-split image (the pooled penultimate features, L2-normalised, in
float16) with its image id, benign/malignant label and diagnosis. For a photo the predictor finds
the nearest by cosine similarity (one matrix product against the whole index):

- the :data:`SHOWN` nearest are shown, with their confirmed diagnosis;
- the ``k`` nearest vote (the entry's ``k``, :data:`VOTE_K` in files written before it): the share
  that is malignant, and their most common diagnosis. Tschandl et al. (Br J Dermatol 2019) found such
  a 16-neighbour vote predicts malignancy about as well as the softmax.
- with a ``weight`` above 0 the vote also enters the verdict: P(malignant) is
  ``(1 - weight) * network + weight * vote`` (:func:`blended`). The bundled recipe weighs them
  equally over 32 neighbours: on validation that beat the network alone on 12 of 14 runs
  (docs/experiments.md).

A run trained on a very large set keeps a stratified sample of at most :data:`MAX_IMAGES` images,
and says so (``sampled_from``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

VOTE_K = 16
SHOWN = 6
MAX_IMAGES = 20_000
FEATURE = "pooled penultimate features, L2-normalised"


@dataclass(frozen=True)
class Neighbour:
    """One similar training lesion."""

    image_id: str
    dx: str
    label: str  # "benign" or "malignant"
    similarity: float  # cosine similarity in the network's feature space, at most 1

    def to_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "dx": self.dx, "label": self.label, "similarity": self.similarity}


@dataclass(frozen=True)
class Similar:
    """What the nearest training lesions say about one photo."""

    neighbours: tuple[Neighbour, ...]  # the SHOWN nearest, nearest first
    malignant_share: float  # share malignant among the VOTE_K nearest
    dx_vote: str  # their most common diagnosis ("" when the index has none)
    k: int  # how many voted (the index's k, or the whole index when smaller)


def normalised(features: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (float32)."""
    features = features.float()
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


def build_index(
    features: torch.Tensor,
    image_ids: Sequence[str],
    labels: Sequence[int],
    dx: Sequence[str],
    max_images: int = MAX_IMAGES,
    seed: int = 0,
    k: int = VOTE_K,
    weight: float = 0.0,
) -> dict[str, Any]:
    """The checkpoint's ``similar`` entry from the training split's pooled features (labels 0 benign, 1 malignant).

    ``k`` neighbours vote; ``weight`` is their vote's share of P(malignant) (0: shown beside it only).
    """
    problem = _check_vote(k, weight)
    if problem:
        raise ValueError(problem)
    n = int(features.shape[0])
    if not (n == len(image_ids) == len(labels) == len(dx)):
        raise ValueError(f"{n} feature rows for {len(image_ids)} ids, {len(labels)} labels and {len(dx)} diagnoses")
    keep = np.arange(n)
    if n > max_images:  # a stratified sample by diagnosis, reproducible
        rng = np.random.default_rng(seed)
        dx_array = np.asarray([str(d) for d in dx])
        keep = np.concatenate(
            [
                rng.choice(np.flatnonzero(dx_array == code), round(max_images * (dx_array == code).sum() / n), False)
                for code in sorted(set(dx_array))
            ]
        )
        keep.sort()
    return {
        "embeddings": normalised(features[torch.as_tensor(keep)]).half().cpu(),
        "image_ids": [str(image_ids[i]) for i in keep],
        "labels": [int(labels[i]) for i in keep],
        "dx": [str(dx[i]) for i in keep],
        "feature": FEATURE,
        "split": "train",
        "sampled_from": n,
        "k": int(k),
        "weight": float(weight),
    }


def _check_vote(k: Any, weight: Any) -> str:
    """What is wrong with a vote's size and weight ('' when usable)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        return f"its similar-cases vote size {k!r} is not a positive whole number"
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < 1:
        return f"its similar-cases vote weight {weight!r} does not lie in [0, 1)"
    return ""


def check_index(entry: Any, feature_dim: int) -> str:
    """What is wrong with a checkpoint's ``similar`` entry ('' when usable) for features of ``feature_dim``."""
    if not isinstance(entry, dict):
        return "its similar-cases entry is not a table"
    embeddings = entry.get("embeddings")
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
        return "its similar-cases embeddings are not a 2-D float tensor"
    rows, width = embeddings.shape
    if width != feature_dim:
        return f"its similar-cases embeddings have {width} features; the network gives {feature_dim}"
    if rows == 0:
        return "its similar-cases index is empty"
    for key in ("image_ids", "labels", "dx"):
        values = entry.get(key)
        if not isinstance(values, list) or len(values) != rows:
            return f"its similar-cases {key} do not match the {rows} embeddings"
    if any(label not in (0, 1) for label in entry["labels"]):
        return "its similar-cases labels are not 0 (benign) or 1 (malignant)"
    if not bool(torch.isfinite(embeddings).all()):
        return "its similar-cases embeddings are not finite"
    return _check_vote(entry.get("k", VOTE_K), entry.get("weight", 0.0))


class SimilarIndex:
    """The index on a device, ready for :meth:`search` (read-only, so it can serve many threads)."""

    def __init__(self, entry: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.embeddings = entry["embeddings"].to(device=device, dtype=torch.float32)
        self.image_ids: list[str] = list(entry["image_ids"])
        self.labels = np.asarray(entry["labels"], dtype=np.int64)
        self.dx: list[str] = list(entry["dx"])
        self.k = int(entry.get("k", VOTE_K))  # files written before the entry held k voted with VOTE_K
        self.weight = float(entry.get("weight", 0.0))  # the vote's share of P(malignant)

    def __len__(self) -> int:
        return len(self.image_ids)

    def nearest(self, features: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, cosine similarities) of the ``k`` nearest per row, nearest first."""
        query = normalised(features.to(self.embeddings.device))
        similarity = query @ self.embeddings.T
        values, indices = similarity.topk(min(k, len(self)), dim=1)
        return indices.cpu().numpy(), values.cpu().numpy()

    def search(self, features: torch.Tensor) -> list[Similar]:
        """What the nearest training lesions say about each row of ``features``."""
        indices, values = self.nearest(features, max(self.k, SHOWN))
        results = []
        for row_indices, row_values in zip(indices, values, strict=True):
            voters = row_indices[: self.k]
            shown = tuple(
                Neighbour(
                    self.image_ids[i],
                    self.dx[i],
                    "malignant" if self.labels[i] else "benign",
                    float(min(1.0, similarity)),
                )
                for i, similarity in zip(row_indices[:SHOWN], row_values[:SHOWN], strict=True)
            )
            results.append(
                Similar(
                    neighbours=shown,
                    malignant_share=float(self.labels[voters].mean()),
                    dx_vote=_most_common([self.dx[i] for i in voters]),
                    k=len(voters),
                )
            )
        return results


def blended(p_network: Any, malignant_share: Any, weight: float) -> Any:
    """P(malignant) from the network's probability and the similar cases' malignant share.

    ``(1 - weight) * p_network + weight * malignant_share``; the network's alone at weight 0 (and where
    there is no vote: a nan share).
    """
    p = np.asarray(p_network, dtype=np.float64)
    share = np.asarray(malignant_share, dtype=np.float64)
    mixed = np.where(np.isfinite(share), (1.0 - weight) * p + weight * share, p) if weight > 0 else p
    return float(mixed) if mixed.ndim == 0 else mixed


def _most_common(values: Sequence[str]) -> str:
    """The most frequent value; a tie goes to the one met first (the nearer neighbour)."""
    values = [value for value in values if value]
    if not values:
        return ""
    counts = Counter(values)
    best = max(counts.values())
    return next(value for value in values if counts[value] == best)


def vote_metrics(
    malignant_share: Sequence[float],
    p_malignant: Sequence[float],
    labels: Sequence[int],
    dx_vote: Sequence[str],
    dx_true: Sequence[str],
    k: int = VOTE_K,
) -> dict[str, Any]:
    """The vote against the network's softmax on one split: both ROC-AUCs, and the majority diagnosis's
    accuracy (``p_malignant``: the network's own probability, before any blend with the vote)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, dtype=np.int64)
    both = len(set(y.tolist())) == 2
    pairs = [(vote, true) for vote, true in zip(dx_vote, dx_true, strict=True) if vote]
    return {
        "k": int(k),
        "n": len(y),
        "vote_roc_auc": float(roc_auc_score(y, malignant_share)) if both else None,
        "softmax_roc_auc": float(roc_auc_score(y, p_malignant)) if both else None,
        "dx_majority_accuracy": (sum(v == t for v, t in pairs) / len(pairs)) if pairs else None,
    }


def vote_in_words(malignant_share: float, k: int) -> str:
    """The vote in plain words: "5 of the 16 most similar confirmed cases were malignant." ('' for none)."""
    if k <= 0 or not np.isfinite(malignant_share):
        return ""
    malignant = round(malignant_share * k)
    verb = "was" if malignant == 1 else "were"
    return f"{malignant} of the {k} most similar confirmed cases {verb} malignant."


def blend_in_words(p_malignant: float, p_network: float, malignant_share: float, k: int, weight: float) -> str:
    """How P(malignant) was formed, in plain words; '' when the vote is not part of it.

    "62 % = 50 % of the network's 70 % and 50 % of the 32 most similar confirmed cases' 53 % malignant."
    """
    if weight <= 0 or k <= 0 or not all(np.isfinite(v) for v in (p_malignant, p_network, malignant_share)):
        return ""
    return (
        f"{p_malignant:.0%} = {1 - weight:.0%} of the network's {p_network:.0%} and {weight:.0%} of the "
        f"{k} most similar confirmed cases' {malignant_share:.0%} malignant."
    )


def case_images(checkpoint: dict[str, Any]) -> dict[str, Path]:
    """{image_id: image file} for the index's cases that are on this machine ({} when the data folder is not).

    The folder is the one the model was trained on: the exported split's (the bundled model's is the
    bundled demo set), else the run's ``--data``. Without it, pages and reports show ids and diagnoses.
    """
    from lesion.data import locate_data, read_metadata
    from lesion.errors import DataError

    index = checkpoint.get("similar") or {}
    record = checkpoint.get("split") if isinstance(checkpoint.get("split"), dict) else {}
    config = checkpoint.get("config") or {}
    folder = record.get("data") or config.get("data")
    if not index or not folder:
        return {}
    try:
        frame, _ = read_metadata(locate_data(str(folder)), config.get("metadata") or None, skip_bad=True)
    except (DataError, OSError, ValueError):
        return {}
    wanted = set(index.get("image_ids") or [])
    return {str(i): Path(p) for i, p in zip(frame["image_id"], frame["path"], strict=True) if str(i) in wanted}
