"""Reading a dataset folder: its metadata CSV (two layouts) and the images it names.

Two layouts are read, told apart by the metadata CSV's columns:

* HAM10000: ``HAM10000_metadata.csv`` (or ``metadata.csv``) with ``lesion_id, image_id, dx, ...``;
  images ``<image_id>.jpg`` anywhere under the folder (HAM ships them in two ``part`` folders).
* ISIC archive export: ``metadata.csv`` with ``isic_id, lesion_id`` and either ``diagnosis_1..N``
  (newer exports) or ``benign_malignant`` + ``diagnosis`` (older ones); images ``<isic_id>.jpg``.

Bad data is never dropped silently: a missing image, an unknown diagnosis or a duplicate id
stops with a :class:`DataError` that names the first offenders, unless ``skip_bad`` asks to
leave them out, and then they are listed in the summary.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lesion.errors import DataError
from lesion.files import PROJECT_ROOT
from lesion.labels import CLASS_NAMES, DX_TO_LABEL, ISIC_NAME_TO_DX, label_index

METADATA_NAMES = ("HAM10000_metadata.csv", "metadata.csv")
DEMO_DATA = "assets/demo"  # the bundled demo set, relative to the repository checkout
#: The image files a dataset folder may hold (the predictor reads more: lesion.images.IMAGE_EXTENSIONS).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
HAM_COLUMNS = ("lesion_id", "image_id", "dx")
FIRST_IDS = 5  # how many offending ids an error message names


def metadata_file(data_dir: str | Path) -> Path | None:
    """The metadata CSV inside ``data_dir`` (top level first, then one level down), or None.

    The one search both ``python -m train`` and the app's dataset list use, so they agree.
    """
    root = Path(data_dir)
    if not root.is_dir():
        return None
    for name in METADATA_NAMES:
        if (root / name).is_file():
            return root / name
    for name in METADATA_NAMES:
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            if (sub / name).is_file():
                return sub / name
    return None


def find_metadata(data_dir: str | Path) -> Path:
    """The metadata CSV inside ``data_dir`` (top level first, then one level down); DataError if none."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    found = metadata_file(root)
    if found is not None:
        return found
    raise DataError(
        f"no metadata CSV in {root}: looked for {' or '.join(METADATA_NAMES)} in the folder and one level down "
        "(HAM10000 ships HAM10000_metadata.csv; an ISIC archive export ships metadata.csv)"
    )


def _resolve_metadata(data_dir: Path, metadata: str | Path | None) -> Path:
    if metadata is None or str(metadata) == "":
        return find_metadata(data_dir)
    path = Path(metadata)
    if not path.is_file() and not path.is_absolute() and (data_dir / path).is_file():
        path = data_dir / path
    if not path.is_file():
        raise DataError(f"metadata file not found: {metadata} (also looked inside {data_dir})")
    return path


def index_images(data_dir: str | Path) -> dict[str, Path]:
    """Map each image stem to its path, walking ``data_dir`` once (hidden folders skipped).

    When a stem occurs twice the first in sorted walk order wins, so the choice is stable.
    """
    found: dict[str, Path] = {}
    for folder, dirs, files in os.walk(data_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES and stem not in found:
                found[stem] = Path(folder, name)
    return found


def read_csv(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not a readable CSV file ({error})") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    return frame.apply(lambda column: column.str.strip())


def require_columns(frame: pd.DataFrame, path: Path, needed: Iterable[str], layout: str) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path} is missing column(s) {', '.join(missing)} expected in the {layout} layout "
            f"(it has: {', '.join(frame.columns)})"
        )


def _diagnosis_columns(frame: pd.DataFrame) -> list[str]:
    """ISIC diagnosis columns, most specific first: diagnosis_N .. diagnosis_1, then diagnosis."""
    numbered = [c for c in frame.columns if c.startswith("diagnosis_") and c[10:].isdigit()]
    ordered = sorted(numbered, key=lambda c: int(c[10:]), reverse=True)
    return ordered + (["diagnosis"] if "diagnosis" in frame.columns else [])


def _isic_dx(frame: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series]:
    """(dx, label name, diagnosis as written) per ISIC row; dx "" and label NaN when nothing maps.

    The most specific diagnosis column that maps wins; a row whose diagnosis we do not know but
    whose diagnosis_1 / benign_malignant says Benign or Malignant keeps that label with dx "other".
    """
    dx = pd.Series("", index=frame.index, dtype=object)
    written = pd.Series("", index=frame.index, dtype=object)
    for column in _diagnosis_columns(frame):
        values = frame[column]
        dx = dx.where(dx != "", values.str.lower().map(ISIC_NAME_TO_DX).fillna(""))
        written = written.where(written != "", values)
    label = dx.map(DX_TO_LABEL)
    for column in ("diagnosis_1", "benign_malignant"):
        if column in frame.columns:
            coarse = frame[column].str.lower()
            other = label.isna() & coarse.isin(CLASS_NAMES)
            dx = dx.where(~other, "other")
            label = label.where(~other, coarse)
    return dx, label, written


def _read_ham(frame: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, int]:
    require_columns(frame, path, HAM_COLUMNS, "HAM10000 (lesion_id, image_id, dx)")
    out = frame[["image_id", "lesion_id", "dx"]].copy()
    out["written"] = out["dx"]
    out["dx"] = out["dx"].str.lower()
    out["label_name"] = out["dx"].map(DX_TO_LABEL)
    return out, 0


def _read_isic(frame: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, int]:
    layout = "ISIC archive (isic_id, lesion_id, diagnosis_1..3 or benign_malignant + diagnosis)"
    require_columns(frame, path, ("isic_id", "lesion_id"), layout)
    if "diagnosis_1" not in frame.columns and "benign_malignant" not in frame.columns:
        require_columns(frame, path, ("diagnosis_1",), layout)
    # Newer exports say Indeterminate in diagnosis_1; older ones in benign_malignant.
    status = frame["diagnosis_1"] if "diagnosis_1" in frame.columns else frame["benign_malignant"]
    indeterminate = status.str.lower() == "indeterminate"
    kept = frame[~indeterminate]
    dx, label, written = _isic_dx(kept)
    out = pd.DataFrame(
        {"image_id": kept["isic_id"], "lesion_id": kept["lesion_id"], "dx": dx, "label_name": label, "written": written}
    )
    return out, int(indeterminate.sum())


def first_ids(ids: Sequence[str]) -> str:
    shown = ", ".join(str(i) for i in list(ids)[:FIRST_IDS])
    return shown + (", ..." if len(ids) > FIRST_IDS else "")


def read_metadata(
    data_dir: str | Path, metadata: str | Path | None = None, skip_bad: bool = False
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a HAM10000 or ISIC archive dataset folder.

    Returns a frame with ``image_id, lesion_id, dx, label`` (0 benign, 1 malignant) and ``path``
    (absolute), and a JSON-ready summary (layout, sizes, counts, what was dropped and why).
    Raises :class:`DataError` for a missing or malformed CSV, duplicate ids, and, unless
    ``skip_bad``, for missing images or diagnoses we cannot map to benign / malignant.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    csv_path = _resolve_metadata(root, metadata)
    frame = read_csv(csv_path)
    layout = "isic" if "isic_id" in frame.columns else "ham10000"
    reader = _read_isic if layout == "isic" else _read_ham
    table, dropped_indeterminate = reader(frame, csv_path)

    duplicated = table.loc[table["image_id"].duplicated(), "image_id"].unique().tolist()
    if duplicated:
        raise DataError(f"{csv_path} lists {len(duplicated)} image id(s) more than once: {first_ids(duplicated)}")
    # Without a lesion id an image can only be its own lesion.
    table["lesion_id"] = table["lesion_id"].where(table["lesion_id"] != "", table["image_id"])

    skip_hint = "; pass --skip-bad-images=true to leave them out"
    unknown = table.loc[table["label_name"].isna(), "image_id"].tolist()
    if unknown and not skip_bad:
        shown = table.loc[table["label_name"].isna(), "written"].unique().tolist()
        raise DataError(
            f"{len(unknown)} image(s) in {csv_path} have a diagnosis we cannot map to benign or malignant "
            f"(diagnoses: {first_ids(shown) or 'empty'}; images: {first_ids(unknown)}){skip_hint}"
        )
    table = table[table["label_name"].notna()]

    index = index_images(root)
    table = table.assign(path=[str(index[i].resolve()) if i in index else "" for i in table["image_id"]])
    missing = table.loc[table["path"] == "", "image_id"].tolist()
    if missing and not skip_bad:
        raise DataError(
            f"{len(missing)} of {len(table)} image(s) listed in {csv_path.name} were not found under {root} "
            f"(looked for <id>{'/'.join(IMAGE_SUFFIXES)}): {first_ids(missing)}{skip_hint}"
        )
    table = table[table["path"] != ""]
    if table.empty:
        raise DataError(f"no usable images in {root} (metadata {csv_path})")

    table = table.assign(label=[label_index(name) for name in table["label_name"]])
    table = table[["image_id", "lesion_id", "dx", "label", "path"]].reset_index(drop=True)
    summary = {
        "layout": layout,
        "metadata": str(csv_path.resolve()),
        "n_images": int(len(table)),
        "n_lesions": int(table["lesion_id"].nunique()),
        "counts": {name: int((table["label"] == i).sum()) for i, name in enumerate(CLASS_NAMES)},
        "dx_counts": {str(k): int(v) for k, v in sorted(table["dx"].value_counts().items())},
        "dropped_indeterminate": dropped_indeterminate,
        "skipped": {"missing": missing, "unknown_dx": unknown, "unreadable": []},
    }
    return table, summary


def locate_data(path: str) -> str:
    """A relative data path is looked up from the working folder, then from the repository (assets/demo).

    A folder found in neither raises DataError saying to pass --data; the bundled demo set ships
    with the repository checkout, not with an installed package, and the message says so.
    """
    candidate = Path(path).expanduser()
    if not candidate.exists() and not candidate.is_absolute() and (PROJECT_ROOT / candidate).exists():
        return str(PROJECT_ROOT / candidate)
    if not candidate.exists():
        if path == DEMO_DATA:
            raise DataError(
                f"the bundled demo set ({path}) is not here: it ships with the repository checkout, not with "
                "the installed package. Pass --data DIR with a HAM10000 or ISIC archive folder "
                "(or the checkout's assets/demo)."
            )
        raise DataError(f"dataset folder not found: {path}. Pass --data DIR with a HAM10000 or ISIC archive folder.")
    return str(candidate)
