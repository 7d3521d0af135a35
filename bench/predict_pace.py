"""Latency and throughput of the predictor against a bare forward pass, measured in one run.

    python -m bench.predict_pace [--arch resnet50] [--reps 20] [--device cpu] [--batch 16] [--chunks 4]

Prints median latencies (after warmup) of
  1. a bare forward (batch 1, weights none, eval, no_grad) — the baseline;
  2. Predictor.predict of a 600 x 450 JPEG: decode, preprocess, forward, Grad-CAM, every OOD score;
  3. pytorch-grad-cam's plain call (explain.reference_cam) on the same preprocessed input;
and batch throughput (images/s) of predict_batch without heatmaps, from decoded images and
from files (``--chunks`` batches per call, so reading ahead can overlap scoring), against a bare
batched forward. Goals: (2) <= 1.3x (1) (<= 1.5x on a GPU); (3) ~4x; batch >= 0.8x.
The device is named in the first line (GPU model, or the CPU's cores and torch threads).
The checkpoint is built in memory (random weights; OOD fitted on random features of the
full bank size and on random layer statistics of the stages' widths, with the default detector
chosen as training chooses it, so scoring costs what it costs with a real model).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from bench.common import REPO, build_checkpoint
from lesion.explain import reference_cam
from lesion.images import load_image
from lesion.predict import Predictor
from lesion.transforms import eval_transform


def median_seconds(runs: dict[str, Callable[[], object]], reps: int, warmup: int, device: torch.device) -> dict:
    """Median wall time of each callable, run round-robin so load drifts hit them all alike.

    CUDA is synchronised after each call so its queue is counted.
    """

    def timed(run: Callable[[], object]) -> float:
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    for _ in range(warmup):
        for run in runs.values():
            timed(run)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            samples[name].append(timed(run))
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--chunks", type=int, default=4, help="batches per predict_batch call")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    predictor = Predictor(build_checkpoint(args.arch, args.image_size), device=args.device)
    model = predictor.model
    workdir = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    jpeg = workdir / "lesion_600x450.jpg"
    sample = sorted((REPO / "assets" / "samples" / "lesions").glob("*.jpg"))[0]
    with Image.open(sample) as image:
        image.convert("RGB").resize((600, 450), Image.Resampling.BICUBIC).save(jpeg, quality=92)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        named = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        named = f"cpu ({os.cpu_count()} cores visible)"
    print(
        f"{args.arch}, {args.image_size} px, device {named}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.reps} reps after {args.warmup} warmup (medians)"
    )

    x1 = torch.randn(1, 3, args.image_size, args.image_size, device=device)
    x_pre = eval_transform(predictor.image_size, predictor.mean, predictor.std)(
        load_image(jpeg, predictor.resize_size)
    )[None].to(device)

    def bare_forward() -> None:
        with torch.no_grad():
            model(x1)

    single = median_seconds(
        {
            "bare": bare_forward,
            "full": lambda: predictor.predict(jpeg),
            "plain": lambda: reference_cam(model, x_pre, "gradcam"),
        },
        args.reps,
        args.warmup,
        device,
    )
    bare, full, plain = single["bare"], single["full"], single["plain"]
    parts = predictor.predict(jpeg).timings
    print(f"bare forward (batch 1)              {bare * 1e3:8.1f} ms   1.00x")
    print(f"Predictor.predict (600x450 JPEG)    {full * 1e3:8.1f} ms   {full / bare:.2f}x   (goal <= 1.3x)")
    print("    one call's parts: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in parts.items()))
    print(
        f"pytorch-grad-cam plain call         {plain * 1e3:8.1f} ms   {plain / bare:.2f}x   (CAM only, no decode/OOD)"
    )

    n, total = args.batch, args.batch * args.chunks
    xb = torch.randn(n, 3, args.image_size, args.image_size, device=device)
    decoded = [load_image(jpeg) for _ in range(total)]  # full-size RGB images, as an app holds them
    files = [jpeg] * total

    def bare_batch_forward() -> None:
        with torch.no_grad():
            model(xb)

    batch = median_seconds(
        {
            "bare": bare_batch_forward,
            "decoded": lambda: predictor.predict_batch(decoded, batch_size=n),
            "files": lambda: predictor.predict_batch(files, batch_size=n),
        },
        max(3, args.reps // 4),
        1,
        device,
    )
    bare_rate = n / batch["bare"]
    print(f"bare batched forward (batch {n})     {bare_rate:8.1f} img/s   1.00x")
    for key, label in (("decoded", "decoded images"), ("files", "from JPEG files")):
        rate = total / batch[key]
        print(f"predict_batch, {label:<20} {rate:8.1f} img/s   {rate / bare_rate:.2f}x   (goal >= 0.8x)")
    jpeg.unlink()
    workdir.rmdir()


if __name__ == "__main__":
    main()
