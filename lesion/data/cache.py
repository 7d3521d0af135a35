"""The decoded-image cache: images decoded and resized once, kept as raw uint8 arrays, shared between runs."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from lesion.data.readers import FIRST_IDS
from lesion.errors import DataError
from lesion.files import atomic_write
from lesion.images import load_image

# Bump when load_image's output changes, so stale cached pixels are never served.
CACHE_VERSION = "1"


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
        shown = "; ".join(f"{i} ({m})" for i, m in unreadable[:FIRST_IDS])
        raise DataError(
            f"{len(unreadable)} of {len(df)} image(s) could not be read: {shown}"
            f"{'; ...' if len(unreadable) > FIRST_IDS else ''}; pass --skip-bad-images=true to leave them out"
        )
    bad = {i for i, _ in unreadable}
    return df[~df["image_id"].isin(bad)].copy(), unreadable
