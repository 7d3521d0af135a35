"""Every page with no model yet, and the Model card page with a trained one (AppTest)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from lesion.card import INTENDED_USE
from lesion.config import build_config, recipe_measurement
from lesion.ood import DETECTORS
from lesion_app.runs_view import NO_MODEL_HELP, measured_duration
from lesion_app.wording import DISCLAIMER, format_duration

REPO = Path(__file__).resolve().parent.parent
PAGES = ["app_pages/predict.py", "app_pages/ood.py", "app_pages/train.py", "app_pages/model.py"]


def open_app(runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("LESION_RUNS_DIR", str(runs_dir))
    monkeypatch.delenv("LESION_CHECKPOINT", raising=False)
    monkeypatch.delenv("LESION_DATA_ROOT", raising=False)
    monkeypatch.setenv("LESION_BUNDLED_MODEL", "")  # no bundled model either: the app as without assets/models
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120).run()
    assert not at.exception
    return at


def test_every_page_says_what_to_do_without_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(tmp_path / "no-runs-yet", monkeypatch)
    for page in PAGES:
        at.switch_page(page).run()
        assert not at.exception, page
        assert any(DISCLAIMER in c.value for c in at.caption), f"{page} lacks the disclaimer"
        assert any(DISCLAIMER in w.value for w in at.sidebar.warning)
        if page.endswith("train.py"):
            assert any(b.label == "Start training" for b in at.button)
            assert [box.value for box in at.selectbox if box.label == "Recipe"] == ["demo"]
        else:
            assert [i.value for i in at.main.info] == [NO_MODEL_HELP], page
    # The duration it quotes is the figure measured and stored with the demo recipe, not a guess in the code.
    measured = recipe_measurement("demo")
    assert f"{format_duration(measured['seconds'])} when we measured it on {measured['machine']}" in NO_MODEL_HELP


def test_the_quoted_demo_duration_follows_the_recipe_file(tmp_path: Path) -> None:
    recipe = tmp_path / "timed.toml"
    recipe.write_text('epochs = 1\n\n[measured]\nseconds = 5400\nmachine = "one old laptop"\n')
    assert measured_duration(str(recipe)) == "1 h 30 min when we measured it on one old laptop"
    assert build_config(str(recipe)).epochs == 1  # the [measured] table is not a setting
    recipe.write_text("epochs = 1\n")
    assert measured_duration(str(recipe)) == "not measured yet"


def test_model_card_page_names_the_split_and_shows_plots(trained_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(trained_run.parent, monkeypatch)
    assert any(c.value == "Measured on the held-out test split:" for c in at.sidebar.caption)
    assert {m.label for m in at.sidebar.metric} >= {"ROC-AUC", "Sensitivity", "Specificity"}
    at.switch_page("app_pages/model.py").run()
    assert not at.exception
    assert any("Model card: tiny" in m.value for m in at.markdown)
    assert any(m.label == "ROC-AUC (test split)" for m in at.metric)
    metrics = at.dataframe[0].value
    assert list(metrics.columns) == ["metric", "validation", "test"] and "roc_auc" in set(metrics["metric"])
    detectors = at.dataframe[1].value
    assert set(detectors["detector"]) == set(DETECTORS) and detectors["in use"].sum() == 1
    captions = [c for image in at.image for c in image.captions]
    assert "ROC curve (test split)" in captions and "Training and validation curves" in captions
    assert "Diagnosis confusion matrix (most probable diagnosis) (test split)" in captions  # a dx model
    assert any(m.value.strip() == INTENDED_USE.strip() for m in at.markdown)  # its own tab


def test_extra_checkpoint_is_offered_first(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LESION_CHECKPOINT", str(trained_run / "model.pt"))
    monkeypatch.setenv("LESION_RUNS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("LESION_BUNDLED_MODEL", "")
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120).run()
    assert not at.exception
    model = at.sidebar.selectbox[0]
    assert model.label == "Model" and len(model.options) == 1 and "LESION_CHECKPOINT" in model.options[0]
    assert [i.value for i in at.main.info] == [
        "Upload a photo or tick a sample below to see what the model says."
    ]  # the Predict page is ready for an upload, not asking for a model


def test_unreadable_checkpoint_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 not really a checkpoint")
    monkeypatch.setenv("LESION_CHECKPOINT", str(broken))
    monkeypatch.setenv("LESION_RUNS_DIR", str(tmp_path / "empty"))
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120).run()
    assert not at.exception
    assert any("could not be loaded" in e.value and "broken.pt" in e.value for e in at.sidebar.error)
    for page in PAGES:
        at.switch_page(page).run()
        assert not at.exception, page
        if not page.endswith("train.py"):
            (message,) = [i.value for i in at.main.info]
            assert "could not be loaded" in message and "Pick another one" in message, page


def test_train_page_offers_the_installed_pretrained_network_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-cache"))  # no ResNet weights downloaded here
    at = open_app(tmp_path / "runs", monkeypatch)
    at.switch_page("app_pages/train.py").run()
    arch = next(box for box in at.selectbox if box.label == "Architecture")
    assert arch.value == "efficientnet_lite0"  # the demo recipe's own choice
    assert "EfficientNet-Lite0 (ImageNet, installed)" in arch.options
    assert "ResNet-50 (ImageNet, downloaded on first use)" in arch.options
    next(box for box in at.selectbox if box.label == "Recipe").select("recommended").run()
    assert not at.exception
    arch = next(box for box in at.selectbox if box.label == "Architecture")
    assert arch.value == "efficientnet_lite0"  # not the recipe's ResNet-50, whose weights would need a download
    assert any("EfficientNet-Lite0 is preselected instead of the recipe's ResNet-50" in c.value for c in at.caption)
    weights = next(radio for radio in at.radio if radio.label == "Starting weights")
    assert weights.value == "imagenet" and "ImageNet (installed)" in weights.options
