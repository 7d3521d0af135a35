"""The predictor: one pass, the evaluation path's probabilities, thresholds, threads, the CLI."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lesion import ood
from lesion.checkpoint import load_checkpoint, save_checkpoint
from lesion.errors import InvalidCheckpoint, InvalidImage
from lesion.images import load_image
from lesion.model import LAYER_NAMES, build_model
from lesion.predict import Prediction, Predictor
from lesion.transforms import eval_transform
from tests.helpers_model import REPO, lesion_paths, ood_paths, tiny_checkpoint_dict, write_tiny_checkpoint
from tests.tolerances import assert_within, ood_slack, p_malignant_slack, probability_slack
from train.predict import main as predict_main


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def predictor(checkpoint_path: Path) -> Predictor:
    return Predictor.from_checkpoint(checkpoint_path)


@pytest.fixture(scope="module")
def wide_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 600 x 450 JPEG made from a sample lesion (the samples are 180 x 180)."""
    path = tmp_path_factory.mktemp("wide") / "wide.jpg"
    with Image.open(lesion_paths()[0]) as image:
        image.convert("RGB").resize((600, 450)).save(path, quality=92)
    return path


def test_loads_every_attribute(predictor: Predictor):
    assert not predictor.model.training
    assert predictor.class_names == ["benign", "malignant"]
    assert (predictor.image_size, predictor.temperature, predictor.decision_threshold) == (64, 1.5, 0.5)
    assert predictor.ood_method == "mahalanobis" and predictor.ood_available
    assert set(predictor.ood_thresholds) == set(ood.DETECTORS)
    assert "state_dict" not in predictor.checkpoint and "metrics" in predictor.checkpoint


def test_probabilities_equal_the_evaluation_path(predictor: Predictor, checkpoint_path: Path):
    paths = lesion_paths()[:6]
    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint["arch"], checkpoint["head"])
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    transform = eval_transform(checkpoint["image_size"], checkpoint["mean"], checkpoint["std"])
    batch = torch.stack([transform(load_image(p, checkpoint["resize_size"])) for p in paths])
    with torch.no_grad():
        logits = model(batch)
    expected = torch.softmax(logits / checkpoint["temperature"], dim=1)[:, 1].numpy()
    # One batch of 6 here, batches of 4 + 2 and single images there: the convolutions sum in other
    # orders, so equal within float32 rounding of the pass (tests/tolerances.py: 2.5e-5 here, while
    # a resize one pixel off, another normalisation, class or temperature moves some p by 5e-3 or more).
    slack = probability_slack(model, logits, checkpoint["temperature"])
    assert_within(predictor.p_malignant(paths, batch_size=4), expected, slack, "batches of 4")
    single = [predictor.predict(p, with_heatmap=False).p_malignant for p in paths]
    assert_within(single, expected, slack, "one at a time")


def test_probabilities_raise_on_a_bad_image(predictor: Predictor, tmp_path: Path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(InvalidImage, match="bad.jpg"):
        predictor.p_malignant([lesion_paths()[0], bad])


def test_prediction_fields_and_heatmap_size(predictor: Predictor, wide_jpeg: Path):
    prediction = predictor.predict(wide_jpeg)
    assert prediction.verdict in ("benign", "malignant", "unknown")
    assert (prediction.image_width, prediction.image_height) == (600, 450)
    assert prediction.heatmap.shape == (450, 600) and prediction.heatmap.dtype == np.float32
    assert prediction.heatmap.min() >= 0 and prediction.heatmap.max() == pytest.approx(1, abs=1e-5)
    # The network saw the centre crop only (450 x 450 here); outside it the map is 0.
    assert prediction.heatmap[:, :70].max() == 0 and prediction.heatmap[:, -70:].max() == 0
    assert set(prediction.timings) == {"decode", "preprocess", "forward", "cam", "ood", "similar", "total"}
    assert prediction.ood_score == prediction.ood_scores["mahalanobis"]
    assert prediction.accepted == (prediction.ood_score <= prediction.ood_threshold)
    assert sum(prediction.probabilities.values()) == pytest.approx(1)
    as_json = json.dumps(prediction.to_dict(), allow_nan=False)
    assert "heatmap" not in json.loads(as_json)
    assert len(prediction.to_dict(include_heatmap=True)["heatmap"]) == 450


def test_heatmap_follows_exif_orientation(predictor: Predictor, wide_jpeg: Path):
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated: 450 wide, 600 high
    buffer = io.BytesIO()
    with Image.open(wide_jpeg) as image:
        image.save(buffer, format="JPEG", exif=exif)
    prediction = predictor.predict(buffer.getvalue())
    assert (prediction.image_width, prediction.image_height) == (450, 600)
    assert prediction.heatmap.shape == (600, 450)


def test_sources_give_the_same_answer(predictor: Predictor):
    path = lesion_paths()[1]
    by_path = predictor.predict(path)
    with path.open("rb") as handle:
        by_file = predictor.predict(handle)
    with Image.open(path) as image:
        by_pil = predictor.predict(image)
    by_bytes = predictor.predict(path.read_bytes())
    for other in (by_file, by_pil, by_bytes):
        assert other.p_malignant == by_path.p_malignant
        assert np.array_equal(other.heatmap, by_path.heatmap)


def test_verdict_follows_the_thresholds(predictor: Predictor):
    path = lesion_paths()[2]
    base = predictor.predict(path, with_heatmap=False, ood_threshold=math.inf)
    assert base.accepted and base.verdict == ("malignant" if base.p_malignant >= 0.5 else "benign")
    assert predictor.predict(path, with_heatmap=False, decision_threshold=0.0, ood_threshold=math.inf).verdict == (
        "malignant"
    )
    assert predictor.predict(path, with_heatmap=False, decision_threshold=1.01, ood_threshold=math.inf).verdict == (
        "benign"
    )
    rejected = predictor.predict(path, with_heatmap=False, ood_threshold=-math.inf)
    assert rejected.verdict == "unknown" and not rejected.accepted


def test_ood_method_override_and_photos_scored(predictor: Predictor):
    car = [p for p in ood_paths() if p.stem.startswith("car")][0]
    for method in ood.DETECTORS:
        prediction = predictor.predict(car, ood_method=method, with_heatmap=False)
        assert prediction.ood_method == method and prediction.ood_threshold == predictor.ood_thresholds[method]
        assert prediction.ood_score == prediction.ood_scores[method]
    with pytest.raises(ValueError, match="unknown OOD method"):
        predictor.predict(car, ood_method="odin")


def test_target_and_cam_method(predictor: Predictor):
    path = lesion_paths()[3]
    zero = predictor.predict(path, target=0, cam_method="layercam")
    one = predictor.predict(path, target=1, cam_method="layercam")
    assert (zero.target, one.target, one.cam_method) == (0, 1, "layercam")
    assert not np.array_equal(zero.heatmap, one.heatmap)
    default = predictor.predict(path)
    assert default.target == (1 if default.p_malignant >= default.decision_threshold else 0)


def test_batch_equals_single_and_keeps_errors_in_place(predictor: Predictor, wide_jpeg: Path):
    images = [lesion_paths()[0], b"%PDF-1.4 not an image", wide_jpeg, lesion_paths()[5]]
    results = predictor.predict_batch(images, batch_size=2, with_heatmap=True)
    assert isinstance(results[1], InvalidImage)
    readable = [image for image, result in zip(images, results, strict=True) if isinstance(result, Prediction)]
    singles = [predictor.predict(image) for image in readable]
    # A batch of two rounds differently from one image: p and every OOD score within the float32
    # rounding of the pass, carried through each scorer (tests/tolerances.py). ViM's residual is the
    # root of a difference of two nearly equal squared norms: with oneDNN off its score moved by 0.019
    # here, about 100 times the 1e-4 this test allowed before.
    p_slack, ood_slacks = p_malignant_slack(predictor, readable), ood_slack(predictor, readable)
    assert set(ood_slacks) == set(predictor.detectors)
    batched = [result for result in results if isinstance(result, Prediction)]
    for i, (result, single) in enumerate(zip(batched, singles, strict=True)):
        assert abs(result.p_malignant - single.p_malignant) <= p_slack
        assert result.ood_scores.keys() == single.ood_scores.keys()
        for name, slack in ood_slacks.items():
            assert abs(result.ood_scores[name] - single.ood_scores[name]) <= slack[i], name
        np.testing.assert_allclose(result.heatmap, single.heatmap, atol=1e-5)


def test_intermediate_checkpoint_without_detectors(tmp_path: Path):
    path = write_tiny_checkpoint(tmp_path / "last.pt", with_ood=False)
    predictor = Predictor.from_checkpoint(path)
    assert not predictor.ood_available and predictor.ood_thresholds == {}
    prediction = predictor.predict(ood_paths()[0])
    assert math.isnan(prediction.ood_score) and prediction.accepted and prediction.verdict != "unknown"
    assert json.loads(json.dumps(prediction.to_dict(), allow_nan=False))["ood_score"] is None


def test_an_intermediate_checkpoint_refuses_a_named_ood_method(tmp_path: Path, capsys: pytest.CaptureFixture):
    # Asking for a detector the checkpoint has not fitted must not quietly accept every photo.
    path = write_tiny_checkpoint(tmp_path / "last.pt", with_ood=False)
    with pytest.raises(ValueError, match="no fitted OOD detectors"):
        Predictor.from_checkpoint(path, ood_method="knn")
    with pytest.raises(ValueError, match="no fitted OOD detectors"):
        Predictor.from_checkpoint(path).predict(ood_paths()[0], ood_method="knn")
    argv = ["--checkpoint", str(path), "--out", str(tmp_path / "r.csv"), "--ood-method", "knn", str(ood_paths()[0])]
    assert predict_main(argv) == 1
    assert "no fitted OOD detectors" in capsys.readouterr().err


def test_a_detector_that_cannot_score_an_image_fails_closed(predictor: Predictor, monkeypatch: pytest.MonkeyPatch):
    lesion = lesion_paths()[0]
    plain = predictor.predict(lesion, ood_threshold=1e30)
    assert plain.accepted and plain.verdict != "unknown"
    with pytest.raises(ValueError, match="NaN"):
        predictor.predict(lesion, ood_threshold=float("nan"))
    scores = predictor._ood_scores

    def nan_for_the_method(*args):
        computed = scores(*args)
        return {**computed, predictor.ood_method: torch.full_like(computed[predictor.ood_method], float("nan"))}

    monkeypatch.setattr(predictor, "_ood_scores", nan_for_the_method)
    for result in (predictor.predict(lesion, ood_threshold=1e30), *predictor.predict_batch([lesion, lesion])):
        assert math.isnan(result.ood_score) and not result.accepted and result.verdict == "unknown"
    # Another detector's NaN does not touch the decision of the one in use.
    other = predictor.predict(lesion, ood_method="msp", ood_threshold=1e30)
    assert other.accepted and math.isnan(other.ood_scores[predictor.ood_method])


def test_eight_threads_give_the_serial_results(predictor: Predictor):
    images = [*lesion_paths()[:3], ood_paths()[0]]
    methods = ["gradcam", "gradcam++", "eigencam", "hirescam"]
    jobs = [(images[i % 4], methods[(i // 4) % 4]) for i in range(8 * 2)]
    serial = [predictor.predict(image, cam_method=method) for image, method in jobs]
    parallel: list[Prediction | None] = [None] * len(jobs)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for index in range(worker, len(jobs), 8):
                image, method = jobs[index]
                parallel[index] = predictor.predict(image, cam_method=method)
        except BaseException as error:  # surfaced below; a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for alone, together in zip(serial, parallel, strict=True):
        assert together.p_malignant == alone.p_malignant and together.ood_scores == alone.ood_scores
        assert np.array_equal(together.heatmap, alone.heatmap)
    assert all(p.grad is None for p in predictor.model.parameters())
    # Only the predictor's own layer-statistics taps (one forward hook per stage): nothing leaked.
    hooks = {name: len(m._forward_hooks) + len(m._backward_hooks) for name, m in predictor.model.named_modules()}
    assert {name: count for name, count in hooks.items() if count} == {name: 1 for name in LAYER_NAMES}


# --- refusing checkpoints ------------------------------------------------------------------


def _refused(path: Path, match: str) -> None:
    with pytest.raises(InvalidCheckpoint, match=match):
        Predictor.from_checkpoint(path)


def test_refuses_files_that_are_not_our_checkpoints(tmp_path: Path, checkpoint_path: Path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    _refused(tmp_path / "foreign.pt", "not a lesion checkpoint")
    (tmp_path / "truncated.pt").write_bytes(checkpoint_path.read_bytes()[:5000])
    _refused(tmp_path / "truncated.pt", "not a readable checkpoint")
    torch.save({"format": "lesion-checkpoint", "model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    _refused(tmp_path / "pickled.pt", "Python objects")
    _refused(tmp_path / "missing.pt", "No checkpoint")


def test_refuses_newer_and_mismatched_checkpoints(tmp_path: Path):
    newer = tiny_checkpoint_dict(with_ood=False)
    newer["format_version"] = 99
    _refused(save_checkpoint(newer, tmp_path / "newer.pt"), "format version 99")
    mismatched = tiny_checkpoint_dict(with_ood=False)
    mismatched["arch"] = "resnet34"  # resnet18 weights do not fit
    _refused(save_checkpoint(mismatched, tmp_path / "mismatch.pt"), "do not fit a resnet34")
    unknown = tiny_checkpoint_dict(with_ood=False)
    unknown["arch"] = "vit_b_16"
    _refused(save_checkpoint(unknown, tmp_path / "unknown.pt"), "cannot build")


# --- the command line ----------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lesion.predict", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_writes_rows_heatmaps_and_survives_a_corrupt_file(tmp_path: Path, checkpoint_path: Path):
    folder = tmp_path / "in" / "nested"
    folder.mkdir(parents=True)
    for source in lesion_paths()[:2]:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "notes.txt").write_text("ignored: not an image extension")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(lesion_paths()[2].read_bytes()[:3000])
    car = ood_paths()[2]
    out, heatmaps = tmp_path / "results.csv", tmp_path / "heatmaps"
    result = _cli("--checkpoint", checkpoint_path, "--out", out, "--heatmaps", heatmaps, tmp_path / "in", corrupt, car)
    assert result.returncode == 0, result.stderr
    assert "img" in result.stderr  # tqdm's bar went to stderr
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["path"]).name for r in rows] == [*(p.name for p in lesion_paths()[:2]), "corrupt.jpg", car.name]
    for row in rows:
        assert {"path", "verdict", "p_malignant", "decision_threshold", "ood_method", "ood_score"} <= set(row)
        assert {"ood_threshold", "accepted", "error", "ood_knn"} <= set(row)
    good = [r for r in rows if not r["error"]]
    assert len(good) == 3 and all(r["verdict"] in ("benign", "malignant", "unknown") for r in good)
    assert all(r["ood_method"] == "mahalanobis" and float(r["decision_threshold"]) == 0.5 for r in good)
    assert "damaged or truncated" in rows[2]["error"] and rows[2]["verdict"] == ""
    written = sorted(p.name for p in heatmaps.iterdir())
    assert written == sorted(Path(r["heatmap"]).name for r in good) and rows[2]["heatmap"] == ""
    car_row = next(r for r in rows if Path(r["path"]).name == car.name)
    with Image.open(car_row["heatmap"]) as overlay, Image.open(car) as original:
        assert overlay.size == original.size


def test_heatmaps_of_same_named_files_in_different_folders_do_not_collide(tmp_path: Path, checkpoint_path: Path):
    sources = lesion_paths()[:2]
    for folder, source in zip(("a", "b"), sources, strict=True):
        (tmp_path / "in" / folder).mkdir(parents=True)
        (tmp_path / "in" / folder / "photo.jpg").write_bytes(source.read_bytes())
    argv = ["--checkpoint", str(checkpoint_path), "--heatmaps", str(tmp_path / "maps"), str(tmp_path / "in")]
    assert predict_main([*argv, "--out", str(tmp_path / "first.csv")]) == 0
    first = {r["path"]: r["heatmap"] for r in csv.DictReader((tmp_path / "first.csv").open())}
    assert len(set(first.values())) == 2 and len(list((tmp_path / "maps").iterdir())) == 2
    assert all(Path(name).name.startswith("photo-") for name in first.values())
    overlays = [Path(name).read_bytes() for name in first.values()]
    assert overlays[0] != overlays[1]  # two different inputs, two different overlays: neither overwrote the other
    assert predict_main([*argv, "--out", str(tmp_path / "again.csv")]) == 0  # the same inputs, the same names
    assert {r["path"]: r["heatmap"] for r in csv.DictReader((tmp_path / "again.csv").open())} == first


def test_cli_exit_codes(tmp_path: Path, checkpoint_path: Path, capsys: pytest.CaptureFixture):
    # In-process through main(argv): the subprocess test above covers the real entry point.
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nonsense")
    assert predict_main(["--checkpoint", str(bad), "--out", str(tmp_path / "r.csv"), str(lesion_paths()[0])]) == 1
    message = capsys.readouterr().err
    assert message.startswith("error: bad.pt") and message.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict_main(["--checkpoint", str(checkpoint_path), "--out", str(tmp_path / "r.csv"), str(empty)]) == 2
    assert "no input images" in capsys.readouterr().err
    unreadable = tmp_path / "unreadable.png"
    unreadable.write_bytes(b"\x89PNG nothing")
    assert predict_main(["--checkpoint", str(checkpoint_path), "--out", str(tmp_path / "r.csv"), str(unreadable)]) == 1
    assert "none of the 1 input(s)" in capsys.readouterr().err
    argv = ["--checkpoint", str(checkpoint_path), "--out", str(tmp_path / "r.csv"), "--ood-method", "msp"]
    assert predict_main([*argv, str(lesion_paths()[0])]) == 0
    assert next(csv.DictReader((tmp_path / "r.csv").open()))["ood_method"] == "msp"


@pytest.mark.parametrize("method", sorted(ood.DETECTORS))
def test_cli_ood_method_for_every_detector(method: str, checkpoint_path: Path, tmp_path: Path):
    out = tmp_path / "r.csv"
    photo = ood_paths()[0]
    argv = ["--checkpoint", str(checkpoint_path), "--out", str(out), "--ood-method", method, str(photo)]
    assert predict_main(argv) == 0
    row = next(csv.DictReader(out.open()))
    assert row["ood_method"] == method and row["error"] == ""
    # The active score is that detector's own column, and the verdict follows its threshold.
    assert float(row["ood_score"]) == pytest.approx(float(row[f"ood_{method}"]), abs=1e-6)
    rejected = float(row["ood_score"]) > float(row["ood_threshold"])
    assert (row["verdict"] == "unknown") == rejected
