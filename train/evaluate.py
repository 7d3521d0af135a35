"""``python -m train.evaluate``: measure any checkpoint on any dataset (HAM10000 or ISIC layout).

    python -m train.evaluate --checkpoint runs/demo/model.pt --data DIR [--split test] [--json]
    lesion-evaluate ...                           # the same, once the package is installed

Images are preprocessed by the predictor's own path (lesion.images.load_image, then the evaluation
transform), so the figures are those the app would give on the same files. Exit status, as for
``python -m train``: 0 done, 1 failed (checkpoint, data or split unusable), 2 usage (bad command line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lesion.errors import LesionError
from lesion.files import SPLIT_FILE


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a model.pt (or best.pt) written by lesion")
    parser.add_argument("--data", required=True, help="dataset folder (HAM10000 or ISIC archive layout)")
    parser.add_argument("--metadata", default=None, help="metadata CSV (default: detected inside --data)")
    parser.add_argument(
        "--split",
        default=None,
        help="evaluate only the images of this fold (train, val, test) of a split.csv given by --split-file",
    )
    parser.add_argument("--split-file", default=None, help="split.csv of a run (default: beside the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--skip-bad-images",
        "--skip-bad",
        dest="skip_bad",
        action="store_true",
        help="skip missing or unreadable images (reported), as python -m train --skip-bad-images=true does",
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    return parser


def evaluate(args: argparse.Namespace) -> dict:
    """Metrics of the checkpoint on the dataset, at the checkpoint's own decision threshold.

    A dx model adds ``dx``: balanced accuracy over diagnoses, per-dx recall, precision and
    support, and the dx confusion matrix (:func:`lesion.metrics.dx_metrics`).
    """
    import numpy as np

    from lesion import data as lesion_data
    from lesion.errors import InvalidImage
    from lesion.metrics import binary_metrics, prediction_dx_metrics
    from lesion.predict import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    df, summary = lesion_data.read_metadata(args.data, args.metadata, skip_bad=args.skip_bad)
    if args.split:
        split_file = Path(args.split_file) if args.split_file else Path(args.checkpoint).parent / SPLIT_FILE
        if not split_file.is_file():
            raise LesionError(f"--split {args.split} needs a split.csv; none at {split_file}")
        folds = lesion_data.read_split(split_file)[["image_id", "fold"]]
        df = df.merge(folds, on="image_id", how="inner")
        df = df[df["fold"] == args.split]
        if df.empty:
            raise LesionError(f"no images of {args.data} are in the {args.split} fold of {split_file}")
    predictions = predictor.predict_batch(df["path"].tolist(), batch_size=args.batch_size, with_heatmap=False)
    for result in predictions:
        if isinstance(result, InvalidImage):
            raise result
    probabilities = np.array([result.p_malignant for result in predictions], dtype=np.float64)
    threshold = predictor.decision_threshold
    metrics = binary_metrics(df["label"].to_numpy(), probabilities, threshold, df["dx"].tolist())
    dx = prediction_dx_metrics(predictions, df["dx"].tolist(), predictor.dx_names)
    if dx is not None:
        metrics["dx"] = dx
    metrics.update(
        checkpoint=str(args.checkpoint),
        data=str(args.data),
        layout=summary.get("layout"),
        split=args.split or "all images",
        skipped=summary.get("skipped", {}),
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.batch_size < 1:
        print(f"error: --batch-size must be at least 1, not {args.batch_size}", file=sys.stderr)
        return 2
    if args.split and args.split not in ("train", "val", "test"):
        print(f"error: --split must be train, val or test, not {args.split!r}", file=sys.stderr)
        return 2
    try:
        metrics = evaluate(args)
    except (LesionError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"{metrics['n']} images ({metrics['n_malignant']} malignant) from {args.data}, {metrics['split']}")
    from lesion.metrics import HEADLINE_METRICS  # here, not at the top: --help stays free of sklearn

    for key in HEADLINE_METRICS:
        value = metrics.get(key)
        print(f"  {key:18s} {value:.4f}" if isinstance(value, float) else f"  {key:18s} n/a")
    print(f"  threshold          {metrics['threshold']:.4f}")
    print(f"  confusion          {metrics['confusion']}")
    dx = metrics.get("dx")
    if dx:
        balanced = dx["balanced_accuracy"]
        print(f"  dx balanced acc.   {balanced:.4f}" if balanced is not None else "  dx balanced acc.   n/a")
        for name in dx["names"]:
            recall, precision = dx["recall"][name], dx["precision"][name]
            print(
                f"  {name:6s} n={dx['support'][name]:<5d} recall "
                + (f"{recall:.3f}" if recall is not None else "n/a")
                + " precision "
                + (f"{precision:.3f}" if precision is not None else "n/a")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
