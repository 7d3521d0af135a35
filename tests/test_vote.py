"""The similar cases' vote weighed into P(malignant): the blend, its checks, training, export and the CLI.

``voting_run`` is a tiny run trained by ``python -m train`` with ``--vote-k`` and ``--vote-weight``, so
the threshold, the metrics and the index are the ones finalize writes for such a recipe.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lesion import similar
from lesion.checkpoint import load_checkpoint, save_checkpoint
from lesion.errors import InvalidCheckpoint
from lesion.export import RESCORE_TOLERANCE, export_run
from lesion.metrics import choose_threshold
from lesion.predict import Predictor
from tests.conftest import DEMO, TINY_TRAINING, run_cli

VOTE_K, VOTE_WEIGHT = 8, 0.5


@pytest.fixture(scope="module")
def voting_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "voting"
    args = [f"--data={DEMO}", f"--out={run_dir}", f"--cache-dir={cache_dir}", *TINY_TRAINING]
    result = run_cli([*args, f"--vote-k={VOTE_K}", f"--vote-weight={VOTE_WEIGHT}"])
    assert result.returncode == 0, f"training failed:\n{result.stdout}\n{result.stderr}"
    return run_dir


def fold_paths(run_dir: Path, fold: str) -> tuple[list[Path], np.ndarray]:
    split = pd.read_csv(run_dir / "split.csv")
    part = split[split["fold"] == fold]
    return [DEMO / "images" / f"{i}.jpg" for i in part["image_id"]], (part["label"] == "malignant").to_numpy(int)


# --- the blend ----------------------------------------------------------------------------------


def test_the_blend_weighs_the_network_and_the_vote() -> None:
    assert similar.blended(0.8, 0.2, 0.5) == pytest.approx(0.5)
    assert similar.blended(0.8, 0.2, 0.25) == pytest.approx(0.65)
    assert similar.blended(0.8, 0.2, 0.0) == pytest.approx(0.8)  # the network alone
    assert similar.blended(0.8, float("nan"), 0.5) == pytest.approx(0.8)  # no vote: the network alone
    mixed = similar.blended([0.1, 0.9], [1.0, float("nan")], 0.5)
    assert mixed.tolist() == pytest.approx([0.55, 0.9])


def test_the_blend_in_words_adds_up() -> None:
    words = similar.blend_in_words(0.615, 0.7, 0.53125, 32, 0.5)
    assert words == "62% = 50% of the network's 70% and 50% of the 32 most similar confirmed cases' 53% malignant."
    assert similar.blend_in_words(0.7, 0.7, 0.5, 16, 0.0) == ""  # the vote is shown beside, not in, the figure
    assert similar.blend_in_words(0.7, 0.7, float("nan"), 16, 0.5) == ""


@pytest.mark.parametrize("k, weight", [(0, 0.5), (8, 1.0), (8, -0.1), (2.5, 0.5), (True, 0.5)])
def test_an_impossible_vote_is_refused(k, weight) -> None:
    features = torch.randn(10, 4)
    with pytest.raises(ValueError, match="vote"):
        similar.build_index(
            features, [str(i) for i in range(10)], [i % 2 for i in range(10)], ["nv"] * 10, k=k, weight=weight
        )


@pytest.mark.parametrize("option, value", [("--vote-weight", "1"), ("--vote-k", "0")])
def test_the_cli_refuses_an_impossible_vote(option: str, value: str, tmp_path: Path) -> None:
    result = run_cli([f"--data={DEMO}", f"--out={tmp_path / 'run'}", *TINY_TRAINING, f"{option}={value}"])
    assert result.returncode != 0
    assert option.removeprefix("--").replace("-", "_") in result.stderr
    assert not (tmp_path / "run" / "model.pt").exists()


# --- a run that weighs the vote in --------------------------------------------------------------


def test_training_writes_the_vote_into_the_checkpoint(voting_run: Path) -> None:
    checkpoint = load_checkpoint(voting_run / "model.pt")
    assert checkpoint["similar"]["k"] == VOTE_K and checkpoint["similar"]["weight"] == VOTE_WEIGHT
    metrics = checkpoint["metrics"]
    assert metrics["vote"] == {"k": VOTE_K, "weight": VOTE_WEIGHT}
    assert metrics["test"]["similar"]["k"] == VOTE_K


def test_the_predictor_blends_as_training_measured(voting_run: Path) -> None:
    """P(malignant) is the blend, its verdict follows the threshold chosen on the blend, and the test
    ROC-AUC training stored is the one the predictor's blend gives."""
    checkpoint = load_checkpoint(voting_run / "model.pt")
    predictor = Predictor(checkpoint)
    alone = Predictor({key: value for key, value in checkpoint.items() if key != "similar"})
    paths, labels = fold_paths(voting_run, "test")
    results = predictor.predict_batch(paths, with_heatmap=False, ood_threshold=math.inf)
    network = alone.predict_batch(paths, with_heatmap=False, ood_threshold=math.inf)
    for result, own in zip(results, network, strict=True):
        assert result.similar_k == VOTE_K and result.vote_weight == VOTE_WEIGHT
        assert result.p_network == pytest.approx(own.p_malignant, abs=1e-6)
        assert result.p_malignant == pytest.approx(0.5 * own.p_malignant + 0.5 * result.similar_malignant, abs=1e-6)
        assert result.verdict == ("malignant" if result.p_malignant >= predictor.decision_threshold else "benign")
        assert result.probabilities["malignant"] == pytest.approx(result.p_malignant)
        assert own.vote_weight == 0.0 and own.p_network == own.p_malignant
    blended = roc_auc_score(labels, [r.p_malignant for r in results])
    assert blended == pytest.approx(checkpoint["metrics"]["test"]["roc_auc"], abs=RESCORE_TOLERANCE)
    softmax = checkpoint["metrics"]["test"]["similar"]["softmax_roc_auc"]
    assert roc_auc_score(labels, [r.p_network for r in results]) == pytest.approx(softmax, abs=RESCORE_TOLERANCE)
    val_paths, val_labels = fold_paths(voting_run, "val")
    val_p = predictor.p_malignant(val_paths)
    assert predictor.decision_threshold == pytest.approx(choose_threshold(val_labels, val_p), abs=1e-3)
    called = np.array([r.p_malignant for r in results]) >= predictor.decision_threshold
    stored = checkpoint["metrics"]["test"]
    assert stored["sensitivity"] == pytest.approx(called[labels == 1].mean(), abs=RESCORE_TOLERANCE)
    assert stored["specificity"] == pytest.approx(1 - called[labels == 0].mean(), abs=RESCORE_TOLERANCE)


def test_a_tampered_vote_is_refused_at_load(voting_run: Path, tmp_path: Path) -> None:
    for key, value, words in (("weight", 1.5, "vote weight"), ("k", 0, "vote size"), ("k", "32", "vote size")):
        checkpoint = load_checkpoint(voting_run / "model.pt")
        checkpoint["similar"][key] = value
        path = save_checkpoint(checkpoint, tmp_path / f"tampered-{key}.pt")
        with pytest.raises(InvalidCheckpoint, match=words):
            Predictor.from_checkpoint(path)


def test_the_export_chooses_the_threshold_on_the_blend_and_remeasures_it(voting_run: Path, tmp_path: Path) -> None:
    exported = export_run(voting_run, tmp_path / "voting.pt")
    assert exported["similar"]["k"] == VOTE_K and exported["similar"]["weight"] == VOTE_WEIGHT
    predictor = Predictor(exported)
    val_paths, val_labels = fold_paths(voting_run, "val")
    # The halved weights' own blend on validation chose the threshold, by the recipe's rule.
    assert exported["decision_threshold"] == pytest.approx(
        choose_threshold(val_labels, predictor.p_malignant(val_paths)), abs=1e-6
    )
    assert exported["metrics"]["decision_threshold"] == exported["decision_threshold"]
    assert exported["metrics"]["vote"] == {"k": VOTE_K, "weight": VOTE_WEIGHT}
    # The stored figures are the blend's, measured independently here from the file's own predictions.
    test_paths, test_labels = fold_paths(voting_run, "test")
    blend = predictor.p_malignant(test_paths)
    network = Predictor({k: v for k, v in exported.items() if k != "similar"}).p_malignant(test_paths)
    assert exported["metrics"]["test"]["roc_auc"] == pytest.approx(roc_auc_score(test_labels, blend), abs=1e-9)
    assert exported["metrics"]["test"]["similar"]["softmax_roc_auc"] == pytest.approx(
        roc_auc_score(test_labels, network), abs=1e-9
    )
    called = blend >= exported["decision_threshold"]
    assert exported["metrics"]["test"]["sensitivity"] == pytest.approx(called[test_labels == 1].mean(), abs=1e-9)
    assert "50% of the network" in (tmp_path / "model_card.md").read_text()


def test_the_cli_csv_gives_the_network_beside_the_blend(voting_run: Path, tmp_path: Path) -> None:
    paths = fold_paths(voting_run, "train")[0][:6]  # training lesions: the OOD check accepts them
    out = tmp_path / "predictions.csv"
    result = run_cli(
        ["--checkpoint", str(voting_run / "model.pt"), "--out", str(out), *map(str, paths)], module="train.predict"
    )
    assert result.returncode == 0, result.stderr
    rows = {Path(row["path"]).name: row for row in csv.DictReader(out.open())}
    predictor = Predictor.from_checkpoint(voting_run / "model.pt")
    accepted = 0
    for path in paths:
        row, expected = rows[path.name], predictor.predict(path, with_heatmap=False)
        assert float(row["p_network"]) == pytest.approx(expected.p_network, abs=1e-5)
        assert float(row["p_malignant"]) == pytest.approx(expected.p_malignant, abs=1e-5)
        if row["similar_malignant"]:
            accepted += 1
            share = float(row["similar_malignant"])
            assert float(row["p_malignant"]) == pytest.approx(0.5 * float(row["p_network"]) + 0.5 * share, abs=1e-5)
    assert accepted >= 4


def test_the_blend_experiment_reproduces_the_run(voting_run: Path, tmp_path: Path) -> None:
    """``bench.experiments.vote_blend`` scores the network alone and each blend; the run's own figures agree."""
    out = tmp_path / "blend.json"
    result = run_cli(
        [str(voting_run), "--data", str(DEMO), "--k", str(VOTE_K), "--w", str(VOTE_WEIGHT), "--json", str(out)],
        module="bench.experiments.vote_blend",
    )
    assert result.returncode == 0, result.stderr
    assert f"k{VOTE_K}_w{VOTE_WEIGHT:g}" in result.stdout and "up on" in result.stdout
    (found,) = json.loads(out.read_text()).values()
    test = load_checkpoint(voting_run / "model.pt")["metrics"]["test"]
    assert found["test"]["network"] == pytest.approx(test["similar"]["softmax_roc_auc"], abs=RESCORE_TOLERANCE)
    assert found["test"][f"vote{VOTE_K}"] == pytest.approx(test["similar"]["vote_roc_auc"], abs=0.01)
    assert found["test"][f"k{VOTE_K}_w{VOTE_WEIGHT:g}"] == pytest.approx(test["roc_auc"], abs=0.01)


def test_the_predict_page_and_the_report_say_how_the_figure_was_formed(
    voting_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamlit.testing.v1 import AppTest

    from lesion.images import load_image
    from lesion.report import ModelFacts, render_report
    from lesion_app.session_cache import SHARED

    monkeypatch.setenv("LESION_RUNS_DIR", str(voting_run.parent))
    monkeypatch.delenv("LESION_CHECKPOINT", raising=False)
    SHARED.clear()
    predictor = Predictor.from_checkpoint(voting_run / "model.pt")
    path = next(p for p in fold_paths(voting_run, "val")[0] if predictor.predict(p, with_heatmap=False).accepted)
    expected = predictor.predict(path, with_heatmap=False)
    formed = similar.blend_in_words(
        expected.p_malignant, expected.p_network, expected.similar_malignant, VOTE_K, VOTE_WEIGHT
    )
    assert formed.startswith(f"{expected.p_malignant:.0%} = 50% of the network's")
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "streamlit_app.py"), default_timeout=120).run()
    at.file_uploader[0].upload(path.name, path.read_bytes(), "image/jpeg")
    at.run()
    assert not at.exception
    assert formed in [caption.value for caption in at.caption]
    headers = [m.value for m in at.markdown if m.value.startswith("**Similar confirmed cases**")]
    assert len(headers) == 1 and similar.vote_in_words(expected.similar_malignant, VOTE_K) in headers[0]
    assert "most similar confirmed cases" in headers[0] and f"of the {VOTE_K} " in headers[0]

    facts = ModelFacts.from_checkpoint(predictor.checkpoint, "voting")
    text = " ".join(pdf_text_of(render_report(expected, load_image(path), facts, name=path.name)).split())
    assert "How it was formed: " + formed in text


def pdf_text_of(data: bytes) -> str:
    import io

    pypdf = pytest.importorskip("pypdf")
    return "".join(page.extract_text() for page in pypdf.PdfReader(io.BytesIO(data)).pages)


def test_an_index_written_before_the_vote_votes_with_16_and_weighs_nothing(voting_run: Path) -> None:
    checkpoint = load_checkpoint(voting_run / "model.pt")
    for key in ("k", "weight"):
        checkpoint["similar"].pop(key)
    predictor = Predictor(checkpoint)
    assert predictor.similar.k == similar.VOTE_K and predictor.similar.weight == 0.0
    path = fold_paths(voting_run, "train")[0][0]
    result = predictor.predict(path, with_heatmap=False, ood_threshold=math.inf)
    assert result.similar_k == similar.VOTE_K and result.vote_weight == 0.0
    assert result.p_malignant == result.p_network


def test_a_binary_head_blends_its_verdict_but_draws_its_sets_from_the_network(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
) -> None:
    """A benign / malignant head: probabilities follow the blend, the conformal set (calibrated on the
    network's outputs) is drawn from the network's, in the pass and when the page redraws it."""
    from lesion import conformal
    from lesion.prediction import output_rows
    from lesion_app.predict_view import with_coverage

    run_dir = tmp_path_factory.mktemp("runs") / "binary-voting"
    args = [f"--data={DEMO}", f"--out={run_dir}", f"--cache-dir={cache_dir}", *TINY_TRAINING, "--target=binary"]
    result = run_cli([*args, f"--vote-k={VOTE_K}", f"--vote-weight={VOTE_WEIGHT}"])
    assert result.returncode == 0, f"training failed:\n{result.stdout}\n{result.stderr}"
    predictor = Predictor.from_checkpoint(run_dir / "model.pt")
    assert not predictor.dx_names and predictor.similar.weight == VOTE_WEIGHT
    for path in fold_paths(run_dir, "test")[0][:8]:
        found = predictor.predict(path, with_heatmap=False, ood_threshold=math.inf, coverage=0.9)
        assert found.probabilities["malignant"] == pytest.approx(found.p_malignant)
        assert found.p_malignant == pytest.approx(0.5 * found.p_network + 0.5 * found.similar_malignant, abs=1e-6)
        row = output_rows([found], predictor.dx_names, predictor.class_names)[0]
        assert row[predictor.class_names.index("malignant")] == pytest.approx(found.p_network)
        assert found.dx_set == conformal.prediction_set(predictor.conformal, row, 0.9)
        for coverage in (0.5, 0.99):
            redrawn = with_coverage(predictor, found, coverage)
            again = predictor.predict(path, with_heatmap=False, ood_threshold=math.inf, coverage=coverage)
            assert redrawn.dx_set == again.dx_set
