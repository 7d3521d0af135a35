"""lesion.runs: run status from events and live processes, model listing, saving an OOD threshold."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lesion.checkpoint import load_checkpoint
from lesion.errors import InvalidCheckpoint
from lesion.events import EventWriter
from lesion.predict import Predictor
from lesion.runs import list_models, list_runs, process_alive, read_run, save_ood_threshold


def make_run(root: Path, name: str, *events: tuple[str, dict], model: bool = False, job: dict | None = None) -> Path:
    """A run folder with the given events (and optionally a model.pt placeholder and job.json)."""
    run = root / name
    writer = EventWriter(run)
    for kind, fields in events:
        writer.emit(kind, **fields)
    if model:
        (run / "model.pt").write_bytes(b"placeholder")
    if job is not None:
        (run / "job.json").write_text(json.dumps(job))
    return run


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


HOST = socket.gethostname()


def test_status_of_each_kind_of_run(tmp_path: Path) -> None:
    me = os.getpid()
    make_run(tmp_path, "done", ("start", {"pid": me, "host": HOST}), ("done", {"metrics": {}}), model=True)
    make_run(tmp_path, "live", ("start", {"pid": me, "host": HOST}), ("step", {"epoch": 1, "batch": 3, "batches": 9}))
    make_run(tmp_path, "killed", ("start", {"pid": dead_pid(), "host": HOST}), ("step", {"epoch": 1, "batch": 1}))
    make_run(
        tmp_path,
        "failed",
        ("start", {"pid": me, "host": HOST}),
        ("error", {"message": "no weights", "reason": "failed"}),
    )
    make_run(
        tmp_path, "stopped", ("start", {"pid": me, "host": HOST}), ("error", {"message": "stop", "reason": "stopped"})
    )
    make_run(
        tmp_path,
        "stopped-kept",
        ("start", {"pid": dead_pid(), "host": HOST}),
        ("error", {"reason": "stopped"}),
        model=True,
    )
    statuses = {run.name: run.status for run in list_runs(tmp_path)}
    assert statuses == {
        "done": "complete",
        "live": "running",
        "killed": "interrupted",
        "failed": "failed",
        "stopped": "stopped",
        "stopped-kept": "complete",
    }
    failed = read_run(tmp_path / "failed")
    assert failed.error == "no weights" and failed.error_reason == "failed"
    assert read_run(tmp_path / "live").progress["batch"] == 3


def test_recycled_pid_is_not_taken_for_the_training_process(tmp_path: Path) -> None:
    # Our own pid exists, but this process was created long after the "run" started: a reused pid.
    long_ago = psutil.Process().create_time() - 3600
    run = make_run(
        tmp_path, "old", ("start", {"pid": os.getpid(), "host": HOST}), job={"pid": os.getpid(), "started": long_ago}
    )
    lines = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    lines[0]["time"] = long_ago
    (run / "events.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert not process_alive(os.getpid(), long_ago, HOST)
    assert process_alive(os.getpid(), time.time(), HOST)
    assert read_run(run).status == "interrupted"


def test_zombie_child_counts_as_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 10
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.05)
    assert not process_alive(child.pid, time.time(), HOST)
    child.wait()


def test_run_on_another_host_is_running_while_its_events_are_fresh(tmp_path: Path) -> None:
    fresh = make_run(tmp_path, "fresh", ("start", {"pid": 12345, "host": "gpu-node-7"}))
    assert read_run(fresh).status == "running"
    stale = make_run(tmp_path, "stale", ("start", {"pid": 12345, "host": "gpu-node-7"}))
    line = json.loads((stale / "events.jsonl").read_text())
    line["time"] -= 3600
    (stale / "events.jsonl").write_text(json.dumps(line) + "\n")
    assert read_run(stale).status == "interrupted"


def test_headline_metrics_name_their_split(tmp_path: Path) -> None:
    run = make_run(tmp_path, "r", ("start", {"pid": 1, "host": HOST}), ("done", {}), model=True)
    (run / "metrics.json").write_text(
        json.dumps(
            {"headline_split": "val", "headline": {"roc_auc": 0.81, "sensitivity": 0.7}, "test": {"roc_auc": 0.5}}
        )
    )
    info = read_run(run)
    assert info.metrics == {"roc_auc": 0.81, "sensitivity": 0.7} and info.metrics_split == "val"
    (run / "metrics.json").unlink()
    make_run(tmp_path, "r2", ("done", {"metrics": {"split": "test", "roc_auc": 0.6}}), model=True)
    assert read_run(tmp_path / "r2").metrics_split == "test"


def test_list_models_has_complete_runs_and_the_extra_checkpoint(tmp_path: Path, trained_run: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(trained_run, runs / "tiny")
    make_run(runs, "unfinished", ("start", {"pid": dead_pid(), "host": HOST}))
    extra = tmp_path / "elsewhere" / "exported.pt"
    extra.parent.mkdir()
    shutil.copy(trained_run / "model.pt", extra)
    models = list_models(runs, extra)
    assert [m.source for m in models] == ["LESION_CHECKPOINT", "run"]
    assert models[0].path == extra.resolve() and models[1].name == "tiny"
    assert models[1].metrics_split == "test" and "roc_auc" in models[1].metrics
    assert list_models(tmp_path / "missing", None) == []
    assert models[0].run is None, "an exported file outside any run folder has no run"


def test_extra_checkpoint_inside_a_run_folder_keeps_its_run(tmp_path: Path, trained_run: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(trained_run, runs / "tiny")
    models = list_models(runs, runs / "tiny" / "model.pt")
    assert [m.source for m in models] == ["LESION_CHECKPOINT"], "the same file is listed once"
    assert models[0].run is not None and models[0].run.path == runs / "tiny"


def test_save_ood_threshold_updates_checkpoint_history_and_card(tmp_path: Path, trained_run: Path) -> None:
    run = tmp_path / "tiny"
    shutil.copytree(trained_run, run)
    checkpoint = run / "model.pt"
    before = load_checkpoint(checkpoint)
    old = before["ood"]["detectors"]["knn"]["threshold"]
    save_ood_threshold(checkpoint, "knn", 0.123456)
    after = load_checkpoint(checkpoint)
    assert after["ood"]["method"] == "knn"
    assert after["ood"]["detectors"]["knn"]["threshold"] == pytest.approx(0.123456)
    assert (
        after["ood"]["detectors"]["mahalanobis"]["threshold"] == before["ood"]["detectors"]["mahalanobis"]["threshold"]
    )
    (note,) = after["threshold_history"]
    assert note["old_threshold"] == pytest.approx(old) and note["new_threshold"] == pytest.approx(0.123456)
    assert note["old_method"] == before["ood"]["method"] and note["time"]
    assert "0.1235" in (run / "model_card.md").read_text()
    fresh = Predictor.from_checkpoint(checkpoint)
    assert fresh.ood_method == "knn" and fresh.ood_thresholds["knn"] == pytest.approx(0.123456)
    save_ood_threshold(checkpoint, "knn", 0.2)
    assert len(load_checkpoint(checkpoint)["threshold_history"]) == 2
    with pytest.raises(InvalidCheckpoint, match="no fitted 'nope' detector"):
        save_ood_threshold(checkpoint, "nope", 1.0)
