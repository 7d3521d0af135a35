"""Hostile and odd uploads: every file of the corpus gets a verdict or a plain message, never a traceback or a hang.

The corpus (tests/hostile_corpus.py, >= 25 files built here in a temporary folder) goes through
``Predictor.predict`` and through the Predict page (AppTest, uploading the bytes), each case under
its own time bound. ``python bench/hostile.py`` prints the same cases as a table with timings.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from lesion.errors import InvalidImage
from lesion.predict import Prediction, Predictor
from tests.hostile_corpus import Case, build_corpus

REPO = Path(__file__).resolve().parent.parent
# Generous: a case that takes this long is hung, not slow (the 50 MP JPEG takes well under a few seconds).
CASE_LIMIT_S = 60.0
VERDICTS = {"benign", "malignant", "unknown"}


def bounded(call: Callable[[], Any], limit_s: float = CASE_LIMIT_S) -> Any:
    """``call()`` in a worker thread; its result or exception, or AssertionError if it outlives ``limit_s``."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = call()
        except BaseException as error:  # handed back to the test thread below
            box["error"] = error

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(limit_s)
    assert not worker.is_alive(), f"hung: still running after {limit_s:.0f} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    return build_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def predictor(trained_model: Path) -> Predictor:
    return Predictor.from_checkpoint(trained_model)


def test_the_corpus_has_every_kind_of_awkward_file(corpus: list[Case]) -> None:
    names = {case.name for case in corpus}
    assert len(corpus) >= 25 and len(names) == len(corpus)
    for required in (
        "empty",
        "one-byte",
        "jpeg-truncated-10%",
        "jpeg-truncated-50%",
        "jpeg-truncated-90%",
        "png-bad-crc-ihdr",
        "text-as-jpg",
        "html-as-jpg",
        "pdf",
        "zip",
        "svg",
        "gif-animated",
        "1x1",
        "10x10000",
        "png-claims-30000^2",
        "jpeg-claims-30000^2",
        "png-16bit",
        "jpeg-cmyk",
        "png-rgba",
        "png-la",
        "png-p",
        "jpeg-exif-rotated",
        "tiff-multipage",
        "webp",
        "heic",
        "jpeg-50mp",
    ):
        assert required in names, required
    by_name = {case.name: case for case in corpus}
    # The huge claims are written by hand: tiny files, so the refusal is about the header, not the download.
    assert by_name["png-claims-30000^2"].path.stat().st_size < 200
    assert by_name["jpeg-claims-30000^2"].path.stat().st_size < 5000
    assert {case.expectation for case in corpus} == {"verdict", "refused"}


def _check_prediction(case: Case, prediction: Prediction) -> list[str]:
    """What is wrong with a verdict (empty when nothing)."""
    problems = []
    if prediction.verdict not in VERDICTS:
        problems.append(f"verdict {prediction.verdict!r}")
    if not 0.0 <= prediction.p_malignant <= 1.0:
        problems.append(f"p_malignant {prediction.p_malignant}")
    if not math.isfinite(prediction.ood_score):
        problems.append(f"ood_score {prediction.ood_score}")
    heatmap = prediction.heatmap
    if heatmap is None or heatmap.dtype != np.float32 or not np.isfinite(heatmap).all():
        problems.append("heatmap missing or not finite float32")
    else:
        if heatmap.min() < 0.0 or heatmap.max() > 1.0:
            problems.append(f"heatmap outside [0, 1]: {heatmap.min()}..{heatmap.max()}")
        if heatmap.shape != (prediction.image_height, prediction.image_width):
            problems.append(f"heatmap {heatmap.shape} vs image {prediction.image_height} x {prediction.image_width}")
        if case.heatmap_shape and heatmap.shape != case.heatmap_shape:
            problems.append(f"heatmap {heatmap.shape}, expected {case.heatmap_shape} (the displayed size)")
    return problems


def test_predictor_answers_every_case_plainly(corpus: list[Case], predictor: Predictor) -> None:
    failures = []
    for case in corpus:
        if case.skip:
            continue
        try:
            prediction = bounded(lambda case=case: predictor.predict(case.path))
        except InvalidImage as error:
            message = str(error)
            if case.expectation != "refused":
                failures.append(f"{case.name}: refused ({message}), expected a verdict")
            elif not message or "Traceback" in message or case.path.name not in message:
                failures.append(f"{case.name}: unhelpful message {message!r}")
            continue
        except BaseException as error:  # anything but InvalidImage is a bug, and so is a hang
            failures.append(f"{case.name}: {type(error).__name__}: {error}")
            continue
        if case.expectation != "verdict":
            failures.append(f"{case.name}: got verdict {prediction.verdict!r}, expected a refusal")
        failures += [f"{case.name}: {problem}" for problem in _check_prediction(case, prediction)]
    assert not failures, "\n".join(failures)


def test_every_case_through_bytes_and_file_objects_agrees_with_paths(corpus: list[Case], predictor: Predictor) -> None:
    # Uploads arrive as bytes; the outcome must not depend on how the file is handed over.
    for case in corpus:
        if case.skip or case.name == "jpeg-50mp":
            continue
        outcomes = []
        for source in (case.path, case.data):
            try:
                outcomes.append(bounded(lambda s=source: predictor.predict(s, with_heatmap=False)).verdict)
            except InvalidImage:
                outcomes.append("refused")
        assert outcomes[0] == outcomes[1], case.name


def test_heic_case_is_built_or_skipped_with_a_reason(corpus: list[Case]) -> None:
    heic = next(case for case in corpus if case.name == "heic")
    if heic.skip:
        pytest.skip(heic.skip)
    assert heic.path.read_bytes()[4:12] in (b"ftypheic", b"ftypmif1", b"ftypheix")


@pytest.fixture(scope="module")
def predict_page(trained_model: Path, tmp_path_factory: pytest.TempPathFactory) -> AppTest:
    """The app on its Predict page, with the tiny model as LESION_CHECKPOINT and no runs folder."""
    patch = pytest.MonkeyPatch()
    patch.setenv("LESION_CHECKPOINT", str(trained_model))
    patch.setenv("LESION_RUNS_DIR", str(tmp_path_factory.mktemp("no-runs")))
    patch.delenv("LESION_PREDICT_COUNTER", raising=False)
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=CASE_LIMIT_S).run()
    assert not at.exception
    yield at
    patch.undo()


def page_outcome(at: AppTest, upload_name: str) -> tuple[str, str]:
    """("refused", message) when the page showed a plain error naming the file, ("verdict", text) when it answered."""
    errors = [box.value for box in at.error if f"**{upload_name}** could not be used" in box.value]
    if errors:
        return "refused", errors[0]
    answers = [box.value for box in [*at.success, *at.error, *at.warning] if box.value.startswith("**")]
    if answers:
        return "verdict", answers[0]
    return "nothing", ""


def test_predict_page_answers_every_case_plainly(corpus: list[Case], predict_page: AppTest) -> None:
    at = predict_page
    failures = []
    for case in corpus:
        if case.skip:
            continue
        at.file_uploader[0].set_value((case.upload_name, case.data, "application/octet-stream"))
        try:
            at.run(timeout=CASE_LIMIT_S)
        except RuntimeError as error:  # AppTest's own time bound
            failures.append(f"{case.name}: {error}")
            continue
        if at.exception:
            failures.append(f"{case.name}: traceback shown: {at.exception[0].value}")
            continue
        outcome, text = page_outcome(at, case.upload_name)
        if outcome != case.expectation:
            failures.append(f"{case.name}: page showed {outcome} ({text!r}), expected {case.expectation}")
        elif outcome == "verdict" and not any(word in text for word in ("Benign", "Malignant", "Not a skin lesion")):
            failures.append(f"{case.name}: verdict box says {text!r}")
    assert not failures, "\n".join(failures)
