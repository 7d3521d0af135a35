"""OOD threshold page through AppTest: live re-thresholding, the notebook baseline, saving into the model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import lesion_app.gallery
from lesion.checkpoint import load_checkpoint
from lesion.config import TrainConfig
from lesion.predict import Predictor
from lesion_app.gallery import Sample, list_samples
from tests.helpers_model import count_predictions

REPO = Path(__file__).resolve().parent.parent
CAR = REPO / "assets" / "samples" / "ood" / "car_image1.jpg"
N_OOD = sum(1 for s in list_samples() if s.kind == "ood")
N_LESIONS = sum(1 for s in list_samples() if s.kind == "lesion")


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run (this module writes into it)."""
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(trained_run, run)
    return run


@pytest.fixture
def counter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return count_predictions(monkeypatch, tmp_path / "predict-calls.txt")


def open_ood_page(runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("LESION_RUNS_DIR", str(runs_dir))
    monkeypatch.delenv("LESION_CHECKPOINT", raising=False)
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=180).run()
    at.switch_page("app_pages/ood.py").run()
    assert not at.exception
    return at


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def threshold_slider(at: AppTest):
    return next(s for s in at.slider if s.label.startswith("Threshold on the"))


def test_slider_rethresholds_without_running_the_model(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch, counter: Path
) -> None:
    at = open_ood_page(run_copy.parent, monkeypatch)
    scored = len(counter.read_text().splitlines())
    assert scored == N_OOD + N_LESIONS  # every gallery image scored once
    slider = threshold_slider(at)
    slider.set_value(slider.min).run()
    assert metric(at, "OOD photos accepted") == f"0 of {N_OOD}"
    assert metric(at, "Lesions rejected") == f"{N_LESIONS} of {N_LESIONS}"
    threshold_slider(at).set_value(threshold_slider(at).max).run()
    assert metric(at, "OOD photos accepted") == f"{N_OOD} of {N_OOD}"
    assert metric(at, "Lesions rejected") == f"0 of {N_LESIONS}"
    assert not at.exception
    assert len(counter.read_text().splitlines()) == scored, "moving the slider ran the network"
    baseline = at.table[0].value
    assert "Notebook" in baseline.iloc[0, 0] and baseline.iloc[0, 1].endswith(f"of {N_OOD}")
    # The notebook's rule, recomputed here from the predictor's msp scores at 1 - 0.8.
    predictor = Predictor.from_checkpoint(run_copy / "model.pt")
    msp = [p.ood_scores["msp"] for p in predictor.predict_batch(sorted((REPO / "assets/samples/ood").glob("*.jpg")))]
    assert baseline.iloc[0, 1] == f"{sum(score <= 0.2 for score in msp)} of {N_OOD}"


def test_other_detector_and_uploaded_images_join_the_gallery(run_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_ood_page(run_copy.parent, monkeypatch)
    next(box for box in at.selectbox if box.label == "Detector").set_value("knn").run()
    assert threshold_slider(at).label == "Threshold on the knn score"
    own_ood, own_lesion = at.file_uploader[0], at.file_uploader[1]
    own_ood.upload("my-car.jpg", CAR.read_bytes(), "image/jpeg")
    own_lesion.upload("broken.jpg", b"nope", "image/jpeg")
    at.run()
    assert not at.exception
    assert metric(at, "OOD photos accepted").endswith(f"of {N_OOD + 1}")
    assert any("broken.jpg" in e.value and "not an image" in e.value for e in at.error)


def test_two_uploads_with_one_name_keep_their_own_scores(run_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two different photos both called image.jpg (from two folders): each keeps its own score.
    at = open_ood_page(run_copy.parent, monkeypatch)
    lesion = next(s for s in list_samples() if s.kind == "lesion").path
    at.file_uploader[0].set_value(
        [("image.jpg", CAR.read_bytes(), "image/jpeg"), ("image.jpg", lesion.read_bytes(), "image/jpeg")]
    )
    at.run()
    assert not at.exception
    assert metric(at, "OOD photos accepted").endswith(f"of {N_OOD + 2}")
    shown = [m.value for m in at.markdown if "image.jpg (uploaded as OOD photo)" in m.value]
    predictor = Predictor.from_checkpoint(run_copy / "model.pt")
    slider = threshold_slider(at)
    decimals = max(0, len(f"{slider.step:f}".rstrip("0").split(".")[1]))
    expected = [f"score {predictor.predict(path).ood_score:.{decimals}f}" for path in (CAR, lesion)]
    assert len(shown) == 2 and [e in m for e, m in zip(expected, shown, strict=True)] == [True, True], (shown, expected)


def test_save_threshold_then_predict_uses_it(run_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sample = next(s for s in list_samples() if s.kind == "lesion")
    with (run_copy / "split.csv").open("a") as split:  # pretend the model was trained on one sample
        split.write(f"{sample.name},LES_X,nv,benign,train\n")
    at = open_ood_page(run_copy.parent, monkeypatch)
    assert any("seen in training (train)" in m.value for m in at.markdown if sample.name in m.value)
    slider = threshold_slider(at)
    steps = round((slider.max - slider.min) / 2 / slider.step)
    chosen = round(slider.min + steps * slider.step, 6)  # a value on the slider's grid
    slider.set_value(chosen).run()
    save = next(b for b in at.button if b.label.startswith("Save"))
    save.click().run()
    assert not at.exception
    default = TrainConfig().ood_method  # the detector the page opens with
    assert any(f"Saved: {default} with" in s.value for s in at.success)
    fresh = Predictor.from_checkpoint(run_copy / "model.pt")
    assert fresh.ood_method == default and fresh.ood_thresholds[default] == pytest.approx(chosen)
    history = load_checkpoint(run_copy / "model.pt")["threshold_history"]
    assert history[-1]["new_threshold"] == pytest.approx(chosen)
    assert float(metric(at, "Saved threshold")) == pytest.approx(chosen, abs=slider.step / 2)
    # The Predict page now answers with the saved threshold.
    at.switch_page("app_pages/predict.py").run()
    at.file_uploader[0].upload(CAR.name, CAR.read_bytes(), "image/jpeg")
    at.run()
    assert not at.exception
    assert any(f"Rejected above {chosen:.4g}" in c.value for c in at.caption)


def test_a_gallery_with_no_readable_image_says_so(
    run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every bundled sample unreadable (a broken checkout, a disk error): the page explains, it does not crash.
    broken = []
    for sample in list_samples()[:3]:
        path = tmp_path / sample.path.name
        path.write_bytes(b"not an image at all")
        broken.append(Sample(sample.name, path, sample.kind, sample.caption, sample.label))
    monkeypatch.setattr(lesion_app.gallery, "list_samples", lambda: broken)
    at = open_ood_page(run_copy.parent, monkeypatch)
    assert not at.exception
    assert any("None of the gallery images could be read" in w.value for w in at.warning)
    assert not at.slider  # nothing to set a threshold against
