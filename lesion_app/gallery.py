"""The bundled samples the pages offer (lesions with their diagnosis, photos that are not lesions), and a run's folds."""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image

from lesion.files import PROJECT_ROOT, SPLIT_FILE
from lesion.labels import DX_NAMES

SAMPLES_DIR = PROJECT_ROOT / "assets" / "samples"
# Longest side of a gallery thumbnail, in pixels: twice the 72 px it is shown at, for sharp phone screens.
THUMBNAIL_SIDE = 144


@dataclass(frozen=True)
class Sample:
    """A bundled image the pages offer."""

    name: str  # file stem, e.g. ISIC_0000169 or car_image1
    path: Path
    kind: str  # "lesion" or "ood"
    caption: str  # what the gallery shows under the image
    label: str = ""  # benign / malignant for lesions, category for OOD photos


def list_samples(samples_dir: Path = SAMPLES_DIR) -> list[Sample]:
    """The bundled sample lesions (with diagnosis) and the non-lesion photos, in file order."""
    samples: list[Sample] = []
    labels = samples_dir / "lesions" / "labels.csv"
    if labels.is_file():
        with labels.open(newline="", encoding="utf-8") as stream:
            for row in csv.DictReader(stream):
                path = samples_dir / "lesions" / f"{row['image_id']}.jpg"
                if path.is_file():
                    dx = DX_NAMES.get(row["dx"], row["dx"])
                    samples.append(
                        Sample(
                            row["image_id"], path, "lesion", f"{row['image_id']}: {dx} ({row['label']})", row["label"]
                        )
                    )
    index = samples_dir / "ood" / "index.csv"
    if index.is_file():
        with index.open(newline="", encoding="utf-8") as stream:
            for row in csv.DictReader(stream):
                path = samples_dir / "ood" / row["file"]
                if path.is_file():
                    samples.append(
                        Sample(
                            path.stem,
                            path,
                            "ood",
                            f"{path.stem}: {row['category']} photo (not a lesion)",
                            row["category"],
                        )
                    )
    return samples


@lru_cache(maxsize=128)
def thumbnail(path: Path, side: int = THUMBNAIL_SIDE) -> bytes:
    """A small JPEG of a bundled sample, made once per server (every visitor's gallery sends these bytes).

    The file's modification time is not part of the key: bundled samples do not change while the app runs.
    """
    with Image.open(path) as image:
        small = image.convert("RGB")
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=80, optimize=True)
    return buffer.getvalue()


@lru_cache(maxsize=1)
def sample_digests() -> frozenset[str]:
    """sha256 of every bundled sample's bytes: what the Predict page may share between sessions."""
    return frozenset(hashlib.sha256(sample.path.read_bytes()).hexdigest() for sample in list_samples())


def training_folds(run_dir: Path | None) -> dict[str, str]:
    """image_id -> fold (train / val / test) from a run's split.csv; {} when there is none."""
    if run_dir is None or not (Path(run_dir) / SPLIT_FILE).is_file():
        return {}
    with (Path(run_dir) / SPLIT_FILE).open(newline="", encoding="utf-8") as stream:
        return {row["image_id"]: row.get("fold", "") for row in csv.DictReader(stream) if row.get("image_id")}
