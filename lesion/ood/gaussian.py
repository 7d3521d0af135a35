"""Gaussians shrunk towards a scaled identity (Ledoit-Wolf): a few hundred images cannot estimate a
2048 x 2048 covariance. :func:`fit_mahalanobis` is the class-conditional one of the ``mahalanobis``
detector; :func:`fit_gaussian` the compact one of each stage of the layer detectors.
"""

from __future__ import annotations

import torch

from lesion.ood.base import Stats

#: Principal directions kept per stage for the layer Mahalanobis distances.
LAYER_RANK = 64


def ledoit_wolf(centred: torch.Tensor) -> float:
    """The Ledoit-Wolf shrinkage coefficient of centred rows (1.0, full shrinkage, for a single row)."""
    if len(centred) <= 1:
        return 1.0
    # Imported here: scikit-learn takes seconds to import and only fitting needs it, not the app's predictor.
    from sklearn.covariance import ledoit_wolf_shrinkage

    return float(ledoit_wolf_shrinkage(centred.numpy(), assume_centered=True))


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
        shrinkage = ledoit_wolf(centred)
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
        shrinkage = ledoit_wolf(centred)
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
