"""The training loader at the step's pace: persistent workers and per-sample seeds keep runs reproducible."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lesion.config import TrainConfig
from lesion.data import ImageCache, read_metadata
from lesion.distributed import DistInfo
from lesion.loaders import make_loader
from lesion.transforms import resize_size
from tests.conftest import DEMO


def _epochs(config: TrainConfig, frame, cache: ImageCache, persistent: bool, epochs=(1, 2)) -> list[torch.Tensor]:
    loader = make_loader(
        config, frame, cache, DistInfo(), train=True, device=torch.device("cpu"), persistent=persistent
    )
    batches = []
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        batches.extend(images.contiguous() for images, _ in loader)
    return batches


def test_augmentation_does_not_depend_on_workers_or_their_lifetime(tmp_path: Path) -> None:
    frame, _ = read_metadata(DEMO)
    frame = frame.head(24).reset_index(drop=True)
    config = TrainConfig(image_size=64, batch_size=8, num_workers=0, balance="none", seed=3)
    cache = ImageCache(tmp_path / "cache", resize_size(64))
    alone = _epochs(config, frame, cache, persistent=False)
    with_workers = _epochs(dataclasses.replace(config, num_workers=2), frame, cache, persistent=True)
    assert len(alone) == len(with_workers) == 6
    for one, other in zip(alone, with_workers, strict=True):
        assert one.dtype == torch.uint8 and one.shape == (8, 3, resize_size(64), resize_size(64))
        assert torch.equal(one, other)
    # A resumed run starts at epoch 2 with fresh workers: it must see what epoch 2 saw above.
    resumed = _epochs(dataclasses.replace(config, num_workers=2), frame, cache, persistent=True, epochs=(2,))
    assert all(torch.equal(a, b) for a, b in zip(alone[3:], resumed, strict=True))
    assert not torch.equal(alone[0], alone[3])  # epochs differ: the seed does follow the epoch


def test_training_batches_are_channels_last_views_of_plain_copies(tmp_path: Path) -> None:
    frame, _ = read_metadata(DEMO)
    config = TrainConfig(image_size=64, batch_size=4, num_workers=0, balance="none")
    loader = make_loader(
        config, frame.head(4), ImageCache(tmp_path, resize_size(64)), DistInfo(), True, torch.device("cpu")
    )
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, resize_size(64), resize_size(64)) and labels.shape == (4,)
    assert images.is_contiguous(memory_format=torch.channels_last)
