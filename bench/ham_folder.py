"""A HAM10000-layout folder of any size, made from the bundled demo images under new ids.

    python -m bench.ham_folder DEST [--images 10000] [--source assets/demo]

Each copy of a demo image gets a new image id and a new lesion id (``<id>_<k>``), so the split
sees ``--images`` images in as many lesions; the files are symbolic links (hard links where
links are refused, a copy as the last resort), so 10,000 images cost a few megabytes and a second.
The layout is HAM10000's: ``HAM10000_metadata.csv`` and ``HAM10000_images_part_1/<id>.jpg``.
(The decoded-image cache resolves links, so the copies share the demo images' cache entries:
reading them costs what a warm cache costs on a real set whose entries sit in the page cache.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import pandas as pd

from bench.common import REPO

DEMO = REPO / "assets" / "demo"
IMAGES_FOLDER = "HAM10000_images_part_1"


def _link(source: Path, target: Path) -> None:
    try:
        os.symlink(source, target)
    except OSError:
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)


def build_ham_folder(dest: str | Path, n_images: int = 10_000, source: str | Path = DEMO) -> Path:
    """Write a HAM10000-layout dataset of ``n_images`` images into ``dest`` (created; must be empty)."""
    dest, source = Path(dest), Path(source)
    frame = pd.read_csv(source / "metadata.csv", dtype=str, keep_default_na=False)
    images = {path.stem: path.resolve() for path in (source / "images").glob("*.jpg")}
    frame = frame[frame["image_id"].isin(images)].reset_index(drop=True)
    if frame.empty:
        raise SystemExit(f"no images listed in {source / 'metadata.csv'} were found in {source / 'images'}")
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"{dest} is not empty")
    (dest / IMAGES_FOLDER).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        copy, row = divmod(i, len(frame))
        original = frame.iloc[row]
        image_id, lesion_id = f"{original['image_id']}_{copy}", f"{original['lesion_id']}_{copy}"
        _link(images[original["image_id"]], dest / IMAGES_FOLDER / f"{image_id}.jpg")
        rows.append({**original.to_dict(), "image_id": image_id, "lesion_id": lesion_id})
    pd.DataFrame(rows, columns=frame.columns).to_csv(dest / "HAM10000_metadata.csv", index=False)
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", help="an empty or new folder")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--source", default=str(DEMO), help="a folder with metadata.csv and images/ (the demo set)")
    args = parser.parse_args(argv)
    path = build_ham_folder(args.dest, args.images, args.source)
    print(f"{args.images} images in HAM10000 layout at {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
