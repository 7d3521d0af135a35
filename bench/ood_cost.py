"""What the default OOD detector costs per prediction, stage by stage against packed, per architecture.

    python bench/ood_cost.py [--device cuda] [--reps 30] [--models resnet18@128,resnet50@128,resnet50@224]

For each architecture (random weights; detectors fitted as in bench/predict.py) it times, in the
same run, against a bare forward of one image:
  - before: the layer statistics in two passes (5 operations a stage) and the stage-by-stage
    Mahalanobis distances (lesion.ood_layers._layer_mahalanobis_by_stage), as the code was until
    2026-11-27;
  - after: the statistics as the hooks now take them (one std_mean kernel a stage on a GPU) and
    the packed distances the detectors use (lesion.ood_layers._layer_mahalanobis);
  - every fitted detector, as each prediction scores them all (before: the three layer detectors
    stage by stage);
and checks that both give the same distances. It also counts the aten operations each way
dispatches (a device-independent count: at batch 1 a GPU pays ~10-20 microseconds for each). At batch 1 on a GPU a pass is bound by how many
operations it launches, so this is where the difference shows; on a CPU both cost a few per cent.
Each time is the fastest of --reps runs after 3 warmups, waiting for the device after each
(bench/ood.py's timer).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ood import _fastest_seconds  # noqa: E402  (bench/ood.py: fastest of reps after warmups, device waited for)
from predict import build_checkpoint  # noqa: E402

from lesion import ood  # noqa: E402
from lesion.model import LAYER_NAMES, _pooled_two_pass, forward_parts, pooled_statistics, unwrap  # noqa: E402
from lesion.ood import layers as ood_layers  # noqa: E402
from lesion.predict import Predictor  # noqa: E402


class _Counting(TorchDispatchMode):
    """Counts the aten operations dispatched inside it (what a GPU pays ~10-20 microseconds each for at batch 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.count += 1
        return func(*args, **(kwargs or {}))


def operations(run: Callable[[], object]) -> int:
    """How many aten operations ``run`` dispatches (views included: they cost dispatch time too)."""
    with _Counting() as counting:
        run()
    return counting.count


#: The layer detectors as they were scored before packing: stage by stage.
BY_STAGE: dict[str, Callable[[dict, ood.Observed], torch.Tensor]] = {
    "mahalanobis_layers": lambda s, seen: ood_layers._layer_mahalanobis_by_stage(s, seen).mean(dim=1),
    "mahalanobis_layers_max": lambda s, seen: ood_layers._layer_mahalanobis_by_stage(s, seen).max(dim=1).values,
    "knn_layers": lambda s, seen: ood_layers._knn_layers_by_stage(s, seen).mean(dim=1),
}


def every_detector(predictor: Predictor, pass_: tuple, before: bool) -> None:
    """Every fitted detector on one pass, as a prediction scores them (``before``: the layer ones stage
    by stage, each on its own; after: :func:`lesion.ood.score_all`, which shares what it can)."""
    features, logits, layers, head = pass_
    if not before:
        ood.score_all(predictor.detectors, features, logits, layers=layers, head=head)
        return
    seen = ood.Observed(features, logits, layers, head)
    for name, stats in predictor.detectors.items():
        (BY_STAGE[name] if name in BY_STAGE else ood.DETECTORS[name].score)(stats, seen)


def measure(arch: str, size: int, device: torch.device, reps: int) -> str:
    predictor = Predictor(build_checkpoint(arch, size), device=str(device))
    model = unwrap(predictor.model)
    x = torch.randn(1, 3, size, size, device=device)
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        getattr(model, n).register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n in LAYER_NAMES
    ]
    with torch.no_grad():
        bare = _fastest_seconds(lambda: forward_parts(model, x), reps, device)
        _, features, logits = forward_parts(model, x)
    for handle in handles:
        handle.remove()
    stats = predictor.detectors["mahalanobis_layers_max"]
    with torch.no_grad():
        layers = {n: pooled_statistics(outputs[n]) for n in LAYER_NAMES}
        seen = ood.Observed(features, logits, layers)

        def fresh() -> ood.Observed:  # a new pass each time: nothing shared from the last run
            return ood.Observed(features, logits, layers)

        taps_before = _fastest_seconds(lambda: [_pooled_two_pass(outputs[n]) for n in LAYER_NAMES], reps, device)
        taps_after = _fastest_seconds(lambda: [pooled_statistics(outputs[n]) for n in LAYER_NAMES], reps, device)
        score_before = _fastest_seconds(
            lambda: ood_layers._layer_mahalanobis_by_stage(stats, seen).max(dim=1).values, reps, device
        )
        score_after = _fastest_seconds(
            lambda: ood_layers._layer_mahalanobis(stats, fresh()).max(dim=1).values, reps, device
        )
        every = _fastest_seconds(lambda: predictor._ood_scores(features, logits, layers), reps, device)
        full = (features, logits, layers, model.fc)
        every_before = _fastest_seconds(lambda: every_detector(predictor, full, True), reps, device)
        ops = {
            "default before": operations(lambda: [_pooled_two_pass(outputs[n]) for n in LAYER_NAMES])
            + operations(lambda: BY_STAGE["mahalanobis_layers_max"](stats, seen)),
            "default after": operations(lambda: [pooled_statistics(outputs[n]) for n in LAYER_NAMES])
            + operations(lambda: ood_layers._layer_mahalanobis(stats, fresh()).max(dim=1).values),
            "every before": operations(lambda: every_detector(predictor, full, True)),
            "every after": operations(lambda: every_detector(predictor, full, False)),
        }
        same = torch.allclose(
            ood_layers._layer_mahalanobis(stats, seen),
            ood_layers._layer_mahalanobis_by_stage(stats, seen),
            rtol=1e-4,
            atol=1e-4,
        )
    before, after = taps_before + score_before, taps_after + score_after
    return (
        f"{arch}@{size}: bare forward {bare * 1e3:.2f} ms | default detector before {before * 1e3:.3f} ms "
        f"({before / bare:.1%}: statistics {taps_before * 1e3:.3f} + distances {score_before * 1e3:.3f}) | "
        f"after {after * 1e3:.3f} ms ({after / bare:.1%}: {taps_after * 1e3:.3f} + {score_after * 1e3:.3f}) | "
        f"every detector: before {(every_before + taps_before) / bare:.1%}, after {(every + taps_after) / bare:.1%} | "
        f"same distances: {same}\n    aten operations dispatched: default detector {ops['default before']} -> "
        f"{ops['default after']}, every detector (hooks excluded) {ops['every before']} -> {ops['every after']}"
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
