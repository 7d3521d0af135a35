"""The one registry of OOD detectors: name -> how to fit it, how to score with it, what it needs.

Every list of detector names (the training config's choices, the predictor's, the command line's,
the OOD page's) reads :data:`DETECTORS`; :data:`DEFAULT_DETECTOR` is the one training stores as in use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lesion.ood.base import Observed, Stats
from lesion.ood.features import (
    ASH_PERCENTILE,
    ENERGY_TEMPERATURE,
    SCALE_PERCENTILE,
    fit_knn,
    fit_vim,
    score_ash,
    score_energy,
    score_knn,
    score_mahalanobis,
    score_msp,
    score_scale,
    score_vim,
)
from lesion.ood.gaussian import fit_mahalanobis
from lesion.ood.layers import (
    fit_knn_layers,
    fit_mahalanobis_layers,
    score_knn_layers,
    score_mahalanobis_layers,
    score_mahalanobis_layers_max,
)


@dataclass(frozen=True)
class Detector:
    """How to fit one detector and score with it, and what of the pass it needs."""

    fit: Callable[[Observed, torch.Tensor, Observed, int], Stats]
    score: Callable[[Stats, Observed], torch.Tensor]
    note: str  # a few words for the OOD page
    needs_layers: bool = False
    needs_head: bool = False


DETECTORS: dict[str, Detector] = {
    "msp": Detector(lambda t, y, v, k: {}, score_msp, "max softmax — the notebook's baseline"),
    "energy": Detector(lambda t, y, v, k: {"temperature": ENERGY_TEMPERATURE}, score_energy, "energy of the logits"),
    "mahalanobis": Detector(
        lambda t, y, v, k: fit_mahalanobis(t.features, y), score_mahalanobis, "distance to the training features"
    ),
    "knn": Detector(lambda t, y, v, k: fit_knn(t.features, k), score_knn, "distance to the nearest training features"),
    "vim": Detector(fit_vim, score_vim, "feature residual beside the logits (ViM)"),
    "ash": Detector(
        lambda t, y, v, k: {"percentile": ASH_PERCENTILE},
        score_ash,
        "energy after pruning activations (ASH)",
        needs_head=True,
    ),
    "scale": Detector(
        lambda t, y, v, k: {"percentile": SCALE_PERCENTILE},
        score_scale,
        "energy after scaling activations (SCALE)",
        needs_head=True,
    ),
    "mahalanobis_layers": Detector(
        fit_mahalanobis_layers,
        score_mahalanobis_layers,
        "distance to the training lesions at every stage",
        needs_layers=True,
    ),
    "mahalanobis_layers_max": Detector(
        fit_mahalanobis_layers, score_mahalanobis_layers_max, "the farthest stage's distance", needs_layers=True
    ),
    "knn_layers": Detector(
        fit_knn_layers, score_knn_layers, "nearest training lesions at every stage", needs_layers=True
    ),
}
#: The detector names, in the registry's order.
DETECTOR_NAMES: tuple[str, ...] = tuple(DETECTORS)
#: The detector training fits as the one in use (TrainConfig.ood_method) and a new checkpoint names.
DEFAULT_DETECTOR = "mahalanobis_layers_max"
#: The detector an OOD entry that names no method stands for: the predictor's reading of such
#: checkpoints since before the layer detectors existed, kept so that they behave as they did.
UNNAMED_DETECTOR = "mahalanobis"


def check_method(method: str, fitted: dict[str, Stats], *, asked: bool = True) -> str:
    """``method`` if a checkpoint with these ``fitted`` detectors can score it, else ValueError.

    ``asked``: the caller named the method (a checkpoint without detectors cannot score it); otherwise
    it is the checkpoint's own, and a checkpoint without detectors simply accepts every image.
    """
    if method not in DETECTORS:
        raise ValueError(f"unknown OOD method {method!r}; choose one of {', '.join(DETECTORS)}")
    if not fitted and asked:
        raise ValueError(
            f"this checkpoint has no fitted OOD detectors (an intermediate checkpoint?), so it cannot score "
            f"{method!r}; use a run's model.pt, or leave the OOD method unset"
        )
    if fitted and method not in fitted:
        raise ValueError(f"this checkpoint has no fitted {method!r} detector; it has {', '.join(fitted)}")
    return method


@torch.no_grad()
def score(
    method: str,
    stats: Stats,
    features: torch.Tensor,
    logits: torch.Tensor,
    layers: dict[str, torch.Tensor] | None = None,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """OOD scores (N,) for ``method``: higher = less like the training lesions.

    ``layers`` (from :class:`lesion.model.LayerStatistics`) and ``head`` (the model's ``fc``) are
    needed by the multi-layer and the activation-shaping detectors; a missing one raises ValueError.
    """
    if method not in DETECTORS:
        raise ValueError(f"unknown OOD method {method!r}; choose one of {', '.join(DETECTORS)}")
    return DETECTORS[method].score(stats, Observed(features, logits, layers, head))


@torch.no_grad()
def score_all(
    detectors: dict[str, Stats],
    features: torch.Tensor,
    logits: torch.Tensor,
    layers: dict[str, torch.Tensor] | None = None,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`score` for every ``{name: stats}`` on one pass, sharing what detectors fitted alike share."""
    seen = Observed(features, logits, layers, head)
    for name in detectors:
        if name not in DETECTORS:
            raise ValueError(f"unknown OOD method {name!r}; choose one of {', '.join(DETECTORS)}")
    return {name: DETECTORS[name].score(stats, seen) for name, stats in detectors.items()}


def stats_on_device(detectors: dict[str, Stats], device: torch.device) -> dict[str, Stats]:
    """Every detector's statistics with their tensors as float32 on ``device``, so scoring converts nothing per call.

    A tensor that detectors fitted alike share stays shared (one copy, and one packed form). The
    copies are ordinary tensors even under torch.inference_mode: inference tensors keep no version
    counter, so an in-place edit of the statistics would go unseen by the packed-form cache.
    """
    converted: dict[int, torch.Tensor] = {}

    def on_device(value: Any) -> Any:
        if not torch.is_tensor(value):
            return value
        if id(value) not in converted:
            with torch.inference_mode(False):
                tensor = value.float().to(device)
                converted[id(value)] = tensor.clone() if tensor.is_inference() else tensor
        return converted[id(value)]

    return {name: {key: on_device(value) for key, value in stats.items()} for name, stats in detectors.items()}
