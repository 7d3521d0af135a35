"""``python -m train.evaluate`` as users run it: any checkpoint on any dataset, figures that match."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lesion.data import read_metadata
from lesion.metrics import binary_metrics
from lesion.predict import Predictor
from tests.conftest import DEMO, SAMPLE_LESIONS, run_cli


def test_json_metrics_on_the_bundled_samples_equal_the_predictors(trained_model: Path) -> None:
    labels = SAMPLE_LESIONS / "labels.csv"
    result = run_cli(
        ["--checkpoint", str(trained_model), "--data", str(SAMPLE_LESIONS), "--metadata", str(labels), "--json"],
        module="train.evaluate",
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 40 and metrics["split"] == "all images"

    predictor = Predictor.from_checkpoint(trained_model)
    frame, _ = read_metadata(SAMPLE_LESIONS, labels)
    expected = binary_metrics(
        frame["label"].to_numpy(),
        np.asarray(predictor.p_malignant(frame["path"].tolist())),
        predictor.decision_threshold,
        frame["dx"].tolist(),
    )
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity", "threshold"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-9), key


def test_test_split_reproduces_the_figures_training_reported(trained_run: Path) -> None:
    result = run_cli(
        ["--checkpoint", str(trained_run / "model.pt"), "--data", str(DEMO), "--split", "test", "--json"],
        module="train.evaluate",
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    reported = json.loads((trained_run / "metrics.json").read_text())["test"]
    assert measured["n"] == reported["n"] and measured["n_malignant"] == reported["n_malignant"]
    assert measured["roc_auc"] == pytest.approx(reported["roc_auc"], abs=1e-3)
    assert measured["confusion"] == reported["confusion"]


def test_human_readable_output_and_plain_errors(trained_model: Path, tmp_path: Path) -> None:
    labels = SAMPLE_LESIONS / "labels.csv"
    ok = run_cli(
        ["--checkpoint", str(trained_model), "--data", str(SAMPLE_LESIONS), "--metadata", str(labels)],
        module="train.evaluate",
    )
    assert ok.returncode == 0 and "roc_auc" in ok.stdout and "40 images" in ok.stdout
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a checkpoint")
    bad = run_cli(["--checkpoint", str(bogus), "--data", str(SAMPLE_LESIONS)], module="train.evaluate")
    assert bad.returncode == 1 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
