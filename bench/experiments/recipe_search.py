"""Search training recipes for the bundled model: several real training runs in parallel on one machine.

Each variant is the ``bundled`` recipe (or another, ``--base``) plus a few ``--key=value`` overrides,
trained by the real entry point (``python -m train``) in its own subprocess and run folder. Several
run at once (one GPU is far from busy with a ResNet-18 at 160 px). The choice uses the VALIDATION
split only: stage 1 trains every variant with the --seeds (default 0); stage 2 trains the best few
again with one more seed (a new seed also draws a new lesion split, so it tests the recipe, not one
split) plus one variant combining every single change that beat the base, and the winner is the
best mean validation ROC-AUC over its seeds (variants with several seeds rank first). Test figures are printed for the record, never used to choose.

    # on one H100 with 16 cores, about 5 minutes (17 runs, measured 299 s):
    python -m bench.experiments.recipe_search --parallel 8 --num-workers 1 --threads 2 --budget-s 300 --device cuda
    # confirm the leaders on more seeds (2 minutes):
    python -m bench.experiments.recipe_search --variants base,mixup,tta --seeds 0,1,2,3 --top 0 --parallel 12 \
        --num-workers 1 --threads 1 --budget-s 240 --device cuda
    # the pretrained candidates of issue 19, five seeds each, paired by split (one H200 or H100; not yet run):
    python -m bench.experiments.recipe_search --variants base,tta,size288,lite1_240,lite1_240_tta,lite2_260,ep24,freeze0 \
        --seeds 0,1,2,3,4 --top 0 --parallel 12 --num-workers 1 --threads 1 --budget-s 480 --device cuda
    # a smoke test on a CPU (two variants, 1 epoch, 64 px):
    python -m bench.experiments.recipe_search --tiny --variants demo,base --parallel 2 --num-workers 0

Prints a table (val ROC-AUC, test ROC-AUC with its 95 % interval, test sensitivity and specificity at
the threshold chosen on validation, wall time) and the winner's overrides; writes results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO
from lesion.files import METRICS_FILE

# Stage-1 variants: name -> overrides on the base recipe, in priority order (the budget may cut the tail).
VARIANTS: dict[str, dict[str, Any]] = {
    "demo": {"recipe": "demo"},  # the in-app recipe, as the baseline
    "base": {},
    "size160": {"image_size": 160},
    "size192": {"image_size": 192},
    "ep40": {"epochs": 40},
    "ep90": {"epochs": 90},
    "ema": {"ema_decay": 0.99},
    "tta": {"tta": True},
    "mixup": {"mixup_alpha": 0.2},
    "cutmix": {"cutmix_alpha": 1.0, "mix_prob": 0.5},
    "ls": {"label_smoothing": 0.1},
    "aug_strong": {"augment": "strong"},
    "aug_notebook": {"augment": "notebook"},
    "lr3e-3": {"lr": 3e-3},
    "first_guess": {  # the recipe guessed on a CPU before the first search on a GPU
        "image_size": 160,
        "epochs": 40,
        "label_smoothing": 0.1,
        "ema_decay": 0.99,
        "tta": True,
        "mixup_alpha": 0.0,
    },
    # The pretrained candidates of issue 19 (docs/experiments.md, four CPU seeds each): the larger
    # EfficientNet-Lites at their native sizes, test-time flips, a longer schedule, nothing frozen.
    "size288": {"image_size": 288},
    "lite1_240": {"arch": "efficientnet_lite1", "image_size": 240},
    "lite1_240_tta": {"arch": "efficientnet_lite1", "image_size": 240, "tta": True},
    "lite2_260": {"arch": "efficientnet_lite2", "image_size": 260},
    "ep24": {"epochs": 24},
    "freeze0": {"freeze_stages": 0},
}
# Run only when named in --variants: the default set fits about 5 minutes on one H100.
OPTIONAL = (
    "aug_notebook",
    "lr3e-3",
    "first_guess",
    "size288",
    "lite1_240",
    "lite1_240_tta",
    "lite2_260",
    "ep24",
    "freeze0",
)
TINY = {"image_size": 64, "epochs": 1, "max_images": 120, "batch_size": 16}


@dataclass
class Run:
    """One training run of one variant with one seed, and what it measured."""

    variant: str
    seed: int
    overrides: dict[str, Any]
    folder: str = ""
    status: str = "pending"  # pending, ok, failed, skipped (over budget)
    wall_s: float = 0.0
    val_auc: float | None = None
    test_auc: float | None = None
    test_ci: tuple[float, float] | None = None
    test_sensitivity: float | None = None
    test_specificity: float | None = None
    best_epoch: int | None = None
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def command_for(run: Run, args: argparse.Namespace, cache: Path) -> list[str]:
    """The real CLI: ``python -m train --recipe=... --key=value ...``."""
    overrides = dict(run.overrides)
    recipe = overrides.pop("recipe", args.base)
    if args.tiny:
        overrides = {**overrides, **TINY}
    options = {
        **overrides,
        "seed": run.seed,
        "num_workers": args.num_workers,
        "device": args.device,
        "cache_dir": str(cache),
        "out": run.folder,
        "data": args.data,
    }
    return [sys.executable, "-m", "train", f"--recipe={recipe}", *(f"--{k}={v}" for k, v in options.items())]


def read_result(run: Run) -> None:
    """Fill the run's figures from its metrics.json."""
    from lesion.metrics import hanley_mcneil_interval

    report = json.loads((Path(run.folder) / METRICS_FILE).read_text())
    val, test = report["val"], report["test"]
    run.val_auc, run.test_auc = val["roc_auc"], test["roc_auc"]
    if run.test_auc is not None:
        run.test_ci = hanley_mcneil_interval(run.test_auc, test["n_malignant"], test["n"] - test["n_malignant"])
    run.test_sensitivity, run.test_specificity = test["sensitivity"], test["specificity"]
    run.best_epoch = report.get("best_epoch")


def execute(run: Run, args: argparse.Namespace, cache: Path, started: float, durations: list[float]) -> Run:
    """Train one run unless the budget would be overrun; never raises."""
    estimate = statistics.median(durations) if durations else 0.0
    if args.budget_s and time.perf_counter() - started + estimate > args.budget_s:
        run.status = "skipped"
        return run
    command = command_for(run, args, cache)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
    log = Path(run.folder).with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    with log.open("w") as stream:
        stream.write(shlex.join(command) + "\n")
        stream.flush()
        try:
            code = subprocess.run(
                command, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT, timeout=args.run_timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    run.wall_s = time.perf_counter() - begin
    if code != 0:
        run.status, run.message = "failed", f"exit {code}; see {log}"
        return run
    durations.append(run.wall_s)
    try:
        read_result(run)
        run.status = "ok"
    except (OSError, KeyError, ValueError) as error:
        run.status, run.message = "failed", f"no metrics: {error}"
    return run


def run_all(runs: list[Run], args: argparse.Namespace, cache: Path, started: float, durations: list[float]) -> None:
    with ThreadPoolExecutor(args.parallel) as pool:
        for run in pool.map(lambda r: execute(r, args, cache, started, durations), runs):
            shown = f"val {run.val_auc:.4f} test {run.test_auc:.4f}" if run.status == "ok" else run.message
            print(f"  [{time.perf_counter() - started:6.0f} s] {run.variant} seed {run.seed}: {run.status} {shown}")


def warm_cache(args: argparse.Namespace, cache: Path, sizes: set[int]) -> None:
    """Decode the data once per image size before the runs start, so they do not all decode at once."""
    from lesion import data as lesion_data
    from lesion.data import locate_data
    from lesion.transforms import resize_size

    df, _ = lesion_data.read_metadata(locate_data(args.data))
    for size in sorted(sizes):
        lesion_data.ImageCache(cache, resize_size(size)).warm(df["path"].tolist(), workers=os.cpu_count() or 1)


def mean_val(runs: list[Run]) -> float:
    values = [r.val_auc for r in runs if r.status == "ok" and r.val_auc is not None]
    return statistics.fmean(values) if values else -1.0


def combined_variant(by_variant: dict[str, list[Run]]) -> dict[str, Any] | None:
    """The base plus every single change that beat it on validation (None if fewer than two did)."""
    base = mean_val(by_variant.get("base", []))
    winners = [
        name
        for name, runs in by_variant.items()
        if name not in ("base", "demo") and mean_val(runs) > base and "recipe" not in VARIANTS.get(name, {})
    ]
    merged: dict[str, Any] = {}
    for name in sorted(winners, key=lambda n: -mean_val(by_variant[n])):
        for key, value in VARIANTS[name].items():
            merged.setdefault(key, value)  # the better variant wins a clash (e.g. two image sizes)
    return merged if len(winners) >= 2 else None


def table(by_variant: dict[str, list[Run]], overrides: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant, best mean validation ROC-AUC first."""
    rows = []
    for name, runs in by_variant.items():
        done = [r for r in runs if r.status == "ok"]
        if not done:
            continue
        first = min(done, key=lambda r: r.seed)
        rows.append(
            {
                "variant": name,
                "seeds": [r.seed for r in done],
                "val_auc_mean": mean_val(done),
                "val_auc_per_seed": [r.val_auc for r in done],
                "test_auc_seed": first.seed,
                "test_auc": first.test_auc,
                "test_ci": first.test_ci,
                "test_auc_mean": statistics.fmean(
                    [r.test_auc for r in done if r.test_auc is not None] or [float("nan")]
                ),
                "sensitivity": first.test_sensitivity,
                "specificity": first.test_specificity,
                "best_epoch": first.best_epoch,
                "wall_s": statistics.fmean(r.wall_s for r in done),
                "overrides": overrides[name],
            }
        )
    return sorted(rows, key=lambda row: (len(row["seeds"]) > 1, row["val_auc_mean"]), reverse=True)


def print_table(rows: list[dict[str, Any]]) -> None:
    def number(value: float | None) -> str:
        return f"{value:.3f}" if isinstance(value, float) else "  n/a"

    print(
        f"\n{'variant':14s} {'seeds':>5s} {'val AUC':>8s} {'per seed':>14s} {'test AUC (1st seed) [95% CI]':>28s} "
        f"{'test mean':>9s} {'sens':>5s} {'spec':>5s} {'best ep':>7s} {'wall s':>6s}"
    )
    for row in rows:
        interval = f"[{row['test_ci'][0]:.3f}, {row['test_ci'][1]:.3f}]" if row["test_ci"] else ""
        per_seed = ",".join(f"{v:.3f}" for v in row["val_auc_per_seed"] if v is not None)
        print(
            f"{row['variant']:14s} {len(row['seeds']):5d} {number(row['val_auc_mean']):>8s} {per_seed:>14s} "
            f"{number(row['test_auc']):>9s} {interval:>18s} {number(row['test_auc_mean']):>9s} "
            f"{number(row['sensitivity']):>5s} {number(row['specificity']):>5s} {row['best_epoch'] or 0:7d} "
            f"{row['wall_s']:6.0f}"
        )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="assets/demo", help="dataset folder")
    parser.add_argument("--base", default="bundled", help="recipe the variants change")
    parser.add_argument("--out", default="runs/recipe-search", help="folder for the run folders and results.json")
    parser.add_argument(
        "--variants",
        default="",
        help="comma-separated variants (default: all but " + ", ".join(OPTIONAL) + "); known: " + ", ".join(VARIANTS),
    )
    parser.add_argument("--parallel", type=int, default=4, help="training processes at once")
    parser.add_argument("--num-workers", type=int, default=3, help="loader workers per training process")
    parser.add_argument("--threads", type=int, default=0, help="OMP threads per process (0 = cores / parallel)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds of stage 1 (each also draws its split)")
    parser.add_argument("--top", type=int, default=3, help="variants trained again with more seeds (0 = no stage 2)")
    parser.add_argument("--extra-seeds", type=int, default=1, help="seeds added for the top variants")
    parser.add_argument("--budget-s", type=float, default=300, help="no run starts that would end past this; 0 = none")
    parser.add_argument("--run-timeout-s", type=float, default=900, help="a run taking longer is killed")
    parser.add_argument("--tiny", action="store_true", help="smoke test: 64 px, 1 epoch, 120 images")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    chosen = [v for v in args.variants.split(",") if v] or [v for v in VARIANTS if v not in OPTIONAL]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    cache = out / "cache"
    started = time.perf_counter()
    overrides = {name: VARIANTS[name] for name in chosen}
    from lesion.config import build_config

    for changes in overrides.values():  # refuse a bad override before any run starts
        recipe = changes.get("recipe", args.base)
        build_config(recipe, {k: v for k, v in changes.items() if k != "recipe"})
    sizes = {TINY["image_size"]} if args.tiny else {int(build_config(args.base).image_size)}
    sizes |= {int(c["image_size"]) for c in overrides.values() if "image_size" in c and not args.tiny}
    sizes |= {int(build_config("demo").image_size)} if "demo" in chosen and not args.tiny else set()
    warm_cache(args, cache, sizes)
    print(f"cache warm for sizes {sorted(sizes)} after {time.perf_counter() - started:.0f} s")

    def make(name: str, seed: int) -> Run:
        return Run(name, seed, overrides[name], folder=str(out / f"{name}-s{seed}"))

    durations: list[float] = []
    seeds = [int(seed) for seed in args.seeds.split(",")]
    print(f"stage 1: {len(chosen)} variants, seeds {seeds}, {args.parallel} at once")
    stage1 = [make(name, seed) for seed in seeds for name in chosen]
    run_all(stage1, args, cache, started, durations)
    by_variant: dict[str, list[Run]] = {name: [r for r in stage1 if r.variant == name] for name in chosen}

    combo = combined_variant(by_variant) if args.top else None
    stage2: list[Run] = []
    if combo is not None:
        overrides["combined"] = combo
        by_variant["combined"] = []
        stage2 += [
            make("combined", seed) for seed in [*seeds, *range(max(seeds) + 1, max(seeds) + 1 + args.extra_seeds)]
        ]
    ranked = sorted((n for n in chosen if mean_val(by_variant[n]) >= 0), key=lambda n: -mean_val(by_variant[n]))
    for name in ranked[: args.top]:
        stage2 += [make(name, max(seeds) + i) for i in range(1, args.extra_seeds + 1)]
    if stage2:
        print(f"stage 2: {len(stage2)} runs (more seeds for {', '.join(ranked[: args.top])}; combined: {combo})")
        run_all(stage2, args, cache, started, durations)
        for run in stage2:
            by_variant[run.variant].append(run)

    rows = table(by_variant, overrides)
    print_table(rows)
    runs = [asdict(r) for runs in by_variant.values() for r in runs]
    (out / "results.json").write_text(json.dumps({"rows": rows, "runs": runs, "args": vars(args)}, indent=2) + "\n")
    if not rows:
        print("no run finished; see the logs in", out)
        return 1
    winner = rows[0]
    print(f"\nwinner (best mean validation ROC-AUC over {len(winner['seeds'])} seed(s)): {winner['variant']}")
    recipe = winner["overrides"].get("recipe", args.base)
    flags = " ".join(f"--{k}={v}" for k, v in winner["overrides"].items() if k != "recipe")
    print(f"  python -m train --recipe={recipe} {flags}".rstrip())
    print(f"total {time.perf_counter() - started:.0f} s; results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
