"""The torch Dataset of a split: (image tensor, label) pairs, pixels from the cache when there is one."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from lesion.data.cache import ImageCache
from lesion.images import load_image


class LesionDataset(torch.utils.data.Dataset):
    """(image tensor, label) pairs; pixels from the cache when given, else decoded each time."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        transform: Callable[[Image.Image], torch.Tensor],
        cache: ImageCache | None,
        short_side: int,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        if cache is not None and cache.short_side != short_side:
            raise ValueError(f"the cache holds images at short side {cache.short_side}, not {short_side}")
        self.paths = [str(p) for p in paths]
        self.labels = [int(v) for v in labels]
        self.transform = transform
        self.cache = cache
        self.short_side = short_side

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        """The untransformed (decoded and resized) image at ``index``."""
        path = self.paths[index]
        return self.cache.get(path) if self.cache is not None else load_image(path, self.short_side)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        # A training sampler hands (index, seed): the sample's randomness then comes from its own
        # seed, not from whichever loader worker draws it or how long that worker has lived, so
        # persistent workers and resumed runs see the same augmentation as a fresh run.
        index, seed = item if isinstance(item, tuple) else (item, None)
        transform = self.transform
        if seed is not None and getattr(transform, "accepts_generator", False):
            generator = torch.Generator().manual_seed(int(seed))

            def transform(image):
                return self.transform(image, generator=generator)

        if self.cache is not None and getattr(self.transform, "accepts_array", False):
            # Training's worker transform slices arrays directly: no PIL image is built.
            return transform(self.cache.get_array(self.paths[index])), self.labels[index]
        return transform(self.load(index)), self.labels[index]
