"""Train page through AppTest: a real tiny job starts, shows progress, is the only one, stops, becomes a model."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from lesion.runs import list_runs
from lesion_app.jobs import DEMO_DATA, JobAlreadyRunning, active_job, read_progress, start_training, stop_training

REPO = Path(__file__).resolve().parent.parent


def open_train_page() -> AppTest:
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120).run()
    at.switch_page("app_pages/train.py").run()
    assert not at.exception
    return at


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_start_watch_refuse_second_stop_and_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_dir: Path
) -> None:
    runs = tmp_path / "runs"
    monkeypatch.setenv("LESION_RUNS_DIR", str(runs))
    monkeypatch.delenv("LESION_CHECKPOINT", raising=False)
    at = open_train_page()
    at.number_input(key="epochs-demo").set_value(50)
    at.number_input(key="batch-demo").set_value(16)
    at.number_input(key="size-demo").set_value(64)
    at.selectbox(key="arch-demo").set_value("resnet18")
    at.radio(key="weights-demo").set_value("none")
    at.number_input(key="max-demo").set_value(40)
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.exception, at.exception
    job = active_job(runs)
    try:
        assert job is not None and job.status == "running"
        assert [s.value for s in at.subheader][0] == f"Running: {job.name}"
        assert at.main.progress, "no progress bar while training"
        assert any(b.label == "Stop training" for b in at.button)
        assert not any(b.label == "Start training" for b in at.button)
        assert [row for row in at.dataframe[-1].value.itertuples() if row.run == job.name][0].status == "running"

        # Progress from the trainer's own events reaches the page.
        wait_for(lambda: read_progress(job.path)["epoch_metrics"], 240, "the first epoch")
        at.run()
        bar = at.main.progress[0]
        assert "Epoch" in bar.proto.text and "of 50" in bar.proto.text and bar.value > 0

        # A second tab (a new session) sees the same job and cannot start another.
        second = open_train_page()
        assert [s.value for s in second.subheader][0] == f"Running: {job.name}"
        assert not any(b.label == "Start training" for b in second.button)
        assert second.sidebar.progress and job.name in second.sidebar.progress[0].proto.text
        with pytest.raises(JobAlreadyRunning, match=job.name):
            start_training(runs, DEMO_DATA, "demo", {"epochs": 1})

        # Stop from the page: the trainer finishes its batch and keeps the best epoch as the model.
        next(b for b in at.button if b.label == "Stop training").click().run()
        assert not at.exception
        assert any("Stopping" in w.value for w in at.warning)
        wait_for(lambda: active_job(runs) is None, 300, "the stopped job to finish")
    finally:
        if active_job(runs) is not None:
            stop_training(active_job(runs))
            wait_for(lambda: active_job(runs) is None, 300, "cleanup")
    (run,) = list_runs(runs)
    assert run.status == "complete", (run.status, run.error)
    at.run()
    assert not at.exception
    assert any(job.name in s.value and "finished" in s.value for s in at.success)
    model = at.sidebar.selectbox[0]
    assert model.label == "Model" and model.value == str((run.path / "model.pt").resolve())
    assert any(b.label == "Start training" for b in at.button)  # free to start the next one
