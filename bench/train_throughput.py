"""Can the data pipeline keep the training step fed? Images/s of each, side by side.

Measured in one run, at the same batch size:

* loading alone in one process: ``load_image`` (JPEG decode + resize) against a warm cache read;
* the data pipeline through a DataLoader with ``--workers`` processes and the training transform:
  without the cache (the baseline), on a cold cache (decode + write), and on a warm cache;
* the training step alone: batched augmentation (rotation, random resized crop, flips, colour
  jitter) and normalisation on the device, then forward + backward + AdamW, on uint8 batches
  already on the device (bfloat16 autocast and channels_last on CUDA), as lesion.training does.

Training splits augmentation: loader workers only cut a random square of the cached image and ship
it as uint8 (``train_worker_transform``); everything per-pixel runs batched on the device
(``BatchAugment``). ``--variants`` also times the older pipeline that did it all in the workers.

The cache lives in a temporary folder, so the cold pass really is cold. Usage::

    python -m bench.train_throughput                      # resnet18, 128 px, CPU: well under 2 minutes
    python -m bench.train_throughput --arch resnet50 --image-size 224 --batch-size 128 --device cuda --workers 12
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from lesion.data import ImageCache, LesionDataset, read_metadata
from lesion.images import load_image
from lesion.model import build_model
from lesion.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchAugment,
    collate_squares,
    resize_size,
    train_worker_transform,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10, help="batches per timed pass")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--data", default="assets/demo", help="dataset folder (HAM10000 or ISIC layout)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also time cheaper pipelines on the warm cache: uint8 output (normalise on the device) and no hue jitter",
    )
    return parser


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loading_rate(load: Callable[[str], object], paths: list[str]) -> float:
    """Images/s of ``load`` over ``paths`` in this process."""
    start = time.perf_counter()
    for path in paths:
        load(path)
    return len(paths) / (time.perf_counter() - start)


def pipeline_rates(dataset: LesionDataset, batch_size: int, workers: int, passes: int, pin: bool) -> list[float]:
    """Images/s of each full pass over ``dataset`` through one DataLoader (workers persist between passes)."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin,
        collate_fn=collate_squares,  # what training uses: squares stacked in their own layout
    )
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        count = sum(images.shape[0] for images, _ in loader)
        rates.append(count / (time.perf_counter() - start))
    return rates


def train_step_rate(arch: str, image_size: int, batch_size: int, batches: int, device: torch.device) -> float:
    """Images/s of colour augmentation + forward + backward + AdamW on pre-made uint8 batches."""
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = build_model(arch, "linear").to(device, memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    augment = BatchAugment("dermoscopy", image_size).to(device).train()
    side = resize_size(image_size)
    raw = torch.randint(0, 256, (batch_size, 3, side, side), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 2, (batch_size,), device=device)
    if cuda:
        torch.backends.cudnn.benchmark = True

    def step() -> None:
        images = augment(raw).contiguous(memory_format=memory_format)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3 if cuda else 1):  # warm-up: cuDNN autotuning, allocator, first-call overheads
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        step()
    _sync(device)
    return batches * batch_size / (time.perf_counter() - start)


def variant_transforms(image_size: int) -> dict[str, v2.Compose]:
    """The older pipeline that did everything in the workers, to show what moving colour work saved."""
    geometry = [
        v2.RandomRotation(180),
        v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
    ]
    normalise = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    jitter = v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)
    return {"old: all augmentation + normalise in workers, warm": v2.Compose([*geometry, jitter, *normalise])}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    frame, _ = read_metadata(args.data)
    wanted = args.batch_size * args.batches
    paths = (frame["path"].tolist() * (wanted // len(frame) + 1))[:wanted]
    unique = len(set(paths))
    short_side = resize_size(args.image_size)
    transform = train_worker_transform(args.image_size)
    labels = [0] * len(paths)
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{os.cpu_count()} CPU cores'}), "
        f"{args.arch} at {args.image_size} px, batch {args.batch_size}, {args.batches} batches "
        f"= {len(paths)} images ({unique} distinct, from {args.data}), {args.workers} loader workers, "
        f"images resized to short side {short_side}"
    )

    with tempfile.TemporaryDirectory(prefix="lesion-bench-cache-") as root:
        cache = ImageCache(root, short_side)
        sample = paths[: min(len(paths), 200)]
        decode_rate = loading_rate(lambda p: load_image(p, short_side), sample)
        cache.warm(sample, workers=1)
        cached_read_rate = loading_rate(cache.get, sample)
        cache = ImageCache(Path(root) / "pipeline", short_side)  # an empty cache again for the cold pass

        pin = device.type == "cuda"
        plain = LesionDataset(paths, labels, transform, None, short_side)
        # Two passes: the first also pays for starting the workers; the second is the steady state.
        no_cache = pipeline_rates(plain, args.batch_size, args.workers, passes=2, pin=pin)[1]
        cold, warm = pipeline_rates(
            LesionDataset(paths, labels, transform, cache, short_side), args.batch_size, args.workers, passes=2, pin=pin
        )
        variants = {}
        if args.variants:
            for name, other in variant_transforms(args.image_size).items():
                dataset = LesionDataset(paths, labels, other, cache, short_side)
                variants[name] = pipeline_rates(dataset, args.batch_size, args.workers, passes=2, pin=pin)[1]
    train = train_step_rate(args.arch, args.image_size, args.batch_size, args.batches, device)

    rows = [
        ("load only, 1 process: decode JPEG + resize", decode_rate),
        ("load only, 1 process: read warm cache", cached_read_rate),
        ("pipeline, NO cache (decode + random square)", no_cache),
        ("pipeline, cold cache (decode + write + square)", cold),
        ("pipeline, warm cache (read + random square)", warm),
        *variants.items(),
        ("training step (augment + fwd + bwd + AdamW)", train),
    ]
    print()
    print(f"{'stage':<56}{'images/s':>10}{'ms/batch':>10}{'x train step':>14}")
    for name, rate in rows:
        print(f"{name:<56}{rate:>10.1f}{1000 * args.batch_size / rate:>10.1f}{rate / train:>14.2f}")
    print()
    print(f"cache speed-up, loading alone:   {cached_read_rate / decode_rate:.2f}x (warm cache read / JPEG decode)")
    print(f"cache speed-up, whole pipeline:  {warm / no_cache:.2f}x (warm cache / no cache)")
    ratio = warm / train
    verdict = "keeps up" if ratio >= 3 else "may starve the GPU; add --workers" if ratio >= 1 else "is the bottleneck"
    print(f"cached pipeline / training step: {ratio:.2f}x (goal >= 3x): the pipeline {verdict}")


if __name__ == "__main__":
    main()
