"""lesion_app.jobs: data folders confined to the data root, the one-job lock, stopping, progress, log tail."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lesion.data import find_metadata
from lesion.errors import ConfigError, DataError
from lesion.events import EventWriter
from lesion.runs import read_run
from lesion_app.jobs import (
    DEMO_DATA,
    JobAlreadyRunning,
    active_job,
    demo_set_name,
    list_datasets,
    log_tail,
    read_progress,
    resolve_data_dir,
    resolve_data_file,
    start_training,
    stop_training,
)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "ham" / "images").mkdir(parents=True)
    (root / "ham" / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\n")
    (root / "isic").mkdir()
    (root / "isic" / "metadata.csv").write_text("isic_id,diagnosis_1,lesion_id\n")
    (root / "empty").mkdir()
    (root / "weights.pth").write_bytes(b"0")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "metadata.csv").write_text("x\n")
    (outside / "secret.pth").write_bytes(b"0")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "link.pth").symlink_to(outside / "secret.pth")
    return root


def test_resolve_data_dir_stays_under_the_root(data_root: Path) -> None:
    assert resolve_data_dir(data_root, "ham") == (data_root / "ham").resolve()
    assert resolve_data_dir(data_root, "ham/images") == (data_root / "ham" / "images").resolve()
    for bad, message in [
        ("../outside", "'..' is not allowed"),
        ("ham/../../outside", "'..' is not allowed"),
        (str(data_root / "ham"), "not an absolute path"),
        ("~/data", "not an absolute path"),
        ("escape", "points outside the data root"),
        ("missing", "is not a folder"),
        ("", "Name a dataset folder"),
    ]:
        with pytest.raises(DataError, match=message):
            resolve_data_dir(data_root, bad)
    with pytest.raises(DataError, match="LESION_DATA_ROOT"):
        resolve_data_dir(None, "ham")


def test_resolve_data_file_stays_under_the_root(data_root: Path) -> None:
    assert resolve_data_file(data_root, "weights.pth") == (data_root / "weights.pth").resolve()
    for bad in ("link.pth", "escape/secret.pth", "../outside/secret.pth", "/etc/passwd", "missing.pth"):
        with pytest.raises(DataError):
            resolve_data_file(data_root, bad)


def test_list_datasets_offers_demo_and_folders_with_metadata(data_root: Path) -> None:
    datasets = list_datasets(data_root)
    assert datasets[0].bundled and datasets[0].path == DEMO_DATA and (DEMO_DATA / "metadata.csv").is_file()
    assert [d.name for d in datasets[1:]] == ["ham", "isic"]  # not "empty", not the symlink leaving the root
    assert [d.name for d in list_datasets(None)] == [datasets[0].name]


def test_the_dataset_list_offers_exactly_what_python_m_train_accepts(tmp_path: Path) -> None:
    # A metadata CSV one level down (HAM10000 unzipped into a sub-folder) is accepted by the CLI's
    # search (lesion.data.find_metadata), so the Train page lists it too; two levels down is neither.
    (tmp_path / "nested" / "HAM10000").mkdir(parents=True)
    (tmp_path / "nested" / "HAM10000" / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\n")
    (tmp_path / "deep" / "a" / "b").mkdir(parents=True)
    (tmp_path / "deep" / "a" / "b" / "metadata.csv").write_text("isic_id,diagnosis_1\n")
    listed = {d.name for d in list_datasets(tmp_path)[1:]}
    assert listed == {"nested"}
    assert find_metadata(tmp_path / "nested").parent.name == "HAM10000"
    with pytest.raises(DataError):
        find_metadata(tmp_path / "deep")


def test_the_demo_set_is_described_by_counting_its_metadata(tmp_path: Path) -> None:
    (tmp_path / "metadata.csv").write_text("lesion_id,image_id,dx\nL1,I1,nv\nL1,I2,nv\nL2,I3,mel\n")
    assert demo_set_name(tmp_path) == "Bundled demo set (3 images of 2 lesions)"
    rows = (DEMO_DATA / "metadata.csv").read_text().splitlines()[1:]
    assert demo_set_name() == f"Bundled demo set ({len(rows)} images of {len({r.split(',')[0] for r in rows})} lesions)"


def sleeper(run_dir: Path) -> subprocess.Popen:
    """A stand-in training process that records SIGTERM in its run folder."""
    code = (
        "import signal, sys, time, pathlib\n"
        f"path = pathlib.Path({str(run_dir)!r}) / 'got-sigterm'\n"
        "signal.signal(signal.SIGTERM, lambda *a: (path.write_text('yes'), sys.exit(0)))\n"
        "time.sleep(60)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def test_lock_names_the_running_job_clears_when_it_dies_and_stop_sends_sigterm(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run = runs / "fake"
    run.mkdir(parents=True)
    process = sleeper(run)
    try:
        time.sleep(0.5)  # let it install its handler
        job = {"pid": process.pid, "started": time.time(), "host": socket.gethostname(), "command": ["fake"]}
        (run / "job.json").write_text(json.dumps(job))
        (runs / ".active_job").write_text(json.dumps({"run": "fake", "path": str(run), **job}))
        running = active_job(runs)
        assert running is not None and running.name == "fake" and running.status == "running"
        with pytest.raises(JobAlreadyRunning, match="'fake' is already running"):
            start_training(runs, DEMO_DATA, "demo", {"epochs": 1})
        assert stop_training(running)
        process.wait(timeout=20)
        assert (run / "got-sigterm").read_text() == "yes"
        assert json.loads((run / "job.json").read_text())["stop_requested"]
    finally:
        process.kill()
        process.wait()
    assert active_job(runs) is None and not (runs / ".active_job").exists()
    assert read_run(run).status == "stopped"  # stopped from the app before any epoch: no model, no error
    assert not stop_training(read_run(run))


def test_start_training_validates_before_launching(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="epochz"):
        start_training(tmp_path / "runs", DEMO_DATA, "demo", {"epochz": 3})
    with pytest.raises(ConfigError, match="unknown recipe"):
        start_training(tmp_path / "runs", DEMO_DATA, "no-such-recipe", {})
    with pytest.raises(DataError, match="not found"):
        start_training(tmp_path / "runs", tmp_path / "nowhere", "demo", {})
    assert not (tmp_path / "runs" / ".active_job").exists()


def test_start_training_runs_the_cli_detached_and_logs(tmp_path: Path, cache_dir: Path) -> None:
    # A data folder without metadata: only the trainer itself finds out, so this is a quick, real failure.
    empty = tmp_path / "empty-data"
    empty.mkdir()
    runs = tmp_path / "runs"
    (runs / "bad-data").mkdir(parents=True)  # an earlier run of the same name is never overwritten
    info = start_training(runs, empty, "demo", {"epochs": 1, "weights": "none"}, run_name="bad data")
    assert info.name == "bad-data-2" and info.status == "running"
    job = json.loads((info.path / "job.json").read_text())
    assert job["command"][1:3] == ["-m", "train"] and "--data" in job["command"] and "--epochs=1" in job["command"]
    assert os.getsid(job["pid"]) == job["pid"]  # its own session: the app's Ctrl+C does not reach it
    deadline = time.time() + 120
    while active_job(runs) is not None and time.time() < deadline:
        time.sleep(0.3)
    run = read_run(info.path)
    assert run.status == "failed" and "metadata" in run.error.lower(), run
    assert log_tail(info.path)  # the CLI's output went to train.log
    assert not (runs / ".active_job").exists()


def test_read_progress_fraction_eta_and_curves(tmp_path: Path) -> None:
    run = tmp_path / "r"
    events = EventWriter(run)
    events.emit("start", config={"epochs": 4}, pid=1, host="x")
    start = json.loads((run / "events.jsonl").read_text())
    start["time"] = time.time() - 100
    (run / "events.jsonl").write_text(json.dumps(start) + "\n")
    for batch in (5, 10):
        events.emit("step", epoch=1, batch=batch, batches=10, loss=1.0 / batch, images_per_s=50)
    events.emit("epoch", epoch=1, epochs=4, train_loss=0.5, val_loss=0.6, val_roc_auc=0.7)
    events.emit("step", epoch=2, batch=5, batches=10, loss=0.3, images_per_s=50)
    progress = read_progress(run)
    assert progress["epoch"] == 2 and progress["batch"] == 5 and progress["epochs"] == 4
    assert progress["fraction"] == pytest.approx(1.5 / 4)
    # 100 s for 1.5 / 4 of the work, so 2.5 / 4 take about 167 s more.
    assert progress["eta_s"] == pytest.approx(100 * 2.5 / 1.5, rel=0.05)
    assert [row["loss"] for row in progress["loss"]] == [0.2, 0.1, 0.3]
    assert progress["epoch_metrics"][0]["val_roc_auc"] == 0.7
    events.emit("error", message="CUDA out of memory", reason="failed")
    progress = read_progress(run)
    assert progress["error"] == "CUDA out of memory" and progress["eta_s"] is None


def test_log_tail_keeps_the_last_state_of_progress_bars(tmp_path: Path) -> None:
    lines = [f"line {i}" for i in range(100)] + ["epoch 1: 10%\repoch 1: 50%\repoch 1: 90%"]
    (tmp_path / "train.log").write_text("\n".join(lines) + "\n")
    tail = log_tail(tmp_path, n=3)
    assert tail.splitlines() == ["line 98", "line 99", "epoch 1: 90%"]
    assert log_tail(tmp_path / "missing") == ""
