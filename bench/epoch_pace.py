"""Do epochs run at the step's pace? A real training run's epoch wall time against what its steps imply.

    python -m bench.epoch_pace                                   # tiny CPU check: resnet18, 64 px, 600 images
    python -m bench.epoch_pace --images 10000 --arch resnet50 --image-size 224 --batch-size 128 \\
        --num-workers 14 --device cuda

Builds a HAM10000-layout folder of ``--images`` images (bench/ham_folder.py: the bundled images
under new ids, as links) and a decoded-image cache in a temporary folder, then measures, in one run:

* the bare training step (batched augmentation + forward + backward + AdamW on uint8 batches
  already on the device, as bench/train_throughput.py times it) and a bare validation forward;
* ``lesion.training.run_training`` on that folder (weights none, ``--epochs`` epochs, the real
  loop with its loaders, validation, events and checkpoints), reading its events.

For every epoch after the first (the first also starts the workers and warms cuDNN) it prints the
epoch's own ``seconds`` (training + validation), the wall time from one epoch event to the next
(checkpoints included), and the time the steps imply: training images / bare step rate +
validation images / bare forward rate. Goal: epoch seconds <= 1.25x implied.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.ham_folder import build_ham_folder
from bench.train_throughput import train_step_rate
from lesion.config import TrainConfig
from lesion.model import build_model, forward_parts
from lesion.training import run_training


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600, help="size of the generated HAM10000-layout set")
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"


def eval_forward_rate(arch: str, image_size: int, batch_size: int, batches: int, device: torch.device) -> float:
    """Images/s of the validation forward (no_grad, bf16 autocast and channels_last on CUDA)."""
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = build_model(arch, "linear").to(device, memory_format=memory_format).eval()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=memory_format)

    def forward() -> None:
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            forward_parts(model, x)

    for _ in range(3 if cuda else 1):
        forward()
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        forward()
    if cuda:
        torch.cuda.synchronize(device)
    return batches * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(
        f"epoch pace: device {device_name(device)}, {args.arch} at {args.image_size} px, batch {args.batch_size}, "
        f"{args.num_workers} loader workers, {args.images} images, {args.epochs} epochs, torch {torch.__version__}"
    )
    step_batches = 20 if device.type == "cuda" else 3
    step_rate = train_step_rate(args.arch, args.image_size, args.batch_size, step_batches, device)
    forward_rate = eval_forward_rate(args.arch, args.image_size, args.batch_size, step_batches, device)

    events: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lesion-epoch-pace-") as root:
        data = build_ham_folder(Path(root) / "ham", args.images)
        config = TrainConfig(
            data=str(data),
            out=str(Path(root) / "run"),
            arch=args.arch,
            weights="none",
            image_size=args.image_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            cache_dir=str(Path(root) / "cache"),
            device=str(device),
            patience=0,
        )
        started = time.perf_counter()
        run_training(config, on_event=events.append)
        total = time.perf_counter() - started

    start = next(e for e in events if e["event"] == "start")
    sizes = start["sizes"]
    n_train, n_val = sum(sizes["train"].values()), sum(sizes["val"].values())
    epochs = [e for e in events if e["event"] == "epoch"]
    implied = n_train / step_rate + n_val / forward_rate
    steps = [e["images_per_s"] for e in events if e["event"] == "step" and e["epoch"] > 1]
    print(f"set: {n_train} training and {n_val} validation images an epoch; whole run {total:.1f} s")
    print(f"bare training step               {step_rate:9.1f} img/s")
    print(f"bare validation forward          {forward_rate:9.1f} img/s")
    if steps:
        print(f"the loop's logged step rate      {statistics.median(steps):9.1f} img/s (median, epochs 2+)")
    print(f"implied epoch (train + val)      {implied:9.2f} s")
    print(f"{'epoch':>5}{'seconds':>10}{'x implied':>11}{'wall to next':>14}{'x implied':>11}")
    for i, epoch in enumerate(epochs):
        wall = epochs[i + 1]["time"] - epoch["time"] if i + 1 < len(epochs) else float("nan")
        print(
            f"{epoch['epoch']:>5}{epoch['seconds']:>10.2f}{epoch['seconds'] / implied:>11.2f}"
            f"{wall:>14.2f}{wall / implied:>11.2f}"
        )
    warm = [e["seconds"] for e in epochs[1:]] or [epochs[0]["seconds"]]
    ratio = statistics.median(warm) / implied
    print(f"epoch seconds / implied (median of epochs 2+): {ratio:.2f}x (goal <= 1.25x)")


if __name__ == "__main__":
    main()
