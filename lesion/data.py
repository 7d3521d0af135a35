"""Datasets on disk: metadata, lesion-level splits, a decoded-image cache, and the torch Dataset.

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

import hashlib
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from lesion.errors import DataError
from lesion.files import atomic_write, write_text_atomic
from lesion.images import load_image
from lesion.labels import CLASS_NAMES, DX_TO_LABEL, ISIC_NAME_TO_DX, label_index

METADATA_NAMES = ("HAM10000_metadata.csv", "metadata.csv")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
HAM_COLUMNS = ("lesion_id", "image_id", "dx")
FOLDS = ("train", "val", "test")
SPLIT_COLUMNS = ("image_id", "lesion_id", "dx", "label", "fold")
# Bump when load_image's output changes, so stale cached pixels are never served.
CACHE_VERSION = "1"
_FIRST = 5  # how many offending ids an error message names


# ----------------------------------------------------------------------------- metadata


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


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not a readable CSV file ({error})") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    return frame.apply(lambda column: column.str.strip())


def _require(frame: pd.DataFrame, path: Path, needed: Iterable[str], layout: str) -> None:
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
    _require(frame, path, HAM_COLUMNS, "HAM10000 (lesion_id, image_id, dx)")
    out = frame[["image_id", "lesion_id", "dx"]].copy()
    out["written"] = out["dx"]
    out["dx"] = out["dx"].str.lower()
    out["label_name"] = out["dx"].map(DX_TO_LABEL)
    return out, 0


def _read_isic(frame: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, int]:
    layout = "ISIC archive (isic_id, lesion_id, diagnosis_1..3 or benign_malignant + diagnosis)"
    _require(frame, path, ("isic_id", "lesion_id"), layout)
    if "diagnosis_1" not in frame.columns and "benign_malignant" not in frame.columns:
        _require(frame, path, ("diagnosis_1",), layout)
    # Newer exports say Indeterminate in diagnosis_1; older ones in benign_malignant.
    status = frame["diagnosis_1"] if "diagnosis_1" in frame.columns else frame["benign_malignant"]
    indeterminate = status.str.lower() == "indeterminate"
    kept = frame[~indeterminate]
    dx, label, written = _isic_dx(kept)
    out = pd.DataFrame(
        {"image_id": kept["isic_id"], "lesion_id": kept["lesion_id"], "dx": dx, "label_name": label, "written": written}
    )
    return out, int(indeterminate.sum())


def _first(ids: Sequence[str]) -> str:
    shown = ", ".join(str(i) for i in list(ids)[:_FIRST])
    return shown + (", ..." if len(ids) > _FIRST else "")


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
    frame = _read_csv(csv_path)
    layout = "isic" if "isic_id" in frame.columns else "ham10000"
    reader = _read_isic if layout == "isic" else _read_ham
    table, dropped_indeterminate = reader(frame, csv_path)

    duplicated = table.loc[table["image_id"].duplicated(), "image_id"].unique().tolist()
    if duplicated:
        raise DataError(f"{csv_path} lists {len(duplicated)} image id(s) more than once: {_first(duplicated)}")
    # Without a lesion id an image can only be its own lesion.
    table["lesion_id"] = table["lesion_id"].where(table["lesion_id"] != "", table["image_id"])

    skip_hint = "; pass --skip-bad-images=true to leave them out"
    unknown = table.loc[table["label_name"].isna(), "image_id"].tolist()
    if unknown and not skip_bad:
        shown = table.loc[table["label_name"].isna(), "written"].unique().tolist()
        raise DataError(
            f"{len(unknown)} image(s) in {csv_path} have a diagnosis we cannot map to benign or malignant "
            f"(diagnoses: {_first(shown) or 'empty'}; images: {_first(unknown)}){skip_hint}"
        )
    table = table[table["label_name"].notna()]

    index = index_images(root)
    table = table.assign(path=[str(index[i].resolve()) if i in index else "" for i in table["image_id"]])
    missing = table.loc[table["path"] == "", "image_id"].tolist()
    if missing and not skip_bad:
        raise DataError(
            f"{len(missing)} of {len(table)} image(s) listed in {csv_path.name} were not found under {root} "
            f"(looked for <id>{'/'.join(IMAGE_SUFFIXES)}): {_first(missing)}{skip_hint}"
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


# ----------------------------------------------------------------------------- subsets and splits


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
    frame = _read_csv(path)
    _require(frame, path, SPLIT_COLUMNS, "split.csv")
    bad_labels = sorted(set(frame["label"]) - set(CLASS_NAMES))
    bad_folds = sorted(set(frame["fold"]) - set(FOLDS))
    if bad_labels or bad_folds:
        raise DataError(f"{path} has unknown label(s) {bad_labels} or fold(s) {bad_folds}")
    frame["label"] = [label_index(name) for name in frame["label"]]
    return frame[list(SPLIT_COLUMNS)].reset_index(drop=True)


# ----------------------------------------------------------------------------- decoded-image cache


def default_cache_dir() -> Path:
    """$LESION_CACHE_DIR, or ~/.cache/lesion."""
    return Path(os.environ.get("LESION_CACHE_DIR") or Path.home() / ".cache" / "lesion")


class ImageCache:
    """Images decoded and resized once by :func:`load_image`, kept as raw uint8 ``.npy`` arrays.

    Later epochs and later runs load the array (a memory copy) instead of decoding a JPEG.
    An entry's key covers the resolved path, file size, modification time and ``short_side``,
    so an edited or replaced image is decoded again. Entries are written to a temporary file
    and renamed into place, so concurrent DataLoader workers or runs never read half a file.
    """

    def __init__(self, root: str | Path, short_side: int) -> None:
        self.root = Path(root)
        self.short_side = int(short_side)
        self.folder = self.root / str(self.short_side)

    def entry(self, path: str | Path) -> Path:
        """Where ``path``'s decoded pixels live (whether or not they are there yet)."""
        resolved = Path(path).resolve()
        stat = resolved.stat()
        text = f"{CACHE_VERSION}|{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{self.short_side}"
        key = hashlib.sha1(text.encode("utf-8")).hexdigest()
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, path: str | Path) -> Image.Image:
        """The RGB image exactly as ``load_image(path, short_side)`` returns it."""
        return Image.fromarray(self.get_array(path), "RGB")

    def get_array(self, path: str | Path) -> np.ndarray:
        """The same pixels as :meth:`get`, as an H x W x 3 uint8 array (no PIL round trip)."""
        try:
            entry = self.entry(path)
        except OSError:  # no such file: let load_image raise its readable InvalidImage
            return np.asarray(load_image(path, self.short_side))
        try:
            array = np.load(entry, allow_pickle=False)
            if array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8:
                return array
        except FileNotFoundError:
            pass
        except (OSError, ValueError, EOFError, TypeError):
            pass  # damaged entry (disk full, edited by hand): decode again and overwrite it
        array = np.asarray(load_image(path, self.short_side))
        self._store(entry, array)
        return array

    def _store(self, entry: Path, array: np.ndarray) -> None:
        try:
            with atomic_write(entry, "wb") as handle:
                np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        except OSError:
            pass  # a read-only or full cache must not stop training; the image is still returned

    def has(self, path: str | Path) -> bool:
        """Whether ``path`` is already cached (False for a file that does not exist)."""
        try:
            return self.entry(path).is_file()
        except OSError:
            return False

    def warm(
        self,
        paths: Sequence[str | Path],
        workers: int = 2,
        progress: bool = False,
        ids: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Decode every image not cached yet, in ``workers`` processes; never raises on a bad image.

        Returns ``{"decoded": n, "cached": n, "unreadable": [(id, message), ...]}`` where id is
        the matching entry of ``ids`` (image ids) or else the path.
        """
        names = [str(p) for p in paths] if ids is None else [str(i) for i in ids]
        todo = [(name, str(path)) for name, path in zip(names, paths, strict=True) if not self.has(path)]
        cached = len(names) - len(todo)
        results = _map_processes(
            _decode_into_cache, [(self.root, self.short_side, p) for _, p in todo], workers, progress
        )
        unreadable = [(name, message) for (name, _), message in zip(todo, results, strict=True) if message]
        return {"decoded": len(todo) - len(unreadable), "cached": cached, "unreadable": unreadable}


def _decode_into_cache(task: tuple[Path, int, str]) -> str | None:
    """Worker: cache one image; the error message, or None when it worked."""
    root, short_side, path = task
    try:
        ImageCache(root, short_side).get(path)
    except Exception as error:  # noqa: BLE001 - every failure is reported to the caller, none is fatal here
        return str(error) or type(error).__name__
    return None


def _check_decodes(task: tuple[None, int, str]) -> str | None:
    """Worker without a cache: decode one image and throw it away."""
    _, short_side, path = task
    try:
        load_image(path, short_side)
    except Exception as error:  # noqa: BLE001 - reported, not fatal
        return str(error) or type(error).__name__
    return None


def _map_processes(function: Callable[[Any], Any], tasks: list[Any], workers: int, progress: bool) -> list[Any]:
    """``[function(t) for t in tasks]``, in a process pool when there is enough work, in order."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="decoding images", unit="img", leave=False)
    results = []
    try:
        if workers <= 1 or len(tasks) < 2 * workers:
            for task in tasks:
                results.append(function(task))
                if bar is not None:
                    bar.update()
            return results
        # fork starts workers in milliseconds; spawn would re-import torch in each one.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        chunk = max(1, min(64, len(tasks) // (workers * 8)))
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            for result in pool.map(function, tasks, chunksize=chunk):
                results.append(result)
                if bar is not None:
                    bar.update()
        return results
    finally:
        if bar is not None:
            bar.close()


def check_images(
    df: pd.DataFrame,
    cache: ImageCache | None,
    skip_bad: bool,
    workers: int = 2,
    progress: bool = False,
    short_side: int = 64,
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Decode every image once (filling ``cache``); return the readable rows and the unreadable ones.

    Unreadable images raise :class:`DataError` (count and first ids) unless ``skip_bad``. Without
    a cache each image is only decoded at ``short_side`` to prove it can be read.
    """
    if cache is not None:
        report = cache.warm(df["path"].tolist(), workers=workers, progress=progress, ids=df["image_id"].tolist())
        unreadable = report["unreadable"]
    else:
        tasks = [(None, short_side, p) for p in df["path"]]
        messages = _map_processes(_check_decodes, tasks, workers, progress)
        unreadable = [(i, m) for i, m in zip(df["image_id"], messages, strict=True) if m]
    if unreadable and not skip_bad:
        shown = "; ".join(f"{i} ({m})" for i, m in unreadable[:_FIRST])
        raise DataError(
            f"{len(unreadable)} of {len(df)} image(s) could not be read: {shown}"
            f"{'; ...' if len(unreadable) > _FIRST else ''}; pass --skip-bad-images=true to leave them out"
        )
    bad = {i for i, _ in unreadable}
    return df[~df["image_id"].isin(bad)].copy(), unreadable


# ----------------------------------------------------------------------------- torch Dataset


class LesionDataset(torch.utils.data.Dataset):
    """(image tensor, label) pairs; pixels from the cache when given, else decoded each time."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        transform: Callable[[Image.Image], torch.Tensor],
        cache: ImageCache | None,
        short_side: int,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        if cache is not None and cache.short_side != short_side:
            raise ValueError(f"the cache holds images at short side {cache.short_side}, not {short_side}")
        self.paths = [str(p) for p in paths]
        self.labels = [int(v) for v in labels]
        self.transform = transform
        self.cache = cache
        self.short_side = short_side

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        """The untransformed (decoded and resized) image at ``index``."""
        path = self.paths[index]
        return self.cache.get(path) if self.cache is not None else load_image(path, self.short_side)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        # A training sampler hands (index, seed): the sample's randomness then comes from its own
        # seed, not from whichever loader worker draws it or how long that worker has lived, so
        # persistent workers and resumed runs see the same augmentation as a fresh run.
        index, seed = item if isinstance(item, tuple) else (item, None)
        transform = self.transform
        if seed is not None and getattr(transform, "accepts_generator", False):
            generator = torch.Generator().manual_seed(int(seed))

            def transform(image):
                return self.transform(image, generator=generator)

        if self.cache is not None and getattr(self.transform, "accepts_array", False):
            # Training's worker transform slices arrays directly: no PIL image is built.
            return transform(self.cache.get_array(self.paths[index])), self.labels[index]
        return transform(self.load(index)), self.labels[index]
