"""How far two float32 evaluations of one quantity may differ, derived from the arithmetic.

Two evaluations that add the same products in another order (another batch composition, another
oneDNN or BLAS kernel, one packed matrix instead of one per stage) round differently, and a test
that compares them must allow for it, or it passes on one CPU and fails on the next (issue 23).

The bound used throughout: a float32 sum of ``n`` terms, in any order, errs by at most
``LAMBDA * sqrt(n) * U32`` times the sum of the terms' magnitudes. The worst case is ``n * U32``, but
rounding errors of both signs add like a random walk; Higham and Mary (SIAM J. Sci. Comput. 41(5),
2019, "A new approach to probabilistic rounding error analysis") prove the sqrt(n) form holds with
probability at least ``1 - 2n exp(-LAMBDA**2 / 2)``: with ``LAMBDA = 8``, 1 - 2.5e-14 n. Two
evaluations differ by at most twice one's error.

Float16 statistics (the checkpoint's bases and kNN banks, unit roundoff 2**-11) are exact in float32,
so both evaluations read the very same numbers: float16 rounding is common to both and cancels in
their difference. It shows only where it changes the size of a term (the norm of a kNN bank row).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lesion import ood
from lesion.ood import layers as ood_layers
from lesion.ood import packing as ood_packing

U32 = 2.0**-24  # float32 unit roundoff
LAMBDA = 8.0  # standard deviations of the random-walk model (see above)


def sum_error(terms: int) -> float:
    """Bound on a float32 sum's error, relative to the sum of its terms' magnitudes, in any order."""
    return LAMBDA * math.sqrt(max(terms, 1)) * U32


def relative_sum_slack(terms: int, sums: int = 1) -> float:
    """Relative difference allowed between two evaluations of a ratio of ``sums`` float32 sums of
    ``terms`` terms of ONE sign each (so the sum of magnitudes is the sum itself), plus a division."""
    return 2 * (sums * sum_error(terms) + U32)


def layer_mahalanobis_slack(stats: dict, seen: ood.Observed) -> torch.Tensor:
    """(N, stages): how far two float32 evaluations of the standardised stage distances may differ.

    Per stage, with c = x - mean (the same float32 numbers on both paths) and p = c @ basis:
    q = rp |c|^2 + sum_j w_j p_j^2, d = sqrt(q), z = (d - loc) / scale. The direction weights w_j
    are negative (1 / top - 1 / rest), so q is a difference of large terms (up to ~430 times q in
    the tests): its error follows their magnitudes, not q. With D and r the widths and ranks of all
    stages together (the packed path runs one product over every stage's columns, zeros included),
    per evaluation:

        |dp_j| <= e_j = sum_error(D) * sum_i |c_i b_ij|
        |dq|   <= sum_error(D + r + 1) * (rp |c|^2 + sum_j |w_j| (|p_j| + e_j)^2) + sum_j |w_j| e_j (2 |p_j| + e_j)

    twice that between two; then |dd| <= min(sqrt(|dq|), |dq| / sqrt(q - |dq|)) and
    |dz| <= |dd| / scale + 4 U32 (d + |loc|) / scale for the standardisation's own roundings.
    Computed in float64 from the very float16 and float32 statistics the scorer reads.
    """
    names = list(stats["layers"])
    width = sum(ood_packing._stage_width(stats[f"{n}.mean"]) for n in names)
    rank = sum(stats[f"{n}.basis"].shape[1] for n in names)
    columns = []
    for name in names:
        centred = ood_layers._stage(stats, seen, name).double() - stats[f"{name}.mean"].double().reshape(1, -1)
        basis = stats[f"{name}.basis"].double()
        weights = stats[f"{name}.weights"].double()
        residual = float(stats[f"{name}.residual_precision"])
        projected = centred @ basis
        squared_norm = (centred * centred).sum(dim=1)
        q = (residual * squared_norm + (projected * projected) @ weights).clamp_min(0)
        e = sum_error(width) * (centred.abs() @ basis.abs())
        magnitudes = abs(residual) * squared_norm + ((projected.abs() + e) ** 2) @ weights.abs()
        dq = 2 * (sum_error(width + rank + 1) * magnitudes + (e * (2 * projected.abs() + e)) @ weights.abs())
        dd = torch.minimum(dq.sqrt(), dq / (q - dq).clamp_min(0).sqrt())  # x / 0 = inf: the root wins
        loc, scale = float(stats[f"{name}.loc"]), float(stats[f"{name}.scale"])
        columns.append(dd / scale + 4 * U32 * (q.sqrt() + abs(loc)) / scale)
    return torch.stack(columns, dim=1)


def knn_layers_slack(stats: dict, seen: ood.Observed) -> torch.Tensor:
    """(N, stages): how far two float32 evaluations of the standardised kNN stage distances may differ.

    Per stage, y = (c @ basis) * scale_inv (the packed path folds scale_inv into its basis first: one
    more rounding), similarities s_m = <y / |y|, bank_m>, z = (1 - s_(k) - loc) / scale. Per evaluation:

        |dy_j|        <= e_j = sum_error(D + 1) * sum_i |c_i b_ij| scale_inv_j
        |d(y / |y|)|  <= 2 |e| / |y| + sum_error(r)
        |ds_m|        <= (|d(y / |y|)| + sum_error(r)) * max_m |bank_m|   (Cauchy-Schwarz)

    The bank's rows are unit vectors rounded to float16, so their norms are 1 to within about
    sqrt(r) 2**-11: the largest is read from the bank. The k-th largest similarity moves no more
    than the similarities do. Twice that between two evaluations; |dz| <= |ds| / scale plus
    4 U32 (2 + |loc|) / scale for the standardisation's roundings.
    """
    names = list(stats["layers"])
    width = sum(ood_packing._stage_width(stats[f"{n}.mean"]) for n in names)
    columns = []
    for name in names:
        centred = ood_layers._layer(seen, name).double() - stats[f"{name}.mean"].double().reshape(1, -1)
        basis = stats[f"{name}.basis"].double()
        scale_inv = stats[f"{name}.scale_inv"].double()
        bank = stats[f"{name}.bank"].double()
        rank = basis.shape[1]
        whitened = (centred @ basis) * scale_inv
        e = sum_error(width + 1) * (centred.abs() @ basis.abs()) * scale_inv.abs()
        direction = 2 * e.norm(dim=1) / whitened.norm(dim=1) + sum_error(rank)
        ds = 2 * (direction + sum_error(rank)) * float(bank.norm(dim=1).max())
        loc, scale = float(stats[f"{name}.loc"]), float(stats[f"{name}.scale"])
        columns.append(ds / scale + 4 * U32 * (2 + abs(loc)) / scale)
    return torch.stack(columns, dim=1)


def forward_error(model: nn.Module) -> float:
    """Bound on one float32 forward pass's rounding error, relative to the scale of its outputs.

    Each convolution or linear layer sums K products per output (in-channels / groups x kernel area).
    The products have both signs, so the partial sums stay at the output's scale and the K roundings
    add like a random walk: sqrt(K) U32 of the output, one standard deviation. BatchNorm keeps every
    stage at its own scale, so the layers' independent errors add in quadrature:
    ``LAMBDA * U32 * sqrt(sum of K)``; about 8.5e-5 for a ResNet-18. (Elementwise steps, ReLU, pooling
    and the residual additions add a few U32 each, far below that.) Two passes that sum in other
    orders (another batch composition, another kernel) differ by at most twice this.
    """
    products = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            products += module.in_channels // module.groups * math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            products += module.in_features
    return LAMBDA * U32 * math.sqrt(products)


def logits_slack(model: nn.Module, logits: torch.Tensor) -> float:
    """How far two float32 passes' logits may differ: twice :func:`forward_error` of their scale."""
    return 2 * forward_error(model) * float(logits.abs().max())


def probability_slack(model: nn.Module, logits: torch.Tensor, temperature: float = 1.0) -> float:
    """How far a softmax probability (or a sum of several, as P(malignant)) of two passes may differ.

    d P / d l_j = P (1[j in the set] - p_j) / T, whose magnitudes sum to 2 P (1 - P) / T <= 1 / (2T):
    P moves by at most half the largest logit change over T.
    """
    return logits_slack(model, logits) / (2 * temperature)


def _pass(predictor: Any, images: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The predictor's own features, logits and layer statistics of the readable ``images``, one batch."""
    preprocessor = predictor.preprocessor
    _, features, logits, layers = predictor._forward(preprocessor.batch([preprocessor.prepare(i) for i in images]))
    return features, logits, layers or {}


def p_malignant_slack(predictor: Any, images: Sequence[Any]) -> float:
    """:func:`probability_slack` of a predictor's calibrated P(malignant), at the scale of its logits."""
    return probability_slack(predictor.model, _pass(predictor, images)[1], predictor.temperature)


def ood_slack(predictor: Any, images: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Per fitted detector, (N,): how far two float32 passes' OOD scores of ``images`` may differ.

    Each score is a function of the pass's features, logits and layer statistics. Two passes give
    those within ``2 forward_error`` of each row's scale (its largest magnitude per input), and the
    scorer's own sums (at most 1024 terms wide) round within ``2 sum_error(1024)`` more; to first
    order the score then moves by at most sum_i |d score / d input_i| times that, the gradient taken
    by autograd through the scorer itself. ViM's residual norm is the root of a difference of two
    nearly equal squared norms, whose slope has no bound near 0: it gets its own bound (:func:`_vim_slack`).
    """
    from lesion.model import classifier

    features, logits, layers = _pass(predictor, images)
    error = 2 * forward_error(predictor.model) + 2 * sum_error(1024)
    leaves = {
        key: value.detach().clone().requires_grad_(True)
        for key, value in {"features": features, "logits": logits, **layers}.items()
    }
    slack = {}
    for name, stats in predictor.detectors.items():
        with torch.enable_grad():
            stage_leaves = {key: leaf for key, leaf in leaves.items() if key in layers}
            seen = ood.Observed(leaves["features"], leaves["logits"], stage_leaves, classifier(predictor.model))
            scores = ood.DETECTORS[name].score(stats, seen)  # the scorer itself: ood.score runs without a graph
            grads = torch.autograd.grad(scores.sum(), list(leaves.values()), allow_unused=True)  # rows are independent
        total = torch.zeros(len(features), dtype=torch.float64)
        for leaf, grad in zip(leaves.values(), grads, strict=True):
            if grad is not None:
                scale = leaf.detach().abs().flatten(1).amax(dim=1).double()
                total += error * scale * grad.abs().flatten(1).sum(dim=1).double()
        slack[name] = total
    if "vim" in predictor.detectors:
        slack["vim"] = _vim_slack(predictor.detectors["vim"], features, logits, error)
    return slack


def _vim_slack(stats: dict, features: torch.Tensor, logits: torch.Tensor, error: float) -> torch.Tensor:
    """(N,) for ViM, alpha * sqrt(|c|^2 - |B^T c|^2) - logsumexp(logits) with c = f - origin.

    The root's slope is unbounded where the residual is ~0 (features inside the principal subspace,
    as the tiny test models' training images nearly are), so the first-order bound of
    :func:`ood_slack` fails there. Instead, exactly: moving c by v moves the squared residual by
    2 (c - B B^T c) . v + |v|^2 - |B^T v|^2, so by at most 2 |c - B B^T c| |v| + max(1, ||B||^2) |v|^2,
    with |v| <= error max|f| sqrt(D) (each feature within ``error`` of its row's scale) and ||B|| the
    float16 basis's spectral norm. The scorer's own two squared norms round by 2 sum_error(D) |c|^2
    more. Then |d residual| <= min(sqrt(|d res^2|), |d res^2| / sqrt(res^2)); the logsumexp moves no
    more than the largest logit.
    """
    centred = features.double() - stats["origin"].double().reshape(1, -1)
    basis = stats["basis"].double()
    projected = centred @ basis
    outside = (centred - projected @ basis.T).norm(dim=1)
    v = error * features.abs().amax(dim=1).double() * math.sqrt(centred.shape[1])
    spectral = float(torch.linalg.matrix_norm(basis, ord=2))
    d_squared = 2 * outside * v + max(1.0, spectral**2) * v**2
    squared_norm = centred.norm(dim=1) ** 2
    d_squared = d_squared + 2 * 2 * sum_error(centred.shape[1]) * squared_norm
    residual_squared = (squared_norm - projected.norm(dim=1) ** 2).clamp_min(0)
    d_residual = torch.minimum(d_squared.sqrt(), d_squared / residual_squared.sqrt())  # x / 0 = inf: the root wins
    return float(stats["alpha"]) * d_residual + error * logits.detach().abs().amax(dim=1).double()


def assert_within(actual: object, expected: object, slack: object, what: str = "") -> None:
    """Every ``|actual - expected| <= slack`` (broadcast; NaN fails); the message names the worst element."""
    difference = (torch.as_tensor(actual).double() - torch.as_tensor(expected).double()).abs()
    allowed = torch.as_tensor(slack, dtype=torch.float64).expand_as(difference)
    if bool((difference <= allowed).all()):
        return
    worst = int(torch.nan_to_num(difference / allowed, nan=math.inf).flatten().argmax())
    raise AssertionError(
        f"{what}: element {worst} differs by {difference.flatten()[worst]:.3g}, more than the "
        f"{allowed.flatten()[worst]:.3g} float32 rounding allows"
    )
