"""Does learning the diagnosis cost benign / malignant ranking? dx head vs binary head, same split and seed.

For each seed, trains the same recipe twice through the real training entry point
(:func:`lesion.training.run_training`, what ``python -m train`` calls), once with ``--target=dx`` and
once with ``--target=binary``. The split depends only on the seed, so both models of a seed are
measured on the same test lesions. Prints, per run, the test ROC-AUC of P(malignant) with its 95 %
interval (bootstrap over lesions), balanced accuracy at the validation-chosen threshold, the dx
balanced accuracy and per-dx recall (dx head); then, per seed, the paired difference in ROC-AUC
(dx - binary) with its 95 % interval. Keep dx as the default only if it is not worse.

    python -m bench.experiments.dx_vs_binary --seeds 0 1 2 --device=cuda            # the demo recipe
    python -m bench.experiments.dx_vs_binary --seeds 0 --epochs=1 --image_size=64   # any --key=value overrides the recipe
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
from lesion.data import locate_data, read_split
from lesion.files import CONFIG_FILE, METRICS_FILE, MODEL_FILE, SPLIT_FILE
from lesion.metrics import (
    mean_roc_auc_difference_interval,
    roc_auc_difference_interval,
    roc_auc_interval,
)
from lesion.predict import Predictor
from lesion.training import run_training

TARGETS = ("dx", "binary")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other --key=value go to training.")
    parser.add_argument("--recipe", default="demo", help="training recipe (default: demo)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one pair of runs per seed")
    parser.add_argument("--out", default="", help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="also print every figure as one JSON object")
    return parser


def test_scores(run_dir: Path, device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, P(malignant) and lesion ids of the run's test split, scored by its model.pt."""
    split = read_split(run_dir / SPLIT_FILE)
    test = split[split["fold"] == "test"].reset_index(drop=True)
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    from lesion.data import read_metadata

    frame, _ = read_metadata(locate_data(config["data"]), config["metadata"] or None, config["skip_bad_images"])
    paths = test.merge(frame[["image_id", "path"]], on="image_id", how="left")["path"].tolist()
    predictor = Predictor.from_checkpoint(run_dir / MODEL_FILE, device=device)
    p = predictor.p_malignant(paths, batch_size=64)
    return test["label"].to_numpy(), p, test["lesion_id"].to_numpy()


def one_run(root: Path, seed: int, target: str, recipe: str, overrides: list[str]) -> dict[str, Any]:
    """Train one model and gather its test figures."""
    run_dir = root / f"seed{seed}-{target}"
    config = build_config(recipe, [*overrides, f"--seed={seed}", f"--target={target}", f"--out={run_dir}"])
    started = time.perf_counter()
    if (run_dir / MODEL_FILE).exists():  # a finished run of an earlier call: measure it again, don't retrain
        print(f"reusing {run_dir} (it has its model.pt)")
        seconds = float("nan")
    else:
        run_training(config)
        seconds = time.perf_counter() - started
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    device = "cuda" if config.device in ("auto", "cuda") and _cuda() else "cpu"
    y, p, lesions = test_scores(run_dir, device)
    test = metrics["test"]
    dx = test.get("dx") or {}
    return {
        "seed": seed,
        "target": target,
        "head": metrics["target"],
        "note": metrics.get("target_note", ""),
        "seconds": seconds,
        "roc_auc": test["roc_auc"],
        "roc_auc_rescored": _auc(y, p),
        "roc_auc_95": roc_auc_interval(y, p, lesions),
        "balanced_accuracy": test["balanced_accuracy"],
        "dx_balanced_accuracy": dx.get("balanced_accuracy"),
        "dx_recall": dx.get("recall", {}),
        "n_test": int(len(y)),
        "n_test_lesions": int(len(set(lesions))),
        "_scores": (y, p, lesions),
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None


def _f(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a"


def report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Print the per-run table and the paired differences; return everything as plain values."""
    print("\nseed  target  head    test ROC-AUC [95 % CI, by lesion]  bal.acc  dx bal.acc  train s  per-dx recall")
    for run in runs:
        low, high = run["roc_auc_95"] or (None, None)
        recall = " ".join(f"{k} {_f(v)}" for k, v in run["dx_recall"].items())
        print(
            f"{run['seed']:<5} {run['target']:<7} {run['head']:<7} {_f(run['roc_auc_rescored'])} [{_f(low)}, {_f(high)}]"
            f"{'':14s}{_f(run['balanced_accuracy']):<8} {_f(run['dx_balanced_accuracy']):<11} "
            f"{run['seconds']:<8.1f} {recall}"
        )
        if run["note"]:
            print(f"      note: {run['note']}")
    pairs, samples = [], []
    print("\npaired difference of test ROC-AUC, dx - binary (same test lesions; bootstrap over lesions)")
    for seed in sorted({run["seed"] for run in runs}):
        dx, binary = (next(r for r in runs if r["seed"] == seed and r["target"] == t) for t in TARGETS)
        y, p_dx, lesions = dx["_scores"]
        _, p_binary, _ = binary["_scores"]
        difference = (dx["roc_auc_rescored"] or np.nan) - (binary["roc_auc_rescored"] or np.nan)
        interval = roc_auc_difference_interval(y, p_dx, p_binary, lesions)
        samples.append((y, p_dx, p_binary, lesions))
        low, high = interval or (None, None)
        pairs.append({"seed": seed, "difference": float(difference), "difference_95": interval})
        print(f"  seed {seed}: {difference:+.3f} [{_f(low)}, {_f(high)}] on {dx['n_test_lesions']} test lesions")
    mean_interval = mean_roc_auc_difference_interval(samples)
    mean_low, mean_high = mean_interval or (None, None)
    means = {
        target: float(np.mean([r["roc_auc_rescored"] or np.nan for r in runs if r["target"] == target]))
        for target in TARGETS
    }
    print(
        f"\nmean test ROC-AUC over {len(pairs)} seed(s): dx {means['dx']:.3f}, binary {means['binary']:.3f}; "
        f"mean difference {np.mean([p['difference'] for p in pairs]):+.3f} "
        f"[{_f(mean_low)}, {_f(mean_high)}] "
        "(95 %, test lesions resampled within each seed)"
    )
    return {
        "runs": [{k: v for k, v in r.items() if k != "_scores"} for r in runs],
        "pairs": pairs,
        "means": means,
        "mean_difference_95": mean_interval,
    }


def main(argv: list[str] | None = None) -> int:
    args, overrides = get_args_parser().parse_known_args(argv)
    bad = [item for item in overrides if not item.startswith("--") or "=" not in item]
    if bad:
        print(f"error: training options are --key=value; got {' '.join(bad)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dx-vs-binary-") as scratch:
        root = Path(args.out) if args.out else Path(scratch)
        started = time.perf_counter()
        runs = [one_run(root, seed, target, args.recipe, overrides) for seed in args.seeds for target in TARGETS]
        result = report(runs)
        print(f"total wall time {time.perf_counter() - started:.1f} s")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
