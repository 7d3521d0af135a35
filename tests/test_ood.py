"""OOD detectors against hand computations on tiny synthetic features."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from lesion import ood

# Two classes of four 2-D points each: class means (1, 1) and (11, 11), and the within-class
# covariance (population, divided by n) is exactly the identity.
FEATURES = torch.tensor(
    [[0, 0], [2, 0], [0, 2], [2, 2], [10, 10], [12, 10], [10, 12], [12, 12]],
    dtype=torch.float32,
)
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def test_msp_is_one_minus_max_softmax():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [-1.0, 3.0]])
    expected = [1 - math.exp(2) / (math.exp(2) + 1), 0.5, 1 - math.exp(3) / (math.exp(3) + math.exp(-1))]
    got = ood.score("msp", {}, torch.zeros(3, 2), logits)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    # The notebook rejected max softmax < 0.8, i.e. score > 0.2.
    assert abs(ood.NOTEBOOK_MSP_THRESHOLD - 0.2) < 1e-12


def test_energy_is_minus_logsumexp():
    logits = torch.tensor([[1.0, 2.0], [-3.0, 0.5]])
    expected = [-math.log(math.e + math.e**2), -math.log(math.exp(-3) + math.exp(0.5))]
    got = ood.score("energy", {"temperature": 1.0}, torch.zeros(2, 2), logits)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    # With T = 2: -2 * log(e^0.5 + e^1).
    got_t2 = ood.score("energy", {"temperature": 2.0}, torch.zeros(1, 2), logits[:1])
    assert got_t2.item() == pytest.approx(-2 * math.log(math.exp(0.5) + math.exp(1.0)), abs=1e-6)


def test_mahalanobis_by_hand_without_shrinkage():
    stats = ood.fit_mahalanobis(FEATURES, LABELS, shrinkage=0.0)
    assert torch.allclose(stats["means"], torch.tensor([[1.0, 1.0], [11.0, 11.0]]))
    # Identity covariance (plus a 1e-6 ridge): the distance is the Euclidean one.
    assert torch.allclose(stats["precision"], torch.eye(2), atol=1e-5)
    points = torch.tensor([[1.0, 3.0], [11.0, 11.0], [6.0, 6.0], [14.0, 15.0]])
    expected = [2.0, 0.0, math.sqrt(50), 5.0]
    got = ood.score("mahalanobis", stats, points, torch.zeros(4, 2))
    assert torch.allclose(got, torch.tensor(expected), atol=1e-4)


def test_mahalanobis_uses_the_shared_covariance():
    # Stretch the second coordinate by 3: a step of 3 along it now counts as 1.
    stretched = FEATURES * torch.tensor([1.0, 3.0])
    stats = ood.fit_mahalanobis(stretched, LABELS, shrinkage=0.0)
    got = ood.score("mahalanobis", stats, torch.tensor([[1.0, 6.0], [4.0, 3.0]]), torch.zeros(2, 2))
    assert torch.allclose(got, torch.tensor([1.0, 3.0]), atol=1e-4)


def test_mahalanobis_default_shrinkage_is_ledoit_wolf():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(30, 5, generator=generator) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])
    labels = (torch.arange(30) % 2).long()
    stats = ood.fit_mahalanobis(features, labels)
    centred = features.double().clone()
    for c in (0, 1):
        centred[labels == c] -= centred[labels == c].mean(0)
    reference = LedoitWolf(assume_centered=True).fit(centred.numpy())
    assert stats["shrinkage"] == pytest.approx(reference.shrinkage_, rel=1e-6)
    covariance = torch.linalg.inv(stats["precision"].double()).numpy()
    assert np.allclose(covariance, reference.covariance_, rtol=1e-3, atol=1e-3)


def test_knn_by_hand():
    bank_points = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]])
    stats = ood._fit_knn(bank_points, torch.zeros(4), torch.zeros(4, 2), 2)
    assert stats["bank"].dtype == torch.float16
    assert torch.allclose(stats["bank"].float().norm(dim=1), torch.ones(4), atol=1e-3)
    # Query along +x: cosine similarities 1, 0, -1, 0.7071 -> 2nd nearest 0.7071 -> distance 0.2929.
    # Query along +y: 0, 1, 0, 0.7071 -> 2nd nearest 0.7071.  Query along -x: -1, 0, 1, -0.7071 -> 0.
    queries = torch.tensor([[5.0, 0.0], [0.0, 0.1], [-1.0, 0.0]])
    got = ood.score("knn", stats, queries, torch.zeros(3, 2))
    expected = [1 - math.sqrt(0.5), 1 - math.sqrt(0.5), 1.0]
    assert torch.allclose(got, torch.tensor(expected), atol=2e-3)  # float16 bank


def test_knn_bank_is_capped_reproducibly():
    features = torch.randn(ood.KNN_BANK_SIZE + 500, 8)
    first = ood._fit_knn(features, torch.zeros(len(features)), torch.zeros(len(features), 2), 10)
    second = ood._fit_knn(features, torch.zeros(len(features)), torch.zeros(len(features), 2), 10)
    assert first["bank"].shape == (ood.KNN_BANK_SIZE, 8)
    assert torch.equal(first["bank"], second["bank"])


@pytest.mark.parametrize("keep", [0.8, 0.9, 0.95])
def test_thresholds_keep_the_requested_share_of_validation(keep):
    generator = torch.Generator().manual_seed(1)
    train, val = torch.randn(200, 6, generator=generator), torch.randn(100, 6, generator=generator)
    train_logits, val_logits = torch.randn(200, 2, generator=generator), torch.randn(100, 2, generator=generator)
    labels = (torch.arange(200) % 2).long()
    detectors = ood.fit_detectors(train, labels, train_logits, val, val_logits, keep=keep, k=5)
    assert set(detectors) == {"msp", "energy", "mahalanobis", "knn"}
    for name, stats in detectors.items():
        assert isinstance(stats["threshold"], float)
        scores = ood.score(name, stats, val, val_logits)
        accepted = int((scores <= stats["threshold"]).sum())
        # 100 validation images: keep * 100 of them are accepted, up to one image.
        assert round(keep * 100) <= accepted <= round(keep * 100) + 1, (name, accepted)


def test_detectors_survive_a_weights_only_round_trip():
    detectors = ood.fit_detectors(FEATURES, LABELS, torch.randn(8, 2), FEATURES[:4], torch.randn(4, 2), k=2)
    buffer = io.BytesIO()
    torch.save({"detectors": detectors}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["detectors"]
    point = torch.tensor([[3.0, 4.0]])
    for name, stats in detectors.items():
        assert torch.equal(
            ood.score(name, stats, point, torch.ones(1, 2)), ood.score(name, loaded[name], point, torch.ones(1, 2))
        )


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown OOD method"):
        ood.score("odin", {}, torch.zeros(1, 2), torch.zeros(1, 2))


def test_evaluate_by_hand():
    lesions = [0.1, 0.2, 0.3, 0.4]
    outliers = [0.35, 0.5, 0.6]
    result = ood.evaluate(lesions, outliers, threshold=0.3)
    assert result["roc_auc"] == pytest.approx(11 / 12)
    # 95 % of lesions accepted at the 0.95 quantile (0.385): only 0.35 of the OOD gets through.
    assert result["fpr_at_95_tpr"] == pytest.approx(1 / 3)
    assert (result["lesions_accepted"], result["lesions_rejected"]) == (3, 1)
    assert (result["ood_accepted"], result["ood_rejected"]) == (0, 3)


def test_decision_table():
    rows = ood.decision_table(["a.jpg", "car.jpg"], torch.tensor([0.1, 0.9]), 0.5, kinds=["lesion", "ood"])
    assert rows == [
        {"name": "a.jpg", "kind": "lesion", "score": pytest.approx(0.1), "accepted": True},
        {"name": "car.jpg", "kind": "ood", "score": pytest.approx(0.9), "accepted": False},
    ]
