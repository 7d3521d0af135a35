"""Transform factories shared by training, evaluation and the app.

Every image goes through :func:`lesion.images.load_image` first, which decodes it and resizes
its shorter side to :func:`resize_size` (the decoded-image cache stores exactly that result).
The evaluation preset then centre-crops and normalises; training presets augment instead.
Because the app and ``train.evaluate`` call the same two functions, they see the same pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def resize_size(image_size: int) -> int:
    """Shorter side an image is resized to before cropping (256 for a 224 crop)."""
    return int(round(image_size * 256 / 224))


def _to_normalised(mean: Sequence[float], std: Sequence[float]) -> list[Callable]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def eval_transform(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """Centre crop and normalise an image already resized by ``load_image``."""
    return v2.Compose([v2.CenterCrop(image_size), *_to_normalised(mean, std)])


def _dermoscopy(image_size: int) -> list[Callable]:
    # Dermoscopic images have no canonical orientation, so both flips and any rotation are
    # label-preserving; colour jitter stands in for the spread of cameras and lighting.
    return [
        v2.RandomRotation(180),
        v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
    ]


def _notebook(image_size: int) -> list[Callable]:
    # The original notebook's augmentation: flips, a small rotation, mild colour jitter.
    return [
        v2.CenterCrop(image_size),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomRotation(20),
        v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1),
    ]


def _no_augment(image_size: int) -> list[Callable]:
    return [v2.CenterCrop(image_size)]


AUGMENTATIONS: dict[str, Callable[[int], list[Callable]]] = {
    "dermoscopy": _dermoscopy,
    "notebook": _notebook,
    "none": _no_augment,
}


def train_transform(
    image_size: int,
    augment: str = "dermoscopy",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Augment and normalise an image already resized by ``load_image``."""
    return v2.Compose([*AUGMENTATIONS[augment](image_size), *_to_normalised(mean, std)])
