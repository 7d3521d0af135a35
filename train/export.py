"""``python -m train.export``: turn a finished run into the app's bundled model file.

    python -m train.export --run runs/bundled --out assets/models/lesion-efficientnet-lite0-demo.pt

Halves the weights to float16, drops training-only state, records the split, re-measures every
figure on the CPU with the app's own predictor and the halved weights, and writes the checkpoint
with ``model_card.md`` and ``metrics.json`` beside it (see lesion.export).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lesion.errors import LesionError
from lesion.runs import BUNDLED_MODEL

# The ceiling for a file kept in git.
MAX_MB = 25


def get_args_parser() -> argparse.ArgumentParser:
    """The CLI's arguments (a function, so other launchers can extend them)."""
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a complete run folder (with model.pt and split.csv)")
    parser.add_argument(
        "--out", default=str(BUNDLED_MODEL), help=f"the file to write (default: {BUNDLED_MODEL.name} in assets/models)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Export; returns the exit status (0 ok, 2 unusable run)."""
    from lesion.export import describe, export_run

    args = get_args_parser().parse_args(argv)
    try:
        checkpoint = export_run(args.run, args.out)
    except LesionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    size_mb = out.stat().st_size / 1e6
    print(f"wrote {out} ({size_mb:.1f} MB), {out.parent / 'model_card.md'}, {out.parent / 'metrics.json'}")
    print(describe(checkpoint))
    test = checkpoint["metrics"]["test"]
    print(
        f"test (re-measured on CPU with float16 weights): ROC-AUC {test['roc_auc']:.4f}, sensitivity "
        f"{test['sensitivity']:.3f}, specificity {test['specificity']:.3f} at threshold {test['threshold']:.3f}"
    )
    if size_mb > MAX_MB:
        print(f"error: {out} is {size_mb:.1f} MB, over the {MAX_MB} MB a bundled model may take", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
