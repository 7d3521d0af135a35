"""The bundled model: the shipped file does what it says, and the export that builds it is honest.

``test_shipped_*`` read ``assets/models/`` as committed. They FAIL (never skip) when the file is
missing or stale: rebuild it with the two commands in docs/bundled-model.md.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from lesion.checkpoint import REQUIRED_KEYS, load_checkpoint, save_checkpoint
from lesion.errors import InvalidCheckpoint, LesionError
from lesion.export import RESCORE_TOLERANCE, TRAINING_ONLY, check_current, describe, export_run, rescore
from lesion.predict import Predictor
from lesion.runs import BUNDLED_MODEL
from tests.conftest import DEMO, SAMPLE_LESIONS, run_cli

REBUILD = (
    "python -m train --recipe bundled --out runs/bundled && "
    f"python -m train.export --run runs/bundled --out {BUNDLED_MODEL.relative_to(BUNDLED_MODEL.parents[2])}"
)
COMPARED = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "accuracy")
MAX_BYTES = 25 * 10**6


def shipped() -> dict:
    """The committed bundled checkpoint, checked against the current format; a plain failure otherwise."""
    if not BUNDLED_MODEL.is_file():
        pytest.fail(f"the bundled model {BUNDLED_MODEL} is missing; build it with: {REBUILD}")
    try:
        checkpoint = load_checkpoint(BUNDLED_MODEL)
        check_current(checkpoint, BUNDLED_MODEL.name)
    except (InvalidCheckpoint, LesionError) as error:
        pytest.fail(f"the bundled model is stale ({error}); rebuild it with: {REBUILD}")
    return checkpoint


def assert_same_figures(stored: dict, measured: dict) -> None:
    assert measured["n"] == stored["n"] and measured["n_malignant"] == stored["n_malignant"]
    for key in COMPARED:
        assert measured[key] == pytest.approx(stored[key], abs=RESCORE_TOLERANCE), key
    # The explanations' figures: the similar-case vote and the diagnosis sets' coverage and size.
    assert set(measured) >= {"similar", "sets"} and set(stored) >= {"similar", "sets"}
    for key in ("vote_roc_auc", "softmax_roc_auc", "dx_majority_accuracy"):
        assert measured["similar"][key] == pytest.approx(stored["similar"][key], abs=RESCORE_TOLERANCE), key
    for key in ("coverage", "mean_size"):
        assert measured["sets"][key] == pytest.approx(stored["sets"][key], abs=RESCORE_TOLERANCE), key


def test_shipped_model_is_small_half_precision_and_current() -> None:
    checkpoint = shipped()
    assert BUNDLED_MODEL.stat().st_size <= MAX_BYTES
    floats = [t for t in checkpoint["state_dict"].values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float16 for t in floats)
    assert not set(TRAINING_ONLY) & set(checkpoint)
    assert all(key in checkpoint for key in REQUIRED_KEYS)
    beside = json.loads((BUNDLED_MODEL.parent / "metrics.json").read_text())
    assert beside["test"]["roc_auc"] == checkpoint["metrics"]["test"]["roc_auc"]
    assert "Model card" in (BUNDLED_MODEL.parent / "model_card.md").read_text()
    # It carries its similar cases (the training split, float16) and its conformal calibration.
    split = checkpoint["split"]["csv"].splitlines()
    assert len(checkpoint["similar"]["image_ids"]) == sum(line.endswith(",train") for line in split)
    assert checkpoint["similar"]["embeddings"].dtype == torch.float16
    assert len(checkpoint["conformal"]["scores"]) == sum(line.endswith(",val") for line in split)
    assert "## Explanations" in (BUNDLED_MODEL.parent / "model_card.md").read_text()
    # The bundled recipe unchanged, so the two documented commands rebuild it: its vote and its OOD keep too.
    from lesion.config import build_config

    recipe = build_config("bundled")
    assert checkpoint["export"]["recipe"] == "bundled"
    assert (checkpoint["similar"]["k"], checkpoint["similar"]["weight"]) == (recipe.vote_k, recipe.vote_weight)
    assert checkpoint["ood"]["keep"] == recipe.ood_keep


def test_shipped_model_still_scores_what_it_stores() -> None:
    checkpoint = shipped()
    measured = rescore(checkpoint, folds=("test",))["test"]
    assert_same_figures(checkpoint["metrics"]["test"], measured)


def test_shipped_model_works_with_the_predict_command(tmp_path: Path) -> None:
    shipped()
    out = tmp_path / "results.csv"
    result = run_cli(
        ["--checkpoint", str(BUNDLED_MODEL), "--out", str(out), str(SAMPLE_LESIONS)], module="lesion.predict"
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert rows and all(row["verdict"] in ("benign", "malignant", "unknown") and not row["error"] for row in rows)


def test_export_halves_weights_records_split_and_remeasures(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "bundled.pt"
    result = run_cli(["--run", str(trained_run), "--out", str(out)], module="train.export")
    assert result.returncode == 0, result.stderr
    checkpoint = load_checkpoint(out)
    check_current(checkpoint)
    assert out.stat().st_size < (trained_run / "model.pt").stat().st_size * 0.6  # float16, no history
    assert not set(TRAINING_ONLY) & set(checkpoint)
    assert checkpoint["split"]["csv"] == (trained_run / "split.csv").read_text()
    assert checkpoint["split"]["data"] == "assets/demo"  # repository-relative: names no builder's folders
    # The figures are the halved file's own, measured by the Predictor, and close to the float32 run's.
    run_test = json.loads((trained_run / "metrics.json").read_text())["test"]
    assert checkpoint["metrics"]["test"]["roc_auc"] == pytest.approx(run_test["roc_auc"], abs=0.02)
    assert_same_figures(checkpoint["metrics"]["test"], rescore(checkpoint, folds=("test",))["test"])
    # Loads as float32 on the CPU and answers like the run's model.
    predictor = Predictor(checkpoint)
    assert all(p.dtype == torch.float32 for p in predictor.model.parameters())
    image = sorted(SAMPLE_LESIONS.glob("*.jpg"))[0]
    full = Predictor.from_checkpoint(trained_run / "model.pt").predict(image, with_heatmap=False)
    assert predictor.predict(image, with_heatmap=False).p_malignant == pytest.approx(full.p_malignant, abs=0.01)
    assert json.loads((out.parent / "metrics.json").read_text())["test"] == checkpoint["metrics"]["test"]
    card = (out.parent / "model_card.md").read_text()
    assert "How this file was made" in card and "## Explanations" in card
    # The index and the calibration are rebuilt from the halved weights: each training image finds itself.
    train_ids = [line.split(",")[0] for line in checkpoint["split"]["csv"].splitlines() if line.endswith(",train")]
    assert checkpoint["similar"]["image_ids"] == train_ids
    first = predictor.predict(DEMO / "images" / f"{train_ids[0]}.jpg", with_heatmap=False, ood_threshold=math.inf)
    assert first.similar[0]["image_id"] == train_ids[0]
    # A dx model's diagnosis figures are re-measured too, and the card shows them.
    dx = checkpoint["metrics"]["test"]["dx"]
    assert dx["names"] == checkpoint["dx_names"] and dx["n"] == checkpoint["metrics"]["test"]["n"]
    assert "Diagnosis (test split): balanced accuracy" in card and "Confusion matrix" in card
    assert checkpoint["metrics"]["headline"]["dx_balanced_accuracy"] == dx["balanced_accuracy"]
    text = describe(checkpoint)
    assert "ResNet-18 trained from random weights on the bundled demo set" in text
    assert f"on {checkpoint['metrics']['test']['n_lesions']} held-out lesions" in text


def test_stale_exports_are_refused(trained_run: Path, tmp_path: Path) -> None:
    checkpoint = export_run(trained_run, tmp_path / "bundled.pt")
    with pytest.raises(LesionError, match="format version 0"):
        check_current({**checkpoint, "format_version": 0})
    with pytest.raises(LesionError, match="not exported"):
        check_current({key: value for key, value in checkpoint.items() if key != "split"})
    missing = tmp_path / "missing.pt"
    save_checkpoint({key: value for key, value in checkpoint.items() if key != "ood"}, missing)
    with pytest.raises(InvalidCheckpoint, match="missing ood"):
        load_checkpoint(missing)


def test_export_refuses_an_unfinished_run(tmp_path: Path) -> None:
    result = run_cli(["--run", str(tmp_path), "--out", str(tmp_path / "x.pt")], module="train.export")
    assert result.returncode == 2 and "no model.pt" in result.stderr
