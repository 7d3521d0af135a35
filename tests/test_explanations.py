"""Similar cases, conformal diagnosis sets and the PDF report: the library, the checkpoint and the CLI.

The tiny model of ``trained_run`` is trained by the installed ``python -m train``, so its index and
calibration are the ones finalize writes; the report is read back with pypdf.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lesion import conformal, similar
from lesion.checkpoint import load_checkpoint, save_checkpoint
from lesion.errors import InvalidCheckpoint
from lesion.predict import Predictor
from lesion.report import CasePictures, ModelFacts, render_report
from lesion.verdict import DISCLAIMER
from tests.conftest import DEMO, SAMPLE_LESIONS, SAMPLE_OOD, run_cli

pypdf = pytest.importorskip("pypdf")


def pdf_text(data: bytes) -> str:
    reader = pypdf.PdfReader(io.BytesIO(data))
    assert len(reader.pages) == 1
    return reader.pages[0].extract_text()


# --- similar cases ------------------------------------------------------------------------------


def test_index_finds_each_row_first_and_votes_from_labels() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 8, generator=generator)
    labels = [i % 3 == 0 for i in range(40)]
    dx = ["mel" if malignant else "nv" for malignant in labels]
    index = similar.build_index(features, [f"id{i}" for i in range(40)], [int(m) for m in labels], dx)
    assert index["embeddings"].dtype == torch.float16 and index["embeddings"].shape == (40, 8)
    found = similar.SimilarIndex(index).search(features * 3.0)  # the scale does not matter: cosine
    for i, result in enumerate(found):
        assert result.neighbours[0].image_id == f"id{i}"
        assert result.neighbours[0].similarity == pytest.approx(1.0, abs=2e-3)  # float16 storage
        assert len(result.neighbours) == similar.SHOWN and result.k == similar.VOTE_K
        nearest, _ = similar.SimilarIndex(index).nearest(features[i : i + 1], similar.VOTE_K)
        expected = np.mean([labels[j] for j in nearest[0]])
        assert result.malignant_share == pytest.approx(expected)
        assert result.dx_vote == ("mel" if expected > 0.5 else "nv") or expected == 0.5


def test_index_keeps_a_stratified_sample_of_a_large_set() -> None:
    features = torch.randn(1000, 4)
    dx = ["nv"] * 800 + ["mel"] * 200
    index = similar.build_index(features, [str(i) for i in range(1000)], [0] * 800 + [1] * 200, dx, max_images=100)
    assert len(index["image_ids"]) == 100 and index["sampled_from"] == 1000
    assert index["dx"].count("mel") == 20
    again = similar.build_index(features, [str(i) for i in range(1000)], [0] * 800 + [1] * 200, dx, max_images=100)
    assert again["image_ids"] == index["image_ids"]  # seeded


def test_a_training_image_finds_its_own_copy_first(trained_run: Path) -> None:
    predictor = Predictor.from_checkpoint(trained_run / "model.pt")
    split = pd.read_csv(trained_run / "split.csv")
    train_ids = split.loc[split["fold"] == "train", "image_id"].tolist()[:4]
    assert predictor.similar is not None and len(predictor.similar) == (split["fold"] == "train").sum()
    for image_id in train_ids:
        result = predictor.predict(DEMO / "images" / f"{image_id}.jpg", with_heatmap=False, ood_threshold=math.inf)
        assert result.similar[0]["image_id"] == image_id
        assert result.similar[0]["similarity"] > 0.99
        assert 0.0 <= result.similar_malignant <= 1.0 and result.similar_dx


def test_the_vote_is_measured_against_the_softmax(trained_run: Path) -> None:
    metrics = load_checkpoint(trained_run / "model.pt")["metrics"]["test"]
    vote = metrics["similar"]
    assert vote["k"] == similar.VOTE_K and vote["n"] == metrics["n"]
    assert 0 <= vote["vote_roc_auc"] <= 1 and vote["softmax_roc_auc"] == pytest.approx(metrics["roc_auc"])
    assert "Similar cases: embeddings" in (trained_run / "model_card.md").read_text()


# --- conformal sets -----------------------------------------------------------------------------


def synthetic(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities by construction: each label is drawn from its own row."""
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.full(classes, 0.6), size=n)
    labels = np.array([rng.choice(classes, p=row) for row in probabilities])
    return probabilities, labels


@pytest.mark.parametrize("method", conformal.METHODS)
@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_sets_cover_at_the_level_asked(method: str, coverage: float) -> None:
    names = [f"c{i}" for i in range(6)]
    found = []
    for seed in range(5):
        probabilities, labels = synthetic(600, 6, seed)
        entry = conformal.calibrate(probabilities[:300], labels[:300], names, method=method)
        sets = conformal.prediction_sets(entry, probabilities[300:], coverage)
        found.append(conformal.set_metrics(sets, [names[y] for y in labels[300:]], coverage)["coverage"])
    # Conformal: at least the level on average over calibration draws; the "top class always" rule
    # and the finite calibration set add a little. 5 x 300 test images: standard error about 0.008.
    assert coverage - 0.02 <= float(np.mean(found)) <= coverage + 0.04


def test_a_set_grows_with_the_coverage_and_always_holds_the_top_class() -> None:
    names = ["a", "b", "c", "d"]
    probabilities, labels = synthetic(200, 4, 1)
    entry = conformal.calibrate(probabilities, labels, names, method="aps")
    row = np.array([0.4, 0.3, 0.2, 0.1])
    sizes = [len(conformal.prediction_set(entry, row, level)) for level in (0.05, 0.5, 0.9, 0.99)]
    assert sizes == sorted(sizes) and sizes[0] >= 1
    assert conformal.prediction_set(entry, row, 0.05)[0] == "a"
    assert conformal.prediction_set(entry, row, 0.999) == names  # beyond what 200 images can promise
    with pytest.raises(ValueError, match="between 0 and 1"):
        conformal.prediction_set(entry, row, 1.0)


def test_a_label_the_head_lacks_is_left_out_of_calibration() -> None:
    entry = conformal.calibrate([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]], [0, -1, 1], ["benign", "malignant"])
    assert entry["left_out"] == 1 and len(entry["scores"]) == 2
    assert conformal.set_in_words(["nv", "mel"], 0.9) == "With 90% confidence: melanocytic nevus or melanoma."


def test_the_trained_model_carries_its_sets(trained_run: Path) -> None:
    predictor = Predictor.from_checkpoint(trained_run / "model.pt")
    lesion = sorted(SAMPLE_LESIONS.glob("*.jpg"))[0]
    wide = predictor.predict(lesion, with_heatmap=False, ood_threshold=math.inf, coverage=0.99)
    narrow = predictor.predict(lesion, with_heatmap=False, ood_threshold=math.inf, coverage=0.5)
    assert set(narrow.dx_set) <= set(wide.dx_set) and narrow.dx_set[0] == wide.dx_set[0]
    assert set(wide.dx_set) <= set(predictor.dx_names) and narrow.set_coverage == 0.5
    sets = load_checkpoint(trained_run / "model.pt")["metrics"]["test"]["sets"]
    assert sets["nominal_coverage"] == 0.9 and 0 <= sets["coverage"] <= 1 and sets["mean_size"] >= 1


# --- rejected photos, older and tampered checkpoints --------------------------------------------


def test_a_rejected_photo_gets_no_cases_and_no_set(trained_run: Path) -> None:
    predictor = Predictor.from_checkpoint(trained_run / "model.pt")
    rejected = predictor.predict(sorted(SAMPLE_LESIONS.glob("*.jpg"))[0], ood_threshold=-math.inf)
    assert rejected.verdict == "unknown"
    assert rejected.similar == [] and rejected.dx_set == [] and math.isnan(rejected.similar_malignant)


def test_a_checkpoint_without_explanations_still_predicts(trained_run: Path, tmp_path: Path) -> None:
    checkpoint = load_checkpoint(trained_run / "model.pt")
    for key in ("similar", "conformal"):
        checkpoint.pop(key)
    predictor = Predictor(checkpoint)
    result = predictor.predict(sorted(SAMPLE_LESIONS.glob("*.jpg"))[0], with_heatmap=False, ood_threshold=math.inf)
    assert result.similar == [] and result.dx_set == [] and result.verdict in ("benign", "malignant")


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda c: c["similar"].update(embeddings=c["similar"]["embeddings"][:, :3]), "features"),
        (lambda c: c["similar"].update(labels=c["similar"]["labels"][:-1]), "labels"),
        (lambda c: c["conformal"].update(names=["x", "y"]), "names"),
        (lambda c: c["conformal"].update(scores=[0.5, float("nan")]), "scores"),
    ],
)
def test_a_tampered_explanation_is_refused_at_load(trained_run: Path, tmp_path: Path, tamper, message: str) -> None:
    checkpoint = load_checkpoint(trained_run / "model.pt")
    tamper(checkpoint)
    path = save_checkpoint(checkpoint, tmp_path / "tampered.pt")
    with pytest.raises(InvalidCheckpoint, match=message):
        Predictor.from_checkpoint(path)


# --- the report -------------------------------------------------------------------------------


def test_the_report_reads_back(trained_run: Path) -> None:
    from lesion.explain import overlay
    from lesion.images import load_image

    predictor = Predictor.from_checkpoint(trained_run / "model.pt")
    facts = ModelFacts.from_checkpoint(predictor.checkpoint, "tiny")
    pictures = CasePictures(predictor.checkpoint)
    assert len(pictures) == len(predictor.similar)  # the demo set is here: every case has its picture
    path = sorted(SAMPLE_LESIONS.glob("*.jpg"))[0]
    image = load_image(path)
    accepted = predictor.predict(path, ood_threshold=math.inf)
    text = pdf_text(
        render_report(
            accepted,
            image,
            facts,
            name=path.name,
            heatmap_image=overlay(image, accepted.heatmap),
            thumbnails=pictures.for_prediction(accepted),
        )
    )
    verdict = {"benign": "Benign", "malignant": "Malignant"}[accepted.verdict]
    assert verdict in text and "Demonstration only — not a diagnosis" in text
    assert f"{accepted.p_malignant:.0%}" in text and "confidence" in text
    assert accepted.similar[0]["image_id"] in text and "most similar confirmed cases" in text
    assert "Test split" in text and "tiny" in text

    rejected = predictor.predict(path, ood_threshold=-math.inf)
    text = pdf_text(render_report(rejected, image, facts, name=path.name))
    assert "Not a skin lesion" in text and "Demonstration only — not a diagnosis" in text
    assert "Benign" not in text and "Malignant" not in text and "confidence" not in text
    assert "most similar" not in text
    assert DISCLAIMER.split(".")[0] in text


def test_cli_writes_reports_and_the_explanation_columns(trained_run: Path, tmp_path: Path) -> None:
    lesion = sorted(SAMPLE_LESIONS.glob("*.jpg"))[0]
    photos = sorted(SAMPLE_OOD.glob("*.jpg"))
    out, reports = tmp_path / "results.csv", tmp_path / "reports"
    args = ["--checkpoint", str(trained_run / "model.pt"), "--out", str(out), "--report", str(reports)]
    result = run_cli([*args, "--coverage", "0.8", str(lesion), *map(str, photos)], module="lesion.predict")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert {"similar_malignant", "similar_ids", "dx_set", "report"} <= set(rows[0])
    assert len(rows) == 1 + len(photos)
    rejected = [row for row in rows if row["accepted"] == "False"]
    accepted = [row for row in rows if row["accepted"] == "True"]
    assert rejected and accepted  # the tiny model rejects some photos that are not lesions and accepts some
    for row in rejected:
        assert row["similar_malignant"] == row["similar_ids"] == row["dx_set"] == ""
        assert "Not a skin lesion" in pdf_text(Path(row["report"]).read_bytes())
    for row in accepted:
        assert 0 <= float(row["similar_malignant"]) <= 1
        assert len(row["similar_ids"].split(";")) == similar.SHOWN and row["dx_set"]
        assert Path(row["report"]).name.endswith("_report.pdf")
        assert "Demonstration only — not a diagnosis" in pdf_text(Path(row["report"]).read_bytes())
    bad = run_cli([*args, "--coverage", "1.5", str(lesion)], module="lesion.predict")
    assert bad.returncode == 2 and "--coverage must be between 0 and 1" in bad.stderr


def test_without_the_data_folder_cases_have_no_pictures(trained_run: Path, tmp_path: Path) -> None:
    """A model whose training images are not on this machine still names its cases; the page shows ids."""
    from lesion_app.predict_view import similar_cases

    checkpoint = load_checkpoint(trained_run / "model.pt")
    checkpoint["config"]["data"] = str(tmp_path / "gone")
    pictures = CasePictures(checkpoint)
    assert len(pictures) == 0
    predictor = Predictor(checkpoint)
    result = predictor.predict(sorted(SAMPLE_LESIONS.glob("*.jpg"))[0], with_heatmap=False, ood_threshold=math.inf)
    cases = similar_cases(result, pictures)
    assert [case["image_id"] for case in cases] == [case["image_id"] for case in result.similar]
    assert all(case["picture"] is None and case["caption"] for case in cases)
