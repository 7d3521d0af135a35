"""What the default OOD detector costs per prediction, stage by stage against packed, per architecture.

    python bench/ood_cost.py [--device cuda] [--reps 30] [--models resnet18@128,resnet50@128,resnet50@224]

For each architecture (random weights; detectors fitted as in bench/predict.py) it times, in the
same run, against a bare forward of one image:
  - before: the layer statistics in two passes (5 operations a stage) and the stage-by-stage
    Mahalanobis distances (lesion.ood._layer_mahalanobis_by_stage), as the code was until
    2026-11-27;
  - after: the statistics as the hooks now take them (one std_mean kernel a stage on a GPU) and
    the packed distances the detectors use (lesion.ood._layer_mahalanobis);
  - every fitted detector, as each prediction scores them all;
and checks that both give the same distances. At batch 1 on a GPU a pass is bound by how many
operations it launches, so this is where the difference shows; on a CPU both cost a few per cent.
Each time is the fastest of --reps runs after 5 warmups, synchronising the device around each.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from predict import build_checkpoint  # noqa: E402

from lesion import ood  # noqa: E402
from lesion.model import LAYER_NAMES, forward_parts, pooled_statistics, unwrap  # noqa: E402
from lesion.predict import Predictor  # noqa: E402


def fastest(run: Callable[[], object], reps: int, device: torch.device) -> float:
    """The fastest of ``reps`` timed runs after 5 warmups, waiting for the device around each."""
    best = float("inf")
    for index in range(reps + 5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= 5:
            best = min(best, time.perf_counter() - started)
    return best


def two_pass(activations: torch.Tensor) -> torch.Tensor:
    """The pooled statistics as every device computed them before: mean, then the mean square about it."""
    flat = activations.float().flatten(2)
    mean = flat.mean(dim=2)
    return torch.cat([mean, (flat - mean.unsqueeze(2)).square().mean(dim=2).sqrt()], dim=1)


def measure(arch: str, size: int, device: torch.device, reps: int) -> str:
    predictor = Predictor(build_checkpoint(arch, size), device=str(device))
    model = unwrap(predictor.model)
    x = torch.randn(1, 3, size, size, device=device)
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        getattr(model, n).register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n in LAYER_NAMES
    ]
    with torch.no_grad():
        bare = fastest(lambda: forward_parts(model, x), reps, device)
        _, features, logits = forward_parts(model, x)
    for handle in handles:
        handle.remove()
    stats = predictor.detectors["mahalanobis_layers_max"]
    with torch.no_grad():
        layers = {n: pooled_statistics(outputs[n]) for n in LAYER_NAMES}
        seen = ood.Observed(features, logits, layers)
        taps_before = fastest(lambda: [two_pass(outputs[n]) for n in LAYER_NAMES], reps, device)
        taps_after = fastest(lambda: [pooled_statistics(outputs[n]) for n in LAYER_NAMES], reps, device)
        score_before = fastest(lambda: ood._layer_mahalanobis_by_stage(stats, seen).max(dim=1).values, reps, device)
        score_after = fastest(lambda: ood._layer_mahalanobis(stats, seen).max(dim=1).values, reps, device)
        every = fastest(lambda: predictor._ood_scores(features, logits, layers), reps, device)
        same = torch.allclose(
            ood._layer_mahalanobis(stats, seen), ood._layer_mahalanobis_by_stage(stats, seen), rtol=1e-4, atol=1e-4
        )
    before, after = taps_before + score_before, taps_after + score_after
    return (
        f"{arch}@{size}: bare forward {bare * 1e3:.2f} ms | default detector before {before * 1e3:.3f} ms "
        f"({before / bare:.1%}: statistics {taps_before * 1e3:.3f} + distances {score_before * 1e3:.3f}) | "
        f"after {after * 1e3:.3f} ms ({after / bare:.1%}: {taps_after * 1e3:.3f} + {score_after * 1e3:.3f}) | "
        f"every detector, after: {(every + taps_after) / bare:.1%} | same distances: {same}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--models", default="resnet18@128,resnet50@128,resnet50@224")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    named = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {device} ({named}), torch {torch.__version__}, fastest of {args.reps} runs")
    for spec in args.models.split(","):
        arch, size = spec.split("@")
        print(measure(arch, int(size), device, args.reps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
