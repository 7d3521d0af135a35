"""Predict page through AppTest: uploads, gallery picks, bad files, and no model run on slider moves."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from lesion.conformal import set_in_words
from lesion.labels import DX_NAMES
from lesion.predict import Predictor
from lesion.similar import vote_in_words
from lesion_app.predict_view import newest_first
from lesion_app.session_cache import SHARED
from lesion_app.wording import VERDICT_TEXT
from tests.helpers_model import count_predictions

REPO = Path(__file__).resolve().parent.parent
LESION = REPO / "assets" / "samples" / "lesions" / "ISIC_0000169.jpg"
CAR = REPO / "assets" / "samples" / "ood" / "car_image1.jpg"


@pytest.fixture
def counter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file that gets one line per network call the app makes."""
    return count_predictions(monkeypatch, tmp_path / "predict-calls.txt")


def calls(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


@pytest.fixture
def predict_page(trained_run: Path, monkeypatch: pytest.MonkeyPatch, counter: Path) -> AppTest:
    monkeypatch.setenv("LESION_RUNS_DIR", str(trained_run.parent))
    monkeypatch.delenv("LESION_CHECKPOINT", raising=False)
    SHARED.clear()  # what an earlier test's session left for others to reuse: each test counts its own network calls
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120).run()
    assert not at.exception
    return at


def heatmaps(at: AppTest) -> list[str]:
    """Captions of the heatmap overlays shown."""
    return [c for image in at.image for c in image.captions if "heatmap" in c]


def verdict_boxes(at: AppTest) -> list[str]:
    verdicts = tuple(f"**{text}**" for text in VERDICT_TEXT.values())
    return [box.value for box in [*at.success, *at.error, *at.warning] if box.value.startswith(verdicts)]


def test_upload_shows_verdicts_matching_the_predictor_and_a_table(predict_page: AppTest, trained_run: Path) -> None:
    at = predict_page
    uploader = at.file_uploader[0]
    uploader.upload(LESION.name, LESION.read_bytes(), "image/jpeg").upload(CAR.name, CAR.read_bytes(), "image/jpeg")
    at.run()
    assert not at.exception
    predictor = Predictor.from_checkpoint(trained_run / "model.pt")
    expected = [VERDICT_TEXT[predictor.predict(path, with_heatmap=False).verdict] for path in (LESION, CAR)]
    assert sorted(box.split("**")[1] for box in verdict_boxes(at)) == sorted(expected)
    table = at.dataframe[0].value
    assert list(table["image"]) == [LESION.name, CAR.name] and list(table["verdict"]) == expected
    assert heatmaps(at) == [f"{LESION.name}: Grad-CAM heatmap", f"{CAR.name}: Grad-CAM heatmap"]
    labels = [button.label for button in at.download_button]
    assert labels.count("Heatmap PNG") == 2 and labels.count("Result JSON") == 2


def test_slider_and_view_never_run_the_model_again(predict_page: AppTest, counter: Path) -> None:
    at = predict_page
    at.file_uploader[0].upload(LESION.name, LESION.read_bytes(), "image/jpeg")
    at.run()
    assert calls(counter) == 1
    at.slider[0].set_value(0.9).run()
    at.segmented_control[0].set_value("Side by side").run()
    assert not at.exception
    assert calls(counter) == 1, "moving the opacity slider or switching the view ran the network"
    captions = [c for image in at.image for c in image.captions]
    assert LESION.name in captions and "Grad-CAM heatmap" in captions  # side by side: the photo, then the overlay
    method = next(box for box in at.selectbox if box.label == "Heatmap method")
    method.set_value("eigencam").run()
    assert calls(counter) == 2  # a different CAM method is a different heatmap: computed once
    method.set_value("gradcam").run()
    assert calls(counter) == 2  # ...and the first one is still cached


def test_gallery_pick_predicts_a_bundled_ood_photo(predict_page: AppTest) -> None:
    at = predict_page
    at.checkbox(key="sample-car_image1").check().run()
    assert not at.exception
    assert len(verdict_boxes(at)) == 1
    assert heatmaps(at) == ["car_image1.jpg: Grad-CAM heatmap"]


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_uploads_get_plain_errors_and_the_good_image_still_works(predict_page: AppTest) -> None:
    at = predict_page
    uploader = at.file_uploader[0]
    uploader.upload("notes.jpg", b"this is not an image at all", "image/jpeg")
    uploader.upload("tiny.png", png((16, 16)), "image/png")
    uploader.upload("truncated.jpg", LESION.read_bytes()[:600], "image/jpeg")
    uploader.upload(LESION.name, LESION.read_bytes(), "image/jpeg")
    at.run()
    assert not at.exception
    errors = [e.value for e in at.error if "could not be used" in e.value]
    assert len(errors) == 3, errors
    assert "notes.jpg" in errors[0] and "not an image we can read" in errors[0]
    assert "tiny.png" in errors[1] and "at least 32 pixels" in errors[1]
    assert "truncated.jpg" in errors[2]
    assert len(verdict_boxes(at)) == 1  # the good image got its answer


def diagnosis_lines(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith("**Most likely diagnoses:**")]


def test_top_three_diagnoses_beside_the_verdict_and_none_for_a_rejected_photo(
    predict_page: AppTest, trained_run: Path
) -> None:
    at = predict_page
    predictor = Predictor.from_checkpoint(trained_run / "model.pt")
    # A lesion this tiny model's OOD check accepts (it rejects some real lesions too).
    lesion = next(p for p in sorted(LESION.parent.glob("*.jpg")) if predictor.predict(p, with_heatmap=False).accepted)
    at.file_uploader[0].upload(lesion.name, lesion.read_bytes(), "image/jpeg").upload(
        CAR.name, CAR.read_bytes(), "image/jpeg"
    )
    at.run()
    assert not at.exception
    accepted = [p for p in (predictor.predict(path, with_heatmap=False) for path in (lesion, CAR)) if p.accepted]
    lines = diagnosis_lines(at)
    assert len(lines) == len(accepted) >= 1  # a rejected photo shows no diagnosis
    for line, prediction in zip(lines, accepted, strict=True):
        ranked = sorted(prediction.dx_probabilities, key=prediction.dx_probabilities.get, reverse=True)[:3]
        shown = line.split("**")[-1].strip()
        assert shown == ", ".join(f"{DX_NAMES[dx]} {prediction.dx_probabilities[dx]:.0%}" for dx in ranked)
    assert len(at.get("vega_lite_chart")) == len(accepted)  # the small bar chart of each


def test_heatmap_target_select_box_recomputes_the_heatmap(predict_page: AppTest, counter: Path) -> None:
    at = predict_page
    at.file_uploader[0].upload(LESION.name, LESION.read_bytes(), "image/jpeg")
    at.run()
    explains = next(box for box in at.selectbox if box.label == "Heatmap explains:")
    assert explains.options[:3] == ["the verdict (default)", "malignant", "benign"]
    assert "melanoma" in explains.options and calls(counter) == 1
    explains.set_value("mel").run()
    assert not at.exception
    assert calls(counter) == 2
    assert heatmaps(at) == [f"{LESION.name}: Grad-CAM heatmap: why melanoma?"]


def test_similar_cases_the_diagnosis_set_and_the_report(
    predict_page: AppTest, trained_run: Path, counter: Path
) -> None:
    """An accepted lesion shows its set under the verdict, six similar cases with pictures, and a report button;
    a rejected photo shows none of them. Moving the confidence slider redraws the set without a new pass."""
    at = predict_page
    predictor = Predictor.from_checkpoint(trained_run / "model.pt")
    lesion = next(p for p in sorted(LESION.parent.glob("*.jpg")) if predictor.predict(p, with_heatmap=False).accepted)
    assert not predictor.predict(CAR, with_heatmap=False).accepted
    at.file_uploader[0].upload(lesion.name, lesion.read_bytes(), "image/jpeg").upload(
        CAR.name, CAR.read_bytes(), "image/jpeg"
    )
    at.run()
    assert not at.exception
    expected = predictor.predict(lesion, with_heatmap=False)
    sets = [m.value for m in at.markdown if m.value.startswith("**With ")]
    assert sets == [f"**{set_in_words(expected.dx_set, 0.9, len(predictor.dx_names))}**"]
    headers = [m.value for m in at.markdown if m.value.startswith("**Similar confirmed cases**")]
    assert len(headers) == 1 and vote_in_words(expected.similar_malignant, expected.similar_k) in headers[0]
    thumbnails = [image for image in at.image if len(image.captions) == 6]
    assert len(thumbnails) == 1
    assert thumbnails[0].captions == [f"{DX_NAMES[case['dx']]} ({case['label']})" for case in expected.similar]
    assert [b.label for b in at.download_button].count("Report (PDF)") == 2  # the rejected photo's says so
    passes = calls(counter)
    slider = next(s for s in at.select_slider if s.label == "Confidence of the diagnosis sets")
    slider.set_value(0.5).run()
    assert not at.exception and calls(counter) == passes  # the set comes from the kept probabilities
    narrow = predictor.predict(lesion, with_heatmap=False, coverage=0.5)
    assert [m.value for m in at.markdown if m.value.startswith("**With ")] == [
        f"**{set_in_words(narrow.dx_set, 0.5, len(predictor.dx_names))}**"
    ]


def test_the_latest_upload_or_pick_is_answered_first(predict_page: AppTest) -> None:
    at = predict_page
    at.checkbox(key="sample-car_image1").check().run()
    assert heatmaps(at) == ["car_image1.jpg: Grad-CAM heatmap"]
    at.file_uploader[0].upload(LESION.name, LESION.read_bytes(), "image/jpeg")
    at.run()
    assert not at.exception
    assert heatmaps(at) == [f"{LESION.name}: Grad-CAM heatmap", "car_image1.jpg: Grad-CAM heatmap"]
    at.checkbox(key="sample-ISIC_0000169").check().run()  # the same lesion, picked from the gallery now
    assert heatmaps(at)[0] == "ISIC_0000169.jpg: Grad-CAM heatmap" and len(verdict_boxes(at)) == 3
    at.checkbox(key="sample-car_image1").uncheck().run()
    assert "car_image1.jpg: Grad-CAM heatmap" not in heatmaps(at) and len(verdict_boxes(at)) == 2


def test_newest_first_orders_by_arrival_and_forgets_what_left() -> None:
    arrived: dict[str, int] = {}
    assert newest_first([("a",), ("b",)], arrived) == [("a",), ("b",)]  # same run: their own order
    assert newest_first([("a",), ("b",), ("c",)], arrived) == [("c",), ("a",), ("b",)]
    assert newest_first([("b",), ("c",)], arrived) == [("c",), ("b",)]  # "a" unticked: forgotten
    assert newest_first([("a",), ("b",), ("c",)], arrived) == [("a",), ("c",), ("b",)]  # ticked again: the newest
