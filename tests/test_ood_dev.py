"""The OOD development set (assets/ood_dev) against a model trained by the real CLI.

The tiny session model (64 px, 120 images, 2 epochs) is far weaker than a demo-recipe model, so
these checks ask for what even it must do: rank the non-lesion images clearly above real lesions
with the multi-layer detector, and reject an all-black image, which no stage has ever seen.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from lesion import ood
from lesion.predict import Predictor

REPO = Path(__file__).resolve().parent.parent
DEV = REPO / "assets" / "ood_dev"


def test_dev_set_is_small_licensed_and_listed():
    listed = {row["file"]: row for row in csv.DictReader((DEV / "index.csv").open())}
    files = {p.name for p in DEV.glob("*.jpg")}
    assert files == set(listed) and len(files) >= 25
    assert sum((DEV / name).stat().st_size for name in files) < 5_000_000
    assert all(row["licence"].startswith(("CC0", "public domain")) for row in listed.values())
    attribution = (REPO / "assets" / "ATTRIBUTION.md").read_text()
    assert all(f"| {name} |" in attribution for name in files)


def test_trained_model_ranks_dev_images_above_lesions(trained_model: Path):
    predictor = Predictor.from_checkpoint(trained_model)
    assert set(predictor.detectors) == set(ood.DETECTORS)
    photos = sorted(DEV.glob("*.jpg")) + sorted((REPO / "assets" / "samples" / "ood").glob("*.jpg"))
    lesions = sorted((REPO / "assets" / "samples" / "lesions").glob("*.jpg"))
    method = "mahalanobis_layers_max"
    photo_scores = np.array([r.ood_scores[method] for r in predictor.predict_batch(photos)])
    lesion_scores = np.array([r.ood_scores[method] for r in predictor.predict_batch(lesions)])
    result = ood.evaluate(lesion_scores, photo_scores, predictor.ood_thresholds[method])
    assert result["roc_auc"] >= 0.75, result
    black = photos.index(DEV / "blank_black.jpg")
    assert photo_scores[black] > predictor.ood_thresholds[method]
