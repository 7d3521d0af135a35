"""``python -m lesion.predict``: classify image files with a checkpoint and write one CSV row each.

    python -m lesion.predict --checkpoint runs/demo/model.pt --out results.csv [--heatmaps DIR] [--report DIR] PATH...
    torchrun --nproc_per_node=4 -m lesion.predict --device cuda --checkpoint ... --out results.csv PATH...
    lesion-predict ...                            # the same, once the package is installed

Exit status, as for ``python -m train`` and ``python -m train.evaluate``: 0 done, 1 failed (the
checkpoint cannot be used, or no input could be read), 2 usage (the command line itself is wrong).
The command lives here, beside the other command lines; ``python -m lesion.predict`` (the
documented spelling) and ``python -m train.predict`` run the same :func:`main`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lesion import explain, ood
from lesion.distributed import DistInfo, all_gather_objects, barrier, batch_aligned_shard, cleanup, init_distributed
from lesion.errors import InvalidImage, LesionError
from lesion.images import IMAGE_EXTENSIONS, load_image
from lesion.labels import DX_CODES
from lesion.predict import Prediction, Predictor
from lesion.report import CasePictures, ModelFacts, report_for_file

#: The CSV's columns before the per-detector ones, in order (a contract: columns are added, never renamed).
RESULT_COLUMNS = (
    "path",
    "verdict",
    "p_malignant",
    "decision_threshold",
    "ood_method",
    "ood_score",
    "ood_threshold",
    "accepted",
    "cam_method",
    "image_width",
    "image_height",
    "error",
)
#: One column per diagnosis of the label map, whatever the model: empty where it has no such output.
DX_COLUMNS = ("dx_top", *(f"p_{dx}" for dx in DX_CODES))
#: The explanations: the similar-case vote and the 6 nearest ids, the conformal set, the report's file.
#: Empty for a rejected photo (and for a model that stores no index or calibration).
EXPLANATION_COLUMNS = ("similar_malignant", "similar_ids", "dx_set", "report")
#: Added later, so at the end: the network's own P(malignant), which p_malignant blends with the
#: similar cases' vote when the model weighs it in (equal to p_malignant otherwise).
LATER_COLUMNS = ("p_network",)


def csv_columns(detector_names: Sequence[str]) -> list[str]:
    """Every column of the CSV: the results, one ``ood_<detector>`` per fitted detector, the heatmap, the
    diagnoses, the explanations."""
    return [*RESULT_COLUMNS, *(f"ood_{name}" for name in detector_names), "heatmap", *DX_COLUMNS, *EXPLANATION_COLUMNS, *LATER_COLUMNS]


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, and image files under folders (recursive, sorted)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            found.append(path)  # a missing file gets its error in its row
    return found


def get_args_parser() -> argparse.ArgumentParser:
    """The CLI's arguments (a function, so other launchers can extend them)."""
    parser = argparse.ArgumentParser(
        prog="python -m lesion.predict", description="Classify images with a lesion checkpoint; write one CSV row each."
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders (searched recursively)")
    parser.add_argument("--checkpoint", required=True, help="a model.pt written by training")
    parser.add_argument("--out", required=True, help="CSV file to write")
    parser.add_argument(
        "--heatmaps",
        default=None,
        help="folder for <stem>-<hash>_heatmap.png overlays (the hash tells same-named inputs apart; "
        "the CSV's heatmap column names each file)",
    )
    parser.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="folder for a one-page PDF report per input, <stem>-<hash>_report.pdf (named like the heatmaps)",
    )
    parser.add_argument(
        "--coverage",
        type=float,
        default=None,
        help="confidence of the diagnosis sets (dx_set), between 0 and 1 (default: the model's, 0.9)",
    )
    parser.add_argument("--ood-method", default=None, choices=sorted(ood.DETECTORS), help="default: the checkpoint's")
    parser.add_argument("--cam-method", default="gradcam", choices=explain.CAM_METHODS)
    parser.add_argument(
        "--cam-target",
        default=None,
        help="what heatmaps explain: malignant, benign or a dx code (default: the verdict)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return parser


def output_name(path: str | Path, suffix: str = "_heatmap.png") -> str:
    """``<stem>-<8 hex><suffix>``: the hex comes from the input's absolute path, so two ``photo.jpg``
    in different folders never overwrite each other, and the same input always gets the same name."""
    digest = hashlib.sha256(str(Path(path).resolve()).encode("utf-8")).hexdigest()[:8]
    return f"{Path(path).stem}-{digest}{suffix}"


def heatmap_name(path: str | Path) -> str:
    """``<stem>-<8 hex>_heatmap.png`` (:func:`output_name`)."""
    return output_name(path, "_heatmap.png")


def report_name(path: str | Path) -> str:
    """``<stem>-<8 hex>_report.pdf``, beside the heatmap of the same input."""
    return output_name(path, "_report.pdf")


def result_row(path: Path, result: Prediction | InvalidImage, detector_names: list[str]) -> dict[str, Any]:
    """One CSV row: an unreadable image fills ``path`` and ``error`` only, a rejected one gets no diagnosis."""
    row: dict[str, Any] = {"path": str(path)}
    if isinstance(result, InvalidImage):
        row["error"] = str(result)
        return row
    row.update(
        verdict=result.verdict,
        p_malignant=f"{result.p_malignant:.6f}",
        p_network=f"{result.p_network:.6f}",
        decision_threshold=f"{result.decision_threshold:.6f}",
        ood_method=result.ood_method,
        ood_score=f"{result.ood_score:.6f}",
        ood_threshold=f"{result.ood_threshold:.6f}",
        accepted=result.accepted,
        cam_method=result.cam_method if result.heatmap is not None else "",
        image_width=result.image_width,
        image_height=result.image_height,
        error="",
    )
    for name in detector_names:
        row[f"ood_{name}"] = f"{result.ood_scores[name]:.6f}"
    if result.accepted:  # a rejected photo gets no diagnosis, no similar cases and no set
        row["dx_top"] = result.dx_top
        row.update({f"p_{dx}": f"{p:.6f}" for dx, p in result.dx_probabilities.items() if dx in DX_CODES})
        if result.similar:
            row["similar_malignant"] = f"{result.similar_malignant:.6f}"
            row["similar_ids"] = ";".join(case["image_id"] for case in result.similar)
        row["dx_set"] = ";".join(result.dx_set)
    return row


@dataclass
class _Outputs:
    """Where the files beside the CSV go (None: not asked for), and what a report needs about the model."""

    heatmaps: Path | None = None
    reports: Path | None = None
    model: ModelFacts | None = None
    pictures: CasePictures | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, predictor: Predictor) -> _Outputs:
        outputs = cls(Path(args.heatmaps) if args.heatmaps else None, Path(args.report) if args.report else None)
        for folder in (outputs.heatmaps, outputs.reports):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        if outputs.reports is not None:
            outputs.model = ModelFacts.from_checkpoint(predictor.checkpoint, Path(args.checkpoint).stem)
            outputs.pictures = CasePictures(predictor.checkpoint)
        return outputs

    def write(self, path: Path, result: Prediction, row: dict[str, Any]) -> None:
        """The heatmap overlay and the report of one image, named in its row."""
        if self.heatmaps is not None and result.heatmap is not None:
            target = self.heatmaps / heatmap_name(path)
            explain.overlay(load_image(path), result.heatmap).save(target)
            row["heatmap"] = str(target)
        if self.reports is not None and self.model is not None:
            target = report_for_file(result, path, self.model, self.pictures, self.reports / report_name(path))
            row["report"] = str(target)


def _score(
    predictor: Predictor, images: Sequence[Path], args: argparse.Namespace, outputs: _Outputs, bar: Any
) -> Iterator[tuple[dict[str, Any], bool]]:
    """(CSV row, whether the image was read) per image, in order, scored ``--batch-size`` at a time."""
    names = list(predictor.detectors)
    with_heatmap = outputs.heatmaps is not None or outputs.reports is not None
    # Several batches per call keep predict_batch's decode-ahead busy; few enough that rows stream
    # out and image-sized heatmaps do not pile up in memory. A whole number of batches, so the
    # batches stay those of a single run (a torchrun shard starts on a batch boundary too).
    group = args.batch_size * (2 if with_heatmap else 16)
    for start in range(0, len(images), group):
        chunk = images[start : start + group]
        results = predictor.predict_batch(
            chunk,
            batch_size=args.batch_size,
            with_heatmap=with_heatmap,
            cam_method=args.cam_method,
            cam_target=args.cam_target,
            coverage=args.coverage,
        )
        for path, result in zip(chunk, results, strict=True):
            row = result_row(path, result, names)
            if isinstance(result, Prediction):
                outputs.write(path, result, row)
            bar.update(1)
            yield row, isinstance(result, Prediction)


@contextlib.contextmanager
def _csv_writer(out: Path, columns: list[str]) -> Iterator[csv.DictWriter]:
    """A DictWriter on ``out`` (its folder made), the header written; missing columns stay empty."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        yield writer


def _device_for(name: str, info: DistInfo) -> str:
    """Under torchrun, a bare ``cuda`` means this process's own GPU (LOCAL_RANK)."""
    return f"cuda:{info.local_rank}" if name == "cuda" and info.enabled else name


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 done, 1 failed, 2 usage: see the module's docstring).

    Under ``torchrun --nproc_per_node=N`` each process scores a contiguous run of whole batches of the
    sorted input list (:func:`lesion.distributed.batch_aligned_shard`: each image in the same batch as
    in a single run, so with the same float arithmetic) and rank 0 writes the one CSV, rows in the
    same order as a single run.
    """
    args = get_args_parser().parse_args(argv)
    info = init_distributed("cuda" if args.device.startswith("cuda") else "cpu")
    try:
        return _main(args, info)
    finally:
        cleanup(info)


def _main(args: argparse.Namespace, info: DistInfo) -> int:
    if args.batch_size < 1:
        if info.is_main:
            print(f"error: --batch-size must be at least 1, not {args.batch_size}", file=sys.stderr)
        return 2
    if args.coverage is not None and not 0 < args.coverage < 1:
        if info.is_main:
            print(f"error: --coverage must be between 0 and 1 (e.g. 0.9), not {args.coverage}", file=sys.stderr)
        return 2
    images = find_images(args.paths)
    if not images:
        if info.is_main:
            print("error: no input images (give image files or folders containing .jpg, .png, ...)", file=sys.stderr)
        return 2
    try:
        return _predict_files(args, images, info)
    except (LesionError, ValueError, OSError) as error:
        # Every rank loads the same checkpoint, so such errors usually repeat on each: say it once,
        # unless it is this process's own (a rank other than 0 names itself).
        prefix = f"rank {info.rank}: " if info.enabled and not info.is_main else ""
        if info.is_main or not isinstance(error, (LesionError, ValueError)):
            print(f"error: {prefix}{error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if info.is_main:
            print("error: interrupted", file=sys.stderr)
        return 1


def _predict_files(args: argparse.Namespace, images: list[Path], info: DistInfo) -> int:
    from tqdm import tqdm

    predictor = Predictor.from_checkpoint(
        args.checkpoint, device=_device_for(args.device, info), ood_method=args.ood_method
    )
    predictor.check_cam_target(args.cam_target)
    outputs = _Outputs.from_args(args, predictor)
    columns = csv_columns(list(predictor.detectors))
    out = Path(args.out)
    bounds = batch_aligned_shard(len(images), args.batch_size, info)
    shard = images[bounds.start : bounds.stop]
    with tqdm(total=len(shard), unit="img", file=sys.stderr, disable=not info.is_main) as bar:
        if not info.enabled:
            # One process: rows are written as they come, so a long run leaves a partial CSV behind.
            processed = 0
            with _csv_writer(out, columns) as writer:
                for row, ok in _score(predictor, images, args, outputs, bar):
                    writer.writerow(row)
                    processed += ok
        else:
            scored = list(_score(predictor, shard, args, outputs, bar))
            shards = all_gather_objects(scored, info)
            processed = sum(ok for part in shards for _, ok in part)
            if info.is_main:
                # Contiguous shards in rank order: concatenated, they are the inputs in order.
                rows = [row for part in shards for row, _ in part]
                with _csv_writer(out, columns) as writer:
                    writer.writerows(rows)
            barrier(info)
    if not processed:
        if info.is_main:
            print(f"error: none of the {len(images)} input(s) could be read as an image; see {out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
