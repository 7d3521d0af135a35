"""Detectors on what the head sees: the penultimate features and the logits of one pass.

Scorers map (stats, :class:`~lesion.ood.base.Observed`) to scores (N,), higher = less like the training
lesions; fitters return the statistics. ``msp`` (the notebook's baseline), ``energy``,
``mahalanobis`` (class means, shared shrunk covariance), ``knn`` (cosine distance to the k-th
nearest training feature), ``vim`` (virtual-logit matching), ``ash`` and ``scale`` (activation
shaping before the head).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lesion.ood.base import Observed, Stats

#: The notebook rejected images whose max softmax was below 0.8; in score units (1 - max softmax,
#: higher = more OOD) that is "reject when score > 0.2".
NOTEBOOK_MSP_THRESHOLD = 0.2
ENERGY_TEMPERATURE = 1.0
KNN_BANK_SIZE = 4096
KNN_SEED = 0
VIM_RANK = 64  # principal subspace of ViM (at most half the feature width)
ASH_PERCENTILE = 90.0
SCALE_PERCENTILE = 85.0


def _needs_head(seen: Observed, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if seen.head is None:
        raise ValueError(f"the {name} detector needs the classifier head (pass head=model.fc)")
    return seen.head


def score_msp(stats: Stats, seen: Observed) -> torch.Tensor:
    return 1.0 - torch.softmax(seen.logits.float(), dim=1).max(dim=1).values


def score_energy(stats: Stats, seen: Observed) -> torch.Tensor:
    temperature = float(stats.get("temperature", ENERGY_TEMPERATURE))
    return -temperature * torch.logsumexp(seen.logits.float() / temperature, dim=1)


def score_mahalanobis(stats: Stats, seen: Observed) -> torch.Tensor:
    features = seen.features.float()
    means = stats["means"].float().to(features.device)  # (C, D)
    precision = stats["precision"].float().to(features.device)  # (D, D)
    centred = features[:, None, :] - means[None, :, :]  # (N, C, D)
    squared = torch.einsum("ncd,de,nce->nc", centred, precision, centred)
    # Rounding can make a distance of ~0 slightly negative; clamp before the square root.
    return squared.clamp_min(0).sqrt().min(dim=1).values


def knn_distance(bank: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    bank = bank.float().to(queries.device)  # (M, D), rows already L2-normalised
    similarity = torch.nn.functional.normalize(queries.float(), dim=1) @ bank.T  # (N, M)
    return 1.0 - similarity.topk(min(k, bank.shape[0]), dim=1).values[:, -1]


def score_knn(stats: Stats, seen: Observed) -> torch.Tensor:
    return knn_distance(stats["bank"], seen.features, int(stats["k"]))


def score_vim(stats: Stats, seen: Observed) -> torch.Tensor:
    centred = seen.features.float() - stats["origin"].float().to(seen.features.device)
    projected = centred @ stats["basis"].float().to(centred.device)
    residual = ((centred * centred).sum(dim=1) - (projected * projected).sum(dim=1)).clamp_min(0).sqrt()
    return float(stats["alpha"]) * residual - torch.logsumexp(seen.logits.float(), dim=1)


def shaped_energy(seen: Observed, percentile: float, prune: bool, name: str) -> torch.Tensor:
    """Energy of the head's logits on features scaled by exp(sum / sum of the top (100 - percentile) %)."""
    head = _needs_head(seen, name)
    features = seen.features.float().clamp_min(0)  # post-ReLU averages: already >= 0
    keep = max(1, round(features.shape[1] * (1 - percentile / 100)))
    top, index = features.topk(keep, dim=1)
    ratio = features.sum(dim=1) / top.sum(dim=1).clamp_min(1e-12)
    shaped = torch.zeros_like(features).scatter(1, index, top) if prune else features
    logits = head(shaped * torch.exp(ratio)[:, None]).float()
    return -torch.logsumexp(logits, dim=1)


def score_ash(stats: Stats, seen: Observed) -> torch.Tensor:
    return shaped_energy(seen, float(stats.get("percentile", ASH_PERCENTILE)), prune=True, name="ash")


def score_scale(stats: Stats, seen: Observed) -> torch.Tensor:
    return shaped_energy(seen, float(stats.get("percentile", SCALE_PERCENTILE)), prune=False, name="scale")


def fit_knn(features: torch.Tensor, k: int) -> Stats:
    """A bank of (at most KNN_BANK_SIZE) L2-normalised training features and the k of the k-th nearest."""
    return {"bank": knn_bank(features), "k": int(k)}


def knn_bank(features: torch.Tensor) -> torch.Tensor:
    rows = features.shape[0]
    if rows > KNN_BANK_SIZE:
        # A seeded choice, so refitting on the same features gives the same bank.
        generator = torch.Generator().manual_seed(KNN_SEED)
        keep = torch.randperm(rows, generator=generator)[:KNN_BANK_SIZE].sort().values
        features = features[keep]
    # float16 halves the checkpoint; cosine similarities change by ~1e-3 at most.
    return torch.nn.functional.normalize(features.float(), dim=1).half()


def fit_vim(train: Observed, labels: torch.Tensor, val: Observed, k: int) -> Stats:
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
