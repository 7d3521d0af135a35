"""Hostile and odd uploads: every file of the corpus gets a verdict or a plain message, never a traceback or a hang.

The corpus (tests/hostile_corpus.py, >= 25 files built here in a temporary folder) goes through
``Predictor.predict`` and through the Predict page (AppTest, uploading the bytes), each case under
its own time bound. ``python -m bench.experiments.hostile`` prints the same cases as a table with timings.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import threading
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest
from torchvision.models import resnet18, resnet50

from lesion.checkpoint import FORMAT_VERSION, load_checkpoint
from lesion.errors import DataError, InvalidCheckpoint, InvalidImage
from lesion.images import MAX_BYTES, load_image
from lesion.predict import Prediction, Predictor
from lesion_app.jobs import resolve_data_dir
from tests.hostile_corpus import Case, build_corpus

REPO = Path(__file__).resolve().parent.parent
# Generous: a case that takes this long is hung, not slow (the 50 MP JPEG takes well under a few seconds).
CASE_LIMIT_S = 60.0
VERDICTS = {"benign", "malignant", "unknown"}
SAMPLE_JPEG = REPO / "assets" / "samples" / "lesions" / "ISIC_0000032.jpg"


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


# ---------------------------------------------------------------------------- untrusted checkpoints


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appears only if the pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


class _TensorsIgnored(pickle.Unpickler):
    """A plain unpickler for a torch zip's data.pkl: tensors become None, every other object is built."""

    def persistent_load(self, pid: Any) -> None:
        return None

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch"):
            return lambda *args, **kwargs: None
        return super().find_class(module, name)


def _unsafe_load(path: Path) -> None:
    """What a careless loader does (a plain unpickle); the payload only creates a file in tmp_path.

    Deliberately not torch.load without weights_only: the project never loads that way, not even here.
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            loaded = _TensorsIgnored(io.BytesIO(archive.read(name))).load()
    else:
        with path.open("rb") as stream:
            loaded = pickle.load(stream)
    loaded["note"].close()  # the file object the payload opened


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_checkpoint_that_would_run_code_is_refused_and_nothing_runs(
    tmp_path: Path, trained_model: Path, container: str
) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "model.pt"
    checkpoint = torch.load(trained_model, map_location="cpu", weights_only=True)
    checkpoint["note"] = _Payload(marker)  # a real lesion checkpoint, with one poisoned value
    if container == "torch-zip":
        torch.save(checkpoint, path)
    else:
        with path.open("wb") as stream:
            pickle.dump(checkpoint, stream, protocol=2)

    for load in (load_checkpoint, Predictor.from_checkpoint):
        with pytest.raises(InvalidCheckpoint, match="could run code") as refused:
            load(path)
        assert "Traceback" not in str(refused.value)
        assert not marker.exists(), f"{load.__name__} ran the pickle's code"

    # The payload is real: a loader without weights_only runs it.
    _unsafe_load(path)
    assert marker.exists()


def _real_checkpoint(trained_model: Path) -> dict[str, Any]:
    return torch.load(trained_model, map_location="cpu", weights_only=True)


def _bad_checkpoints(trained_model: Path, folder: Path) -> dict[str, Path]:
    """name -> a file that must be refused with InvalidCheckpoint."""
    good = trained_model.read_bytes()
    files: dict[str, Path] = {}

    def save(name: str, value: Any) -> None:
        files[name] = folder / f"{name}.pt"
        torch.save(value, files[name])

    def raw(name: str, data: bytes) -> None:
        files[name] = folder / f"{name}.pt"
        files[name].write_bytes(data)

    save(
        "resnet50-weights-labelled-resnet18", {**_real_checkpoint(trained_model), "state_dict": resnet50().state_dict()}
    )
    save("unknown-arch", {**_real_checkpoint(trained_model), "arch": "vit_b_16"})
    save("plain-torchvision-state-dict", resnet18().state_dict())
    save("newer-format", {**_real_checkpoint(trained_model), "format_version": FORMAT_VERSION + 1})
    incomplete = _real_checkpoint(trained_model)
    del incomplete["temperature"]
    save("missing-key", incomplete)
    save("not-a-dict", [1, 2, 3])
    # Well-formed but impossible (hand-edited or hostile): NaN probabilities or a failure on the first photo.
    real = _real_checkpoint(trained_model)
    for key, value in (
        ("temperature", 0.0),
        ("temperature", float("nan")),
        ("image_size", 0),
        ("resize_size", 10**6),
        ("std", [0.0, 0.0, 0.0]),
        ("mean", [0.5]),
        ("decision_threshold", "x"),
    ):
        save(f"{key}={value}", {**real, key: value})
    detectors = real["ood"]["detectors"]

    def with_detector(name: str, stats: dict) -> dict:
        """The real checkpoint with one detector's statistics replaced."""
        return {**real, "ood": {**real["ood"], "detectors": {**detectors, name: stats}}}

    mahalanobis = detectors["mahalanobis"]
    save(
        "ood-stats-of-another-network",
        with_detector("mahalanobis", {**mahalanobis, "means": mahalanobis["means"][:, :5]}),
    )
    # The default detector's stage statistics cut at other widths that add up to the same total.
    layers = dict(detectors["mahalanobis_layers_max"])
    for name, grow in (("layer1", 2), ("layer2", -2)):
        mean, basis = layers[f"{name}.mean"], layers[f"{name}.basis"]
        if grow > 0:
            layers[f"{name}.mean"] = torch.cat([mean, mean[:, :grow]], dim=1)
            layers[f"{name}.basis"] = torch.cat([basis, basis[:grow]], dim=0)
        else:
            layers[f"{name}.mean"], layers[f"{name}.basis"] = mean[:, :grow], basis[:grow]
    save("layer-stats-cut-at-other-widths", with_detector("mahalanobis_layers_max", layers))
    for label, key, value in (
        ("layer-stats-nan-location", "layer1.loc", float("nan")),
        ("ood-threshold-overflow", "threshold", 10**400),
        ("ood-threshold-nan", "threshold", float("nan")),  # NaN would accept every photo
        ("ood-threshold-inf", "threshold", float("inf")),
    ):
        save(label, with_detector("mahalanobis_layers_max", {**detectors["mahalanobis_layers_max"], key: value}))
    # Statistics that load and fit the network but score NaN for every image.
    save("ood-vim-alpha-nan", with_detector("vim", {**detectors["vim"], "alpha": float("nan")}))
    save("ood-energy-temperature-0", with_detector("energy", {**detectors["energy"], "temperature": 0.0}))
    nan_precision = torch.full_like(mahalanobis["precision"], float("nan"))
    save("ood-mahalanobis-precision-nan", with_detector("mahalanobis", {**mahalanobis, "precision": nan_precision}))
    # An OOD entry of the wrong shape, or naming a detector it has not fitted.
    save("ood-entry-a-list", {**real, "ood": [1, 2]})
    save("ood-detectors-a-list", {**real, "ood": {**real["ood"], "detectors": list(detectors)}})
    save("ood-stats-not-a-dict", with_detector("msp", 1.0))
    save("ood-method-unknown", {**real, "ood": {**real["ood"], "method": "nope"}})
    without_knn = {name: stats for name, stats in detectors.items() if name != "knn"}
    save("ood-method-not-fitted", {**real, "ood": {**real["ood"], "method": "knn", "detectors": without_knn}})
    raw("truncated-10-bytes", good[:10])
    raw("truncated-50%", good[: len(good) // 2])
    raw("truncated-99%", good[: len(good) * 99 // 100])
    raw("empty", b"")
    raw("a-text-file", b"hello, not a checkpoint\n")  # the legacy unpickler fails on it with a bare KeyError
    raw("a-jpeg", (REPO / "assets" / "samples" / "lesions" / "ISIC_0000032.jpg").read_bytes())
    return files


def test_foreign_newer_and_damaged_checkpoints_get_plain_messages(trained_model: Path, tmp_path: Path) -> None:
    failures = []
    for name, path in _bad_checkpoints(trained_model, tmp_path).items():
        for load in (load_checkpoint, Predictor.from_checkpoint):
            try:
                bounded(lambda load=load, path=path: load(path))
            except InvalidCheckpoint as error:
                if not str(error) or "Traceback" in str(error):
                    failures.append(f"{name}: {load.__name__}: unhelpful message {error!r}")
                if name == "newer-format" and "format version" not in str(error):
                    failures.append(f"{name}: message does not name the version: {error}")
            except BaseException as error:  # anything but InvalidCheckpoint is a bug
                failures.append(f"{name}: {load.__name__}: {type(error).__name__}: {error}")
            else:
                # load_checkpoint only checks the structure; the Predictor must refuse the weights. (==, not
                # "is": each lookup of a classmethod makes a new bound method.)
                if load == Predictor.from_checkpoint or not (
                    name in ("resnet50-weights-labelled-resnet18", "unknown-arch", "layer-stats-cut-at-other-widths")
                    or name.startswith(("ood-", "layer-stats-"))
                ):
                    failures.append(f"{name}: {load.__name__} accepted it")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("kind", ["code", "truncated", "plain-state-dict"])
def test_app_with_a_bad_lesion_checkpoint_shows_a_plain_error(tmp_path: Path, trained_model: Path, kind: str) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "model.pt"
    if kind == "code":
        torch.save({**_real_checkpoint(trained_model), "note": _Payload(marker)}, path)
    elif kind == "truncated":
        path.write_bytes(trained_model.read_bytes()[:5000])
    else:
        torch.save(resnet18().state_dict(), path)
    patch = pytest.MonkeyPatch()
    try:
        patch.setenv("LESION_CHECKPOINT", str(path))
        patch.setenv("LESION_RUNS_DIR", str(tmp_path / "no-runs"))
        at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=CASE_LIMIT_S).run()
    finally:
        patch.undo()
    assert not at.exception, at.exception[0].value if at.exception else ""
    errors = [box.value for box in at.sidebar.error]
    assert errors and errors[0].startswith("This model could not be loaded:"), errors
    assert "model.pt" in errors[0] and "Traceback" not in errors[0]
    assert not marker.exists()


# ---------------------------------------------------------------------------- who may do what


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """A data root with one dataset, and ways out of it: a sibling folder and a symlink to it."""
    root = tmp_path / "root"
    (root / "ham" / "images").mkdir(parents=True)
    (root / "ham" / "metadata.csv").write_text("lesion_id,image_id,dx\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "metadata.csv").write_text("lesion_id,image_id,dx\n")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "ham" / "deeper-escape").symlink_to(outside, target_is_directory=True)
    return root


ESCAPES = ["../outside", "ham/../../outside", "/etc", "~/data", "escape", "ham/deeper-escape", "escape/../ham"]


def test_data_paths_stay_inside_the_data_root(data_root: Path) -> None:
    assert resolve_data_dir(data_root, "ham") == (data_root / "ham").resolve()
    for text in [*ESCAPES, str(data_root / "ham"), str(data_root.parent / "outside")]:
        with pytest.raises(DataError):
            resolve_data_dir(data_root, text)


def test_train_page_refuses_paths_outside_the_data_root_and_starts_nothing(data_root: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    patch = pytest.MonkeyPatch()
    try:
        patch.setenv("LESION_DATA_ROOT", str(data_root))
        patch.setenv("LESION_RUNS_DIR", str(runs))
        patch.delenv("LESION_CHECKPOINT", raising=False)
        at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=CASE_LIMIT_S).run()
        at.switch_page("app_pages/train.py").run()
        assert not at.exception
        for text in ESCAPES:
            at.text_input[0].set_value(text).run()
            next(button for button in at.button if button.label == "Start training").click().run()
            assert not at.exception, text
            messages = [box.value for box in at.error]
            assert messages and "data root" in messages[0] and "Traceback" not in messages[0], (text, messages)
            assert not runs.exists() or not [p for p in runs.iterdir() if p.is_dir()], f"{text!r} started a job"
    finally:
        patch.undo()


def test_upload_limit_is_set_and_an_oversized_upload_gets_a_plain_message(predict_page: AppTest) -> None:
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] * 2**20 == MAX_BYTES  # the uploader and the decoder agree
    big = SAMPLE_JPEG.read_bytes()
    oversized = big[:-2] + b"\0" * (MAX_BYTES + 1 - len(big)) + big[-2:]  # a JPEG padded past the limit
    with pytest.raises(InvalidImage, match="the limit is 50 MB"):
        load_image(oversized)
    at = predict_page
    at.file_uploader[0].set_value(("huge.jpg", oversized, "image/jpeg"))
    at.run(timeout=CASE_LIMIT_S)
    assert not at.exception
    outcome, message = page_outcome(at, "huge.jpg")
    assert outcome == "refused" and "limit is 50 MB" in message


def test_visitors_never_see_a_traceback() -> None:
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["client"]["showErrorDetails"] == "none"


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-dev.txt"])
def test_dependencies_are_pinned(name: str) -> None:
    lines = [line.split("#", 1)[0].strip() for line in (REPO / name).read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("-r ")]
    assert requirements
    loose = [
        line
        for line in requirements
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._\-]*(\[[\w,\-]+\])?==[\w.+!\-]+", line)
    ]
    assert not loose, f"not pinned with ==: {loose}"
