"""OOD detectors against hand computations on tiny synthetic features."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from scipy.stats.mstats import hdquantiles
from sklearn.covariance import LedoitWolf

from lesion import ood
from lesion.model import LAYER_NAMES, LayerStatistics, build_model, forward_parts, pooled_statistics
from lesion.ood import features as ood_features
from lesion.ood import layers as ood_layers
from tests.tolerances import assert_within, knn_layers_slack, layer_mahalanobis_slack

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
    stats = ood_features.fit_knn(bank_points, 2)
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
    first = ood_features.fit_knn(features, 10)
    second = ood_features.fit_knn(features, 10)
    assert first["bank"].shape == (ood.KNN_BANK_SIZE, 8)
    assert torch.equal(first["bank"], second["bank"])


@pytest.mark.parametrize("keep", [0.8, 0.9, 0.95])
def test_thresholds_keep_the_requested_share_of_validation(keep):
    generator = torch.Generator().manual_seed(1)
    train, val = torch.randn(200, 6, generator=generator), torch.randn(100, 6, generator=generator)
    train_logits, val_logits = torch.randn(200, 2, generator=generator), torch.randn(100, 2, generator=generator)
    labels = (torch.arange(200) % 2).long()
    detectors = ood.fit_detectors(train, labels, train_logits, val, val_logits, keep=keep, k=5)
    # Without layer statistics or a head, only the detectors that need neither are fitted.
    assert set(detectors) == {"msp", "energy", "mahalanobis", "knn", "vim"}
    for name, stats in detectors.items():
        assert isinstance(stats["threshold"], float)
        scores = ood.score(name, stats, val, val_logits)
        accepted = int((scores <= stats["threshold"]).sum())
        # 100 validation images: keep * 100 of them are accepted, within two images (the Harrell-Davis
        # quantile is a weighted average of the order statistics around the plain quantile).
        assert abs(accepted - round(keep * 100)) <= 2, (name, accepted)


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


def test_scores_that_are_not_numbers_count_as_rejected():
    # NaN is what a detector gives when it cannot score an image; the predictor rejects it, and so
    # do these figures (the OOD page would otherwise fail in scikit-learn, which refuses NaN).
    result = ood.evaluate([0.1, float("nan"), 0.3], [float("nan"), 0.5, float("inf")], threshold=0.4)
    assert (result["lesions_accepted"], result["lesions_rejected"]) == (2, 1)
    assert (result["ood_accepted"], result["ood_rejected"]) == (0, 3)
    # The NaN lesion ranks with the top scores: it ties the NaN and infinite photos, beats the 0.5 one.
    assert result["roc_auc"] == pytest.approx((3 + 3 + 0.5 + 0 + 0.5) / 9)
    lesions, photos = ood.ranked(np.array([0.1, np.nan, -np.inf]), [np.inf, 0.5])
    assert np.isfinite(lesions).all() and np.isfinite(photos).all()
    assert lesions[1] == photos[0] > 0.5 and lesions[2] < 0.1
    assert ood.ranked([np.nan], [np.nan])[0][0] == ood.ranked([np.nan], [np.nan])[1][0]  # nothing finite at all


# --- the detectors added for issue 9: every stage of the same pass -----------------------------------


def test_harrell_davis_matches_scipy():
    values = np.random.default_rng(0).normal(size=37)
    for q in (0.5, 0.9, 0.95):
        assert ood.harrell_davis_quantile(values, q) == pytest.approx(float(hdquantiles(values, [q])[0]), rel=1e-9)
    assert ood.harrell_davis_quantile([1.0, 2.0, 3.0], 0.5) == pytest.approx(2.0)  # symmetric weights
    with pytest.raises(ValueError, match="at least one"):
        ood.harrell_davis_quantile([], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        ood.harrell_davis_quantile([1.0, float("nan"), 2.0], 0.5)
    # An infinite score far from the quantile has a weight that underflows to 0: it must not give 0 * inf = NaN.
    many = np.append(np.random.default_rng(1).normal(size=1499), np.inf)
    assert ood.harrell_davis_quantile(many, 0.5) == pytest.approx(float(np.quantile(many[:-1], 0.5)), abs=0.05)


def test_fitting_no_detector_fits_none_and_unscorable_ones_are_left_out(monkeypatch: pytest.MonkeyPatch):
    logits = torch.randn(8, 2)
    assert ood.fit_detectors(FEATURES, LABELS, logits, FEATURES[:4], logits[:4], k=2, names=[]) == {}
    broken = ood.Detector(
        lambda t, y, v, k: {}, lambda stats, seen: torch.full((len(seen.features),), float("nan")), ""
    )
    monkeypatch.setitem(ood.DETECTORS, "broken", broken)
    with pytest.warns(UserWarning, match="'broken' left out"):
        fitted = ood.fit_detectors(FEATURES, LABELS, logits, FEATURES[:4], logits[:4], k=2, names=["msp", "broken"])
    assert set(fitted) == {"msp"}


def test_threshold_keeps_the_target_share_of_new_lesions():
    # Many small validation splits (60 lesions each) from one distribution; each threshold is then
    # applied to fresh lesions of that distribution. On average the rejected share is the target, and
    # the bootstrap range of each split covers the share its own threshold really rejects most of the time.
    rng = np.random.default_rng(0)
    fresh = rng.normal(size=200_000)
    rates, covered = [], 0
    for _ in range(60):
        validation = rng.normal(size=60)
        threshold = ood.harrell_davis_quantile(validation, 0.95)
        rate = float(np.mean(fresh > threshold))
        spread = ood.rejection_spread(validation, 0.95, rounds=200, seed=1)
        covered += spread["low"] <= rate <= spread["high"]
        rates.append(rate)
    assert abs(np.mean(rates) - 0.05) < 0.01, np.mean(rates)
    assert covered >= 0.8 * 60, covered


def test_low_rank_gaussian_at_full_rank_is_the_ledoit_wolf_mahalanobis():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(40, 6, generator=generator) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 0.1])
    exact = ood.fit_mahalanobis(features, torch.zeros(40, dtype=torch.long))
    compact = ood.fit_gaussian(features, rank=6)
    assert compact["shrinkage"] == pytest.approx(exact["shrinkage"], rel=1e-9)
    queries = torch.randn(5, 6, generator=generator) * 3
    expected = ood.score("mahalanobis", exact, queries, torch.zeros(5, 2))
    assert torch.allclose(ood.gaussian_distance(compact, queries), expected, rtol=2e-3)
    # Fewer directions: the rest is one isotropic variance, and the basis is float16.
    small = ood.fit_gaussian(features, rank=2)
    assert small["basis"].shape == (6, 2) and small["basis"].dtype == torch.float16
    # The principal directions vary more than the rest, so they count less: weights <= 0.
    assert small["residual_precision"] > 0 and bool((small["weights"] <= 0).all())


def test_vim_residual_and_logits_by_hand():
    # Training features span the first two axes around the origin -pinv(W) b = 0 (no bias effect).
    generator = torch.Generator().manual_seed(0)
    train = torch.zeros(50, 8)
    train[:, :2] = torch.randn(50, 2, generator=generator) * 5
    head = torch.nn.Linear(8, 3)
    with torch.no_grad():
        head.bias.zero_()
    logits = head(train).detach()
    stats = ood_features.fit_vim(
        ood.Observed(train, logits, head=head), torch.zeros(50), ood.Observed(train, logits), 1
    )
    assert stats["basis"].shape == (8, 4)  # min(VIM_RANK, D / 2)
    query = torch.zeros(2, 8)
    query[0, 0], query[1, 7] = 3.0, 3.0  # inside the subspace, then 3 units outside it
    query_logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    got = ood.score("vim", stats, query, query_logits)
    lse = torch.logsumexp(query_logits, dim=1)
    expected = torch.tensor([0.0, 3.0 * stats["alpha"]]) - lse
    assert torch.allclose(got, expected, atol=1e-2)


def test_ash_and_scale_by_hand():
    features = torch.tensor([[4.0, 1.0, 0.0, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    torch.manual_seed(0)
    head = torch.nn.Linear(10, 2)
    # Logits of size ~10 whose logsumexp can land near 0: float32 rounding is absolute, not relative
    # (an unseeded head once gave 0.0159405 against 0.0159410); a wrong mask or scale moves it by ~1.
    close = {"rel": 1e-5, "abs": 1e-4}
    # ASH at the 80th percentile keeps the top 2 (4 and 3); sum 10 / kept 7 -> scale exp(10 / 7).
    pruned = torch.tensor([[4.0, 0, 0, 0, 0, 3.0, 0, 0, 0, 0]]) * math.exp(10 / 7)
    got = ood.score("ash", {"percentile": 80.0}, features, torch.zeros(1, 2), head=head)
    assert got.item() == pytest.approx(-torch.logsumexp(head(pruned), dim=1).item(), **close)
    # SCALE keeps every activation, scaled the same way.
    got = ood.score("scale", {"percentile": 80.0}, features, torch.zeros(1, 2), head=head)
    expected = -torch.logsumexp(head(features * math.exp(10 / 7)), dim=1).item()
    assert got.item() == pytest.approx(expected, **close)
    with pytest.raises(ValueError, match="classifier head"):
        ood.score("ash", {"percentile": 80.0}, features, torch.zeros(1, 2))


def test_layer_statistics_are_the_stage_means_and_stds_of_the_same_pass():
    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), LayerStatistics(model) as tap:
        forward_parts(model, x)  # outside capture(): nothing is kept
        with tap.capture() as layers:
            activations, _, _ = forward_parts(model, x)
        with torch.no_grad():
            stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
            layer1 = model.layer1(stem)
    assert sorted(layers) == list(LAYER_NAMES)
    assert layers["layer1"].shape == (2, 128) and layers["layer4"].shape == (2, 1024)
    assert torch.allclose(layers["layer1"][:, :64], layer1.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(layers["layer1"][:, 64:], layer1.std(dim=(2, 3), correction=0), atol=1e-5)
    assert torch.allclose(layers["layer4"][:, :512], activations.mean(dim=(2, 3)), atol=1e-5)
    assert not any(m._forward_hooks for m in model.modules())  # closed with the block


def test_pooled_statistics_keep_their_digits_on_large_offsets_and_bf16() -> None:
    from lesion.model import pooled_statistics

    torch.manual_seed(1)
    x = 1000.0 + torch.randn(3, 8, 56, 56)  # a large mean over a small spread: one-pass moments would cancel
    reference = torch.cat([x.double().mean(dim=(2, 3)), x.double().std(dim=(2, 3), correction=0)], dim=1)
    assert torch.allclose(pooled_statistics(x).double(), reference, rtol=1e-4, atol=1e-3)
    low = x.bfloat16()  # an autocast pass hands the hooks bf16 activations
    assert pooled_statistics(low).dtype == torch.float32
    expected = torch.cat([low.double().mean(dim=(2, 3)), low.double().std(dim=(2, 3), correction=0)], dim=1)
    assert torch.allclose(pooled_statistics(low).double(), expected, rtol=1e-4, atol=1e-2)


def _observed_tiny_model(rows: int = 40):
    """Features, logits and stage statistics of real sample lesions through a tiny random ResNet-18."""
    from tests.helpers_model import batch_of, lesion_paths

    torch.manual_seed(0)
    model = build_model("resnet18", "linear", num_classes=3).eval()  # 3 columns: nothing assumes 2
    with torch.no_grad(), LayerStatistics(model) as tap, tap.capture() as layers:
        _, features, logits = forward_parts(model, batch_of(lesion_paths()[:rows], 32))
    return model, features, logits, layers


def _fit_first_28(features, logits, layers, **options) -> dict[str, dict]:
    """Detectors fitted on the first 28 images (labels 0, 1, 2 in turn), thresholds on the rest."""
    return ood.fit_detectors(
        features[:28],
        torch.arange(28) % 3,
        logits[:28],
        features[28:],
        logits[28:],
        train_layers={n: v[:28] for n, v in layers.items()},
        val_layers={n: v[28:] for n, v in layers.items()},
        **options,
    )


def test_every_detector_fits_scores_and_survives_weights_only_round_trip():
    model, features, logits, layers = _observed_tiny_model()
    detectors = _fit_first_28(features, logits, layers, k=3, head=model.fc)
    assert set(detectors) == set(ood.DETECTORS)
    buffer = io.BytesIO()
    torch.save({"detectors": detectors}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["detectors"]
    for name, stats in detectors.items():
        spread = stats["rejection_spread"]
        assert spread["target"] == pytest.approx(0.05) and 0 <= spread["low"] <= spread["median"] <= spread["high"] <= 1
        scores = ood.score(name, stats, features, logits, layers=layers, head=model.fc)
        assert scores.shape == (40,) and bool(torch.isfinite(scores).all()), name
        again = ood.score(name, loaded[name], features, logits, layers=layers, head=model.fc)
        assert torch.equal(scores, again), name
    with pytest.raises(ValueError, match="layer1 statistics"):
        ood.score("mahalanobis_layers", detectors["mahalanobis_layers"], features, logits)


def test_layer_statistics_stay_compact():
    # The bundled ResNet-18 must stay under 25 MB: its layer detectors store float16 bases of LAYER_RANK
    # and KNN_LAYER_RANK directions, whatever the number of training images (here 600 rows of random stats).
    widths = {"layer1": 128, "layer2": 256, "layer3": 512, "layer4": 1024}
    generator = torch.Generator().manual_seed(0)
    layers = {n: torch.rand(600, w, generator=generator) for n, w in widths.items()}
    features, logits = torch.rand(600, 512, generator=generator), torch.randn(600, 2, generator=generator)
    detectors = ood.fit_detectors(
        features[:500],
        torch.arange(500) % 2,
        logits[:500],
        features[500:],
        logits[500:],
        train_layers={n: v[:500] for n, v in layers.items()},
        val_layers={n: v[500:] for n, v in layers.items()},
        names=["mahalanobis_layers", "mahalanobis_layers_max", "knn_layers", "vim"],
    )
    # The two layer Mahalanobis detectors share their tensors, so the file holds them once.
    buffer = io.BytesIO()
    torch.save(detectors["mahalanobis_layers"], buffer)
    alone = buffer.tell()
    buffer = io.BytesIO()
    torch.save({n: detectors[n] for n in ("mahalanobis_layers", "mahalanobis_layers_max")}, buffer)
    assert buffer.tell() < alone + 10_000
    sizes = {name: ood.stats_bytes(stats) for name, stats in detectors.items()}
    assert sizes["mahalanobis_layers"] < 300_000 and sizes["vim"] < 100_000, sizes
    assert sizes["knn_layers"] < 250_000, sizes


def test_packed_layer_distances_equal_the_stage_by_stage_ones_and_follow_changed_statistics():
    model, features, logits, layers = _observed_tiny_model()
    stats = _fit_first_28(features, logits, layers, names=["mahalanobis_layers"])["mahalanobis_layers"]
    keys = set(stats)
    for power_stats in (stats, {k: v for k, v in stats.items() if k != "power"}):  # root space, and power 1
        for rows in (slice(None), slice(3, 4)):  # a batch, and one image as the app scores it
            seen = ood.Observed(features[rows], logits[rows], {n: v[rows] for n, v in layers.items()})
            packed = ood_layers._layer_mahalanobis(power_stats, seen)
            reference = ood_layers._layer_mahalanobis_by_stage(power_stats, seen)
            assert packed.shape == reference.shape == (len(features[rows]), 4)
            # The two sum in other orders, over terms of both signs: equal within float32 rounding,
            # bounded from the terms themselves (tests/tolerances.py); a misplaced block moves z by ~1.
            assert_within(packed, reference, layer_mahalanobis_slack(power_stats, seen), "packed vs by stage")
    assert set(stats) == keys  # scoring adds nothing that a checkpoint would then carry
    # A re-standardised stage (same dict, same tensors) is seen at once, not served from the cache.
    seen = ood.Observed(features, logits, layers)
    before = ood_layers._layer_mahalanobis(stats, seen)
    stats["layer2.loc"] += 1.0
    after = ood_layers._layer_mahalanobis(stats, seen)
    assert torch.allclose(after[:, 1], before[:, 1] - 1.0 / stats["layer2.scale"], atol=1e-5)
    assert torch.equal(after[:, [0, 2, 3]], before[:, [0, 2, 3]])


def _stages_of_mixed_ranks() -> tuple[dict, ood.Observed]:
    """Four stages of widths 12, 20, 8, 30 kept at ranks 5, 20, 8, 3: two of them full rank (no residual)."""
    generator = torch.Generator().manual_seed(0)
    widths, ranks = (12, 20, 8, 30), (5, 20, 8, 3)
    train = {f"layer{i + 1}": torch.rand(60, w, generator=generator) for i, w in enumerate(widths)}
    test = {f"layer{i + 1}": torch.rand(7, w, generator=generator) * 1.5 for i, w in enumerate(widths)}
    stats: dict = {"layers": list(train), "power": 0.5}
    for (name, x), rank in zip(train.items(), ranks, strict=True):
        for key, value in ood.fit_gaussian(x.sqrt(), rank).items():
            stats[f"{name}.{key}"] = value
        ood_layers._set_standardisation(stats, name, ood.gaussian_distance(stats, x[:20].sqrt(), f"{name}."))
    assert stats["layer2.residual_precision"] == stats["layer3.residual_precision"] == 0.0
    return stats, ood.Observed(torch.zeros(7, 1), torch.zeros(7, 2), test)


def test_packed_distances_hold_for_mixed_ranks_and_follow_replaced_or_edited_tensors():
    stats, seen = _stages_of_mixed_ranks()

    def agrees() -> bool:
        difference = (
            ood_layers._layer_mahalanobis(stats, seen) - ood_layers._layer_mahalanobis_by_stage(stats, seen)
        ).abs()
        return bool((difference <= layer_mahalanobis_slack(stats, seen)).all())  # float32 rounding, bounded

    assert agrees()
    before = ood_layers._layer_mahalanobis(stats, seen)
    stats["layer3.mean"] = stats["layer3.mean"] + 0.25  # a new tensor in the same dict
    assert agrees() and not torch.allclose(ood_layers._layer_mahalanobis(stats, seen)[:, 2], before[:, 2])
    stats["layer4.weights"].mul_(0.5)  # the same tensor, edited in place
    assert agrees()
    # Statistics of stages as wide as these in total, but cut differently, are refused, not misread.
    shifted = dict(seen.layers, layer1=seen.layers["layer1"][:, :10])
    shifted["layer2"] = torch.cat([seen.layers["layer2"], seen.layers["layer2"][:, :2]], dim=1)
    with pytest.raises(ValueError, match="widths"):
        ood_layers._layer_mahalanobis(stats, ood.Observed(seen.features, seen.logits, shifted))
    for key, bad in (("layer1.basis", stats["layer1.basis"][:1]), ("layer2.weights", torch.tensor(1.0))):
        with pytest.raises(ValueError, match="do not fit together"):
            ood_layers._layer_mahalanobis({**stats, key: bad}, seen)


def test_packed_knn_layers_equal_the_stage_by_stage_ones():
    model, features, logits, layers = _observed_tiny_model()
    stats = _fit_first_28(features, logits, layers, names=["knn_layers"], k=3)["knn_layers"]
    seen = ood.Observed(features, logits, layers)
    # Equal within the float32 rounding of two summation orders, bounded from the terms (tests/tolerances.py).
    assert_within(
        ood_layers._knn_layers(stats, seen), ood_layers._knn_layers_by_stage(stats, seen), knn_layers_slack(stats, seen)
    )
    # Stages of different widths whitened to different ranks (12, 20, 8, 24): padded with zeros when packed.
    generator = torch.Generator().manual_seed(1)
    widths = (12, 20, 8, 30)
    train = {f"layer{i + 1}": torch.rand(60, w, generator=generator) for i, w in enumerate(widths)}
    val = {n: torch.rand(15, v.shape[1], generator=generator) for n, v in train.items()}
    test = {n: torch.rand(9, v.shape[1], generator=generator) * 1.3 for n, v in train.items()}
    mixed = ood_layers.fit_knn_layers(
        ood.Observed(torch.zeros(60, 1), torch.zeros(60, 2), train), None, ood.Observed(None, None, val), 5
    )
    assert [mixed[f"{n}.basis"].shape[1] for n in train] == [12, 20, 8, 24]
    seen = ood.Observed(None, None, test)
    packed = ood_layers._knn_layers(mixed, seen)
    assert packed.shape == (9, 4)
    assert_within(packed, ood_layers._knn_layers_by_stage(mixed, seen), knn_layers_slack(mixed, seen), "mixed ranks")
    # Banks of different sizes (not what fitting makes) are scored stage by stage: the very same operations.
    uneven = {**mixed, "layer2.bank": mixed["layer2.bank"][:40]}
    assert torch.equal(ood_layers._knn_layers(uneven, seen), ood_layers._knn_layers_by_stage(uneven, seen))
    # k beyond the bank, then k and one stage's location changed in the same dict: the cache follows.
    for key, value in (("k", 1000), ("k", 2), ("layer3.loc", mixed["layer3.loc"] + 0.5)):
        mixed[key] = value
        assert_within(
            ood_layers._knn_layers(mixed, seen),
            ood_layers._knn_layers_by_stage(mixed, seen),
            knn_layers_slack(mixed, seen),
            key,
        )
    shifted = dict(test, layer1=test["layer1"][:, :10], layer2=torch.cat([test["layer2"], test["layer1"][:, :2]], 1))
    with pytest.raises(ValueError, match="widths"):
        ood_layers._knn_layers(mixed, ood.Observed(None, None, shifted))


def test_score_all_shares_the_stage_distances_of_detectors_fitted_alike():
    model, features, logits, layers = _observed_tiny_model()
    fit = _fit_first_28(features, logits, layers, k=3, head=model.fc)
    both = ood.score_all(fit, features, logits, layers=layers, head=model.fc)
    for name, stats in fit.items():  # the same scores as one detector at a time
        alone = ood.score(name, stats, features, logits, layers=layers, head=model.fc)
        assert torch.allclose(both[name], alone, atol=1e-6), name
    # The two Mahalanobis layer detectors hold the same tensors, so the second reads the first's distances.
    mean_stats, max_stats = fit["mahalanobis_layers"], fit["mahalanobis_layers_max"]
    assert mean_stats["layer1.basis"] is max_stats["layer1.basis"]
    seen = ood.Observed(features, logits, layers)
    assert ood_layers._layer_mahalanobis(mean_stats, seen) is ood_layers._layer_mahalanobis(max_stats, seen)
    older = {k: v for k, v in max_stats.items() if k != "power"}  # another power: computed afresh
    assert not torch.allclose(
        ood_layers._layer_mahalanobis(older, seen), ood_layers._layer_mahalanobis(mean_stats, seen)
    )
    with pytest.raises(ValueError, match="unknown OOD method"):
        ood.score_all({"nope": {}}, features, logits)
    # A pass reused with other statistics for a stage is computed afresh, not read from the memo.
    first = ood_layers._layer_mahalanobis(mean_stats, seen).clone()
    seen.layers = dict(layers, layer2=layers["layer2"] * 2)
    again = ood_layers._layer_mahalanobis(mean_stats, seen)
    # Packed and stage by stage sum in other orders: q is a difference of terms up to ~400 times its size
    # (negative direction weights), so a 1e-4 tolerance held on one CPU and not on another (issue 23).
    # The bound comes from those terms (tests/tolerances.py); a stale or misread stage moves z by ~1.
    slack = layer_mahalanobis_slack(mean_stats, seen)
    assert bool(((again[:, 1] - first[:, 1]).abs() > slack[:, 1]).all())  # every image's layer2 moved
    assert_within(again, ood_layers._layer_mahalanobis_by_stage(mean_stats, seen), slack, "after layer2 changed")


def test_packed_detectors_work_on_inference_tensors_and_refuse_values_that_are_not_finite():
    model, features, logits, layers = _observed_tiny_model()
    fit = _fit_first_28(features, logits, layers, names=["mahalanobis_layers_max", "knn_layers"], k=3)
    with torch.inference_mode():  # as a caller may build a Predictor: inference tensors keep no version counter
        frozen = {
            name: {k: v.float() + 0 if torch.is_tensor(v) else v for k, v in st.items()} for name, st in fit.items()
        }
        for name, stats in frozen.items():
            got = ood.score(name, stats, features, logits, layers=layers)
            assert torch.allclose(got, ood.score(name, fit[name], features, logits, layers=layers), atol=1e-5)
            # No version counter to see an in-place edit by: the packed form is never reused for them.
            stats["layer1.mean"].add_(1)
            edited = {k: v.clone() if torch.is_tensor(v) else v for k, v in stats.items()}
            expected = ood.score(name, edited, features, logits, layers=layers)
            assert torch.allclose(ood.score(name, stats, features, logits, layers=layers), expected, atol=1e-5)
            assert not torch.allclose(got, expected, atol=1e-3)
    for name, key in (("mahalanobis_layers_max", "layer1.loc"), ("knn_layers", "layer4.scale")):
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="not finite"):
                ood.score(name, {**fit[name], key: bad}, features, logits, layers=layers)


def test_one_kernel_pooled_statistics_equal_the_two_pass_ones():
    from lesion.model import _pooled_one_kernel, _pooled_two_pass

    activations = torch.randn(3, 16, 14, 14).relu() * 5
    assert torch.equal(pooled_statistics(activations), _pooled_two_pass(activations))  # the CPU's path
    assert torch.allclose(_pooled_one_kernel(activations), _pooled_two_pass(activations), rtol=1e-5, atol=1e-6)


def test_layer_gaussians_are_fitted_to_square_roots_and_older_statistics_keep_scoring():
    model, features, logits, layers = _observed_tiny_model()
    fit = _fit_first_28(features, logits, layers, names=["mahalanobis_layers_max", "knn_layers"])
    stats = fit["mahalanobis_layers_max"]
    assert stats["power"] == ood.LAYER_POWER == 0.5 and "power" not in fit["knn_layers"]
    # The stage Gaussians live in root space: the layer1 distance is the plain Gaussian distance of the roots.
    rooted = layers["layer1"].clamp_min(0).sqrt()
    direct = ood.gaussian_distance(stats, rooted, "layer1.")
    standardised = (direct - stats["layer1.loc"]) / stats["layer1.scale"]
    seen = ood.Observed(features, logits, layers)
    per_stage = ood_layers._layer_mahalanobis(stats, seen)
    # The packed pass sums in another order: equal within float32 rounding (tests/tolerances.py).
    assert_within(per_stage[:, 0], standardised, layer_mahalanobis_slack(stats, seen)[:, 0], "root space")
    # Statistics written before the power existed (no "power" key) are read as power 1: the raw values.
    older = {k: v for k, v in stats.items() if k != "power"}
    raw = ood.gaussian_distance(older, layers["layer1"], "layer1.")
    per_stage_old = ood_layers._layer_mahalanobis(older, seen)
    expected = (raw - stats["layer1.loc"]) / stats["layer1.scale"]
    assert_within(per_stage_old[:, 0], expected, layer_mahalanobis_slack(older, seen)[:, 0], "power 1")
    for bad in (0.0, -1.0, 2.0, float("nan")):
        with pytest.raises(ValueError, match="power"):
            ood.score("mahalanobis_layers_max", {**stats, "power": bad}, features, logits, layers=layers)
