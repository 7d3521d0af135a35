"""The names of the files in a run folder, and the one helper that writes any file atomically.

A run folder (``runs/<name>/``) is complete once ``model.pt`` exists.
Every writer in the library goes through :func:`atomic_write`, so a reader (the app, a second
process, a resumed run) sees either the old file or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

#: The checkout (or installed site) the package sits in: where assets/ and the default runs/ live.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

MODEL_FILE = "model.pt"  # the final, calibrated model; its presence makes the run complete
BEST_FILE = "best.pt"  # the best epoch so far (validation ROC-AUC)
LAST_FILE = "last.pt"  # the last epoch with optimizer state: what a resume reads
METRICS_FILE = "metrics.json"  # measured figures, headline first
EVENTS_FILE = "events.jsonl"  # progress events, one JSON object a line
CONFIG_FILE = "config.json"  # the full training config
SPLIT_FILE = "split.csv"  # image id, lesion id, label, fold
CARD_FILE = "model_card.md"  # the model card
JOB_FILE = "job.json"  # written by the app's launcher: pid, command, stop requests
LOG_FILE = "train.log"  # the job's stdout and stderr when the app launched it
PLOTS_DIR = "plots"  # ROC, PR, calibration, confusion and learning-curve PNGs


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, fsync: bool = False, **open_args: Any) -> Iterator[IO]:
    """Open a unique temporary file beside ``path``; on success rename it over ``path``.

    The temporary name comes from :func:`tempfile.mkstemp`, so two writers racing for the same
    target never share a temporary file; the last rename wins whole. On any error the temporary
    file is removed and ``path`` is left as it was. ``fsync`` makes the bytes durable before the
    rename (checkpoints: a power cut must not leave a renamed but empty file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "b" not in mode:
        open_args.setdefault("encoding", "utf-8")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o644)  # mkstemp's 0600 would hide run files from other users of the machine
        with os.fdopen(handle, mode, **open_args) as stream:
            yield stream
            stream.flush()
            if fsync:
                os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically; return the path."""
    with atomic_write(path, "w", newline="") as stream:
        stream.write(text)
    return Path(path)
