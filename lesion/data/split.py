"""Lesion-level splits: every image of a lesion on one side, stratified by label and diagnosis, seeded and saved.

The notebook split images at random, so images of one lesion sat on both sides; here the unit is the lesion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lesion.data.readers import read_csv, require_columns
from lesion.errors import DataError
from lesion.files import SPLIT_FILE, write_text_atomic
from lesion.labels import CLASS_NAMES, label_index

FOLDS = ("train", "val", "test")
SPLIT_COLUMNS = ("image_id", "lesion_id", "dx", "label", "fold")


def _lesions(df: pd.DataFrame) -> pd.DataFrame:
    """One row per lesion, sorted by id: its image count, label (malignant if any image is) and dx.

    A lesion's dx is its first image's (by image id); "" when the frame has no dx column.
    """
    grouped = df.groupby("lesion_id", sort=True)
    label = grouped["label"].max().astype(int)
    if "dx" in df.columns:
        dx = df.sort_values("image_id").groupby("lesion_id", sort=True)["dx"].first().astype(str)
    else:
        dx = pd.Series("", index=label.index)
    return pd.DataFrame({"n": grouped.size(), "label": label, "dx": dx})


def _interleaved(ids: np.ndarray, strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``ids`` shuffled so that every stretch of the order holds each stratum in its overall share.

    Each stratum is shuffled, and its j-th lesion (of n) gets the key (j + u) / n with one random
    offset u per stratum; sorting by the key deals the strata out evenly, so cutting the order into
    val, test and train gives each fold every diagnosis in about its share of the data.
    """
    keys = np.empty(len(ids))
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        members = rng.permutation(members)
        keys[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return ids[np.argsort(keys, kind="stable")]


def select_subset(df: pd.DataFrame, max_images: int, seed: int) -> pd.DataFrame:
    """At most ``max_images`` images, whole lesions, in the dataset's label proportions.

    Deterministic for a given seed and set of rows; both labels keep at least one lesion.
    """
    if max_images <= 0 or max_images >= len(df):
        return df.copy()
    lesions = _lesions(df)
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for label in sorted(lesions["label"].unique()):
        group = lesions[lesions["label"] == label]
        target = max(1, round(max_images * group["n"].sum() / len(df)))
        total = 0
        for lesion_id in rng.permutation(group.index.to_numpy()):
            size = int(group.at[lesion_id, "n"])
            if total + size <= target or total == 0:
                chosen.append(lesion_id)
                total += size
            if total >= target:
                break
    return df[df["lesion_id"].isin(set(chosen))].copy()


def _fold_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction))
    while n_val + n_test > n - 1:  # keep at least one lesion for training
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def split_by_lesion(df: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """Return a copy of ``df`` with a ``fold`` column: train, val or test.

    Lesions (not images) are shuffled with a seeded generator within each label and cut by
    the fractions, so no lesion has images on two sides and every fold holds both labels. Within a
    label the order interleaves the diagnoses (:func:`_interleaved`), so each fold holds each
    diagnosis in about its share: validation then looks like test, and what is fitted on it (the
    decision threshold, the temperature, the OOD thresholds) carries over. (A split by label only
    once gave validation 20 % and test 35 % of the demo set's nevi and melanomas, which come from
    other ISIC collections than the rest, and the OOD threshold fitted on validation rejected 9 %
    of test lesions instead of 5 %.)
    Lesion ids are sorted first, so the result does not depend on the order of the rows.
    """
    lesions = _lesions(df)
    per_label = {int(k): int(v) for k, v in lesions["label"].value_counts().items()}
    if any(per_label.get(i, 0) < len(FOLDS) for i in range(len(CLASS_NAMES))):
        have = ", ".join(f"{per_label.get(i, 0)} {name}" for i, name in enumerate(CLASS_NAMES))
        raise DataError(
            "the dataset is too small to split: train, val and test each need at least one benign and one "
            f"malignant image, so at least 3 benign and 3 malignant lesions (6 images) are needed; it has {have} "
            f"lesion(s) in {len(df)} image(s)"
        )
    rng = np.random.default_rng(seed)
    fold_of: dict[str, str] = {}
    for label in range(len(CLASS_NAMES)):
        members = lesions[lesions["label"] == label]
        ids = _interleaved(members.index.to_numpy(), members["dx"].to_numpy(), rng)
        n_val, n_test = _fold_sizes(len(ids), val_fraction, test_fraction)
        fold_of.update(dict.fromkeys(ids[:n_val], "val"))
        fold_of.update(dict.fromkeys(ids[n_val : n_val + n_test], "test"))
        fold_of.update(dict.fromkeys(ids[n_val + n_test :], "train"))
    out = df.copy()
    out["fold"] = out["lesion_id"].map(fold_of)
    return out


def write_split(df: pd.DataFrame, path: str | Path) -> Path:
    """Write split.csv (image_id, lesion_id, dx, label as benign/malignant, fold), atomically."""
    out = df[list(SPLIT_COLUMNS)].copy()
    out["label"] = [CLASS_NAMES[int(i)] for i in out["label"]]
    path = Path(path)
    write_text_atomic(path, out.to_csv(index=False))
    return path


def read_split(path: str | Path) -> pd.DataFrame:
    """Read a split.csv; ``label`` comes back as 0 / 1 like :func:`read_metadata`'s frame."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    frame = read_csv(path)
    require_columns(frame, path, SPLIT_COLUMNS, SPLIT_FILE)
    bad_labels = sorted(set(frame["label"]) - set(CLASS_NAMES))
    bad_folds = sorted(set(frame["fold"]) - set(FOLDS))
    if bad_labels or bad_folds:
        raise DataError(f"{path} has unknown label(s) {bad_labels} or fold(s) {bad_folds}")
    frame["label"] = [label_index(name) for name in frame["label"]]
    return frame[list(SPLIT_COLUMNS)].reset_index(drop=True)
