"""Detectors on every residual stage of the same pass (the feature ensemble of Lee et al. 2018).

They read the channel means and standard deviations of each stage (:class:`lesion.model.LayerStatistics`).
``mahalanobis_layers`` averages, and ``mahalanobis_layers_max`` takes the largest of, one
standardised Mahalanobis distance per stage to the training lesions (one Gaussian for all classes,
fitted to the square roots of the statistics); ``knn_layers`` averages standardised cosine
distances to the k-th nearest training image in each stage's whitened principal subspace. Each
stage is standardised on validation lesions, so the stages can be combined. The ``*_by_stage``
functions score one stage at a time: the reference the packed forms (:mod:`lesion.ood.packing`) are tested against.
"""

from __future__ import annotations

import torch

from lesion.ood.base import Observed, Stats
from lesion.ood.features import knn_bank, knn_distance
from lesion.ood.gaussian import LAYER_RANK, fit_gaussian, gaussian_distance
from lesion.ood.packing import packed_knn, packed_layers

#: The layer Mahalanobis detectors fit their Gaussians to the SQUARE ROOTS of the pooled statistics:
#: channel means and standard deviations of post-ReLU maps are non-negative and right-skewed, and the
#: root makes them far more Gaussian. On nine demo runs (ResNet-18 at 128 px, ResNet-50 at 128 and 224 px)
#: it raised the ROC-AUC against the development photos on every one (0.984 -> 0.992 on a ResNet-50
#: at 128 px); see docs/ood.md.
LAYER_POWER = 0.5
KNN_LAYER_RANK = 24  # whitened directions per stage for knn_layers


def _layer(seen: Observed, name: str) -> torch.Tensor:
    if seen.layers is None or name not in seen.layers:
        raise ValueError(f"this detector needs the {name} statistics of the pass (lesion.model.LayerStatistics)")
    return seen.layers[name].float()


def _standardise(stats: Stats, name: str, distances: torch.Tensor) -> torch.Tensor:
    return (distances - float(stats[f"{name}.loc"])) / float(stats[f"{name}.scale"])


def _set_standardisation(stats: Stats, name: str, validation_distances: torch.Tensor) -> None:
    """Location and scale of one stage's distances on validation lesions, so stages can be combined."""
    values = validation_distances.double()
    stats[f"{name}.loc"] = float(values.mean())
    spread = float(values.std()) if len(values) > 1 else 0.0
    stats[f"{name}.scale"] = spread if spread > 1e-12 else 1.0


def _power(stats: Stats) -> float:
    """The power the stage statistics are raised to; 1 for statistics fitted before it existed."""
    power = float(stats.get("power", 1.0))
    if not 0 < power <= 1:  # NaN fails this too
        raise ValueError(f"the layer statistics' power must lie in (0, 1]; got {power}")
    return power


def _stage(stats: Stats, seen: Observed, name: str) -> torch.Tensor:
    """One stage's pooled statistics, raised to the fitted power (they are >= 0: post-ReLU maps)."""
    power = _power(stats)
    values = _layer(seen, name)
    return values if power == 1 else values.clamp_min(0) ** power


def _stage_parts(stats: Stats, seen: Observed) -> list[torch.Tensor]:
    """The pass's statistics for each stage the detector was fitted on, in its order."""
    parts = [_layer(seen, n) for n in stats["layers"]]
    if not parts:
        raise ValueError("the layer statistics name no stage")
    return parts


def _check_widths(parts: list[torch.Tensor], dims: tuple[int, ...]) -> None:
    if tuple(p.shape[1] for p in parts) != dims:
        raise ValueError(
            f"the layer statistics fit stages of widths {dims}, this pass gave {tuple(p.shape[1] for p in parts)}"
        )


def _layer_mahalanobis_by_stage(stats: Stats, seen: Observed) -> torch.Tensor:
    """(N, stages) standardised distances, one stage at a time: the reference for :func:`_layer_mahalanobis`."""
    return torch.stack(
        [_standardise(stats, n, gaussian_distance(stats, _stage(stats, seen, n), f"{n}.")) for n in stats["layers"]],
        dim=1,
    )


def _layer_mahalanobis(stats: Stats, seen: Observed) -> torch.Tensor:
    """(N, stages) standardised distances, every stage in the same few operations."""
    parts = _stage_parts(stats, seen)
    packed = packed_layers(stats, parts[0].device)
    _check_widths(parts, packed.dims)
    power = _power(stats)
    # mahalanobis_layers and mahalanobis_layers_max share their statistics: one computation a pass.
    # The memo holds what it was computed from and is used only for the very same inputs.
    memo_key = ("mahalanobis_layers", id(packed), power)
    shared = seen.memo.get(memo_key)
    if shared is not None and shared[0] is packed and all(a is b for a, b in zip(shared[1], parts, strict=True)):
        return shared[2]
    x = torch.cat(parts, dim=1)
    if power != 1:
        x = x.clamp_min(0) ** power
    centred = x - packed.mean
    projected = centred @ packed.basis
    squared = torch.cat([centred, projected], dim=1).square_() @ packed.weights
    distances = torch.addcmul(packed.bias, squared.clamp_min_(0).sqrt_(), packed.inv_scale)
    seen.memo[memo_key] = (packed, tuple(parts), distances)
    return distances


def score_mahalanobis_layers(stats: Stats, seen: Observed) -> torch.Tensor:
    return _layer_mahalanobis(stats, seen).mean(dim=1)


def score_mahalanobis_layers_max(stats: Stats, seen: Observed) -> torch.Tensor:
    return _layer_mahalanobis(stats, seen).max(dim=1).values


def _whiten(stats: Stats, name: str, x: torch.Tensor) -> torch.Tensor:
    centred = x.float() - stats[f"{name}.mean"].float().to(x.device)
    return (centred @ stats[f"{name}.basis"].float().to(x.device)) * stats[f"{name}.scale_inv"].float().to(x.device)


def _knn_layer_distances(stats: Stats, seen: Observed, name: str) -> torch.Tensor:
    return knn_distance(stats[f"{name}.bank"], _whiten(stats, name, _layer(seen, name)), int(stats["k"]))


def _knn_layers_by_stage(stats: Stats, seen: Observed) -> torch.Tensor:
    """(N, stages) standardised distances, one stage at a time: the reference for :func:`_knn_layers`."""
    return torch.stack([_standardise(stats, n, _knn_layer_distances(stats, seen, n)) for n in stats["layers"]], dim=1)


def _knn_layers(stats: Stats, seen: Observed) -> torch.Tensor:
    """(N, stages) standardised distances, every stage in the same dozen operations."""
    names = list(stats["layers"])
    parts = _stage_parts(stats, seen)
    packed = packed_knn(stats, parts[0].device)
    if packed is None:
        return _knn_layers_by_stage(stats, seen)
    _check_widths(parts, packed.dims)
    whitened = (torch.cat(parts, dim=1) - packed.mean) @ packed.basis  # (N, stages * rank)
    per_stage = torch.nn.functional.normalize(whitened.view(len(whitened), len(names), packed.rank), dim=2)
    similarity = torch.bmm(per_stage.transpose(0, 1), packed.banks)  # (stages, N, bank rows)
    kth = similarity.topk(packed.k, dim=2).values[:, :, -1]
    return torch.addcmul(packed.bias, kth, packed.inv_scale, value=-1).T


def score_knn_layers(stats: Stats, seen: Observed) -> torch.Tensor:
    return _knn_layers(stats, seen).mean(dim=1)


def fit_mahalanobis_layers(train: Observed, labels: torch.Tensor, val: Observed, k: int) -> Stats:
    names = sorted(train.layers or {})
    # The root suits post-ReLU stages (ResNets), whose statistics are >= 0; EfficientNet stages end in a
    # linear projection, whose channel means can be negative and would be clamped away: power 1 there.
    signed = any(bool((train.layers[name] < 0).any()) for name in names)
    stats: Stats = {"layers": names, "power": 1.0 if signed else LAYER_POWER}
    for name in names:
        for key, value in fit_gaussian(_stage(stats, train, name), LAYER_RANK).items():
            stats[f"{name}.{key}"] = value
        _set_standardisation(stats, name, gaussian_distance(stats, _stage(stats, val, name), f"{name}."))
    return stats


def fit_knn_layers(train: Observed, labels: torch.Tensor, val: Observed, k: int) -> Stats:
    names = sorted(train.layers or {})
    stats: Stats = {"layers": names, "k": int(k)}
    for name in names:
        x = _layer(train, name).double()
        mean = x.mean(dim=0, keepdim=True)
        _, singular, vt = torch.linalg.svd(x - mean, full_matrices=False)
        rank = max(1, min(KNN_LAYER_RANK, len(x) - 1, len(singular)))
        variance = singular[:rank] ** 2 / max(len(x) - 1, 1)
        # A floor of 1 % of the largest variance: whitening must not blow up directions of pure noise.
        spread = (variance + 0.01 * variance[0]).clamp_min(1e-12).sqrt()
        stats[f"{name}.mean"] = mean.float()
        stats[f"{name}.basis"] = vt[:rank].T.contiguous().half()
        stats[f"{name}.scale_inv"] = (1.0 / spread).float()
        stats[f"{name}.bank"] = knn_bank(_whiten(stats, name, x.float()))
        _set_standardisation(stats, name, _knn_layer_distances(stats, val, name))
    return stats
