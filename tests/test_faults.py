"""Training under faults: a SIGKILL mid-run, a corrupt image in the data, a disk that fills up.

Nothing is lost: a killed run is listed as interrupted and the same command resumes it from its last
checkpoint; a corrupt image stops the run at once naming it (or is skipped and reported when asked);
a checkpoint write that fails leaves the previous checkpoint intact and no temporary file behind.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import lesion.checkpoint
import lesion.files
from lesion.checkpoint import load_checkpoint, save_checkpoint
from lesion.events import iter_events
from lesion.runs import list_runs
from tests.conftest import DEMO, REPO, TINY_TRAINING, run_cli


def _tiny(extra: list[str]) -> list[str]:
    """TINY_TRAINING with some keys replaced."""
    keys = {item.split("=", 1)[0] for item in extra}
    return [item for item in TINY_TRAINING if item.split("=", 1)[0] not in keys] + extra


def _events(run_dir: Path) -> list[dict]:
    return list(iter_events(run_dir)) if (run_dir / "events.jsonl").is_file() else []


# ---------------------------------------------------------------------------- SIGKILL and resume


def test_sigkill_mid_training_is_listed_as_interrupted_and_the_same_command_resumes(
    tmp_path: Path, cache_dir: Path
) -> None:
    runs = tmp_path / "runs"
    run_dir = runs / "killed"
    args = [f"--data={DEMO}", f"--out={run_dir}", f"--cache-dir={cache_dir}"]
    # The tiny model's images (already in the session's cache), 3 batches an epoch: the run is short, not trivial.
    args += _tiny(["--epochs=2", "--max-steps-per-epoch=3", "--log-every=1"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if any(e["event"] == "checkpoint" and e.get("kind") == "last" for e in _events(run_dir)):
                break
            time.sleep(0.05)
        assert process.poll() is None, "training ended before it could be killed"
        process.send_signal(signal.SIGKILL)  # no handler runs: what a power cut or the OOM killer does
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
    assert process.returncode == -signal.SIGKILL

    events = _events(run_dir)
    assert not (run_dir / "model.pt").exists()
    assert (run_dir / "last.pt").is_file()
    assert load_checkpoint(run_dir / "last.pt")["epoch"] >= 1  # readable: it was written atomically
    assert not [e for e in events if e["event"] in ("done", "error")]
    assert not list(run_dir.glob(".*.tmp"))
    [info] = list_runs(runs)
    assert info.status == "interrupted"

    result = run_cli(args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    starts = [e for e in _events(run_dir) if e["event"] == "start"]
    assert len(starts) == 2 and starts[0]["resumed_from_epoch"] == 0 and starts[1]["resumed_from_epoch"] >= 1
    epochs = [e["epoch"] for e in _events(run_dir) if e["event"] == "epoch"]
    assert epochs[-1] == 2 and sorted(set(epochs)) == [1, 2]
    assert (run_dir / "model.pt").is_file()
    [info] = list_runs(runs)
    assert info.status == "complete"


# ---------------------------------------------------------------------------- corrupt data


@pytest.fixture
def small_dataset_with_a_corrupt_image(tmp_path: Path) -> tuple[Path, str]:
    """A copy of 60 demo images (30 benign, 30 malignant lesions) whose first malignant JPEG is cut short."""
    metadata = pd.read_csv(DEMO / "metadata.csv")
    malignant = metadata["dx"].isin(["mel", "bcc", "akiec"])
    rows = pd.concat([metadata[~malignant].head(30), metadata[malignant].head(30)])
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows.to_csv(data / "metadata.csv", index=False)
    for image_id in rows["image_id"]:
        (data / "images" / f"{image_id}.jpg").write_bytes((DEMO / "images" / f"{image_id}.jpg").read_bytes())
    bad = str(rows[malignant.loc[rows.index]]["image_id"].iloc[0])
    path = data / "images" / f"{bad}.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    return data, bad


def test_a_corrupt_image_fails_the_run_fast_naming_it(small_dataset_with_a_corrupt_image, tmp_path: Path) -> None:
    data, bad = small_dataset_with_a_corrupt_image
    run_dir = tmp_path / "run"
    args = [f"--data={data}", f"--out={run_dir}", f"--cache-dir={tmp_path / 'cache'}"]
    started = time.monotonic()
    result = run_cli([*args, *_tiny(["--epochs=1", "--max-images=0", "--max-steps-per-epoch=2"])], timeout=240)
    assert result.returncode == 1, result.stderr[-3000:]
    assert bad in result.stderr and "Traceback" not in result.stderr
    errors = [e for e in _events(run_dir) if e["event"] == "error"]
    assert errors and bad in errors[-1]["message"] and errors[-1]["reason"] == "failed"
    assert not [e for e in _events(run_dir) if e["event"] == "step"], "it trained before checking the images"
    assert not (run_dir / "model.pt").exists()
    # "Fast": the failure comes from the check before training, so well within the time of one epoch.
    assert time.monotonic() - started < 200
    [info] = list_runs(tmp_path)
    assert info.status == "failed" and bad in info.error


def test_skip_bad_images_completes_and_reports_the_skipped_image(
    small_dataset_with_a_corrupt_image, tmp_path: Path
) -> None:
    data, bad = small_dataset_with_a_corrupt_image
    run_dir = tmp_path / "run"
    args = [f"--data={data}", f"--out={run_dir}", f"--cache-dir={tmp_path / 'cache'}", "--skip-bad-images=true"]
    result = run_cli([*args, *_tiny(["--epochs=1", "--max-images=0", "--max-steps-per-epoch=2"])], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "model.pt").is_file()
    checkpoint = load_checkpoint(run_dir / "model.pt")
    assert bad in json.dumps(checkpoint["data"]["skipped"])
    assert checkpoint["data"]["n_images"] == 59
    split = pd.read_csv(run_dir / "split.csv")
    assert bad not in set(split["image_id"]) and len(split) == 59
    card = (run_dir / "model_card.md").read_text()
    assert re.search(r"skipped[^\n]*: 1\b", card), card


# ---------------------------------------------------------------------------- disk full


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _half_written_then_disk_full(obj, stream, *args, **kwargs):
    stream.write(b"PK\x03\x04" + b"\0" * 4096)  # some bytes reach the temporary file first
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(
    "target, fault",
    [("torch.save", _disk_full), ("torch.save", _half_written_then_disk_full), ("os.replace", _disk_full)],
    ids=["save-fails", "save-fails-midway", "rename-fails"],
)
def test_failed_checkpoint_write_leaves_the_previous_one_intact(
    trained_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, fault
) -> None:
    path = tmp_path / "last.pt"
    previous = load_checkpoint(trained_model)
    save_checkpoint(previous, path)
    before = path.read_bytes()
    changed = {**previous, "epoch": previous.get("epoch", 0) + 1, "decision_threshold": 0.123}

    module, name = target.split(".")
    # torch.save is called by lesion.checkpoint, os.replace by the shared atomic writer (lesion.files).
    owner = lesion.checkpoint if module == "torch" else lesion.files
    monkeypatch.setattr(getattr(owner, module), name, fault)
    with pytest.raises(OSError) as raised:
        save_checkpoint(changed, path)
    monkeypatch.undo()

    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    again = load_checkpoint(path)
    assert again["decision_threshold"] == previous["decision_threshold"]
    assert torch.equal(again["state_dict"]["fc.weight"], previous["state_dict"]["fc.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"], "a temporary file was left behind"
