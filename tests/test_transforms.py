"""Transforms: the app, evaluation and training's batched augmentation agree where they must."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from lesion.images import load_image
from lesion.transforms import (
    AUGMENTATIONS,
    BatchAugment,
    eval_transform,
    resize_size,
    train_transform,
    train_worker_transform,
)
from tests.conftest import SAMPLE_LESIONS

IMAGE = SAMPLE_LESIONS / "ISIC_0024581.jpg"


def test_batch_augment_in_eval_mode_is_exactly_the_evaluation_crop() -> None:
    image = load_image(IMAGE, resize_size(224))
    square = v2.CenterCrop(resize_size(224))(image)
    expected = eval_transform(224)(square)
    got = BatchAugment("dermoscopy", 224).eval()(v2.ToImage()(square).unsqueeze(0))[0]
    assert torch.allclose(got, expected, atol=1e-5)


def test_worker_part_ships_uint8_squares_of_the_cached_size() -> None:
    image = load_image(IMAGE, resize_size(96))
    out = train_worker_transform(96)(image)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, resize_size(96), resize_size(96))


def test_training_augmentation_is_random_but_seeded() -> None:
    image = load_image(IMAGE, resize_size(64))
    for name in AUGMENTATIONS:
        transform = train_transform(64, name)
        torch.manual_seed(3)
        first = transform(image)
        torch.manual_seed(3)
        again = transform(image)
        assert first.shape == (3, 64, 64) and torch.isfinite(first).all()
        assert torch.equal(first, again), name
    torch.manual_seed(4)
    assert not torch.equal(train_transform(64)(image), first)


def test_augmentation_keeps_pixel_values_in_the_normalised_range() -> None:
    batch = torch.randint(0, 256, (16, 3, 73, 73), dtype=torch.uint8)
    out = BatchAugment("dermoscopy", 64).train()(batch)
    low = (0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    high = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert out.shape == (16, 3, 64, 64)
    for channel in range(3):
        assert out[:, channel].min() >= low[channel] - 1e-5 and out[:, channel].max() <= high[channel] + 1e-5
