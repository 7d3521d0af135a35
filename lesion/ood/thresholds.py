"""Where a detector's threshold goes: the Harrell-Davis quantile of validation lesions' scores, and
the bootstrap spread of the share of new lesions such a threshold rejects.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lesion.ood.base import as_numpy
from lesion.verdict import accepts

BOOTSTRAP_ROUNDS = 500
BOOTSTRAP_SEED = 0


def harrell_davis_quantile(values: Any, q: float) -> float:
    """The Harrell-Davis estimate of the ``q`` quantile: all order statistics, Beta-weighted.

    Smoother than one order statistic, so a threshold set on a small validation split moves less
    from one split to the next (Harrell & Davis 1982).
    """
    ordered = np.sort(as_numpy(values))
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


def rejection_spread(
    scores: Any, keep: float, rounds: int = BOOTSTRAP_ROUNDS, seed: int = BOOTSTRAP_SEED
) -> dict[str, float]:
    """Bootstrap spread of the share of NEW lesions a threshold fitted like ours rejects.

    Each round refits the threshold on a resample of the validation scores and counts the
    validation lesions left out of that resample (out-of-bag, so unseen by that threshold) that
    it rejects. Returns the median and the 2.5 % / 97.5 % percentiles of that share, and the target.
    """
    values = as_numpy(scores)
    rng = np.random.default_rng(seed)
    shares = []
    for _ in range(rounds):
        drawn = rng.integers(0, len(values), len(values))
        left_out = np.ones(len(values), dtype=bool)
        left_out[drawn] = False
        if left_out.any():
            threshold = harrell_davis_quantile(values[drawn], keep)
            shares.append(float(np.mean(~accepts(values[left_out], threshold))))
    if not shares:
        return {"target": 1 - keep, "median": float("nan"), "low": float("nan"), "high": float("nan")}
    low, median, high = np.percentile(shares, [2.5, 50, 97.5])
    return {"target": float(1 - keep), "median": float(median), "low": float(low), "high": float(high)}
