"""Out-of-distribution detectors: is this photo like the lesions the model was trained on?

Every detector maps what one forward pass gives (:class:`Observed`: penultimate features, logits,
and, where captured, the pooled statistics of layer1..layer4 and the classifier head) to a score
where HIGHER means LESS like the training lesions; an image is rejected when its score is above the
detector's threshold. Statistics are fitted on TRAINING lesions; thresholds are set so that a chosen
share (``keep``, 95 % by default) of VALIDATION lesions is accepted, with the Harrell-Davis quantile
(a smooth weighted average of all order statistics, steadier than one order statistic when the
validation split is small), so every detector is compared at the same cost to real lesions. The
bootstrap spread of the share of NEW lesions a threshold rejects (out-of-bag validation lesions)
is kept beside each threshold.

Penultimate features only:

- ``msp``: 1 - max softmax (Hendrycks & Gimpel 2017), the notebook's baseline. With two classes
  the max softmax never drops below 0.5, so this score lives in [0, 0.5] and separates little;
  over the C outputs of a dx head it lives in [0, 1 - 1/C] (the max over diagnoses, not over sides).
- ``energy``: -T * logsumexp(logits / T) with T = 1 (Liu et al. 2020), over all of the head's outputs.
- ``mahalanobis``: minimum over classes (diagnoses, for a dx head) of the Mahalanobis distance to the class mean, with one
  covariance shared by the classes (Lee et al. 2018), shrunk towards a scaled identity
  (Ledoit-Wolf) because a few hundred images cannot estimate a 2048 x 2048 covariance.
- ``knn``: cosine distance to the k-th nearest L2-normalised training feature (Sun et al. 2022).
- ``vim``: virtual-logit matching (Wang et al. 2022): the norm of the feature's part outside the
  principal subspace of the training features (origin -pinv(W) b of a linear head), scaled to the
  logits, minus the logsumexp of the logits.
- ``ash``, ``scale``: activation shaping (Djurisic et al. 2023, ASH-S at the 90th percentile; Xu et
  al. 2024, SCALE at the 85th): the features are pruned (ASH) or not (SCALE) and scaled by
  exp(sum of all / sum of the top ones) before the head; the score is the energy of those logits.

Every residual stage (the feature ensemble of Lee et al. 2018, on the channel means and standard
deviations of layer1..layer4 from :class:`lesion.model.LayerStatistics`, same pass):

- ``mahalanobis_layers``: one Mahalanobis distance per stage to the training lesions (one Gaussian
  for all classes: low-level statistics are not class-specific, and a diagnosis with a dozen images
  would give a noisy class mean), each standardised on validation lesions, averaged. The Gaussians
  are fitted to the square roots of the statistics (``LAYER_POWER``), which are far less skewed.
- ``mahalanobis_layers_max``: the same distances, the largest standardised one.
- ``knn_layers``: cosine distance to the k-th nearest training image in each stage's whitened
  principal subspace, standardised on validation lesions, averaged.

Compact statistics: a stage's covariance is kept as its top ``LAYER_RANK`` principal directions
(float16) plus one isotropic variance for the rest (Ledoit-Wolf shrinkage applied to both), which
is the exact shrunk covariance when the stage has no more dimensions than that.

Logits are the raw network outputs (before temperature scaling): the detectors are fitted and
applied on the same quantity, so calibration never shifts an OOD threshold. Nothing assumes two
classes: every logit-based score works with any number of columns.

Fitted statistics are tensors and plain values only, so they live in a ``weights_only`` checkpoint.
These are our own short implementations; pytorch-ood is not a dependency.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

#: The notebook rejected images whose max softmax was below 0.8; in score units (1 - max softmax,
#: higher = more OOD) that is "reject when score > 0.2".
NOTEBOOK_MSP_THRESHOLD = 0.2
ENERGY_TEMPERATURE = 1.0
KNN_BANK_SIZE = 4096
KNN_SEED = 0
LAYER_RANK = 64  # principal directions kept per stage for the layer Mahalanobis distances
#: The layer Mahalanobis detectors fit their Gaussians to the SQUARE ROOTS of the pooled statistics:
#: channel means and standard deviations of post-ReLU maps are non-negative and right-skewed, and the
#: root makes them far more Gaussian. On nine demo runs (ResNet-18 at 128 px, ResNet-50 at 128 and 224 px)
#: it raised the ROC-AUC against the development photos on every one (0.984 -> 0.992 on a ResNet-50
#: at 128 px); see the README's "Rejecting photos that are not lesions".
LAYER_POWER = 0.5
KNN_LAYER_RANK = 24  # whitened directions per stage for knn_layers
VIM_RANK = 64  # principal subspace of ViM (at most half the feature width)
ASH_PERCENTILE = 90.0
SCALE_PERCENTILE = 85.0
BOOTSTRAP_ROUNDS = 500
BOOTSTRAP_SEED = 0

Stats = dict[str, Any]

#: The detector training fits as the one in use (TrainConfig.ood_method) and a new checkpoint names.
DEFAULT_DETECTOR = "mahalanobis_layers_max"
#: The detector an OOD entry that names no method stands for: the predictor's reading of such
#: checkpoints since before the layer detectors existed, kept so that they behave as they did.
UNNAMED_DETECTOR = "mahalanobis"


@dataclass
class Observed:
    """What one forward pass gives the detectors, for N images."""

    features: torch.Tensor  # (N, D) pooled penultimate features
    logits: torch.Tensor  # (N, C) raw logits
    layers: dict[str, torch.Tensor] | None = None  # stage name -> (N, 2 * channels), LayerStatistics
    head: Callable[[torch.Tensor], torch.Tensor] | None = None  # the classifier head, features -> logits
    # Work detectors fitted alike share within one scoring of this pass (see :func:`score_all`).
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)


# --- shared pieces ---------------------------------------------------------------------------


def _needs_head(seen: Observed, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if seen.head is None:
        raise ValueError(f"the {name} detector needs the classifier head (pass head=model.fc)")
    return seen.head


def _layer(seen: Observed, name: str) -> torch.Tensor:
    if seen.layers is None or name not in seen.layers:
        raise ValueError(f"this detector needs the {name} statistics of the pass (lesion.model.LayerStatistics)")
    return seen.layers[name].float()


def fit_gaussian(x: torch.Tensor, rank: int = LAYER_RANK, shrinkage: float | None = None) -> Stats:
    """One Ledoit-Wolf-shrunk Gaussian, its covariance kept as ``rank`` principal directions + an isotropic rest.

    Returns ``mean`` (1, D), ``basis`` (D, r) float16, ``weights`` (r,) and ``residual_precision`` so that
    distance^2 = residual_precision * |c|^2 + sum_j weights_j * (basis_j . c)^2 with c = x - mean.
    """
    x = x.detach().cpu().double()
    rows, dim = x.shape
    mean = x.mean(dim=0, keepdim=True)
    centred = x - mean
    if shrinkage is None:
        from sklearn.covariance import ledoit_wolf_shrinkage  # here: only fitting needs sklearn (app start-up)

        shrinkage = float(ledoit_wolf_shrinkage(centred.numpy(), assume_centered=True)) if rows > 1 else 1.0
    _, singular, vt = torch.linalg.svd(centred, full_matrices=False)
    eigen = singular**2 / max(rows, 1)
    trace = float(eigen.sum())
    mu = trace / dim or 1.0
    kept = min(rank, len(eigen), dim)
    # A tiny ridge so that a direction with no spread (a constant channel) never divides by zero.
    top = (1 - shrinkage) * eigen[:kept] + shrinkage * mu + 1e-6 * mu
    rest_dims = dim - kept
    if rest_dims:
        rest = (1 - shrinkage) * (trace - float(eigen[:kept].sum())) / rest_dims + shrinkage * mu + 1e-6 * mu
        residual_precision, weights = 1.0 / rest, 1.0 / top - 1.0 / rest
    else:
        residual_precision, weights = 0.0, 1.0 / top
    return {
        "mean": mean.float(),
        "basis": vt[:kept].T.contiguous().half(),  # float16 halves the file; distances move by ~1e-3
        "weights": weights.float(),
        "residual_precision": float(residual_precision),
        "shrinkage": float(shrinkage),
    }


def gaussian_distance(stats: Stats, x: torch.Tensor, prefix: str = "") -> torch.Tensor:
    """Mahalanobis distance (N,) of ``x`` to a Gaussian from :func:`fit_gaussian` (keys under ``prefix``)."""
    centred = x.float() - stats[prefix + "mean"].float().to(x.device)
    projected = centred @ stats[prefix + "basis"].float().to(x.device)
    squared = float(stats[prefix + "residual_precision"]) * (centred * centred).sum(dim=1)
    squared = squared + (projected * projected) @ stats[prefix + "weights"].float().to(x.device)
    return squared.clamp_min(0).sqrt()


def _standardise(stats: Stats, name: str, distances: torch.Tensor) -> torch.Tensor:
    return (distances - float(stats[f"{name}.loc"])) / float(stats[f"{name}.scale"])


def _set_standardisation(stats: Stats, name: str, validation_distances: torch.Tensor) -> None:
    """Location and scale of one stage's distances on validation lesions, so stages can be combined."""
    values = validation_distances.double()
    stats[f"{name}.loc"] = float(values.mean())
    spread = float(values.std()) if len(values) > 1 else 0.0
    stats[f"{name}.scale"] = spread if spread > 1e-12 else 1.0


# --- scorers: (stats, observed) -> scores (N,), higher = more OOD ----------------------------------


def _score_msp(stats: Stats, seen: Observed) -> torch.Tensor:
    return 1.0 - torch.softmax(seen.logits.float(), dim=1).max(dim=1).values


def _score_energy(stats: Stats, seen: Observed) -> torch.Tensor:
    temperature = float(stats.get("temperature", ENERGY_TEMPERATURE))
    return -temperature * torch.logsumexp(seen.logits.float() / temperature, dim=1)


def _score_mahalanobis(stats: Stats, seen: Observed) -> torch.Tensor:
    features = seen.features.float()
    means = stats["means"].float().to(features.device)  # (C, D)
    precision = stats["precision"].float().to(features.device)  # (D, D)
    centred = features[:, None, :] - means[None, :, :]  # (N, C, D)
    squared = torch.einsum("ncd,de,nce->nc", centred, precision, centred)
    # Rounding can make a distance of ~0 slightly negative; clamp before the square root.
    return squared.clamp_min(0).sqrt().min(dim=1).values


def _knn_distance(bank: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    bank = bank.float().to(queries.device)  # (M, D), rows already L2-normalised
    similarity = torch.nn.functional.normalize(queries.float(), dim=1) @ bank.T  # (N, M)
    return 1.0 - similarity.topk(min(k, bank.shape[0]), dim=1).values[:, -1]


def _score_knn(stats: Stats, seen: Observed) -> torch.Tensor:
    return _knn_distance(stats["bank"], seen.features, int(stats["k"]))


def _score_vim(stats: Stats, seen: Observed) -> torch.Tensor:
    centred = seen.features.float() - stats["origin"].float().to(seen.features.device)
    projected = centred @ stats["basis"].float().to(centred.device)
    residual = ((centred * centred).sum(dim=1) - (projected * projected).sum(dim=1)).clamp_min(0).sqrt()
    return float(stats["alpha"]) * residual - torch.logsumexp(seen.logits.float(), dim=1)


def _shaped_energy(seen: Observed, percentile: float, prune: bool, name: str) -> torch.Tensor:
    """Energy of the head's logits on features scaled by exp(sum / sum of the top (100 - percentile) %)."""
    head = _needs_head(seen, name)
    features = seen.features.float().clamp_min(0)  # post-ReLU averages: already >= 0
    keep = max(1, round(features.shape[1] * (1 - percentile / 100)))
    top, index = features.topk(keep, dim=1)
    ratio = features.sum(dim=1) / top.sum(dim=1).clamp_min(1e-12)
    shaped = torch.zeros_like(features).scatter(1, index, top) if prune else features
    logits = head(shaped * torch.exp(ratio)[:, None]).float()
    return -torch.logsumexp(logits, dim=1)


def _score_ash(stats: Stats, seen: Observed) -> torch.Tensor:
    return _shaped_energy(seen, float(stats.get("percentile", ASH_PERCENTILE)), prune=True, name="ash")


def _score_scale(stats: Stats, seen: Observed) -> torch.Tensor:
    return _shaped_energy(seen, float(stats.get("percentile", SCALE_PERCENTILE)), prune=False, name="scale")


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


def _layer_mahalanobis_by_stage(stats: Stats, seen: Observed) -> torch.Tensor:
    """(N, stages) standardised distances, one stage at a time: the reference for :func:`_layer_mahalanobis`."""
    return torch.stack(
        [_standardise(stats, n, gaussian_distance(stats, _stage(stats, seen, n), f"{n}.")) for n in stats["layers"]],
        dim=1,
    )


@dataclass(frozen=True)
class _Packed:
    """Every stage's Gaussian as one block-diagonal problem (see :func:`_packed_layers`)."""

    dims: tuple[int, ...]  # each stage's width, in order: what the pass must give
    mean: torch.Tensor  # (1, sum of widths)
    basis: torch.Tensor  # (sum of widths, sum of ranks), block-diagonal
    weights: torch.Tensor  # (sum of widths + sum of ranks, stages)
    inv_scale: torch.Tensor  # (stages,)
    bias: torch.Tensor  # (stages,) = -loc / scale


#: (kind, device, ids of the source tensors, plain values) -> (weak references to those tensors, their
#: versions, the packed form). Weak, so a dropped checkpoint frees its entry.
_PACKED: dict[tuple, tuple[tuple, tuple, Any]] = {}
_PACKED_ENTRIES = 16  # two a predictor: the Mahalanobis layer detectors (shared) and knn_layers
# The app scores from several threads: building an entry twice is harmless, racing the eviction is not.
_PACKED_LOCK = threading.Lock()


def _stage_width(mean: torch.Tensor) -> int:
    """A stage's width from its fitted mean, (D,) or (1, D); -1 for any other shape."""
    return mean.shape[-1] if mean.dim() in (1, 2) and mean.numel() == mean.shape[-1] else -1


def _standardisation(stats: Stats, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each stage's validation location and scale, float64, in ``names`` order."""
    loc = torch.tensor([float(stats[f"{n}.loc"]) for n in names], dtype=torch.float64)
    scale = torch.tensor([float(stats[f"{n}.scale"]) for n in names], dtype=torch.float64)
    return loc, scale


def _stage_parts(stats: Stats, seen: Observed) -> list[torch.Tensor]:
    """The pass's statistics for each stage the detector was fitted on, in its order."""
    parts = [_layer(seen, n) for n in stats["layers"]]
    if not parts:
        raise ValueError("the layer statistics name no stage")
    return parts


def _pack(stats: Stats, names: list[str], device: torch.device) -> _Packed:
    """Build the packed form, refusing stage statistics that do not fit together (ValueError)."""
    means, bases, weights_by_stage = [], [], []
    for n in names:
        mean, basis, weights = (stats[f"{n}.{key}"] for key in ("mean", "basis", "weights"))
        if not all(torch.is_tensor(t) for t in (mean, basis, weights)):
            raise TypeError(f"the {n} statistics must be tensors")
        dim = _stage_width(mean)
        if dim < 1 or basis.dim() != 2 or basis.shape[0] != dim or tuple(weights.shape) != (basis.shape[1],):
            raise ValueError(
                f"the {n} statistics do not fit together (mean {tuple(mean.shape)}, basis "
                f"{tuple(basis.shape)}, weights {tuple(weights.shape)})"
            )
        means.append(mean.float().reshape(1, dim).cpu())
        bases.append(basis.float().cpu())
        weights_by_stage.append(weights.float().cpu())
    dims = tuple(m.shape[1] for m in means)
    ranks = [b.shape[1] for b in bases]
    dim, rank = sum(dims), sum(ranks)
    basis = torch.zeros(dim, rank)
    weights = torch.zeros(dim + rank, len(names))
    row = col = 0
    for i, n in enumerate(names):
        basis[row : row + dims[i], col : col + ranks[i]] = bases[i]
        weights[row : row + dims[i], i] = float(stats[f"{n}.residual_precision"])
        weights[dim + col : dim + col + ranks[i], i] = weights_by_stage[i]
        row, col = row + dims[i], col + ranks[i]
    loc, scale = _standardisation(stats, names)
    return _Packed(
        dims=dims,
        mean=torch.cat(means, dim=1).to(device),
        basis=basis.to(device),
        weights=weights.to(device),
        inv_scale=(1 / scale).float().to(device),
        bias=(-loc / scale).float().to(device),
    )


def _version_of(value: Any) -> int | None:
    """A tensor's in-place edit counter; None for non-tensors."""
    return value._version if torch.is_tensor(value) else None


def _finite(values: tuple, what: str) -> tuple:
    """``values``, or ValueError when one is NaN or infinite (a damaged checkpoint; it would score NaN)."""
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"the {what} statistics hold a value that is not finite: {values}")
    return values


def _cached(device: torch.device, kind: str, sources: tuple, values: tuple, build: Callable[[], Any]):
    """``build()``, or what it gave before for these very tensors and values on this device.

    Keyed by the tensors themselves (detectors fitted alike share their tensors, and so one entry),
    used only while they are the same objects, unchanged (same versions), with the same plain values;
    anything else builds it again. Entries keep weak references, so statistics nobody holds any more
    free theirs. Inference tensors keep no version counter, so an in-place edit of one could not be
    seen: statistics that hold one are never cached (the Predictor converts its own to ordinary
    tensors, so this costs only callers that fit or edit statistics under torch.inference_mode).
    """
    if any(torch.is_tensor(t) and t.is_inference() for t in sources):
        return build()
    versions = tuple(_version_of(t) for t in sources)
    key = (kind, str(device), tuple(id(t) for t in sources), values)
    hit = _PACKED.get(key)
    if hit is not None and hit[1] == versions and all(ref() is t for ref, t in zip(hit[0], sources, strict=True)):
        return hit[2]
    packed = build()
    refs = tuple(weakref.ref(t) for t in sources)
    with _PACKED_LOCK:
        for stale in [k for k, entry in _PACKED.items() if any(ref() is None for ref in entry[0])]:
            del _PACKED[stale]  # built from statistics nobody holds any more
        while key not in _PACKED and len(_PACKED) >= _PACKED_ENTRIES:
            _PACKED.pop(next(iter(_PACKED)))
        _PACKED[key] = (refs, versions, packed)
    return packed


def _packed_layers(stats: Stats, device: torch.device) -> _Packed:
    """Every stage's Gaussian as one block-diagonal problem, built once per fitted tensors and device.

    With c = x - mean over all stages at once and p = c @ basis (block-diagonal), the squared
    distances of all stages are [c, p]^2 @ weights, where ``weights`` holds each stage's residual
    precision against its dimensions and its direction weights against its directions. On a GPU
    at batch 1 every launched operation costs ~10 microseconds whatever its size, so a dozen
    operations instead of ~60 is what keeps the detector within a few per cent of the forward pass.
    """
    names = list(stats["layers"])
    sources = tuple(stats[f"{n}.{key}"] for n in names for key in ("mean", "basis", "weights"))
    values = tuple(float(stats[f"{n}.{key}"]) for n in names for key in ("residual_precision", "loc", "scale"))
    return _cached(device, "mahalanobis", sources, _finite(values, "layer"), lambda: _pack(stats, names, device))


def _check_widths(parts: list[torch.Tensor], dims: tuple[int, ...]) -> None:
    if tuple(p.shape[1] for p in parts) != dims:
        raise ValueError(
            f"the layer statistics fit stages of widths {dims}, this pass gave {tuple(p.shape[1] for p in parts)}"
        )


def _layer_mahalanobis(stats: Stats, seen: Observed) -> torch.Tensor:
    """(N, stages) standardised distances, every stage in the same few operations."""
    parts = _stage_parts(stats, seen)
    packed = _packed_layers(stats, parts[0].device)
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


def _score_mahalanobis_layers(stats: Stats, seen: Observed) -> torch.Tensor:
    return _layer_mahalanobis(stats, seen).mean(dim=1)


def _score_mahalanobis_layers_max(stats: Stats, seen: Observed) -> torch.Tensor:
    return _layer_mahalanobis(stats, seen).max(dim=1).values


def _whiten(stats: Stats, name: str, x: torch.Tensor) -> torch.Tensor:
    centred = x.float() - stats[f"{name}.mean"].float().to(x.device)
    return (centred @ stats[f"{name}.basis"].float().to(x.device)) * stats[f"{name}.scale_inv"].float().to(x.device)


def _knn_layer_distances(stats: Stats, seen: Observed, name: str) -> torch.Tensor:
    return _knn_distance(stats[f"{name}.bank"], _whiten(stats, name, _layer(seen, name)), int(stats["k"]))


def _knn_layers_by_stage(stats: Stats, seen: Observed) -> torch.Tensor:
    """(N, stages) standardised distances, one stage at a time: the reference for :func:`_knn_layers`."""
    return torch.stack([_standardise(stats, n, _knn_layer_distances(stats, seen, n)) for n in stats["layers"]], dim=1)


@dataclass(frozen=True)
class _PackedKnn:
    """Every stage's whitening and bank in one problem (see :func:`_packed_knn`)."""

    dims: tuple[int, ...]  # each stage's width, in order
    rank: int  # whitened directions per stage, the narrower stages padded with zeros
    mean: torch.Tensor  # (1, sum of widths)
    basis: torch.Tensor  # (sum of widths, stages * rank), block-diagonal, whitening scale folded in
    banks: torch.Tensor  # (stages, rank, bank rows): each stage's bank, transposed and padded
    k: int
    inv_scale: torch.Tensor  # (stages, 1)
    bias: torch.Tensor  # (stages, 1) = (1 - loc) / scale, since the distance is 1 - similarity


def _pack_knn(stats: Stats, names: list[str], device: torch.device) -> _PackedKnn | None:
    """Build the packed form; None when the banks differ in size (then each stage is scored alone)."""
    parts = []
    for n in names:
        mean, basis, scale_inv, bank = (stats[f"{n}.{key}"] for key in ("mean", "basis", "scale_inv", "bank"))
        if not all(torch.is_tensor(t) for t in (mean, basis, scale_inv, bank)):
            raise TypeError(f"the {n} statistics must be tensors")
        dim = _stage_width(mean)
        rank = basis.shape[1] if basis.dim() == 2 else -1
        if dim < 1 or basis.shape[0] != dim or tuple(scale_inv.shape) != (rank,) or bank.dim() != 2:
            raise ValueError(f"the {n} statistics do not fit together")
        if bank.shape[1] != rank:
            raise ValueError(f"the {n} bank has {bank.shape[1]} columns for {rank} whitened directions")
        parts.append((mean.float().reshape(1, dim).cpu(), basis.float().cpu(), scale_inv.float().cpu(), bank))
    if len({bank.shape[0] for *_, bank in parts}) != 1:
        return None
    dims = tuple(mean.shape[1] for mean, *_ in parts)
    rank = max(basis.shape[1] for _, basis, _, _ in parts)
    basis = torch.zeros(sum(dims), len(names) * rank)
    banks = torch.zeros(len(names), rank, parts[0][3].shape[0])
    row = 0
    for i, (_, stage_basis, scale_inv, bank) in enumerate(parts):
        # Zero columns add nothing to a norm or a dot product: a padded stage gives the same cosines.
        basis[row : row + dims[i], i * rank : i * rank + stage_basis.shape[1]] = stage_basis * scale_inv
        banks[i, : bank.shape[1]] = bank.float().cpu().T
        row += dims[i]
    loc, scale = _standardisation(stats, names)
    return _PackedKnn(
        dims=dims,
        rank=rank,
        mean=torch.cat([mean for mean, *_ in parts], dim=1).to(device),
        basis=basis.to(device),
        banks=banks.to(device),
        k=min(int(stats["k"]), parts[0][3].shape[0]),
        inv_scale=(1 / scale).float().reshape(-1, 1).to(device),
        bias=((1 - loc) / scale).float().reshape(-1, 1).to(device),
    )


def _knn_layers(stats: Stats, seen: Observed) -> torch.Tensor:
    """(N, stages) standardised distances, every stage in the same dozen operations."""
    names = list(stats["layers"])
    parts = _stage_parts(stats, seen)
    device = parts[0].device
    sources = tuple(stats[f"{n}.{key}"] for n in names for key in ("mean", "basis", "scale_inv", "bank"))
    values = _finite(tuple(float(stats[f"{n}.{key}"]) for n in names for key in ("loc", "scale")), "knn_layers")
    values += (int(stats["k"]),)
    packed = _cached(device, "knn", sources, values, lambda: _pack_knn(stats, names, device))
    if packed is None:
        return _knn_layers_by_stage(stats, seen)
    _check_widths(parts, packed.dims)
    whitened = (torch.cat(parts, dim=1) - packed.mean) @ packed.basis  # (N, stages * rank)
    per_stage = torch.nn.functional.normalize(whitened.view(len(whitened), len(names), packed.rank), dim=2)
    similarity = torch.bmm(per_stage.transpose(0, 1), packed.banks)  # (stages, N, bank rows)
    kth = similarity.topk(packed.k, dim=2).values[:, :, -1]
    return torch.addcmul(packed.bias, kth, packed.inv_scale, value=-1).T


def _score_knn_layers(stats: Stats, seen: Observed) -> torch.Tensor:
    return _knn_layers(stats, seen).mean(dim=1)


# --- fitting: (train, train labels, validation, k) -> stats ---------------------------------------


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
        # Imported here: scikit-learn takes seconds to import and only fitting needs it, not the app's predictor.
        from sklearn.covariance import ledoit_wolf_shrinkage

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


def _fit_knn(features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, k: int) -> Stats:
    return {"bank": _knn_bank(features), "k": int(k)}


def _knn_bank(features: torch.Tensor) -> torch.Tensor:
    rows = features.shape[0]
    if rows > KNN_BANK_SIZE:
        # A seeded choice, so refitting on the same features gives the same bank.
        generator = torch.Generator().manual_seed(KNN_SEED)
        keep = torch.randperm(rows, generator=generator)[:KNN_BANK_SIZE].sort().values
        features = features[keep]
    # float16 halves the checkpoint; cosine similarities change by ~1e-3 at most.
    return torch.nn.functional.normalize(features.float(), dim=1).half()


def _fit_vim(train: Observed, labels: torch.Tensor, val: Observed, k: int) -> Stats:
    x = train.features.double()
    head = train.head
    if isinstance(head, nn.Linear) and head.bias is not None:
        # Wang et al.: the origin where the linear head's logits vanish, -pinv(W) b.
        weight, bias = head.weight.detach().cpu().double(), head.bias.detach().cpu().double()
        origin = -(torch.linalg.pinv(weight) @ bias)
    else:  # no linear head to take it from: the training mean
        origin = x.mean(dim=0)
    centred = x - origin
    rank = max(1, min(VIM_RANK, x.shape[1] // 2, x.shape[0] - 1))
    _, _, vt = torch.linalg.svd(centred, full_matrices=False)
    basis = vt[:rank].T.contiguous()
    residual = (centred - centred @ basis @ basis.T).norm(dim=1)
    max_logits = train.logits.double().max(dim=1).values
    # alpha scales the residual norm to the size of the logits (the paper's sum of max logits / sum of norms).
    alpha = float(max_logits.abs().mean() / residual.mean().clamp_min(1e-12))
    return {"origin": origin.float(), "basis": basis.half(), "alpha": alpha}


def _fit_mahalanobis_layers(train: Observed, labels: torch.Tensor, val: Observed, k: int) -> Stats:
    names = sorted(train.layers or {})
    stats: Stats = {"layers": names, "power": LAYER_POWER}
    for name in names:
        for key, value in fit_gaussian(_stage(stats, train, name), LAYER_RANK).items():
            stats[f"{name}.{key}"] = value
        _set_standardisation(stats, name, gaussian_distance(stats, _stage(stats, val, name), f"{name}."))
    return stats


def _fit_knn_layers(train: Observed, labels: torch.Tensor, val: Observed, k: int) -> Stats:
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
        stats[f"{name}.bank"] = _knn_bank(_whiten(stats, name, x.float()))
        _set_standardisation(stats, name, _knn_layer_distances(stats, val, name))
    return stats


@dataclass(frozen=True)
class Detector:
    """How to fit one detector and score with it, and what of the pass it needs."""

    fit: Callable[[Observed, torch.Tensor, Observed, int], Stats]
    score: Callable[[Stats, Observed], torch.Tensor]
    note: str  # a few words for the OOD page
    needs_layers: bool = False
    needs_head: bool = False


DETECTORS: dict[str, Detector] = {
    "msp": Detector(lambda t, y, v, k: {}, _score_msp, "max softmax — the notebook's baseline"),
    "energy": Detector(lambda t, y, v, k: {"temperature": ENERGY_TEMPERATURE}, _score_energy, "energy of the logits"),
    "mahalanobis": Detector(
        lambda t, y, v, k: fit_mahalanobis(t.features, y), _score_mahalanobis, "distance to the training features"
    ),
    "knn": Detector(
        lambda t, y, v, k: _fit_knn(t.features, y, t.logits, k), _score_knn, "distance to the nearest training features"
    ),
    "vim": Detector(_fit_vim, _score_vim, "feature residual beside the logits (ViM)"),
    "ash": Detector(
        lambda t, y, v, k: {"percentile": ASH_PERCENTILE},
        _score_ash,
        "energy after pruning activations (ASH)",
        needs_head=True,
    ),
    "scale": Detector(
        lambda t, y, v, k: {"percentile": SCALE_PERCENTILE},
        _score_scale,
        "energy after scaling activations (SCALE)",
        needs_head=True,
    ),
    "mahalanobis_layers": Detector(
        _fit_mahalanobis_layers,
        _score_mahalanobis_layers,
        "distance to the training lesions at every stage",
        needs_layers=True,
    ),
    "mahalanobis_layers_max": Detector(
        _fit_mahalanobis_layers, _score_mahalanobis_layers_max, "the farthest stage's distance", needs_layers=True
    ),
    "knn_layers": Detector(
        _fit_knn_layers, _score_knn_layers, "nearest training lesions at every stage", needs_layers=True
    ),
}
#: name -> scorer (stats, Observed) -> scores; kept for callers that list the detectors.
SCORERS: dict[str, Callable[[Stats, Observed], torch.Tensor]] = {n: d.score for n, d in DETECTORS.items()}


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


# --- thresholds ---------------------------------------------------------------------------------


def harrell_davis_quantile(values: Any, q: float) -> float:
    """The Harrell-Davis estimate of the ``q`` quantile: all order statistics, Beta-weighted.

    Smoother than one order statistic, so a threshold set on a small validation split moves less
    from one split to the next (Harrell & Davis 1982).
    """
    ordered = np.sort(_as_numpy(values))
    n = len(ordered)
    if n == 0:
        raise ValueError("a quantile needs at least one value")
    if np.isnan(ordered).any():
        raise ValueError("a quantile of scores that include NaN is undefined")
    if n == 1:
        return float(ordered[0])
    a, b = q * (n + 1), (1 - q) * (n + 1)
    from scipy.stats import beta as beta_distribution  # here: only fitting needs scipy (app start-up)

    weights = np.diff(beta_distribution.cdf(np.arange(n + 1) / n, a, b))
    # Far order statistics get weights that underflow to 0: leave them out, so that an infinite
    # score there does not turn the estimate into 0 * inf = NaN.
    used = weights > 0
    return float(weights[used] @ ordered[used])


def keep_threshold(scores: torch.Tensor, keep: float) -> float:
    """The threshold accepting ``keep`` of these lesions (Harrell-Davis): score <= it is accepted."""
    return harrell_davis_quantile(scores, keep)


def rejection_spread(
    scores: Any, keep: float, rounds: int = BOOTSTRAP_ROUNDS, seed: int = BOOTSTRAP_SEED
) -> dict[str, float]:
    """Bootstrap spread of the share of NEW lesions a threshold fitted like ours rejects.

    Each round refits the threshold on a resample of the validation scores and counts the
    validation lesions left out of that resample (out-of-bag, so unseen by that threshold) that
    it rejects. Returns the median and the 2.5 % / 97.5 % percentiles of that share, and the target.
    """
    values = _as_numpy(scores)
    rng = np.random.default_rng(seed)
    shares = []
    for _ in range(rounds):
        drawn = rng.integers(0, len(values), len(values))
        left_out = np.ones(len(values), dtype=bool)
        left_out[drawn] = False
        if left_out.any():
            threshold = harrell_davis_quantile(values[drawn], keep)
            shares.append(float(np.mean(values[left_out] > threshold)))
    if not shares:
        return {"target": 1 - keep, "median": float("nan"), "low": float("nan"), "high": float("nan")}
    low, median, high = np.percentile(shares, [2.5, 50, 97.5])
    return {"target": float(1 - keep), "median": float(median), "low": float(low), "high": float(high)}


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
        stats["threshold"] = keep_threshold(val_scores, keep)
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


# --- evaluation ----------------------------------------------------------------------------


def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).ravel()


def ranked(*groups: Any) -> list[np.ndarray]:
    """The score arrays with every non-finite score replaced by a finite one that ranks the same.

    NaN (a detector that could not score the image, which the predictor rejects) and +inf rank
    above every finite score, -inf below: ROC figures count them as the predictor decides them,
    and scikit-learn, which refuses non-finite scores, can compute them.
    """
    arrays = [_as_numpy(g) for g in groups]
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.array([])
    top = float(finite.max()) if len(finite) else 0.0
    bottom = float(finite.min()) if len(finite) else 0.0
    span = top - bottom or abs(top) or 1.0
    out = []
    for a in arrays:
        a = a.copy()
        a[np.isnan(a) | (a == np.inf)] = top + span
        a[a == -np.inf] = bottom - span
        out.append(a)
    return out


def evaluate(lesion_scores: Any, ood_scores: Any, threshold: float) -> dict[str, float | int]:
    """How well scores separate OOD images (positive) from lesions, and what ``threshold`` does.

    ``fpr_at_95_tpr`` is the share of OOD images accepted when the threshold accepts 95 % of
    the lesions given here (the usual OOD benchmark number; lower is better). A NaN score counts
    as rejected, as the predictor decides it.
    """
    lesions, ood = (np.where(np.isnan(x), np.inf, x) for x in (_as_numpy(lesion_scores), _as_numpy(ood_scores)))
    result: dict[str, float | int] = {"roc_auc": float("nan"), "fpr_at_95_tpr": float("nan")}
    if len(lesions) and len(ood):
        truth = np.r_[np.zeros(len(lesions)), np.ones(len(ood))]
        from sklearn.metrics import roc_auc_score

        ranked_lesions, ranked_ood = ranked(lesions, ood)
        result["roc_auc"] = float(roc_auc_score(truth, np.r_[ranked_lesions, ranked_ood]))
        at_95 = float(np.quantile(ranked_lesions, 0.95))
        result["fpr_at_95_tpr"] = float(np.mean(ranked_ood <= at_95))
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
