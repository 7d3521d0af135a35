"""Datasets on disk: metadata, lesion-level splits, a decoded-image cache, and the torch Dataset.

Two layouts are read, told apart by the metadata CSV's columns (:mod:`lesion.data.readers`):

* HAM10000: ``HAM10000_metadata.csv`` (or ``metadata.csv``) with ``lesion_id, image_id, dx, ...``;
  images ``<image_id>.jpg`` anywhere under the folder (HAM ships them in two ``part`` folders).
* ISIC archive export: ``metadata.csv`` with ``isic_id, lesion_id`` and either ``diagnosis_1..N``
  (newer exports) or ``benign_malignant`` + ``diagnosis`` (older ones); images ``<isic_id>.jpg``.

Bad data is never dropped silently: a missing image, an unknown diagnosis or a duplicate id
stops with a :class:`~lesion.errors.DataError` that names the first offenders, unless ``skip_bad``
asks to leave them out, and then they are listed in the summary. Splits are by lesion
(:mod:`lesion.data.split`), decoded pixels are cached (:mod:`lesion.data.cache`), and
:mod:`lesion.data.dataset` serves them to torch.
"""

from __future__ import annotations

from lesion.data.cache import CACHE_VERSION, ImageCache, check_images, default_cache_dir
from lesion.data.dataset import LesionDataset
from lesion.data.readers import (
    DEMO_DATA,
    HAM_COLUMNS,
    IMAGE_SUFFIXES,
    METADATA_NAMES,
    find_metadata,
    index_images,
    locate_data,
    metadata_file,
    read_metadata,
)
from lesion.data.split import FOLDS, SPLIT_COLUMNS, read_split, select_subset, split_by_lesion, write_split

__all__ = [
    "DEMO_DATA",
    "locate_data",
    "CACHE_VERSION",
    "FOLDS",
    "HAM_COLUMNS",
    "IMAGE_SUFFIXES",
    "METADATA_NAMES",
    "SPLIT_COLUMNS",
    "ImageCache",
    "LesionDataset",
    "check_images",
    "default_cache_dir",
    "find_metadata",
    "index_images",
    "metadata_file",
    "read_metadata",
    "read_split",
    "select_subset",
    "split_by_lesion",
    "write_split",
]
