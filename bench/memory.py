"""Resident memory over many predictions with heatmaps: a leak (hooks left by a CAM, gradients piling up
on the weights, caches that never shrink) shows as steady growth.

    python -m bench.memory [--checkpoint runs/x/model.pt] [--n 500] [--warmup 30] [--json]

Warms up first (allocator pools, lazy imports), then predicts ``--n`` times over a mix of bundled
lesions and non-lesion photos (cycling the CAM methods), sampling RSS (psutil) after gc. Prints RSS
before and after, the growth, the slope of a line fitted to the second half of the samples, and
whether any module of the model was left with a hook or a parameter with a gradient. Without
``--checkpoint`` it uses the newest runs/*/model.pt, or trains the tiny model in a temporary folder.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.common import REPO, ensure_checkpoint
from lesion.predict import Predictor

CAMS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam")


def mixed_images() -> list[bytes]:
    """Bundled lesions and non-lesion photos, as the bytes an upload brings."""
    lesions = sorted((REPO / "assets" / "samples" / "lesions").glob("*.jpg"))[:8]
    photos = sorted((REPO / "assets" / "samples" / "ood").glob("*.jpg"))[:4]
    return [path.read_bytes() for path in [*lesions, *photos]]


def _is_layer_tap(hook: Any) -> bool:
    """The Predictor's own layer1..layer4 taps (lesion.model.LayerStatistics) live as long as it does: not a leak."""
    return getattr(hook, "__qualname__", "").startswith("LayerStatistics.")


def leftovers(model: Any) -> list[str]:
    """Hooks still registered on any module (besides the Predictor's own layer taps), and parameters
    holding a gradient (both mean a leak)."""
    import torch

    found = []
    for name, module in model.named_modules():
        for attribute in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
        ):
            hooks = [hook for hook in (getattr(module, attribute, None) or {}).values() if not _is_layer_tap(hook)]
            if hooks:
                found.append(f"{name or 'model'}.{attribute}: {len(hooks)}")
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            found.append(f"{name}.grad is set")
    from torch.nn.modules import module as module_globals

    for attribute in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        if getattr(module_globals, attribute, None):
            found.append(f"torch global {attribute}")
    if torch.is_grad_enabled() is False:
        found.append("grad mode left disabled")
    return found


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def measure(checkpoint: str | Path, n: int = 500, warmup: int = 30, samples: int = 20) -> dict[str, Any]:
    """Predict ``n`` times with heatmaps after ``warmup``; RSS figures in MB and leftovers."""
    predictor = Predictor.from_checkpoint(checkpoint)
    images = mixed_images()
    for i in range(warmup):
        predictor.predict(images[i % len(images)], cam_method=CAMS[i % len(CAMS)])
    start = rss_mb()
    points: list[tuple[int, float]] = [(0, start)]
    every = max(1, n // samples)
    started = time.perf_counter()
    for i in range(1, n + 1):
        prediction = predictor.predict(images[i % len(images)], cam_method=CAMS[i % len(CAMS)])
        assert prediction.heatmap is not None
        if i % every == 0 or i == n:
            points.append((i, rss_mb()))
    elapsed = time.perf_counter() - started
    end = points[-1][1]
    half = points[len(points) // 2 :]
    slope = float(np.polyfit([p[0] for p in half], [p[1] for p in half], 1)[0]) if len(half) > 1 else 0.0
    return {
        "predictions": n,
        "warmup": warmup,
        "rss_start_mb": round(start, 1),
        "rss_end_mb": round(end, 1),
        "rss_peak_mb": round(max(p[1] for p in points), 1),
        "growth_mb": round(end - start, 2),
        "slope_mb_per_100": round(slope * 100, 3),
        "seconds": round(elapsed, 1),
        "ms_per_prediction": round(elapsed / n * 1000, 1),
        "leftovers": leftovers(predictor.model),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="model.pt (default: newest runs/*/model.pt, or train one)")
    parser.add_argument("--n", type=int, default=500, help="predictions measured")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--limit-mb", type=float, default=50.0, help="growth above this is reported as a leak")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    checkpoint = ensure_checkpoint(args.checkpoint)
    result = measure(checkpoint, args.n, args.warmup)
    result["checkpoint"] = str(checkpoint)
    result["ok"] = result["growth_mb"] < args.limit_mb and not result["leftovers"]
    if args.json:
        print(json.dumps(result))
    else:
        print(f"checkpoint: {checkpoint}")
        print(
            f"{result['predictions']} predictions with heatmaps (after {result['warmup']} warm-up), "
            f"{result['seconds']} s, {result['ms_per_prediction']} ms each"
        )
        print(
            f"RSS {result['rss_start_mb']} MB -> {result['rss_end_mb']} MB (peak {result['rss_peak_mb']} MB): "
            f"growth {result['growth_mb']:+.1f} MB (limit {args.limit_mb:.0f} MB); "
            f"slope over the second half {result['slope_mb_per_100']:+.2f} MB / 100 predictions"
        )
        print("hooks / gradients left on the model:", ", ".join(result["leftovers"]) or "none")
        print("OK" if result["ok"] else "LEAK")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
