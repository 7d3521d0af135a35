"""Run folders as the app sees them: which are models, which are still training, which failed.

A run folder (``runs/<name>/``) is COMPLETE when its ``model.pt`` exists. While training, the
``start`` event (and ``job.json`` when the app launched it) names the process; a process is
only taken as alive when its pid exists *and* it was created before the run started, so a
recycled pid never makes a dead run look alive.

This module is pure library: the app's pages call it, and so can scripts and tests.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from lesion.errors import InvalidCheckpoint, LesionError
from lesion.events import read_events
from lesion.files import CARD_FILE as CARD_FILE  # re-exported: lesion.runs.CARD_FILE stays importable
from lesion.files import CONFIG_FILE, EVENTS_FILE, JOB_FILE, METRICS_FILE, MODEL_FILE, PROJECT_ROOT, SPLIT_FILE

# The model shipped with the app (python -m train.export writes it; docs/bundled-model.md).
BUNDLED_MODEL = PROJECT_ROOT / "assets" / "models" / "lesion-efficientnet-lite0-demo.pt"
# A run on another machine cannot be probed; it counts as running while its events keep coming.
REMOTE_STALE_S = 15 * 60
# A process whose start time is later than this after the run began is a recycled pid.
PID_SLACK_S = 2.0


@dataclass
class RunInfo:
    """One run folder, summarised for listing."""

    name: str  # folder name
    path: Path  # the run folder
    status: str  # complete, running, interrupted, failed or stopped
    created: float  # Unix time the run started (start event, job.json, or folder time)
    progress: dict[str, Any] = field(default_factory=dict)  # last step / epoch event fields
    metrics: dict[str, float] = field(default_factory=dict)  # headline metrics
    metrics_split: str = ""  # which split ``metrics`` were measured on ("test", "val")
    error: str = ""  # message of the error event, if any
    error_reason: str = ""  # "stopped" or "failed"
    pid: int | None = None  # training process, when known
    host: str = ""  # machine the training process runs on

    @property
    def checkpoint(self) -> Path:
        """The final model file (it exists only when the run is complete)."""
        return self.path / MODEL_FILE

    @property
    def created_text(self) -> str:
        """Local time the run started, for display."""
        return _dt.datetime.fromtimestamp(self.created).strftime("%Y-%m-%d %H:%M")


@dataclass
class ModelEntry:
    """A usable model: a complete run, or the file LESION_CHECKPOINT names."""

    name: str  # what the selector shows
    path: Path  # the checkpoint file
    source: str  # "run", "LESION_CHECKPOINT" or "bundled"
    mtime: float  # changes whenever the file is rewritten (e.g. a saved OOD threshold)
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_split: str = ""
    run: RunInfo | None = None

    @property
    def key(self) -> str:
        """A stable identifier for selectors (the checkpoint path)."""
        return str(self.path)


def default_runs_dir() -> Path:
    """$LESION_RUNS_DIR, or ``runs/`` beside the app."""
    return Path(os.environ.get("LESION_RUNS_DIR") or PROJECT_ROOT / "runs")


def default_extra_checkpoint() -> Path | None:
    """$LESION_CHECKPOINT, when set."""
    value = os.environ.get("LESION_CHECKPOINT", "").strip()
    return Path(value) if value else None


def default_bundled_checkpoint() -> Path | None:
    """The bundled model file; $LESION_BUNDLED_MODEL names another, and set empty turns it off."""
    value = os.environ.get("LESION_BUNDLED_MODEL")
    if value is None:
        return BUNDLED_MODEL
    return Path(value.strip()) if value.strip() else None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; {} when missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def process_alive(pid: int | None, started: float | None = None, host: str = "") -> bool:
    """True when ``pid`` runs on this machine and was created no later than ``started``."""
    if not pid or (host and host != socket.gethostname()):
        return False
    try:
        process = psutil.Process(int(pid))
        if process.status() == psutil.STATUS_ZOMBIE:
            _reap(int(pid))
            return False
        created = process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False
    return started is None or created <= started + PID_SLACK_S


def _reap(pid: int) -> None:
    """Collect a finished child of this process (the app launched it), so it stops being a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def headline_metrics(metrics: dict[str, Any]) -> tuple[dict[str, float], str]:
    """Pick the headline numbers and say which split they come from.

    Reads metrics.json (``headline`` + ``headline_split``), the ``done`` event's summary
    (``split`` + values), or per-split tables (test preferred over val).
    """

    # Here, not at the top: lesion.metrics imports torch and scikit-learn, and the app's sidebar
    # reads runs before the first page is drawn (bench/app.py, first verdict).
    from lesion.metrics import HEADLINE_METRICS

    def pick(values: Any) -> dict[str, float]:
        if not isinstance(values, dict):
            return {}
        return {k: float(values[k]) for k in HEADLINE_METRICS if isinstance(values.get(k), (int, float))}

    if metrics.get("headline_split") and pick(metrics.get("headline")):
        return pick(metrics["headline"]), str(metrics["headline_split"])
    if isinstance(metrics.get("split"), str) and pick(metrics):
        return pick(metrics), metrics["split"]
    for split in ("test", "val"):
        picked = pick(metrics.get(split))
        if picked:
            return picked, split
    return {}, ""


def _status(events: list[dict[str, Any]], has_model: bool, alive: bool, remote_fresh: bool, stop_asked: bool) -> str:
    terminal = next((e for e in reversed(events) if e.get("event") in ("done", "error")), None)
    if terminal is None and (alive or remote_fresh):
        return "running"
    if has_model:
        return "complete"
    if terminal is not None and terminal.get("event") == "error":
        # A stop asked for from the app ends in an error when no epoch had finished yet.
        return "stopped" if terminal.get("reason") == "stopped" or stop_asked else "failed"
    return "stopped" if stop_asked else "interrupted"


def read_run(path: str | Path) -> RunInfo:
    """Summarise one run folder."""
    path = Path(path)
    events, _ = read_events(path)
    job = read_json(path / JOB_FILE)
    start = next((e for e in events if e.get("event") == "start"), {})
    pid = start.get("pid") or job.get("pid")
    host = start.get("host") or job.get("host") or ""
    started = job.get("started") or start.get("time")
    created = float(started or path.stat().st_mtime)
    alive = process_alive(pid, started, host) or (
        # The launcher's pid is checked too: it exists before the trainer writes its start event.
        bool(job.get("pid")) and process_alive(job.get("pid"), job.get("started"), job.get("host", ""))
    )
    last_time = events[-1].get("time", 0) if events else 0
    remote = bool(host) and host != socket.gethostname()
    remote_fresh = remote and time.time() - float(last_time or 0) < REMOTE_STALE_S
    has_model = (path / MODEL_FILE).is_file()
    progress = next((e for e in reversed(events) if e.get("event") in ("step", "epoch")), {})
    error = next((e for e in reversed(events) if e.get("event") == "error"), {})
    metrics = read_json(path / METRICS_FILE)
    if not metrics:
        done = next((e for e in reversed(events) if e.get("event") == "done"), {})
        metrics = done.get("metrics") or {}
    headline, split = headline_metrics(metrics)
    return RunInfo(
        name=path.name,
        path=path,
        status=_status(events, has_model, alive, remote_fresh, bool(job.get("stop_requested"))),
        created=created,
        progress=dict(progress),
        metrics=headline,
        metrics_split=split,
        error=str(error.get("message", "")),
        error_reason=str(error.get("reason", "")),
        pid=int(pid) if pid else None,
        host=host,
    )


def _is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in (EVENTS_FILE, JOB_FILE, MODEL_FILE))


def list_runs(runs_dir: str | Path | None = None) -> list[RunInfo]:
    """Every run folder under ``runs_dir``, newest first."""
    runs_dir = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    if not runs_dir.is_dir():
        return []
    runs = [read_run(p) for p in runs_dir.iterdir() if not p.name.startswith(".") and _is_run_folder(p)]
    return sorted(runs, key=lambda run: run.created, reverse=True)


def list_models(
    runs_dir: str | Path | None = None,
    extra_checkpoint: str | Path | None = None,
    bundled_checkpoint: str | Path | None = None,
) -> list[ModelEntry]:
    """Usable models: LESION_CHECKPOINT first (when given and present), then complete runs, newest first,
    then the bundled model (when given and present), so it is the default only when there is nothing else.
    """
    entries: list[ModelEntry] = []
    if extra_checkpoint and Path(extra_checkpoint).is_file():
        extra = Path(extra_checkpoint).resolve()
        metrics, split = _metrics_beside(extra)
        name = f"{extra.parent.name}/{extra.name}" if extra.name == MODEL_FILE else extra.name
        # A checkpoint inside a run folder keeps its run (split.csv tells which samples it trained on).
        run = read_run(extra.parent) if (extra.parent / SPLIT_FILE).is_file() else None
        entries.append(ModelEntry(name, extra, "LESION_CHECKPOINT", extra.stat().st_mtime, metrics, split, run))
    seen = {entry.path for entry in entries}
    for run in list_runs(runs_dir):
        checkpoint = run.checkpoint.resolve()
        if run.status != "complete" or checkpoint in seen or not checkpoint.is_file():
            continue
        entries.append(
            ModelEntry(run.name, checkpoint, "run", checkpoint.stat().st_mtime, run.metrics, run.metrics_split, run)
        )
    if bundled_checkpoint and Path(bundled_checkpoint).is_file():
        bundled = Path(bundled_checkpoint).resolve()
        if bundled not in {entry.path for entry in entries}:
            metrics, split = _metrics_beside(bundled)
            entries.append(ModelEntry(bundled.stem, bundled, "bundled", bundled.stat().st_mtime, metrics, split))
    return entries


def _metrics_beside(checkpoint: Path) -> tuple[dict[str, float], str]:
    """Headline metrics from a metrics.json next to a checkpoint, if there is one."""
    return headline_metrics(read_json(checkpoint.parent / METRICS_FILE))


def run_dir_of(checkpoint_path: str | Path) -> Path | None:
    """The run folder holding ``checkpoint_path``, or None for a loose checkpoint file."""
    folder = Path(checkpoint_path).resolve().parent
    return folder if (folder / EVENTS_FILE).is_file() or (folder / CONFIG_FILE).is_file() else None


def save_ood_threshold(checkpoint_path: str | Path, method: str, threshold: float) -> None:
    """Store ``threshold`` for detector ``method`` and make it the checkpoint's OOD method.

    The file is rewritten atomically; the change (old -> new, time) is appended to the
    checkpoint's ``threshold_history``; the model card beside it is regenerated.
    """
    # Imported here: listing runs must not import torch (the app draws its first page without it).
    from lesion.checkpoint import load_checkpoint, save_checkpoint

    checkpoint_path = Path(checkpoint_path)
    checkpoint = load_checkpoint(checkpoint_path)
    ood = dict(checkpoint.get("ood") or {})
    detectors = {name: dict(values) for name, values in (ood.get("detectors") or {}).items()}
    if method not in detectors:
        fitted = ", ".join(sorted(detectors)) or "none"
        raise InvalidCheckpoint(f"{checkpoint_path.name} has no fitted {method!r} detector (fitted: {fitted}).")
    threshold = float(threshold)
    if threshold != threshold:  # NaN would silently accept or reject everything
        raise LesionError("The OOD threshold must be a number.")
    note = {
        "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "method": method,
        "old_method": str(ood.get("method", "")),
        "old_threshold": detectors[method].get("threshold"),
        "new_threshold": threshold,
    }
    detectors[method]["threshold"] = threshold
    ood.update(method=method, detectors=detectors)
    checkpoint["ood"] = ood
    checkpoint["threshold_history"] = [*list(checkpoint.get("threshold_history") or []), note]
    save_checkpoint(checkpoint, checkpoint_path)
    run_dir = run_dir_of(checkpoint_path)
    if run_dir is not None and checkpoint_path.name == MODEL_FILE:
        _write_card(run_dir)


def _write_card(run_dir: Path) -> None:
    """Regenerate the model card so it states the threshold now in force."""
    from lesion.card import write_model_card

    write_model_card(run_dir)
