"""Two recipes, paired by seed: which gives the better benign / malignant ranking, on validation and on test?

For each seed, trains recipe A and recipe B through the real training entry point
(:func:`lesion.training.run_training`, what ``python -m train`` calls). The split depends only on
the seed and the data, so both runs of a seed are measured on the same validation and test lesions.
Each model.pt scores its own validation and test images with the app's predictor; the script prints
per run the ROC-AUC of P(malignant) on both splits, the dx balanced accuracy and the training wall
time, then per seed the paired difference (B - A) with its 95 % interval (bootstrap over lesions),
and the mean difference over the seeds with its interval (lesions resampled within each seed).

Validation chose each run's best epoch (and so flatters both a little, alike); test is held out.

    python -m bench.experiments.compare_recipes scratch demo --seeds 0 1 2 --out runs/compare   # the demo recipe's claim
    python -m bench.experiments.compare_recipes demo demo --seeds 0 --b=--image-size=192         # a change against its recipe

A run folder that already holds model.pt is measured again, not retrained (so an interrupted
comparison resumes, and runs trained elsewhere can be compared by placing them at
``OUT/A-sSEED`` and ``OUT/B-sSEED``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lesion.config import build_config
from lesion.data import locate_data, read_metadata, read_split
from lesion.files import CONFIG_FILE, METRICS_FILE, MODEL_FILE, SPLIT_FILE
from lesion.metrics import mean_roc_auc_difference_interval, roc_auc_difference_interval
from lesion.predict import Predictor
from lesion.training import run_training

SPLITS = ("val", "test")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe_a", help="the baseline recipe (name or .toml)")
    parser.add_argument("recipe_b", help="the challenger recipe (name or .toml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one pair of runs per seed")
    parser.add_argument("--a", action="append", default=[], metavar="--KEY=VALUE", help="an override for A")
    parser.add_argument("--b", action="append", default=[], metavar="--KEY=VALUE", help="an override for B")
    parser.add_argument("--out", default="", help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--device", default="cpu", help="training and scoring device (default: cpu)")
    parser.add_argument("--json", action="store_true", help="also print every figure as one JSON object")
    return parser


def split_scores(run_dir: Path, fold: str, device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, P(malignant) and lesion ids of one fold of the run's saved split, scored by its model.pt."""
    split = read_split(run_dir / SPLIT_FILE)
    rows = split[split["fold"] == fold].reset_index(drop=True)
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    frame, _ = read_metadata(locate_data(config["data"]), config["metadata"] or None, config["skip_bad_images"])
    paths = rows.merge(frame[["image_id", "path"]], on="image_id", how="left")["path"].tolist()
    predictor = Predictor.from_checkpoint(run_dir / MODEL_FILE, device=device)
    return rows["label"].to_numpy(), predictor.p_malignant(paths, batch_size=64), rows["lesion_id"].to_numpy()


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def one_run(run_dir: Path, recipe: str, overrides: list[str], seed: int, device: str) -> dict[str, Any]:
    """Train (unless run_dir has its model.pt) and score one run on both splits."""
    config = build_config(recipe, [*overrides, f"--seed={seed}", f"--out={run_dir}", f"--device={device}"])
    seconds = float("nan")
    if (run_dir / MODEL_FILE).exists():
        print(f"reusing {run_dir} (it has its model.pt)", file=sys.stderr)
    else:
        started = time.perf_counter()
        run_training(config)
        seconds = time.perf_counter() - started
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    run: dict[str, Any] = {
        "run": str(run_dir),
        "seed": seed,
        "arch": json.loads((run_dir / CONFIG_FILE).read_text())["arch"],
        "seconds": seconds,
        "dx_balanced_accuracy": (metrics["test"].get("dx") or {}).get("balanced_accuracy"),
        "_scores": {},
    }
    for fold in SPLITS:
        y, p, lesions = split_scores(run_dir, fold, device)
        run[f"{fold}_roc_auc"] = _auc(y, p)
        run["_scores"][fold] = (y, p, lesions)
    return run


def _f(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) and np.isfinite(value) else "n/a"


def report(pairs: list[tuple[dict[str, Any], dict[str, Any]]], names: tuple[str, str]) -> dict[str, Any]:
    """Print the runs and the paired differences; return every figure as plain values."""
    print("\nrecipe        seed  arch                val ROC-AUC  test ROC-AUC  dx bal.acc (test)  train s")
    for pair in pairs:
        for name, run in zip(names, pair, strict=True):
            print(
                f"{name:<13} {run['seed']:<5} {run['arch']:<19} {_f(run['val_roc_auc']):<12} "
                f"{_f(run['test_roc_auc']):<13} {_f(run['dx_balanced_accuracy']):<18} {_f(run['seconds'])}"
            )
    result: dict[str, Any] = {"names": list(names), "splits": {}}
    for fold in SPLITS:
        print(f"\n{fold}: paired ROC-AUC difference, {names[1]} - {names[0]} (same lesions; bootstrap over lesions)")
        per_seed, samples = [], []
        for a, b in pairs:
            y, p_a, lesions = a["_scores"][fold]
            y_b, p_b, lesions_b = b["_scores"][fold]
            if not (np.array_equal(y, y_b) and np.array_equal(lesions, lesions_b)):
                raise SystemExit(f"seed {a['seed']}: the two runs were not trained on the same {fold} split")
            difference = b[f"{fold}_roc_auc"] - a[f"{fold}_roc_auc"]
            interval = roc_auc_difference_interval(y, p_b, p_a, lesions)
            samples.append((y, p_b, p_a, lesions))
            per_seed.append({"seed": a["seed"], "difference": difference, "difference_95": interval})
            low, high = interval or (None, None)
            print(f"  seed {a['seed']}: {difference:+.3f} [{_f(low)}, {_f(high)}] on {len(set(lesions))} lesions")
        mean_interval = mean_roc_auc_difference_interval(samples)
        low, high = mean_interval or (None, None)
        means = [float(np.mean([pair[i][f"{fold}_roc_auc"] for pair in pairs])) for i in (0, 1)]
        mean_difference = float(np.mean([row["difference"] for row in per_seed]))
        print(
            f"  mean over {len(pairs)} seed(s): {names[0]} {means[0]:.3f}, {names[1]} {means[1]:.3f}; "
            f"difference {mean_difference:+.3f} [{_f(low)}, {_f(high)}] (95 %, lesions resampled within each seed)"
        )
        result["splits"][fold] = {
            "per_seed": per_seed,
            "means": dict(zip(names, means, strict=True)),
            "mean_difference": mean_difference,
            "mean_difference_95": mean_interval,
        }
    result["runs"] = [{k: v for k, v in run.items() if k != "_scores"} for pair in pairs for run in pair]
    return result


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    names = (Path(args.recipe_a).stem, Path(args.recipe_b).stem)
    labels = ("A", "B") if names[0] == names[1] else names
    with tempfile.TemporaryDirectory(prefix="compare-recipes-") as scratch:
        root = Path(args.out) if args.out else Path(scratch)
        started = time.perf_counter()
        pairs = [
            tuple(
                one_run(root / f"{label}-s{seed}", recipe, overrides, seed, args.device)
                for label, recipe, overrides in zip(
                    labels, (args.recipe_a, args.recipe_b), (args.a, args.b), strict=True
                )
            )
            for seed in args.seeds
        ]
        result = report(pairs, labels)
        print(f"\ntotal wall time {time.perf_counter() - started:.1f} s")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
