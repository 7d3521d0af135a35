"""Fitting: every detector on training lesions, its threshold on validation lesions."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lesion.ood.base import Observed, Stats
from lesion.ood.registry import DETECTORS
from lesion.ood.thresholds import harrell_davis_quantile, rejection_spread


def fit_detectors(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    train_logits: torch.Tensor,
    val_features: torch.Tensor,
    val_logits: torch.Tensor,
    keep: float = 0.95,
    k: int = 10,
    *,
    train_layers: dict[str, torch.Tensor] | None = None,
    val_layers: dict[str, torch.Tensor] | None = None,
    head: nn.Module | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, dict]:
    """Fit every detector on training lesions and set its threshold on validation lesions.

    Returns ``{name: {"threshold": float, "rejection_spread": {...}, ...stats}}``; each threshold
    accepts ``keep`` of the validation lesions. Detectors that need the layer statistics or the
    head are fitted only when ``train_layers``/``val_layers`` or ``head`` are given; ``names``
    restricts the set. ``head`` is used on the CPU (a copy is made).
    """
    if not 0 < keep < 1:
        raise ValueError(f"keep must lie in (0, 1); got {keep}")
    if len(val_features) == 0:
        raise ValueError("fitting OOD thresholds needs at least one validation image")
    head = cpu_copy(head)

    def observed(features, logits, layers) -> Observed:
        layers = {n: v.detach().cpu().float() for n, v in layers.items()} if layers else None
        return Observed(features.detach().cpu().float(), logits.detach().cpu().float(), layers, head)

    train = observed(train_features, train_logits, train_layers)
    val = observed(val_features, val_logits, val_layers)
    train_labels = train_labels.detach().cpu().long()
    detectors: dict[str, dict] = {}
    fitted: dict[Callable, Stats] = {}
    for name in DETECTORS if names is None else names:
        detector = DETECTORS[name]
        if (detector.needs_layers and not (train.layers and val.layers)) or (detector.needs_head and head is None):
            continue
        with torch.no_grad():
            if detector.fit not in fitted:
                fitted[detector.fit] = detector.fit(train, train_labels, val, k)
            # Detectors fitted alike share the tensors: torch.save writes a shared tensor once.
            stats = dict(fitted[detector.fit])
            val_scores = detector.score(stats, val)
        if not bool(torch.isfinite(val_scores).all()):
            # No threshold can be set on scores that are not numbers; the predictor would refuse it.
            warnings.warn(
                f"OOD detector {name!r} left out: it gives non-finite scores on validation lesions", stacklevel=2
            )
            continue
        stats["threshold"] = harrell_davis_quantile(val_scores, keep)  # accepts `keep` of them
        stats["rejection_spread"] = rejection_spread(val_scores, keep)
        detectors[name] = stats
    return detectors


def cpu_copy(head: nn.Module | None) -> nn.Module | None:
    """A float32 CPU copy of a head (the model's own may sit on a GPU, in training)."""
    if head is None:
        return None
    import copy

    from lesion.model import unwrap

    return copy.deepcopy(unwrap(head)).cpu().float().eval()


def stats_bytes(stats: Stats) -> int:
    """Bytes of the tensors in one detector's statistics (what it adds to a checkpoint)."""
    return sum(v.numel() * v.element_size() for v in stats.values() if torch.is_tensor(v))
