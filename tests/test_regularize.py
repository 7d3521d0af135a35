"""Mixup / cutmix targets, the soft-target loss, the EMA of the weights, and test-time flips."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lesion.checkpoint import check_checkpoint
from lesion.errors import InvalidCheckpoint
from lesion.images import load_image
from lesion.model import build_model, forward_parts
from lesion.predict import Predictor
from lesion.regularize import FLIP_DIMS, BatchMix, ModelEma, SoftTargetCrossEntropy, flip_logits
from lesion.transforms import eval_transform
from tests.helpers_model import lesion_paths, tiny_checkpoint_dict
from tests.tolerances import assert_within, logits_slack, probability_slack, relative_sum_slack


def _batch(n: int = 8, side: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(n, 3, side, side), torch.tensor([0, 1] * (n // 2))


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_targets_are_distributions_that_match_the_images(mixup: float, cutmix: float) -> None:
    images, labels = _batch()
    mixer = BatchMix(mixup, cutmix, prob=1.0)
    for seed in range(10):
        torch.manual_seed(seed)
        mixed, targets = mixer(images, labels)
        assert targets.shape == (8, 2) and mixed.shape == images.shape
        assert torch.allclose(targets.sum(1), torch.ones(8))
        assert (targets >= 0).all() and (targets <= 1).all()
        if cutmix and not mixup:
            # An image paired with one of the other label keeps exactly its own label's share of pixels.
            own = targets[torch.arange(8), labels]
            kept_pixels = (mixed == images).float().mean((1, 2, 3))
            other = own < 1.0
            assert torch.allclose(kept_pixels[other], own[other], atol=1e-6)
    assert not torch.equal(mixed, images)


def test_mixing_off_or_not_drawn_keeps_the_batch() -> None:
    images, labels = _batch()
    mixed, targets = BatchMix(0.0, 0.0, prob=1.0)(images, labels)
    assert torch.equal(mixed, images) and torch.equal(targets, F.one_hot(labels, 2).float())
    mixed, _ = BatchMix(0.4, 1.0, prob=0.0)(images, labels)
    assert torch.equal(mixed, images)


def test_cutmix_target_is_the_pasted_area() -> None:
    images = torch.zeros(2, 3, 20, 20)
    images[1] = 1.0
    labels = torch.tensor([0, 1])
    torch.manual_seed(3)
    mixed, targets = BatchMix(0.0, 1.0, prob=1.0)(images, labels)
    # Image 0 (all zeros, benign) got a box of ones from its partner, or kept itself if paired with itself.
    pasted = float(mixed[0].mean())
    assert targets[0, 1].item() == pytest.approx(pasted, abs=1e-6)
    assert targets[0, 0].item() == pytest.approx(1 - pasted, abs=1e-6)


def test_soft_loss_equals_weighted_cross_entropy_for_one_hot_targets() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 1])
    weight = torch.tensor([0.7, 1.6])
    loss = SoftTargetCrossEntropy(weight)
    expected = F.cross_entropy(logits, labels, weight=weight)
    # The same log-probabilities, summed in other orders: a ratio of two float32 sums of 12 terms of
    # one sign each (tests/tolerances.py), ~7e-6 relative; a wrong weighting moves it by 1e-2 or more.
    close = relative_sum_slack(terms=12, sums=2)
    assert loss(logits, labels).item() == pytest.approx(expected.item(), rel=close)
    assert loss(logits, F.one_hot(labels, 2).float()).item() == pytest.approx(expected.item(), rel=close)
    # Label smoothing on hard labels is PyTorch's own; on soft targets it blends towards uniform.
    smoothed = SoftTargetCrossEntropy(None, label_smoothing=0.2)
    soft = torch.tensor([[0.3, 0.7]] * 6)
    target = soft * 0.8 + 0.1
    manual = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    assert smoothed(logits, soft).item() == pytest.approx(manual.item(), rel=close)
    assert smoothed(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits, labels, label_smoothing=0.2).item(), rel=close
    )


def test_soft_loss_weights_each_class_share() -> None:
    logits = torch.tensor([[2.0, -1.0]])
    target = torch.tensor([[0.25, 0.75]])
    weight = torch.tensor([1.0, 3.0])
    log_p = F.log_softmax(logits, 1)[0]
    manual = -(0.25 * 1.0 * log_p[0] + 0.75 * 3.0 * log_p[1]) / (0.25 * 1.0 + 0.75 * 3.0)
    got = SoftTargetCrossEntropy(weight)(logits, target).item()
    assert got == pytest.approx(manual.item(), rel=relative_sum_slack(terms=2, sums=2))  # float32, other order


def test_ema_update_follows_the_formula() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.9)
    start = copy.deepcopy(model.state_dict())
    expected = {k: v.clone() for k, v in start.items()}
    for step in range(30):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        model.train()(torch.randn(4, 3))  # moves BatchNorm's running statistics and batch count
        decay = min(0.9, (1 + step) / (10 + step))
        assert ema.current_decay() == pytest.approx(decay)
        ema.update(model)
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                expected[key] = decay * expected[key] + (1 - decay) * value
            else:
                expected[key] = value.clone()
    for key, value in ema.module.state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6), key
    assert ema.module.state_dict()["1.num_batches_tracked"].item() == 30
    assert not any(p.requires_grad for p in ema.module.parameters())
    # The model itself is untouched by the average.
    assert not torch.equal(model.state_dict()["0.weight"], ema.module.state_dict()["0.weight"])


def test_ema_state_round_trips_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.99)
    for _ in range(5):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
    state = ema.state_dict()
    restored = ModelEma(nn.Linear(3, 2), decay=0.99)
    restored.load_state_dict(state)
    assert restored.updates == 5
    for key, value in ema.module.state_dict().items():
        assert torch.equal(value, restored.module.state_dict()[key])
    with pytest.raises(ValueError, match="decay"):
        ModelEma(model, decay=1.0)


def test_flip_logits_is_the_mean_over_the_four_flips() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", "linear").eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        views = [model(torch.flip(images, dims)) for dims in FLIP_DIMS]
        expected = torch.stack(views).mean(0)
        # Three flips in one batch of 9 there, batches of 3 here: equal within float32 rounding of a pass.
        slack = logits_slack(model, torch.stack(views))
        assert_within(flip_logits(model, images), expected, slack, "flips batched")
        assert_within(flip_logits(model, images, model(images)), expected, slack, "plain pass given")
        assert not torch.allclose(expected, views[0], atol=10 * slack)  # the flips do change the logits


def test_predictor_with_tta_averages_flips_but_keeps_heatmap_and_ood_on_the_plain_pass() -> None:
    checkpoint = tiny_checkpoint_dict()
    plain = Predictor(checkpoint)
    flipped = Predictor({**checkpoint, "tta": True})
    path = lesion_paths()[0]
    a, b = plain.predict(path), flipped.predict(path)
    batch = eval_transform(flipped.image_size, flipped.mean, flipped.std)(load_image(path, plain.resize_size))
    with torch.no_grad():
        logits = torch.stack([flipped.model(torch.flip(batch[None], dims))[0] for dims in FLIP_DIMS]).mean(0)
    expected = torch.softmax(logits / flipped.temperature, 0)[flipped.malignant_index].item()
    # The predictor batches the three flips; here each is its own batch: float32 rounding of a pass.
    slack = probability_slack(flipped.model, logits, flipped.temperature)
    assert b.p_malignant == pytest.approx(expected, abs=slack)
    assert b.p_malignant != pytest.approx(a.p_malignant, abs=10 * slack)  # the flips do count
    assert b.ood_scores == pytest.approx(a.ood_scores, rel=1e-5)
    if a.target == b.target:
        assert np.allclose(a.heatmap, b.heatmap, atol=1e-5)


def test_tta_must_be_a_bool_in_a_checkpoint() -> None:
    checkpoint = tiny_checkpoint_dict(with_ood=False)
    assert check_checkpoint({**checkpoint, "tta": True})
    with pytest.raises(InvalidCheckpoint, match="tta"):
        check_checkpoint({**checkpoint, "tta": "yes"})


def test_forward_parts_and_model_agree() -> None:
    """flip_logits calls the model directly; the predictor's plain pass uses forward_parts."""
    torch.manual_seed(0)
    model = build_model("resnet18", "linear").eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(forward_parts(model, images)[2], model(images), atol=1e-6)
