"""The training CLI as users run it: a complete run folder, resume, torchrun, plain failures."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pandas as pd
import pytest
import torch

from lesion.checkpoint import REQUIRED_KEYS
from lesion.config import TrainConfig, build_config
from lesion.errors import WeightsUnavailable
from lesion.events import iter_events
from lesion.ood import DETECTORS
from lesion.training import run_training
from tests.conftest import DEMO, REPO, TINY_TRAINING, run_cli


def test_cli_writes_a_complete_run_folder(trained_run: Path) -> None:
    for name in ("config.json", "events.jsonl", "split.csv", "best.pt", "last.pt", "model.pt", "metrics.json"):
        assert (trained_run / name).is_file(), name
    for plot in ("roc", "pr", "calibration", "confusion", "curves"):
        assert (trained_run / "plots" / f"{plot}.png").stat().st_size > 1000
    kinds = [event["event"] for event in iter_events(trained_run)]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert {"step", "epoch", "checkpoint"} <= set(kinds)
    assert kinds.count("epoch") == 2

    checkpoint = torch.load(trained_run / "model.pt", map_location="cpu", weights_only=True)
    assert set(REQUIRED_KEYS) <= set(checkpoint)
    assert "training" not in checkpoint  # the final model carries no optimizer state
    assert checkpoint["config"]["arch"] == "resnet18" and checkpoint["config"]["image_size"] == 64
    assert set(checkpoint["ood"]["detectors"]) == set(DETECTORS)
    assert checkpoint["ood"]["method"] == TrainConfig().ood_method
    spread = checkpoint["metrics"]["ood_rejection_spread"][checkpoint["ood"]["method"]]
    assert spread["low"] <= spread["median"] <= spread["high"]
    assert 0.0 < checkpoint["decision_threshold"] < 1.0 and checkpoint["temperature"] > 0
    assert checkpoint["metrics"]["headline_split"] == "test"
    assert "roc_auc" in checkpoint["metrics"]["test"] and "roc_auc" in checkpoint["metrics"]["val"]
    assert checkpoint["data"]["n_images"] == 120
    last = torch.load(trained_run / "last.pt", map_location="cpu", weights_only=True)
    assert "optimizer" in last["training"]

    split = pd.read_csv(trained_run / "split.csv")
    assert list(split.columns[:5]) == ["image_id", "lesion_id", "dx", "label", "fold"]
    assert split.groupby("lesion_id")["fold"].nunique().max() == 1, "a lesion sits on two sides of the split"
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert (
        metrics["split_sizes"]["test"]["benign"] + metrics["split_sizes"]["test"]["malignant"] == metrics["test"]["n"]
    )
    card = (trained_run / "model_card.md").read_text()
    assert "not a diagnosis" in card and "test" in card and "split" in card


def _tiny_config(out: Path, cache: Path, **changes) -> object:
    overrides = [item for item in TINY_TRAINING if not item.startswith("--recipe")]
    config = build_config("scratch", [*overrides, f"--data={DEMO}", f"--out={out}", f"--cache-dir={cache}"])
    return dataclasses.replace(config, max_images=80, **changes)


class _Crash(BaseException):
    """Stands in for a process killed between epochs (not an Exception: nothing catches it)."""


# The second case resumes mixup / cutmix draws and the EMA of the weights (kept in last.pt) too.
REGULARISED = {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "mix_prob": 0.8, "ema_decay": 0.9, "tta": True}


@pytest.mark.parametrize("changes", [{}, REGULARISED], ids=["plain", "mix-ema-tta"])
def test_resume_gives_the_same_model_as_an_uninterrupted_run(tmp_path: Path, cache_dir: Path, changes: dict) -> None:
    run_training(_tiny_config(tmp_path / "straight", cache_dir, **changes))

    def crash_after_first_epoch(event: dict) -> None:
        if event["event"] == "checkpoint" and event["kind"] == "last" and event["epoch"] == 1:
            raise _Crash

    interrupted = _tiny_config(tmp_path / "resumed", cache_dir, **changes)
    with pytest.raises(_Crash):
        run_training(interrupted, on_event=crash_after_first_epoch)
    assert not (tmp_path / "resumed" / "model.pt").exists()
    run_training(interrupted)

    starts = [e for e in iter_events(tmp_path / "resumed") if e["event"] == "start"]
    assert [e["resumed_from_epoch"] for e in starts] == [0, 1]
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    for key, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][key]), key
    assert straight["metrics"]["test"]["roc_auc"] == resumed["metrics"]["test"]["roc_auc"]
    assert resumed["tta"] is bool(changes.get("tta", False))
    if changes.get("ema_decay"):
        runs = ("straight", "resumed")
        emas = [torch.load(tmp_path / run / "last.pt", weights_only=True)["training"]["ema"] for run in runs]
        assert emas[0]["updates"] == emas[1]["updates"] > 0
        for key, tensor in emas[0]["state_dict"].items():
            assert torch.equal(tensor, emas[1]["state_dict"][key]), key


def test_torchrun_two_processes_on_cpu(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "train",
        f"--data={DEMO}",
        f"--out={out}",
        f"--cache-dir={cache_dir}",
        *TINY_TRAINING,
        "--epochs=1",
        "--max-images=60",
        "--device=cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    events = list(iter_events(out))
    start = events[0]
    assert start["event"] == "start" and start["world_size"] == 2
    assert [e["event"] for e in events].count("start") == 1, "only rank 0 writes events"
    assert events[-1]["event"] == "done"
    assert torch.load(out / "model.pt", weights_only=True)["metrics"]["test"]["n"] > 0
    assert result.stdout.count("run folder:") == 1


def test_missing_weights_file_fails_with_one_plain_line(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "run"
    result = run_cli(
        [f"--data={DEMO}", f"--out={out}", f"--cache-dir={cache_dir}", *TINY_TRAINING, "--weights=/nowhere/r18.pth"]
    )
    assert result.returncode == 1
    assert "error: weights file not found: /nowhere/r18.pth" in result.stderr
    assert "Traceback" not in result.stderr
    error = list(iter_events(out))[-1]
    assert error["event"] == "error" and error["reason"] == "failed" and "not found" in error["message"]


def test_offline_imagenet_weights_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.models import _api

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(_api.WeightsEnum, "get_state_dict", offline)
    from lesion.weights import imagenet_state_dict

    with pytest.raises(WeightsUnavailable, match="--weights=none") as caught:
        imagenet_state_dict("resnet50")
    assert "--weights=/path/to/that/file" in str(caught.value)
    assert "--arch=efficientnet_lite0" in str(caught.value)  # the offline alternative, named


def test_missing_dataset_fails_with_one_plain_line(tmp_path: Path) -> None:
    result = run_cli([f"--data={tmp_path}", f"--out={tmp_path / 'run'}", "--recipe=demo"])
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr
    assert str(tmp_path) in result.stderr


def test_a_stop_before_the_first_epoch_is_reported_as_stopped(tmp_path: Path, cache_dir: Path) -> None:
    import signal

    from lesion.training import StoppedBeforeModel

    def stop_at_start(event: dict) -> None:
        if event["event"] == "start":
            os.kill(os.getpid(), signal.SIGTERM)  # what the app's Stop button sends

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StoppedBeforeModel):
        run_training(_tiny_config(tmp_path / "stopped", cache_dir), on_event=stop_at_start)
    last = list(iter_events(tmp_path / "stopped"))[-1]
    assert last["event"] == "error" and last["reason"] == "stopped"
    assert signal.getsignal(signal.SIGTERM) == before, "the caller's signal handlers are restored"
