"""Transform factories shared by training, evaluation and the app.

Every image goes through :func:`lesion.images.load_image` first, which decodes it and resizes
its shorter side to :func:`resize_size` (the decoded-image cache stores exactly that result).
The evaluation preset then centre-crops and normalises; training presets augment instead.
Because the app and ``train.evaluate`` call the same two functions, they see the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import default_collate
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


def crop_origin(width: int, height: int, crop: int) -> tuple[int, int]:
    """(left, top) of a centre ``crop`` square, rounded as torchvision's CenterCrop rounds."""
    return int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))


def centre_crop_uint8(image: Image.Image | np.ndarray, crop: int) -> torch.Tensor:
    """The centre ``crop`` square of an RGB image (already resized by ``load_image``) as C x H x W uint8.

    Cropping the uint8 pixels before any float conversion is what lets the predictor normalise
    whole batches at once (:func:`normalise_batch`), on the device, with the same numbers.
    """
    array = np.asarray(image)
    height, width = array.shape[:2]
    if min(height, width) < crop:
        raise ValueError(f"image of {width}x{height} is smaller than the {crop} px crop")
    left, top = crop_origin(width, height, crop)
    window = array[top : top + crop, left : left + crop]
    # A plain copy viewed as C x H x W (a transposing copy costs far more; see RandomSquare).
    return torch.from_numpy(np.array(window, copy=True)).permute(2, 0, 1)


def normalise_batch(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 N x 3 x H x W to normalised float32, with :func:`eval_transform`'s very operations.

    (ToDtype multiplies by 1/255, Normalize subtracts the mean and divides by the std; doing the
    same in the same order gives the same floats, on whole batches and on any device.)
    """
    x = images.to(torch.float32).mul_(1.0 / 255)
    mean_t = torch.as_tensor(list(mean), dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(list(std), dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def _draft_step(width: int, height: int, scale: float) -> int:
    """The 1/step scale Pillow's JPEG draft mode picks for ``load_image`` (1 when it decodes in full)."""
    wanted = (max(1, int(width * scale)) + 1, max(1, int(height * scale)) + 1)
    ratio = min(width // wanted[0], height // wanted[1])
    # ratio is 0 when the image is enlarged (a 180 px photo for a 256 px model): no draft mode.
    return next((step for step in (8, 4, 2) if ratio >= step), 1)


def resize_short_side_tensor(image: torch.Tensor, short_side: int) -> torch.Tensor:
    """What ``load_image(jpeg, short_side)`` makes of a JPEG, for its fully decoded C x H x W uint8 tensor.

    Same output size and the same path: draft mode's 1/2, 1/4 or 1/8 scale (as block averages),
    then bilinear with antialiasing, which torch implements after Pillow's, rounded to uint8.
    Pixels differ from Pillow's by a fraction of a level on average (libjpeg's DCT scaling is not
    exactly a block average, and a GPU decoder's IDCT is not libjpeg's); the geometry is the same.
    """
    _, height, width = image.shape
    scale = short_side / min(width, height)
    size = (max(short_side, round(height * scale)), max(short_side, round(width * scale)))
    if size == (height, width):
        return image
    x = image[None].float()
    step = _draft_step(width, height, scale)
    if step > 1:
        # Pillow decodes such JPEGs in draft mode, at 1/step scale (DCT scaling, close to a box
        # filter); averaging step x step blocks first follows the same path to the same pixels.
        x = torch.nn.functional.avg_pool2d(x, step, step, ceil_mode=True)
    resized = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)


# Training augmentation runs in two parts. Loader workers only cut a random square of the cached
# image (already resized to resize_size) and ship it as uint8: a slice and a copy, so a few workers
# feed a GPU. Everything per-pixel -- rotation, random resized crop, flips, colour jitter and
# normalisation -- runs batched on the training device in BatchAugment: one affine grid_sample and
# a few blends per batch. (Doing it per image in workers with torchvision's ColorJitter, hue above
# all, delivered a third of what an H200 consumes; see bench/train_throughput.py.)


@dataclass(frozen=True)
class AugmentSpec:
    """Ranges of one augmentation preset."""

    rotation: float  # degrees, uniform in [-rotation, rotation]
    scale: tuple[float, float]  # share of the source square's area kept by the random crop
    ratio: tuple[float, float]  # aspect ratio range of the crop
    flips: bool  # random horizontal and vertical flips
    colour: tuple[float, float, float, float]  # brightness, contrast, saturation, hue (as ColorJitter)


AUGMENTATIONS: dict[str, AugmentSpec] = {
    # Dermoscopic images have no canonical orientation: any rotation and both flips keep the label;
    # colour jitter stands in for the spread of dermatoscopes and lighting.
    "dermoscopy": AugmentSpec(180.0, (0.5, 1.0), (0.8, 1.25), True, (0.2, 0.2, 0.2, 0.02)),
    # Stronger still, for small sets trained from scratch: tighter crops, wider aspect and colour ranges.
    "strong": AugmentSpec(180.0, (0.25, 1.0), (0.75, 4 / 3), True, (0.3, 0.3, 0.3, 0.05)),
    # The original notebook's augmentation: centre crop, flips, a small rotation, mild colour jitter.
    "notebook": AugmentSpec(20.0, (1.0, 1.0), (1.0, 1.0), True, (0.1, 0.1, 0.1, 0.0)),
    "none": AugmentSpec(0.0, (1.0, 1.0), (1.0, 1.0), False, (0.0, 0.0, 0.0, 0.0)),
}


class RandomSquare:
    """A random ``side`` x ``side`` window of an image as a C x H x W uint8 tensor.

    Takes a PIL image or an H x W x 3 array (the cache hands arrays over directly: a slice and one
    copy, no PIL round trip). Positions come from ``generator`` when given (training passes one
    seeded per sample), else from torch's global generator.
    """

    accepts_array = True
    accepts_generator = True

    def __init__(self, side: int) -> None:
        self.side = side

    def __call__(self, image: Image.Image | np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        array = np.asarray(image)
        height, width = array.shape[:2]
        if min(height, width) < self.side:
            raise ValueError(f"image of {width}x{height} is smaller than the {self.side} px square")
        top = int(torch.randint(0, height - self.side + 1, (), generator=generator))
        left = int(torch.randint(0, width - self.side + 1, (), generator=generator))
        window = array[top : top + self.side, left : left + self.side]
        # Copy the window as it lies (H x W x C) and only *view* it as C x H x W: a transposing copy
        # costs about 100x a plain one and bounded what a loader worker could deliver.
        return torch.from_numpy(np.array(window, copy=True)).permute(2, 0, 1)


def collate_squares(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch of :class:`RandomSquare` outputs: N x C x H x W uint8 laid out channels_last.

    The squares are stacked in their own H x W x C layout (a plain copy, into shared memory in a
    loader worker) and handed on as an N x C x H x W view; BatchAugment reads either layout.
    """
    images = default_collate([image.permute(1, 2, 0) for image, _ in batch])
    labels = default_collate([label for _, label in batch])
    return images.permute(0, 3, 1, 2), labels


def train_worker_transform(image_size: int) -> RandomSquare:
    """The loader-worker part of training: a random square of the cached image, uint8 out."""
    return RandomSquare(resize_size(image_size))


class BatchAugment(nn.Module):
    """Per-image random geometry and colour on a uint8 batch of squares, then normalise.

    In eval mode it only centre-crops to ``image_size`` and normalises: pixel for pixel what
    :func:`eval_transform` gives (the crop is a grid_sample whose samples fall on pixel centres).
    """

    def __init__(
        self,
        augment: str = "dermoscopy",
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.spec = AUGMENTATIONS[augment]
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("gray", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1), persistent=False)

    def _uniform(self, low: float, high: float, n: int) -> torch.Tensor:
        # Drawn on the CPU from the global generator: the same numbers on any device, so a seeded
        # run is reproducible and resume matches an uninterrupted run.
        return torch.empty(n).uniform_(low, high)

    def _affine(self, n: int, source: int) -> torch.Tensor:
        """(n, 2, 3) maps from output to input normalised coordinates."""
        spec, base = self.spec, self.image_size / source
        if self.training:
            area = self._uniform(*spec.scale, n)
            log_ratio = self._uniform(math.log(spec.ratio[0]), math.log(spec.ratio[1]), n)
            ratio = torch.exp(log_ratio)
            scale_x = torch.sqrt(area * ratio).clamp(max=1.0)
            scale_y = torch.sqrt(area / ratio).clamp(max=1.0)
            angle = self._uniform(-spec.rotation, spec.rotation, n) * math.pi / 180
            shift_x = (torch.rand(n) * 2 - 1) * (1 - scale_x)
            shift_y = (torch.rand(n) * 2 - 1) * (1 - scale_y)
            flip_x = torch.where(torch.rand(n) < 0.5, -1.0, 1.0) if spec.flips else torch.ones(n)
            flip_y = torch.where(torch.rand(n) < 0.5, -1.0, 1.0) if spec.flips else torch.ones(n)
            scale_x, scale_y = scale_x * base, scale_y * base
        else:
            scale_x = scale_y = torch.full((n,), base)
            angle = shift_x = shift_y = torch.zeros(n)
            flip_x = flip_y = torch.ones(n)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = scale_x * cos * flip_x, -scale_x * sin * flip_y
        theta[:, 1, 0], theta[:, 1, 1] = scale_y * sin * flip_x, scale_y * cos * flip_y
        theta[:, 0, 2], theta[:, 1, 2] = shift_x, shift_y
        return theta

    def _factor(self, amount: float, n: int, device: torch.device) -> torch.Tensor:
        return self._uniform(1 - amount, 1 + amount, n).view(n, 1, 1, 1).to(device)

    def _colour(self, x: torch.Tensor) -> torch.Tensor:
        brightness, contrast, saturation, hue = self.spec.colour
        n = x.shape[0]
        if brightness:
            x = (x * self._factor(brightness, n, x.device)).clamp_(0, 1)
        if contrast:
            mean = (x * self.gray).sum(1, keepdim=True).mean((2, 3), keepdim=True)
            x = (mean + (x - mean) * self._factor(contrast, n, x.device)).clamp_(0, 1)
        if saturation:
            gray = (x * self.gray).sum(1, keepdim=True)
            x = (gray + (x - gray) * self._factor(saturation, n, x.device)).clamp_(0, 1)
        if hue:
            x = _rotate_hue(x, (self._uniform(-hue, hue, n) * 2 * math.pi).to(x.device))
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, _, height, width = images.shape
        if height != width:
            raise ValueError(f"BatchAugment expects square inputs, got {height}x{width}")
        x = images.float().div_(255.0)
        theta = self._affine(n, height).to(x.device)
        grid = torch.nn.functional.affine_grid(theta, [n, 3, self.image_size, self.image_size], align_corners=False)
        x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.training:
            x = self._colour(x)
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
    """The whole training augmentation for one image, on the CPU (for inspection and tests).

    Training itself runs :func:`train_worker_transform` in loader workers and
    :class:`BatchAugment` on whole batches on the training device.
    """
    worker, batch = train_worker_transform(image_size), BatchAugment(augment, image_size, mean, std).train()

    def transform(image):
        return batch(worker(image).unsqueeze(0))[0]

    return transform
