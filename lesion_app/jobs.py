"""Training jobs launched from the app, their progress, and the data folders they may read.

A job is a separate process (``python -m train ...``) in its own session, so a browser reload,
a second visitor or a restart of the app neither kills nor duplicates it. One job runs at a
time: ``runs_dir/.active_job`` is created with O_EXCL and names the job; a lock whose process
has died is stale and is cleared.

Data folders are confined to $LESION_DATA_ROOT: a path typed in the app is resolved under
it, and anything that escapes it (``..``, an absolute path, a symlink pointing outside) is refused.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lesion.config import build_config
from lesion.errors import DataError, LesionError
from lesion.events import read_events
from lesion.files import JOB_FILE, LOG_FILE, write_text_atomic
from lesion.runs import PROJECT_ROOT, RunInfo, process_alive, read_json, read_run

LOCK_FILE = ".active_job"
DEMO_DATA = PROJECT_ROOT / "assets" / "demo"
# A lock younger than this without a pid is a launch in progress, not a stale lock.
LAUNCH_GRACE_S = 30.0


class JobAlreadyRunning(LesionError, RuntimeError):
    """Another training job is running; only one runs at a time."""


@dataclass
class Dataset:
    """A dataset folder the Train page offers."""

    name: str  # what the selector shows
    path: Path  # folder passed to --data
    bundled: bool  # the demo set shipped with the app


# ---------------------------------------------------------------------------- data folders


def default_data_root() -> Path | None:
    """$LESION_DATA_ROOT, when set."""
    value = os.environ.get("LESION_DATA_ROOT", "").strip()
    return Path(value) if value else None


def resolve_data_dir(data_root: str | Path | None, relative: str) -> Path:
    """The folder ``relative`` under ``data_root``; anything escaping the root raises DataError."""
    if data_root is None:
        raise DataError("No data root is configured: set LESION_DATA_ROOT to the folder that holds your datasets.")
    text = relative.strip()
    if not text:
        raise DataError("Name a dataset folder under the data root.")
    candidate = Path(text)
    if candidate.is_absolute() or text.startswith("~"):
        raise DataError(f"{text!r}: give a folder relative to the data root, not an absolute path.")
    if ".." in candidate.parts:
        raise DataError(f"{text!r}: '..' is not allowed; datasets must lie under the data root.")
    root = Path(data_root).resolve()
    resolved = (root / candidate).resolve()
    if resolved != root and root not in resolved.parents:
        # Only a symlink can get here: the text itself had no '..' and was relative.
        raise DataError(f"{text!r} points outside the data root (a symlink?); it was refused.")
    if not resolved.is_dir():
        raise DataError(f"{text!r} is not a folder under the data root.")
    return resolved


def resolve_data_file(data_root: str | Path | None, relative: str) -> Path:
    """A file (e.g. local weights) under ``data_root``, with the same confinement as folders."""
    if data_root is None:
        raise DataError("No data root is configured: set LESION_DATA_ROOT to the folder that holds your files.")
    text = relative.strip()
    if not text:
        raise DataError("Name a file under the data root.")
    parent = str(Path(text).parent)
    folder = resolve_data_dir(data_root, parent) if parent not in ("", ".") else Path(data_root).resolve()
    path = (folder / Path(text).name).resolve()
    if folder not in path.parents:
        raise DataError(f"{text!r} points outside the data root (a symlink?); it was refused.")
    if not path.is_file():
        raise DataError(f"{text!r} is not a file under the data root.")
    return path


def has_metadata(folder: Path) -> bool:
    """True when ``python -m train --data folder`` would find a metadata CSV (same search, same depth)."""
    from lesion.data import metadata_file  # here: lesion.data imports torch, and the sidebar runs before any page

    return metadata_file(folder) is not None


def demo_set_name(folder: Path = DEMO_DATA) -> str:
    """What the selector calls the bundled demo set, with its size counted from its metadata."""
    try:
        with (folder / "metadata.csv").open(newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
    except OSError:
        return "Bundled demo set"
    lesions = len({row.get("lesion_id") or row.get("image_id") for row in rows})
    return f"Bundled demo set ({len(rows)} images of {lesions} lesions)"


def list_datasets(data_root: str | Path | None = None) -> list[Dataset]:
    """The bundled demo set, then every sub-folder of ``data_root`` that ``python -m train`` accepts as --data."""
    datasets = [Dataset(demo_set_name(), DEMO_DATA, True)]
    if data_root is None or not Path(data_root).is_dir():
        return datasets
    root = Path(data_root)
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            resolved = resolve_data_dir(root, folder.name)
        except DataError:
            continue  # symlinks leaving the root are not offered
        if has_metadata(resolved):
            datasets.append(Dataset(folder.name, resolved, False))
    return datasets


# ---------------------------------------------------------------------------- the lock


def _lock_path(runs_dir: Path) -> Path:
    return Path(runs_dir) / LOCK_FILE


def _read_lock(runs_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads(_lock_path(runs_dir).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written: treated like a launch in progress until it ages


def _lock_alive(lock: dict[str, Any], lock_mtime: float) -> bool:
    if not lock.get("pid"):
        return time.time() - lock_mtime < LAUNCH_GRACE_S
    return process_alive(lock.get("pid"), lock.get("started"), lock.get("host", ""))


def _acquire_lock(runs_dir: Path, run_dir: Path) -> None:
    path = _lock_path(runs_dir)
    for _ in range(2):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            running = active_job(runs_dir)  # clears the lock when its process has died
            if running is not None:
                raise JobAlreadyRunning(
                    f"Training run {running.name!r} is already running (started {running.created_text}). "
                    "Wait for it to finish or stop it first; only one training job runs at a time."
                ) from None
            continue
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump({"run": run_dir.name, "path": str(run_dir), "pid": None, "host": socket.gethostname()}, stream)
        return
    raise JobAlreadyRunning(f"Could not take the training lock {path}; another launch is under way.")


def _write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(value, indent=2))


def active_job(runs_dir: str | Path) -> RunInfo | None:
    """The job the app is running, or None (a stale lock is removed on the way)."""
    runs_dir = Path(runs_dir)
    path = _lock_path(runs_dir)
    lock = _read_lock(runs_dir)
    if lock is None:
        return None
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    if not _lock_alive(lock, mtime):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return None
    run_dir = Path(lock.get("path") or runs_dir / str(lock.get("run", "")))
    if not run_dir.is_dir():
        return None
    return read_run(run_dir)


# ---------------------------------------------------------------------------- launching


def _run_name(runs_dir: Path, recipe: str, run_name: str | None) -> str:
    base = run_name or f"{Path(recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip(".-") or "run"
    name, number = base, 2
    while (runs_dir / name).exists():
        name, number = f"{base}-{number}", number + 1
    return name


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def training_command(data_dir: Path, run_dir: Path, recipe: str, overrides: dict[str, Any]) -> list[str]:
    """The command line of a training job (the same CLI a person would type)."""
    command = [sys.executable, "-m", "train", "--data", str(data_dir), "--out", str(run_dir), "--recipe", recipe]
    return command + [f"--{key.replace('_', '-')}={_format_value(value)}" for key, value in overrides.items()]


def start_training(
    runs_dir: str | Path,
    data_dir: str | Path,
    recipe: str,
    overrides: dict[str, Any],
    run_name: str | None = None,
) -> RunInfo:
    """Launch ``python -m train`` as a detached process; raise JobAlreadyRunning if one runs.

    The recipe and overrides are validated here first, so a typo is reported at once
    instead of in the job's log.
    """
    runs_dir = Path(runs_dir)
    data_dir = Path(data_dir)
    overrides = {key: value for key, value in overrides.items() if key not in ("data", "out")}
    build_config(recipe, {key: _format_value(value) for key, value in overrides.items()})
    if not data_dir.is_dir():
        raise DataError(f"Dataset folder not found: {data_dir}")
    runs_dir.mkdir(parents=True, exist_ok=True)
    run_dir = runs_dir / _run_name(runs_dir, recipe, run_name)
    _acquire_lock(runs_dir, run_dir)
    try:
        run_dir.mkdir(parents=True)
        command = training_command(data_dir, run_dir, recipe, overrides)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with (run_dir / LOG_FILE).open("ab") as log:
            process = subprocess.Popen(
                command,
                cwd=PROJECT_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives the app's restart and Ctrl+C in its terminal
                close_fds=True,
            )
        job = {"pid": process.pid, "command": command, "started": time.time(), "host": socket.gethostname()}
        _write_json_atomic(run_dir / JOB_FILE, job)
        _write_json_atomic(_lock_path(runs_dir), {"run": run_dir.name, "path": str(run_dir), **job})
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            _lock_path(runs_dir).unlink()
        raise
    return read_run(run_dir)


def stop_training(run: RunInfo | str | Path) -> bool:
    """Ask a running job to stop (SIGTERM): it finishes its batch and keeps its best epoch.

    Returns False when the run has no live process.
    """
    info = run if isinstance(run, RunInfo) else read_run(run)
    job = read_json(info.path / JOB_FILE)
    candidates = [(info.pid, None, info.host), (job.get("pid"), job.get("started"), job.get("host", ""))]
    for pid, started, host in candidates:
        if pid and process_alive(pid, started or info.created, host):
            os.kill(int(pid), signal.SIGTERM)
            if job:
                # Every tab can then say "stopping" while the trainer finishes its batch.
                _write_json_atomic(info.path / JOB_FILE, {**job, "stop_requested": time.time()})
            return True
    return False


# ---------------------------------------------------------------------------- progress


def _epoch_fraction(step: dict[str, Any], epochs: int) -> float:
    """Share of all batches done after ``step`` (epochs counted from 1 in events)."""
    batches = max(int(step.get("batches") or 1), 1)
    epoch = int(step.get("epoch") or 1)
    batch = min(int(step.get("batch") or 0), batches)
    return min(((epoch - 1) + batch / batches) / max(epochs, 1), 1.0)


def read_progress(run_dir: str | Path) -> dict[str, Any]:
    """What the Train page shows: position, fraction done, ETA, curves and the last error."""
    run_dir = Path(run_dir)
    events, _ = read_events(run_dir)
    starts = [i for i, e in enumerate(events) if e.get("event") == "start"]
    session = events[starts[-1] :] if starts else events  # after a resume, time the current session only
    start = session[0] if starts else {}
    epochs = int((start.get("config") or {}).get("epochs") or 0)
    epoch_events = [e for e in events if e.get("event") == "epoch"]
    if epoch_events and epoch_events[-1].get("epochs"):
        epochs = int(epoch_events[-1]["epochs"])
    steps = [e for e in events if e.get("event") == "step"]
    session_steps = [e for e in session if e.get("event") == "step"]
    last = steps[-1] if steps else {}
    fraction = _epoch_fraction(last, epochs) if last and epochs else 0.0
    if epoch_events and epochs:
        fraction = max(fraction, min(int(epoch_events[-1].get("epoch") or 0) / epochs, 1.0))
    eta = None
    if session_steps and start.get("time") and epochs:
        # Work done in this session (a resumed run starts at its resumed epoch) over the time it took.
        done_here = fraction - min(int(start.get("resumed_from_epoch") or 0) / epochs, 1.0)
        if done_here > 0:
            eta = max((time.time() - float(start["time"])) * (1.0 - fraction) / done_here, 0.0)
    terminal = next((e for e in reversed(events) if e.get("event") in ("done", "error")), {})
    if terminal:
        eta = 0.0 if terminal.get("event") == "done" else None
    return {
        "epoch": int(last.get("epoch") or 0),
        "epochs": epochs,
        "batch": int(last.get("batch") or 0),
        "batches": int(last.get("batches") or 0),
        "fraction": 1.0 if terminal.get("event") == "done" else fraction,
        "eta_s": eta,
        "images_per_s": last.get("images_per_s"),
        "loss": [{"step": i + 1, "epoch": s.get("epoch"), "loss": s.get("loss")} for i, s in enumerate(steps)],
        "epoch_metrics": [
            {
                "epoch": e.get("epoch"),
                "train_loss": e.get("train_loss"),
                "val_loss": e.get("val_loss"),
                "val_roc_auc": e.get("val_roc_auc"),
            }
            for e in epoch_events
        ],
        "done": terminal.get("event") == "done",
        "error": str(terminal.get("message", "")) if terminal.get("event") == "error" else "",
        "error_reason": str(terminal.get("reason", "")) if terminal.get("event") == "error" else "",
        "last_event": events[-1].get("event") if events else "",
        "stop_requested": bool(read_json(run_dir / JOB_FILE).get("stop_requested")) and not terminal,
        "started": start.get("time"),
    }


def log_tail(run_dir: str | Path, n: int = 20) -> str:
    """The last ``n`` lines of the job's train.log (read from the end, so a long log costs nothing)."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return ""
    with path.open("rb") as stream:
        stream.seek(0, os.SEEK_END)
        size = stream.tell()
        block = min(size, 64 * 1024)
        stream.seek(size - block)
        data = stream.read()
    # tqdm redraws with carriage returns; keep only the last state of each line.
    lines = []
    for line in data.decode("utf-8", errors="replace").split("\n"):
        parts = [part for part in line.split("\r") if part.strip()]
        lines.append(parts[-1] if parts else line.strip("\r"))
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines[-n:])
