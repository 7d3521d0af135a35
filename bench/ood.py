"""How well each OOD detector separates the bundled non-lesion photos from unseen lesions.

    python bench/ood.py [--checkpoint runs/NAME/model.pt] [--device cpu]

Lesions are ones the model did NOT train on: the test fold of the run's split.csv when the
checkpoint sits in a run folder that has one, else the bundled assets/samples/lesions. OOD
images are the 7 bundled photos (assets/samples/ood). Prints ROC-AUC (OOD positive) and FPR at
95 % TPR per detector, what each fitted threshold accepts, and the notebook's setting (max
softmax below 0.8 rejected) beside them. Every detector's score comes from the same forward pass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lesion import ood  # noqa: E402
from lesion.errors import InvalidImage, LesionError  # noqa: E402
from lesion.predict import Prediction, Predictor  # noqa: E402


def newest_checkpoint(root: Path) -> Path | None:
    """The most recently written runs/*/model.pt, if any."""
    found = sorted(root.glob("*/model.pt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def unseen_lesions(checkpoint: Path, predictor: Predictor) -> tuple[list[Path], str]:
    """Test-fold images of the checkpoint's run, or the bundled samples; with a description."""
    split_file = checkpoint.parent / "split.csv"
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


def scores_of(predictor: Predictor, paths: list[Path], device_batch: int) -> tuple[dict[str, np.ndarray], list[Path]]:
    """Every detector's scores for the readable images (one forward pass per batch)."""
    results = predictor.predict_batch(paths, batch_size=device_batch)
    kept = [(p, r) for p, r in zip(paths, results, strict=True) if isinstance(r, Prediction)]
    for path, result in zip(paths, results, strict=True):
        if isinstance(result, InvalidImage):
            print(f"  skipped {path.name}: {result}")
    scores = {name: np.array([r.ood_scores[name] for _, r in kept]) for name in predictor.detectors}
    return scores, [p for p, _ in kept]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the newest runs/*/model.pt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    checkpoint = Path(args.checkpoint) if args.checkpoint else newest_checkpoint(REPO / "runs")
    if checkpoint is None:
        print("No trained model found under runs/. Make one (a few minutes on a laptop CPU) with:")
        print("    python -m train --recipe demo --out runs/demo")
        return 1
    try:
        predictor = Predictor.from_checkpoint(checkpoint, device=args.device)
    except LesionError as error:
        print(f"error: {error}")
        return 2
    if not predictor.ood_available:
        print(f"{checkpoint} has no fitted OOD detectors (an intermediate checkpoint?); use a run's model.pt.")
        return 2

    lesion_paths, described = unseen_lesions(checkpoint, predictor)
    ood_paths = sorted((REPO / "assets" / "samples" / "ood").glob("*.jpg"))
    print(f"checkpoint {checkpoint} ({predictor.checkpoint.get('arch')}, {predictor.image_size} px)")
    print(f"lesions: {described}; OOD: {len(ood_paths)} bundled photos (assets/samples/ood)")
    lesion_scores, _ = scores_of(predictor, lesion_paths, args.batch_size)
    ood_scores, ood_kept = scores_of(predictor, ood_paths, args.batch_size)
    n_lesions, n_ood = len(next(iter(lesion_scores.values()))), len(ood_kept)

    print()
    print(f"{'detector':<22} {'ROC-AUC':>8} {'FPR@95TPR':>10} {'threshold':>11} {'lesions kept':>13} {'OOD kept':>9}")
    rows = [(name, predictor.ood_thresholds[name]) for name in predictor.detectors]
    if "msp" in predictor.detectors:
        rows.append(("msp (notebook, p<0.8)", ood.NOTEBOOK_MSP_THRESHOLD))
    for label, threshold in rows:
        name = label.split()[0]
        result = ood.evaluate(lesion_scores[name], ood_scores[name], threshold)
        marker = " *" if name == predictor.ood_method and "notebook" not in label else ""
        print(
            f"{label + marker:<22} {result['roc_auc']:8.3f} {result['fpr_at_95_tpr']:10.3f} {threshold:11.4f} "
            f"{result['lesions_accepted']:>6}/{n_lesions:<6} {result['ood_accepted']:>4}/{n_ood:<4}"
        )
    print(
        "(* = the checkpoint's default detector; thresholds fitted to keep "
        f"{(predictor.checkpoint.get('ood') or {}).get('keep', 0.95):.0%} of validation lesions)"
    )

    print()
    names = list(predictor.detectors)
    print(f"{'OOD photo':<22} " + " ".join(f"{n:>12}" for n in names))
    for i, path in enumerate(ood_kept):
        cells = []
        for name in names:
            accepted = ood_scores[name][i] <= predictor.ood_thresholds[name]
            cells.append(f"{'accept' if accepted else 'REJECT':>12}")
        print(f"{path.name:<22} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
