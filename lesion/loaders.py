"""Data loaders over one split, and one pass of a model over a loader: shared by training and finalize.

Training loaders are sampled (balanced or shuffled) and sharded across torchrun ranks and ship
uint8 squares (augmentation runs batched on the device); evaluation loaders give centre crops in a
fixed order. :func:`collect_outputs` returns the logits and pooled features of every image.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from lesion import data as lesion_data
from lesion.config import TrainConfig
from lesion.distributed import DistInfo
from lesion.model import LayerStatistics, forward_parts, unwrap
from lesion.regularize import flip_logits
from lesion.targets import BINARY, Target
from lesion.transforms import collate_squares, eval_transform, resize_size, train_worker_transform


class DistributedWeightedSampler(Sampler[int]):
    """Balanced sampling with replacement, seeded per epoch and sharded across ranks."""

    def __init__(self, weights: np.ndarray, num_samples: int, info: DistInfo, seed: int) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.per_rank = math.ceil(num_samples / info.world_size)
        self.info = info
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        total = self.per_rank * self.info.world_size
        indices = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        return iter(indices[self.info.rank :: self.info.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank


class ShardSampler(Sampler[int]):
    """A seeded permutation (or the identity) cut into contiguous-by-stride shards, one per rank."""

    def __init__(self, size: int, info: DistInfo, seed: int, shuffle: bool) -> None:
        self.size, self.info, self.seed, self.shuffle, self.epoch = size, info, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(
                self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            )
        else:
            order = torch.arange(self.size)
        return iter(order[self.info.rank :: self.info.world_size].tolist())

    def __len__(self) -> int:
        return len(range(self.info.rank, self.size, self.info.world_size))


class SeededSampler(Sampler[tuple[int, int]]):
    """Another sampler's indices, each paired with its own seed: (index, seed).

    The seed depends on the run's seed, the epoch, the rank and the position in the epoch only,
    so a sample's augmentation is the same whichever loader worker draws it, with any number of
    workers, persistent or not, and after a resume.
    """

    def __init__(self, base: Sampler[int], seed: int, rank: int) -> None:
        self.base, self.seed, self.rank, self.epoch = base, seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.base.set_epoch(epoch)

    def __iter__(self):
        start = ((self.seed * 1_000_003 + self.epoch) * 7_919 + self.rank) * 2**24
        return ((index, (start + position) % 2**63) for position, index in enumerate(self.base))

    def __len__(self) -> int:
        return len(self.base)


def make_loader(
    config: TrainConfig,
    frame: pd.DataFrame,
    cache: lesion_data.ImageCache,
    info: DistInfo,
    train: bool,
    device: torch.device,
    target: Target = BINARY,
    persistent: bool = False,
) -> DataLoader:
    """A loader over ``frame``: augmented and sampled for training, plain centre crops otherwise.

    Its labels are ``target``'s: the dx output of each image for a dx head, 0 / 1 for a binary one.
    ``persistent`` keeps the worker processes between epochs (the training loop iterates the same
    two loaders every epoch; starting a dozen workers twice an epoch costs seconds on a fast GPU).
    """
    # Training loaders ship uint8 squares; augmentation and normalisation run batched on the device.
    transform = train_worker_transform(config.image_size) if train else eval_transform(config.image_size)
    labels = target.indices(frame["dx"].tolist(), frame["label"].tolist())
    dataset = lesion_data.LesionDataset(
        frame["path"].tolist(), labels.tolist(), transform, cache, resize_size(config.image_size)
    )
    if train and config.balance == "sampler":
        # Balanced over the head's outputs: each diagnosis (or each side) is drawn equally often.
        counts = np.bincount(labels, minlength=target.num_outputs).astype(float)
        weights = 1.0 / counts[labels]
        sampler: Sampler[int] = DistributedWeightedSampler(weights, len(frame), info, config.seed)
    else:
        sampler = ShardSampler(len(frame), info, config.seed, shuffle=train)
    if train:
        sampler = SeededSampler(sampler, config.seed, info.rank)
    workers = config.num_workers
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=collate_squares if train else None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
        persistent_workers=persistent and workers > 0,
        # Four batches ahead per worker: the step never waits on one slow read.
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(config.seed),
    )


def _seed_worker(worker_id: int) -> None:
    # Each worker's torch seed comes from the loader's generator; numpy and random follow it,
    # so augmentation is reproducible for a given seed and epoch (and therefore after resume).
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def autocast_for(device: torch.device, enabled: bool) -> torch.autocast:
    """bfloat16 autocast on CUDA when asked (no GradScaler needed); a disabled context elsewhere."""
    use = enabled and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use)


@torch.no_grad()
def collect_outputs(
    model: nn.Module, loader: DataLoader, device: torch.device, config: TrainConfig, *, features: bool = False
) -> dict[str, torch.Tensor]:
    """Logits (and pooled features) of every image in the loader's order, on the CPU.

    With ``features`` the result also holds, under ``layer1`` .. ``layer4``, the pooled channel
    statistics of each stage from the same pass (:class:`lesion.model.LayerStatistics`).
    With ``config.tta`` the logits are averaged over flips; ``plain_logits`` (and the features)
    always come from the un-flipped pass, which is what the OOD detectors see in the predictor.
    Outputs stay on the device until the loop ends: one copy back instead of a wait per batch.
    """
    model = unwrap(model).eval()
    outputs: dict[str, list[torch.Tensor]] = {"logits": [], "labels": [], "features": [], "plain_logits": []}
    memory_format = torch.channels_last if config.channels_last and device.type == "cuda" else torch.contiguous_format
    tap = LayerStatistics(model) if features else None  # hooks only when the stages are wanted
    try:
        for images, labels in loader:
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            with autocast_for(device, config.amp):
                with tap.capture() if tap else nullcontext({}) as layers:
                    _, pooled, logits = forward_parts(model, images)
                outputs["plain_logits"].append(logits.float())
                if config.tta:
                    # after the capture: the flipped passes must not overwrite the stages' statistics
                    logits = flip_logits(model, images, logits)
            outputs["logits"].append(logits.float())
            outputs["labels"].append(labels)
            if features:
                outputs["features"].append(pooled.float())
                for name, values in layers.items():
                    outputs.setdefault(name, []).append(values.float())
    finally:
        if tap is not None:
            tap.close()
    return {k: torch.cat(v).cpu() if v else torch.empty(0) for k, v in outputs.items()}
