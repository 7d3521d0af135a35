"""The diagnosis (dx) head: training's choice, probabilities, heatmap targets, CSV, figures, old checkpoints."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, precision_score, recall_score

from lesion import explain
from lesion.checkpoint import check_checkpoint, load_checkpoint, save_checkpoint
from lesion.errors import InvalidCheckpoint
from lesion.images import load_image
from lesion.labels import DX_CODES, DX_TO_LABEL
from lesion.metrics import dx_metrics, roc_auc_interval
from lesion.model import forward_parts
from lesion.predict import Predictor
from lesion.targets import IGNORE_INDEX, choose_target
from lesion.transforms import eval_transform
from tests.conftest import SAMPLE_LESIONS, SAMPLE_OOD, run_cli
from tests.helpers_model import lesion_paths, tiny_checkpoint_dict
from train.predict import result_row

CAR = SAMPLE_OOD / "car_image1.jpg"


@pytest.fixture(scope="module")
def dx_predictor(trained_model: Path) -> Predictor:
    return Predictor.from_checkpoint(trained_model)


@pytest.fixture(scope="module")
def format1_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A binary checkpoint exactly as lesion wrote them before the dx head: format 1, no dx keys."""
    checkpoint = tiny_checkpoint_dict()
    for key in ("target", "dx_names", "dx_malignant"):
        del checkpoint[key]
    checkpoint["format_version"] = 1
    return save_checkpoint(checkpoint, tmp_path_factory.mktemp("format1") / "model.pt")


# ---------------------------------------------------------------- choosing the head


def test_dx_is_chosen_when_each_side_has_two_diagnoses_in_label_map_order() -> None:
    target = choose_target("dx", ["vasc", "mel", "nv", "bcc", "nv", "other"])
    assert target.kind == "dx" and target.names == ("nv", "mel", "bcc", "vasc") and not target.note
    assert target.malignant == (False, True, True, False)
    assert target.indices(["mel", "other", "vasc"], [1, 0, 0]).tolist() == [1, IGNORE_INDEX, 3]


def test_too_few_diagnoses_fall_back_to_binary_and_say_why() -> None:
    target = choose_target("dx", ["nv", "bkl", "mel", "mel"])
    assert target.kind == "binary" and target.names == ("benign", "malignant")
    assert "malignant: mel" in target.note and "benign / malignant only" in target.note
    assert choose_target("binary", ["nv", "bkl", "mel", "bcc"]).kind == "binary"
    with pytest.raises(ValueError, match="unknown target"):
        choose_target("coarse", ["nv"])


# ---------------------------------------------------------------- what training wrote


def test_training_learns_the_diagnosis_and_reports_it(trained_run: Path) -> None:
    checkpoint = load_checkpoint(trained_run / "model.pt")
    names = checkpoint["dx_names"]
    assert checkpoint["target"] == "dx" and checkpoint["format_version"] == 2
    assert names == [code for code in DX_CODES if code in names] and len(names) >= 4
    assert checkpoint["dx_malignant"] == [DX_TO_LABEL[name] == "malignant" for name in names]
    assert checkpoint["state_dict"]["fc.weight"].shape[0] == len(names)

    metrics = json.loads((trained_run / "metrics.json").read_text())
    dx = metrics["test"]["dx"]
    assert dx["names"] == names and dx["n"] == metrics["test"]["n"]
    assert np.asarray(dx["confusion"]).sum() == dx["n"] and sum(dx["support"].values()) == dx["n"]
    assert set(dx["recall"]) == set(dx["precision"]) == set(names)
    assert metrics["headline"]["dx_balanced_accuracy"] == dx["balanced_accuracy"]
    assert (trained_run / "plots" / "dx_confusion.png").stat().st_size > 1000
    card = (trained_run / "model_card.md").read_text()
    assert "one output per diagnosis" in card and "Diagnosis (test split): balanced accuracy" in card
    assert checkpoint["config"]["side_loss"] == 1.0  # the default: the dx loss plus the benign / malignant one
    assert "plus 1 x benign / malignant cross-entropy of P(malignant)" in card
    start = json.loads((trained_run / "events.jsonl").read_text().splitlines()[0])
    assert start["target"] == "dx" and start["outputs"] == names


def test_evaluate_json_adds_the_dx_figures(trained_model: Path, dx_predictor: Predictor) -> None:
    labels = SAMPLE_LESIONS / "labels.csv"
    result = run_cli(
        ["--checkpoint", str(trained_model), "--data", str(SAMPLE_LESIONS), "--metadata", str(labels), "--json"],
        module="train.evaluate",
    )
    assert result.returncode == 0, result.stderr
    dx = json.loads(result.stdout)["dx"]
    paths = sorted(SAMPLE_LESIONS.glob("*.jpg"))
    table = {row["image_id"]: row["dx"] for row in csv.DictReader(labels.open())}
    predictions = dx_predictor.predict_batch(paths, with_heatmap=False)
    probabilities = [[p.dx_probabilities[n] for n in dx_predictor.dx_names] for p in predictions]
    expected = dx_metrics([table[p.stem] for p in paths], np.array(probabilities), dx_predictor.dx_names)
    assert dx == expected


# ---------------------------------------------------------------- the predictor


def test_dx_probabilities_sum_to_one_and_p_malignant_is_the_malignant_sum(dx_predictor: Predictor) -> None:
    malignant = {n for n, m in zip(dx_predictor.dx_names, dx_predictor.target.malignant, strict=True) if m}
    for prediction in dx_predictor.predict_batch([*lesion_paths()[:8], CAR], with_heatmap=False):
        assert list(prediction.dx_probabilities) == dx_predictor.dx_names
        assert sum(prediction.dx_probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        in_sum = sum(p for dx, p in prediction.dx_probabilities.items() if dx in malignant)
        assert prediction.p_malignant == pytest.approx(in_sum, abs=1e-6)
        assert prediction.probabilities["malignant"] == pytest.approx(prediction.p_malignant)
        top = max(prediction.dx_probabilities, key=prediction.dx_probabilities.get)
        assert prediction.dx_top == (top if prediction.accepted else "")


def test_probabilities_match_the_network_and_temperature(dx_predictor: Predictor, trained_model: Path) -> None:
    checkpoint = load_checkpoint(trained_model)
    transform = eval_transform(checkpoint["image_size"], checkpoint["mean"], checkpoint["std"])
    path = lesion_paths()[3]
    with torch.no_grad():
        logits = dx_predictor.model(transform(load_image(path, checkpoint["resize_size"]))[None])
    expected = torch.softmax(logits / checkpoint["temperature"], dim=1)[0].tolist()
    got = dx_predictor.predict(path, with_heatmap=False).dx_probabilities
    assert list(got.values()) == pytest.approx(expected, abs=1e-5)


def test_heatmap_target_switches_what_the_map_explains(dx_predictor: Predictor) -> None:
    path = lesion_paths()[0]
    default = dx_predictor.predict(path)
    side = "malignant" if default.verdict == "malignant" else "benign"
    assert default.cam_target == side
    same = dx_predictor.predict(path, cam_target=side)
    np.testing.assert_array_equal(same.heatmap, default.heatmap)
    other = dx_predictor.predict(path, cam_target="benign" if side == "malignant" else "malignant")
    assert not np.allclose(other.heatmap, default.heatmap, atol=0.05)

    # A diagnosis target is Grad-CAM of that dx's logit: the same map pytorch-grad-cam draws.
    transform = eval_transform(dx_predictor.image_size, dx_predictor.mean, dx_predictor.std)
    batch = transform(load_image(path, dx_predictor.resize_size))[None]
    with torch.no_grad():
        activations = forward_parts(dx_predictor.model, batch)[0]
    maps = {}
    for index, dx in enumerate(dx_predictor.dx_names):
        prediction = dx_predictor.predict(path, cam_target=dx)
        assert prediction.cam_target == dx and prediction.target == index
        low = dx_predictor._low_resolution_cams(activations, [dx], "gradcam")
        reference = explain.reference_cam(dx_predictor.model, batch, "gradcam", index)
        np.testing.assert_allclose(explain.upsample(low, reference.shape[1:]).numpy(), reference, atol=1e-4)
        maps[dx] = prediction.heatmap
    assert len({m.tobytes() for m in maps.values()}) > 1, "every diagnosis gave the same heatmap"
    with pytest.raises(ValueError, match="unknown heatmap target"):
        dx_predictor.predict(path, cam_target="psoriasis")


def test_predict_csv_has_dx_columns_and_rejected_rows_have_none(
    dx_predictor: Predictor, trained_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results.csv"
    lesion = lesion_paths()[0]
    result = run_cli(
        ["--checkpoint", str(trained_model), "--out", str(out), str(lesion), str(CAR)], module="lesion.predict"
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    header = next(csv.reader(out.open()))
    assert header[:12] == [
        "path", "verdict", "p_malignant", "decision_threshold", "ood_method", "ood_score", "ood_threshold",
        "accepted", "cam_method", "image_width", "image_height", "error",
    ]  # fmt: skip
    assert header[-14:-5] == ["dx_top", *(f"p_{dx}" for dx in DX_CODES)]
    # columns only grow, at the end
    assert header[-5:] == ["similar_malignant", "similar_ids", "dx_set", "report", "p_network"]
    for row, path in zip(rows, (lesion, CAR), strict=True):
        prediction = dx_predictor.predict(path, with_heatmap=False)
        if row["accepted"] == "True":
            values = {dx: float(row[f"p_{dx}"]) for dx in dx_predictor.dx_names}
            assert sum(values.values()) == pytest.approx(1.0, abs=1e-4)
            assert row["dx_top"] == prediction.dx_top == max(values, key=values.get)
            assert all(row[f"p_{dx}"] == "" for dx in DX_CODES if dx not in dx_predictor.dx_names)
        else:
            assert all(row[column] == "" for column in header[-10:-1])  # p_network aside

    # A rejected photo, whatever this tiny model's detector says about the car: no diagnosis.
    rejected = dx_predictor.predict(CAR, with_heatmap=False, ood_threshold=-1e9)
    assert rejected.verdict == "unknown" and rejected.dx_top == "" and rejected.dx_probabilities
    row = result_row(CAR, rejected, list(dx_predictor.detectors))
    assert not any(key == "dx_top" or key.startswith("p_") and key not in ("p_malignant", "p_network") for key in row)


# ---------------------------------------------------------------- today's binary checkpoints


def test_a_format_1_binary_checkpoint_still_loads_and_scores(format1_checkpoint: Path, tmp_path: Path) -> None:
    predictor = Predictor.from_checkpoint(format1_checkpoint)
    assert predictor.dx_names == [] and predictor.cam_targets == ["malignant", "benign"]
    prediction = predictor.predict(lesion_paths()[0])
    assert prediction.dx_probabilities == {} and prediction.dx_top == ""
    assert prediction.p_malignant == pytest.approx(prediction.probabilities["malignant"])
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    # The default heatmap is still the verdict class's logit, as before the dx head.
    by_index = predictor.predict(lesion_paths()[0], target=predictor.class_names.index(prediction.verdict))
    np.testing.assert_array_equal(by_index.heatmap, prediction.heatmap)
    with pytest.raises(ValueError, match="unknown heatmap target"):
        predictor.predict(lesion_paths()[0], cam_target="mel")

    out = tmp_path / "binary.csv"
    result = run_cli(
        ["--checkpoint", str(format1_checkpoint), "--out", str(out), str(lesion_paths()[0])], module="lesion.predict"
    )
    assert result.returncode == 0, result.stderr
    (row,) = list(csv.DictReader(out.open()))
    assert float(row["p_malignant"]) == pytest.approx(prediction.p_malignant, abs=1e-6)
    assert all(row[f"p_{dx}"] == "" for dx in DX_CODES) and row["dx_top"] == ""


def test_impossible_dx_entries_are_refused() -> None:
    checkpoint = tiny_checkpoint_dict(with_ood=False)
    checkpoint.update(target="dx", dx_names=["nv", "bkl"], dx_malignant=[False, False])
    with pytest.raises(InvalidCheckpoint, match="needs benign and malignant"):
        check_checkpoint(checkpoint)
    checkpoint.update(dx_names=["nv", "mel", "mel"], dx_malignant=[False, True, True])
    with pytest.raises(InvalidCheckpoint, match="repeated"):
        check_checkpoint(checkpoint)
    checkpoint.update(dx_names=["nv", "mel"], dx_malignant=[False, True])  # a 2-output head on 2 dx: fine
    Predictor(check_checkpoint(checkpoint))


# ---------------------------------------------------------------- metrics


def test_dx_metrics_agree_with_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    names = ["nv", "mel", "bkl", "bcc"]
    truth = rng.choice(names, 200, p=[0.5, 0.2, 0.2, 0.1]).tolist()
    probabilities = rng.dirichlet(np.ones(4), 200)
    probabilities[np.arange(200), [names.index(t) for t in truth]] += rng.random(200) * 0.6
    result = dx_metrics([*truth, "other"], np.vstack([probabilities, np.full(4, 0.25)]), names)
    predicted = [names[i] for i in probabilities.argmax(axis=1)]
    assert result["n"] == 200 and result["n_unscored"] == 1
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, predicted))
    recall = recall_score(truth, predicted, labels=names, average=None)
    precision = precision_score(truth, predicted, labels=names, average=None)
    assert [result["recall"][n] for n in names] == pytest.approx(recall.tolist())
    assert [result["precision"][n] for n in names] == pytest.approx(precision.tolist())
    assert np.asarray(result["confusion"]).sum(axis=1).tolist() == [result["support"][n] for n in names]


def test_roc_auc_interval_by_lesion_brackets_the_estimate() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = np.repeat(rng.integers(0, 2, 150), 2)  # two images per lesion
    p = y * 0.4 + rng.random(300)
    lesions = np.repeat(np.arange(150), 2)
    low, high = roc_auc_interval(y, p, lesions)
    assert low < roc_auc_score(y, p) < high and 0.05 < high - low < 0.3
    wide = roc_auc_interval(y[:60], p[:60], lesions[:60])
    assert wide[1] - wide[0] > high - low  # fewer lesions, wider interval
    assert roc_auc_interval(np.zeros(10), np.linspace(0, 1, 10)) is None


def test_paired_difference_interval_sees_a_better_model_and_not_a_copy() -> None:
    from lesion.metrics import roc_auc_difference_interval

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    good, poor = y * 0.8 + rng.random(300), y * 0.1 + rng.random(300)
    low, high = roc_auc_difference_interval(y, good, poor)
    assert 0 < low < high  # clearly better: the whole interval is above 0
    assert roc_auc_difference_interval(y, good, good) == (0.0, 0.0)


def test_mean_difference_over_seeds_is_narrower_than_one_seed() -> None:
    from lesion.metrics import mean_roc_auc_difference_interval, roc_auc_difference_interval

    rng = np.random.default_rng(3)
    splits = []
    for _ in range(3):
        y = rng.integers(0, 2, 120)
        splits.append((y, y * 0.5 + rng.random(120), y * 0.4 + rng.random(120), np.arange(120) // 2))
    one = roc_auc_difference_interval(*splits[0][:3], splits[0][3])
    low, high = mean_roc_auc_difference_interval(splits)
    assert high - low < one[1] - one[0]  # three independent splits pin the mean down better than one
    copies = [(y, a, a, g) for y, a, _, g in splits]
    assert mean_roc_auc_difference_interval(copies) == (0.0, 0.0)
    clearly = [(y, y * 0.9 + rng.random(len(y)), b, g) for y, _, b, g in splits]
    assert mean_roc_auc_difference_interval(clearly)[0] > 0
    assert mean_roc_auc_difference_interval([]) is None


def test_training_and_evaluation_loaders_carry_the_dx_labels(tmp_path: Path) -> None:
    import pandas as pd

    from lesion.config import TrainConfig
    from lesion.distributed import DistInfo
    from lesion.loaders import make_loader
    from lesion.targets import dx_target

    frame = pd.DataFrame({"path": ["a.jpg", "b.jpg", "c.jpg"], "dx": ["mel", "vasc", "other"], "label": [1, 0, 1]})
    target = dx_target(["nv", "mel", "vasc", "bcc"])
    config = TrainConfig(image_size=64, num_workers=0)
    for train in (True, False):
        loader = make_loader(config, frame, None, DistInfo(), train=train, device=torch.device("cpu"), target=target)
        assert loader.dataset.labels == [1, 2, IGNORE_INDEX]


def test_side_loss_is_the_binary_cross_entropy_of_p_malignant() -> None:
    import torch

    from lesion.regularize import DxSideCrossEntropy, SoftTargetCrossEntropy
    from lesion.targets import dx_target, p_malignant

    target = dx_target(["nv", "mel", "bkl", "bcc"])
    torch.manual_seed(0)
    logits = torch.randn(8, 4)
    labels = torch.tensor([0, 1, 2, 3, 1, 0, -100, 3])
    pure = SoftTargetCrossEntropy()(logits, labels)
    assert torch.isclose(DxSideCrossEntropy(target.malignant_mask(), side_weight=0.0)(logits, labels), pure)
    combined = DxSideCrossEntropy(target.malignant_mask(), side_weight=2.0)(logits, labels)
    p = p_malignant(torch.softmax(logits, dim=1), target)
    side = torch.tensor([bool(target.malignant[i]) for i in labels.clamp_min(0)]).float()
    kept = labels >= 0  # an image without a dx output counts in neither term
    binary = torch.nn.functional.binary_cross_entropy(p[kept], side[kept])
    assert torch.isclose(combined, pure + 2.0 * binary, atol=1e-5)
    soft = torch.nn.functional.one_hot(labels[kept], 4).float()  # mixed batches: soft targets, same loss
    hard = DxSideCrossEntropy(target.malignant_mask())(logits[kept], labels[kept])
    assert torch.isclose(DxSideCrossEntropy(target.malignant_mask())(logits[kept], soft), hard, atol=1e-5)
