"""Transform factories shared by training, evaluation and the app.

Every image goes through :func:`lesion.images.load_image` first, which decodes it and resizes
its shorter side to :func:`resize_size` (the decoded-image cache stores exactly that result).
The evaluation preset then centre-crops and normalises; training presets augment instead.
Because the app and ``train.evaluate`` call the same two functions, they see the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
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
    # label-preserving.
    return [
        v2.RandomRotation(180),
        v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
    ]


def _notebook(image_size: int) -> list[Callable]:
    # The original notebook's augmentation: flips and a small rotation (its colour jitter is below).
    return [v2.CenterCrop(image_size), v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), v2.RandomRotation(20)]


def _no_augment(image_size: int) -> list[Callable]:
    return [v2.CenterCrop(image_size)]


GEOMETRY: dict[str, Callable[[int], list[Callable]]] = {
    "dermoscopy": _dermoscopy,
    "notebook": _notebook,
    "none": _no_augment,
}

# Colour jitter stands in for the spread of dermatoscopes and lighting:
# (brightness, contrast, saturation, hue) as in torchvision's ColorJitter.
COLOUR: dict[str, tuple[float, float, float, float]] = {
    "dermoscopy": (0.2, 0.2, 0.2, 0.02),
    "notebook": (0.1, 0.1, 0.1, 0.0),
    "none": (0.0, 0.0, 0.0, 0.0),
}


def train_geometry(image_size: int, augment: str = "dermoscopy") -> v2.Compose:
    """The per-image part of training augmentation, run in loader workers: uint8 tensor out.

    Colour jitter and normalisation run afterwards on whole batches on the training device
    (:class:`BatchColourAugment`): per-pixel colour work in the workers (hue jitter above all) was
    what kept the data pipeline from feeding a GPU, and uint8 moves 4x fewer bytes.
    """
    return v2.Compose([*GEOMETRY[augment](image_size), v2.ToImage()])


class BatchColourAugment(nn.Module):
    """Per-image random brightness, contrast, saturation and hue on a uint8 batch, then normalise.

    Same ranges as torchvision's ColorJitter, but one vectorised pass per batch on the device.
    """

    def __init__(
        self, augment: str = "dermoscopy", mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        super().__init__()
        self.brightness, self.contrast, self.saturation, self.hue = COLOUR[augment]
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("gray", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1), persistent=False)

    def _factor(self, amount: float, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, 1, 1, 1, device=like.device).uniform_(1 - amount, 1 + amount)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        n = x.shape[0]
        if self.training and self.brightness:
            x = (x * self._factor(self.brightness, n, x)).clamp_(0, 1)
        if self.training and self.contrast:
            mean = (x * self.gray).sum(1, keepdim=True).mean((2, 3), keepdim=True)
            x = (mean + (x - mean) * self._factor(self.contrast, n, x)).clamp_(0, 1)
        if self.training and self.saturation:
            gray = (x * self.gray).sum(1, keepdim=True)
            x = (gray + (x - gray) * self._factor(self.saturation, n, x)).clamp_(0, 1)
        if self.training and self.hue:
            x = _rotate_hue(x, torch.empty(n, device=x.device).uniform_(-self.hue, self.hue) * 2 * math.pi)
        return (x - self.mean) / self.std


# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane, a 3x3 matrix per image.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(len(angle), 3, 3, device=x.device)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
    matrix = _YIQ_TO_RGB.to(x.device) @ rotation @ _RGB_TO_YIQ.to(x.device)  # (n, 3, 3)
    return torch.einsum("nij,njhw->nihw", matrix, x).clamp_(0, 1)


def train_transform(
    image_size: int,
    augment: str = "dermoscopy",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable:
    """The whole training augmentation for one image (geometry, colour, normalise), on the CPU.

    Training itself splits this into :func:`train_geometry` (workers) and
    :class:`BatchColourAugment` (device); this single-image form is for inspection and tests.
    """
    geometry, colour = train_geometry(image_size, augment), BatchColourAugment(augment, mean, std)

    def transform(image):
        return colour(geometry(image).unsqueeze(0))[0]

    return transform
