"""What the OOD check costs per prediction: the one benchmark of its cost.

    python -m bench.ood_cost [--device cuda] [--reps 30] [--models resnet18@128,resnet50@128,resnet50@224]

:func:`scoring_costs` is each fitted detector's cost on a real checkpoint and image, as a share of a
bare forward pass (bench/ood_quality.py prints it in its cost column). The command line measures the
default detector stage by stage against packed, per architecture:

For each architecture (random weights; detectors fitted as in bench/predict_pace.py) it times, in the
same run, against a bare forward of one image:
  - before: the layer statistics in two passes (5 operations a stage) and the stage-by-stage
    Mahalanobis distances (lesion.ood.layers._layer_mahalanobis_by_stage), as the code was until
    2026-11-27;
  - after: the statistics as the hooks now take them (one std_mean kernel a stage on a GPU) and
    the packed distances the detectors use (lesion.ood.layers._layer_mahalanobis);
  - every fitted detector, as each prediction scores them all (before: the three layer detectors
    stage by stage);
and checks that both give the same distances. It also counts the aten operations each way
dispatches (a device-independent count: at batch 1 a GPU pays ~10-20 microseconds for each). At batch 1 on a GPU a pass is bound by how many
operations it launches, so this is where the difference shows; on a CPU both cost a few per cent.
Each time is the fastest of --reps runs after 3 warmups, waiting for the device after each
(bench/ood_quality.py's timer).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import build_checkpoint, fastest_seconds
from lesion import ood
from lesion.images import load_image
from lesion.model import _pooled_two_pass, classifier, forward_parts, pooled_statistics, stage_names, unwrap
from lesion.ood import layers as ood_layers
from lesion.predict import Predictor
from lesion.transforms import eval_transform


class _Counting(TorchDispatchMode):
    """Counts the aten operations dispatched inside it (what a GPU pays ~10-20 microseconds each for at batch 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.count += 1
        return func(*args, **(kwargs or {}))


def _tap_seconds(predictor: Predictor, batch: torch.Tensor, reps: int) -> float:
    """What the layer hooks add to one pass: their statistics, computed on the pass's own stage outputs.

    Timed directly rather than as (pass with hooks - bare pass): on a CPU two forward passes differ
    by more than the hooks cost (a millisecond of jitter on a 17 ms pass), so a difference of two
    noisy minimums says more about the machine than about the hooks.
    """
    model = unwrap(predictor.model)
    outputs: dict[str, torch.Tensor] = {}
    stages = stage_names(model)
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
        for name in stages
    ]
    try:
        with torch.no_grad():
            forward_parts(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return fastest_seconds(lambda: [pooled_statistics(outputs[name]) for name in stages], reps, predictor.device)


def scoring_costs(predictor: Predictor, image: Path, reps: int) -> tuple[float, dict[str, float]]:
    """(bare forward seconds, {detector: share of the bare forward}) for one image, as the app predicts.

    A detector's cost is its own scoring time, plus, for the detectors that read layer1..layer4,
    what collecting those statistics adds to the pass (the hooks, timed on the pass's own outputs).
    """
    transform = eval_transform(predictor.image_size, predictor.mean, predictor.std)
    batch = transform(load_image(image, predictor.resize_size))[None].to(predictor.device)
    model, device = predictor.model, predictor.device

    def bare() -> None:
        with torch.no_grad():
            forward_parts(model, batch)

    bare_s = min(fastest_seconds(bare, reps, device) for _ in range(2))
    _, features, logits, layers = predictor._forward(batch)
    taps = _tap_seconds(predictor, batch, reps) if layers else 0.0
    # Round-robin over the detectors, one call each per round, so a burst of another process on a
    # shared machine spoils one sample of each rather than every sample of one detector.
    fastest = dict.fromkeys(predictor.detectors, float("inf"))
    for _ in range(reps + 3):
        for name, stats in predictor.detectors.items():
            started = time.perf_counter()
            ood.score(name, stats, features, logits, layers=layers, head=classifier(model))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            fastest[name] = min(fastest[name], time.perf_counter() - started)
    costs = {
        name: (own + (taps if ood.DETECTORS[name].needs_layers else 0.0)) / bare_s for name, own in fastest.items()
    }
    # What a prediction pays for every detector at once: each one's scoring, and the hooks once.
    costs["_all"] = (sum(fastest.values()) + taps) / bare_s
    if device.type == "cuda":
        costs.update(_in_pass_costs(predictor, batch, reps, bare))
    return bare_s, costs


def _in_pass_costs(predictor: Predictor, batch: torch.Tensor, reps: int, bare) -> dict[str, float]:
    """On a GPU: what the hooks and the scoring add to a pass, timed together as a prediction runs them.

    The columns above time the scoring on its own, after the device has finished the pass. Here it is
    (pass with the layer hooks + scoring, then wait) minus (bare pass, then wait), the runs alternating
    so that both see the same clocks: at batch 1 a GPU pass is bound by the launches of its operations,
    and this counts the hooks' own Python too. (On a CPU the difference of two passes is mostly noise,
    so it is printed on a GPU only.)
    """
    model, device = predictor.model, predictor.device

    def scored(names: list[str]) -> Callable[[], None]:
        def run() -> None:
            _, features, logits, layers = predictor._forward(batch)
            chosen = {name: predictor.detectors[name] for name in names}
            ood.score_all(chosen, features, logits, layers=layers, head=classifier(model))  # as Predictor._run scores

        return run

    runs = {"bare": bare, "default": scored([predictor.ood_method]), "every": scored(list(predictor.detectors))}
    fastest = dict.fromkeys(runs, float("inf"))
    for _ in range(3):
        for name, run in runs.items():
            fastest[name] = min(fastest[name], fastest_seconds(run, reps, device))
    return {
        "_in_pass_default": (fastest["default"] - fastest["bare"]) / fastest["bare"],
        "_in_pass_every": (fastest["every"] - fastest["bare"]) / fastest["bare"],
    }


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
    stages = stage_names(model)
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n in stages
    ]
    with torch.no_grad():
        bare = fastest_seconds(lambda: forward_parts(model, x), reps, device)
        _, features, logits = forward_parts(model, x)
    for handle in handles:
        handle.remove()
    stats = predictor.detectors["mahalanobis_layers_max"]
    with torch.no_grad():
        layers = {n: pooled_statistics(outputs[n]) for n in stages}
        seen = ood.Observed(features, logits, layers)

        def fresh() -> ood.Observed:  # a new pass each time: nothing shared from the last run
            return ood.Observed(features, logits, layers)

        taps_before = fastest_seconds(lambda: [_pooled_two_pass(outputs[n]) for n in stages], reps, device)
        taps_after = fastest_seconds(lambda: [pooled_statistics(outputs[n]) for n in stages], reps, device)
        score_before = fastest_seconds(
            lambda: ood_layers._layer_mahalanobis_by_stage(stats, seen).max(dim=1).values, reps, device
        )
        score_after = fastest_seconds(
            lambda: ood_layers._layer_mahalanobis(stats, fresh()).max(dim=1).values, reps, device
        )
        every = fastest_seconds(lambda: predictor._ood_scores(features, logits, layers), reps, device)
        full = (features, logits, layers, classifier(model))
        every_before = fastest_seconds(lambda: every_detector(predictor, full, True), reps, device)
        ops = {
            "default before": operations(lambda: [_pooled_two_pass(outputs[n]) for n in stages])
            + operations(lambda: BY_STAGE["mahalanobis_layers_max"](stats, seen)),
            "default after": operations(lambda: [pooled_statistics(outputs[n]) for n in stages])
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
