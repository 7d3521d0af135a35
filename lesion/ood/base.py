"""What every detector reads: the statistics type and :class:`Observed`, one forward pass's outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: A detector's fitted statistics: tensors and plain values only, so they live in a ``weights_only`` checkpoint.
Stats = dict[str, Any]


@dataclass
class Observed:
    """What one forward pass gives the detectors, for N images."""

    features: torch.Tensor  # (N, D) pooled penultimate features
    logits: torch.Tensor  # (N, C) raw logits
    layers: dict[str, torch.Tensor] | None = None  # stage name -> (N, 2 * channels), LayerStatistics
    head: Callable[[torch.Tensor], torch.Tensor] | None = None  # the classifier head, features -> logits
    # Work detectors fitted alike share within one scoring of this pass (see :func:`lesion.ood.score_all`).
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)


def as_numpy(values: Any) -> np.ndarray:
    """Scores (tensor, array or list) as a flat float64 array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).ravel()
