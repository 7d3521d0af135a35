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

Where each part lives: :mod:`~lesion.ood.registry` (the detector names, the default, scoring),
:mod:`~lesion.ood.features` and :mod:`~lesion.ood.layers` (the detectors), :mod:`~lesion.ood.gaussian`
(shrunk Gaussians), :mod:`~lesion.ood.packing` (the layer statistics packed for fast scoring, with
their cache), :mod:`~lesion.ood.fitting`, :mod:`~lesion.ood.thresholds` (Harrell-Davis, bootstrap) and
:mod:`~lesion.ood.evaluation`. The accept rule itself is :func:`lesion.verdict.accepts`.
"""

from __future__ import annotations

from lesion.ood.base import Observed, Stats
from lesion.ood.evaluation import evaluate, ranked, roc_points
from lesion.ood.features import (
    ASH_PERCENTILE,
    ENERGY_TEMPERATURE,
    KNN_BANK_SIZE,
    NOTEBOOK_MSP_THRESHOLD,
    SCALE_PERCENTILE,
)
from lesion.ood.fitting import cpu_copy, fit_detectors, stats_bytes
from lesion.ood.gaussian import LAYER_RANK, fit_gaussian, fit_mahalanobis, gaussian_distance
from lesion.ood.layers import KNN_LAYER_RANK, LAYER_POWER
from lesion.ood.registry import (
    DEFAULT_DETECTOR,
    DETECTOR_NAMES,
    DETECTORS,
    UNNAMED_DETECTOR,
    Detector,
    check_method,
    score,
    score_all,
    stats_on_device,
)
from lesion.ood.thresholds import harrell_davis_quantile, rejection_spread

__all__ = [
    "ASH_PERCENTILE",
    "DEFAULT_DETECTOR",
    "DETECTORS",
    "DETECTOR_NAMES",
    "ENERGY_TEMPERATURE",
    "KNN_BANK_SIZE",
    "KNN_LAYER_RANK",
    "LAYER_POWER",
    "LAYER_RANK",
    "NOTEBOOK_MSP_THRESHOLD",
    "SCALE_PERCENTILE",
    "UNNAMED_DETECTOR",
    "Detector",
    "Observed",
    "Stats",
    "check_method",
    "cpu_copy",
    "evaluate",
    "fit_detectors",
    "fit_gaussian",
    "fit_mahalanobis",
    "gaussian_distance",
    "harrell_davis_quantile",
    "ranked",
    "rejection_spread",
    "roc_points",
    "score",
    "score_all",
    "stats_bytes",
    "stats_on_device",
]
