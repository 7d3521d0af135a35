"""Two exported checkpoints on one recorded split: the paired difference of their test ROC-AUC.

Both models score the same images (the split recorded in checkpoint B, e.g. a new bundled model,
unless ``--split-from a``) through the app's own predictor; the script prints each one's ROC-AUC of
P(malignant) and dx balanced accuracy on that fold, and the paired difference B - A with its 95 %
interval (bootstrap over lesions). Neither model may have trained on those images: the script
refuses when the two recorded splits disagree on which images are in the fold or in training.

    python -m bench.experiments.compare_checkpoints OLD.pt assets/models/lesion-efficientnet-lite0-demo.pt
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from sklearn.metrics import roc_auc_score

from lesion.checkpoint import load_checkpoint
from lesion.export import split_frame
from lesion.metrics import prediction_dx_metrics, roc_auc_difference_interval
from lesion.predict import Predictor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="the baseline checkpoint (exported: it records its split)")
    parser.add_argument("b", help="the challenger checkpoint")
    parser.add_argument("--fold", default="test", help="the fold to score (default: test)")
    parser.add_argument("--split-from", choices=("a", "b"), default="b", help="whose recorded split to use")
    args = parser.parse_args(argv)
    checkpoints = {"a": load_checkpoint(args.a), "b": load_checkpoint(args.b)}
    frames = {key: split_frame(checkpoint) for key, checkpoint in checkpoints.items()}
    fold_ids = {key: set(frame.loc[frame["fold"] == args.fold, "image_id"]) for key, frame in frames.items()}
    trained_on = {key: set(frame.loc[frame["fold"] == "train", "image_id"]) for key, frame in frames.items()}
    if fold_ids["a"] != fold_ids["b"] or trained_on["a"] & fold_ids["b"] or trained_on["b"] & fold_ids["a"]:
        print(f"error: the two checkpoints' {args.fold} folds differ, so no paired comparison", file=sys.stderr)
        return 1
    frame = frames[args.split_from]
    part = frame[frame["fold"] == args.fold].reset_index(drop=True)
    y, lesions = part["label"].to_numpy(), part["lesion_id"].to_numpy()
    scores = {}
    for key, path in (("a", args.a), ("b", args.b)):
        predictor = Predictor(checkpoints[key])
        predictions = predictor.predict_batch(part["path"].tolist(), batch_size=32, with_heatmap=False)
        scores[key] = np.array([p.p_malignant for p in predictions])
        dx = prediction_dx_metrics(predictions, part["dx"].tolist(), predictor.dx_names) or {}
        print(
            f"{key}: {path}: {args.fold} ROC-AUC {roc_auc_score(y, scores[key]):.3f}, "
            f"dx balanced accuracy {dx.get('balanced_accuracy', float('nan')):.3f} "
            f"({len(part)} images, {len(set(lesions))} lesions)"
        )
    difference = roc_auc_score(y, scores["b"]) - roc_auc_score(y, scores["a"])
    low, high = roc_auc_difference_interval(y, scores["b"], scores["a"], lesions) or (float("nan"),) * 2
    print(f"b - a: {difference:+.3f} [{low:.3f}, {high:.3f}] (95 %, bootstrap over lesions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
