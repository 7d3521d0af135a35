"""How well each OOD detector separates non-lesion photos from unseen lesions, per architecture.

    python -m bench.ood_quality [--checkpoint runs/NAME/model.pt ...] [--device cpu]
    python -m bench.ood_quality --train runs/ood-bench --device cuda          # trains the three models first

With ``--train DIR`` the models are trained here with the real entry point (``python -m train
--recipe demo`` on the bundled data, one run folder per architecture under DIR; a run that already
has its model.pt is reused). The default architectures are ResNet-18 at 128 px and ResNet-50 at
128 px, plus ResNet-50 at 224 px on a GPU (``--models`` chooses). Without ``--train`` the given
checkpoints (default: the newest runs/*/model.pt) are measured.

Lesions are ones the model did NOT train on: the test fold of the run's split.csv when the
checkpoint sits in a run folder, else the bundled assets/samples/lesions. Non-lesion images are
the development set assets/ood_dev (public-domain photos and generated hard cases) plus the 7
bundled photos (assets/samples/ood). Per detector it prints ROC-AUC (photos positive), FPR at
95 % TPR, photos accepted by the fitted threshold, test lesions rejected by source (HAM10000 ids
ISIC_0024306..ISIC_0034320 vs other ISIC archive images), the bootstrap spread of new lesions
rejected fitted on validation, and the cost per prediction: the detector's scoring time (plus the
layer statistics' share of the pass, for the detectors that use them) as a share of a bare forward
pass of one image, all measured in the same run. Every score comes from the prediction's own pass.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import REPO
from bench.ood_cost import scoring_costs
from lesion import ood
from lesion.errors import InvalidImage, LesionError
from lesion.files import MODEL_FILE, SPLIT_FILE
from lesion.predict import Prediction, Predictor

PHOTO_FOLDERS = (REPO / "assets" / "ood_dev", REPO / "assets" / "samples" / "ood")
HAM10000_IDS = (24306, 34320)  # ISIC_0024306 .. ISIC_0034320 are HAM10000's images
GOALS = {"roc_auc": 0.995, "lesions_rejected": 0.06, "cost": 0.05}


def newest_checkpoint(root: Path) -> Path | None:
    """The most recently written runs/*/model.pt, if any."""
    found = sorted(root.glob("*/model.pt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def source_of(path: Path) -> str:
    """HAM10000 or another ISIC archive collection, from the image id."""
    stem = path.stem
    number = int(stem.split("_")[1]) if stem.startswith("ISIC_") and stem.split("_")[1].isdigit() else -1
    return "HAM10000" if HAM10000_IDS[0] <= number <= HAM10000_IDS[1] else "other ISIC"


def unseen_lesions(checkpoint: Path, predictor: Predictor) -> tuple[list[Path], str]:
    """Test-fold images of the checkpoint's run, or the bundled samples; with a description."""
    split_file = checkpoint.parent / SPLIT_FILE
    data_dir = (predictor.checkpoint.get("config") or {}).get("data", "")
    if split_file.is_file() and data_dir:
        from lesion import data as lesion_data

        data_path = Path(data_dir) if Path(data_dir).is_absolute() else REPO / data_dir
        try:
            frame, _ = lesion_data.read_metadata(data_path, skip_bad=True)
            folds = lesion_data.read_split(split_file)[["image_id", "fold"]]
            test = frame.merge(folds, on="image_id")
            test = test[test["fold"] == "test"]
            if len(test):
                return [Path(p) for p in test["path"]], f"{len(test)} test-fold lesions of {split_file}"
        except LesionError as error:
            print(f"(could not use {split_file}: {error}; using the bundled samples)")
    samples = sorted((REPO / "assets" / "samples" / "lesions").glob("*.jpg"))
    return samples, f"{len(samples)} bundled sample lesions (assets/samples/lesions)"


def photo_paths() -> list[Path]:
    """The development photos and the bundled gallery photos."""
    return [p for folder in PHOTO_FOLDERS for p in sorted(folder.glob("*.jpg"))]


def scores_of(predictor: Predictor, paths: list[Path], batch_size: int) -> tuple[dict[str, np.ndarray], list[Path]]:
    """Every detector's scores for the readable images (one forward pass per batch)."""
    results = predictor.predict_batch(paths, batch_size=batch_size)
    kept = [(p, r) for p, r in zip(paths, results, strict=True) if isinstance(r, Prediction)]
    for path, result in zip(paths, results, strict=True):
        if isinstance(result, InvalidImage):
            print(f"  skipped {path.name}: {result}")
    scores = {name: np.array([r.ood_scores[name] for _, r in kept]) for name in predictor.detectors}
    return scores, [p for p, _ in kept]


def _count(mask: np.ndarray) -> str:
    return f"{int(mask.sum())}/{len(mask)}"


def report(checkpoint: Path, device: str, batch_size: int, reps: int) -> list[dict]:
    """Print one architecture's table; return its rows."""
    predictor = Predictor.from_checkpoint(checkpoint, device=device)
    if not predictor.ood_available:
        print(f"{checkpoint} has no fitted OOD detectors (an intermediate checkpoint?); use a run's model.pt.")
        return []
    lesion_paths, described = unseen_lesions(checkpoint, predictor)
    photos = photo_paths()
    lesion_scores, lesions_kept = scores_of(predictor, lesion_paths, batch_size)
    photo_scores, photos_kept = scores_of(predictor, photos, batch_size)
    sources = np.array([source_of(p) for p in lesions_kept])
    bare_s, costs = scoring_costs(predictor, photos_kept[0], reps)
    stats_kb = {name: ood.stats_bytes(stats) / 1024 for name, stats in predictor.checkpoint["ood"]["detectors"].items()}
    test_auc = (predictor.checkpoint.get("metrics") or {}).get("test", {}).get("roc_auc")
    print()
    print(
        f"== {checkpoint} ({predictor.checkpoint.get('arch')}, {predictor.image_size} px, device {device}; "
        f"test ROC-AUC benign/malignant {test_auc if test_auc is None else round(test_auc, 3)})"
    )
    print(f"   lesions: {described}; photos: {len(photos_kept)} (assets/ood_dev + assets/samples/ood)")
    print(f"   bare forward of one image: {bare_s * 1000:.1f} ms")
    header = (
        f"{'detector':<24}{'ROC-AUC':>8}{'FPR@95':>8}{'photos acc':>11}{'HAM rej':>9}{'ISIC rej':>9}"
        f"{'all rej':>9}{'val-boot rej (95%)':>20}{'cost':>7}{'stats KB':>9}"
    )
    print(header)
    rows = []
    for name in predictor.detectors:
        threshold = predictor.ood_thresholds[name]
        result = ood.evaluate(lesion_scores[name], photo_scores[name], threshold)
        rejected = lesion_scores[name] > threshold
        spread = predictor.checkpoint["ood"]["detectors"][name].get("rejection_spread") or {}
        boot = f"{spread['median']:.1%} ({spread['low']:.0%}-{spread['high']:.0%})" if spread else "-"
        marker = "*" if name == predictor.ood_method else ""
        print(
            f"{name + marker:<24}{result['roc_auc']:8.3f}{result['fpr_at_95_tpr']:8.3f}"
            f"{_count(photo_scores[name] <= threshold):>11}{_count(rejected[sources == 'HAM10000']):>9}"
            f"{_count(rejected[sources == 'other ISIC']):>9}{rejected.mean():>9.1%}{boot:>20}"
            f"{costs[name]:>7.1%}{stats_kb.get(name, 0):>9.0f}"
        )
        rows.append({"detector": name, **result, "rejected": float(rejected.mean()), "cost": costs[name]})
    total_kb = sum(stats_kb.values())
    all_cost = costs.pop("_all")
    print(f"(* = the checkpoint's default; all detectors together: {all_cost:.1%} of the forward, {total_kb:.0f} KB)")
    if "_in_pass_default" in costs:
        print(
            f"timed inside the pass on this GPU (hooks + scoring, then wait, against a bare pass): the default adds "
            f"{costs.pop('_in_pass_default'):.1%} to the bare pass, every detector {costs.pop('_in_pass_every'):.1%}"
        )
    if "msp" in predictor.detectors:
        notebook = ood.evaluate(lesion_scores["msp"], photo_scores["msp"], ood.NOTEBOOK_MSP_THRESHOLD)
        print(
            f"notebook rule (max softmax < 0.8 rejected): photos accepted {notebook['ood_accepted']}/{len(photos_kept)}, "
            f"lesions rejected {notebook['lesions_rejected']}/{len(lesions_kept)}"
        )
    for name in predictor.detectors:
        accepted = [
            p.name for p, s in zip(photos_kept, photo_scores[name], strict=True) if s <= predictor.ood_thresholds[name]
        ]
        if len(accepted) <= 3:  # the few a good detector lets through are worth naming
            marker = " (the default)" if name == predictor.ood_method else ""
            print(f"photos {name}{marker} accepts: {', '.join(accepted) or 'none'}")
    return rows


def train_models(runs: Path, models: list[str], device: str, workers: int, extra: list[str]) -> list[Path]:
    """Train each ``arch@size`` with ``python -m train --recipe demo``; reuse finished runs."""
    paths = []
    for spec in models:
        arch, size = spec.split("@")
        run_dir = runs / f"{arch}-{size}"
        if not (run_dir / MODEL_FILE).is_file():
            command = [sys.executable, "-m", "train", "--recipe", "demo", "--out", str(run_dir)]
            command += [f"--arch={arch}", f"--image_size={size}", f"--device={device}", f"--num_workers={workers}"]
            command += extra
            print("$", " ".join(command[1:]), flush=True)
            started = time.perf_counter()
            subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
            print(f"  trained in {time.perf_counter() - started:.0f} s", flush=True)
        paths.append(run_dir / MODEL_FILE)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", default=[], help="repeatable; default: newest runs/*/model.pt")
    parser.add_argument("--train", default=None, metavar="RUNS_DIR", help="train the --models here first (demo recipe)")
    parser.add_argument(
        "--models", default=None, help="arch@size,... (default resnet18@128,resnet50@128[,resnet50@224 on cuda])"
    )
    parser.add_argument("--train-arg", action="append", default=[], help="extra --key=value for python -m train")
    parser.add_argument("--workers", type=int, default=2, help="data loader workers when training")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions for the cost column")
    args = parser.parse_args(argv)

    if args.train:
        models = (
            args.models or "resnet18@128,resnet50@128" + (",resnet50@224" if args.device.startswith("cuda") else "")
        ).split(",")
        checkpoints = train_models(Path(args.train), models, args.device, args.workers, args.train_arg)
    else:
        newest = newest_checkpoint(REPO / "runs")
        checkpoints = [Path(p) for p in args.checkpoint] or ([newest] if newest else [])
    if not checkpoints:
        print("No trained model found under runs/. Make one (a few minutes on a laptop CPU) with:")
        print(
            "    python -m train --recipe demo --out runs/demo      (or: python -m bench.ood_quality --train runs/ood-bench)"
        )
        return 1
    print(f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for checkpoint in checkpoints:
        try:
            report(checkpoint, args.device, args.batch_size, args.reps)
        except LesionError as error:
            print(f"error: {checkpoint}: {error}")
            return 2
    print()
    print(
        f"goals for the default detector: ROC-AUC >= {GOALS['roc_auc']}, test lesions rejected <= "
        f"{GOALS['lesions_rejected']:.0%}, cost <= {GOALS['cost']:.0%} of the forward pass"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
