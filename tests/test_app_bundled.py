"""The app on a fresh clone (the bundled model answers at once) and on a shared server (a presenter password).

The bundled-model test FAILS, never skips, when assets/models has no model (see tests/test_bundled.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from lesion.export import describe
from lesion.predict import Predictor
from lesion.runs import BUNDLED_MODEL
from lesion_app.access import LOCKED_HELP
from lesion_app.gallery import list_samples
from lesion_app.wording import VERDICT_TEXT
from tests.test_bundled import shipped

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery staple"


def open_app(monkeypatch: pytest.MonkeyPatch, runs_dir: Path, bundled: str | None = None) -> AppTest:
    monkeypatch.setenv("LESION_RUNS_DIR", str(runs_dir))
    monkeypatch.delenv("LESION_CHECKPOINT", raising=False)
    monkeypatch.delenv("LESION_DATA_ROOT", raising=False)
    if bundled is None:
        monkeypatch.delenv("LESION_BUNDLED_MODEL", raising=False)
    else:
        monkeypatch.setenv("LESION_BUNDLED_MODEL", bundled)
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=180).run()
    assert not at.exception, at.exception
    return at


def test_fresh_clone_selects_the_bundled_model_and_answers_a_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = shipped()  # a plain failure naming the rebuild command when the file is missing or stale
    at = open_app(monkeypatch, tmp_path / "no-runs-yet")
    model = at.sidebar.selectbox[0]
    assert Path(model.value) == BUNDLED_MODEL.resolve()
    assert "bundled with the app" in model.format_func(model.value)
    sample = next(s for s in list_samples() if s.kind == "lesion")
    at.checkbox(key=f"sample-{sample.name}").check().run()
    assert not at.exception, at.exception
    expected = Predictor.from_checkpoint(BUNDLED_MODEL).predict(sample.path, with_heatmap=False)
    verdicts = [box.value for box in [*at.main.success, *at.main.error, *at.main.warning]]
    assert any(text.startswith(f"**{VERDICT_TEXT[expected.verdict]}**") for text in verdicts), verdicts
    # The sidebar says what the model is, from its checkpoint: data, arch, size, start, figure and held-out count.
    facts = " ".join(caption.value for caption in at.sidebar.caption)
    assert describe(checkpoint) in facts
    test = checkpoint["metrics"]["test"]
    assert f"Test ROC-AUC {test['roc_auc']:.3f} on {test['n_lesions']} held-out lesions" in facts
    start = "from ImageNet weights" if checkpoint["config"]["weights"] == "imagenet" else "from random weights"
    assert start in facts and f"{checkpoint['image_size']} px" in facts


def test_bundled_model_is_read_only_on_the_ood_page(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run's model stands in for the shipped file: what matters is that it is the bundled one.
    bundled = tmp_path / "models" / "bundled.pt"
    bundled.parent.mkdir()
    shutil.copy(trained_run / "model.pt", bundled)
    at = open_app(monkeypatch, tmp_path / "no-runs-yet", bundled=str(bundled))
    at.switch_page("app_pages/ood.py").run()
    assert not at.exception, at.exception
    save = next(b for b in at.button if b.label.startswith("Save "))
    assert save.disabled
    assert any("kept as shipped" in c.value for c in at.caption)


def locked_state(at: AppTest) -> tuple[bool, bool]:
    """(Start training disabled, lock message shown) on the Train page."""
    start = next(b for b in at.button if b.label == "Start training")
    return start.disabled, any(i.value == LOCKED_HELP for i in at.main.info)


def submit_password(at: AppTest, value: str) -> AppTest:
    field = next(t for t in at.sidebar.text_input if t.label == "Presenter password")
    field.input(value)
    next(b for b in at.sidebar.button if b.label == "Unlock").click()
    return at.run()


def test_presenter_password_locks_training_until_given(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(trained_run, runs / "tiny")
    monkeypatch.setenv("LESION_ADMIN_PASSWORD", PASSWORD)
    at = open_app(monkeypatch, runs, bundled="")
    at.switch_page("app_pages/train.py").run()
    assert locked_state(at) == (True, True)
    assert at.dataframe, "visitors still see the runs"
    at.switch_page("app_pages/ood.py").run()
    assert next(b for b in at.button if b.label.startswith("Save ")).disabled
    assert at.slider, "visitors can still move the threshold slider"

    at.switch_page("app_pages/train.py").run()
    submit_password(at, PASSWORD[:-1] + "X")
    assert not at.exception
    assert [e.value for e in at.sidebar.error] == ["Wrong password: training and saving thresholds stay locked."]
    assert locked_state(at) == (True, True)

    submit_password(at, PASSWORD)
    assert not at.exception and not at.sidebar.error
    assert locked_state(at) == (False, False)
    at.switch_page("app_pages/ood.py").run()
    assert not next(b for b in at.button if b.label.startswith("Save ")).disabled
    # Never shown back: not in any element's text, and the field is empty again.
    shown = [
        e.value for e in [*at.sidebar.caption, *at.sidebar.markdown, *at.main.markdown] if isinstance(e.value, str)
    ]
    assert not any(PASSWORD in text for text in shown)
    assert all(t.value == "" for t in at.sidebar.text_input if t.label == "Presenter password")


def test_without_a_password_everything_stays_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LESION_ADMIN_PASSWORD", raising=False)
    at = open_app(monkeypatch, tmp_path / "runs", bundled="")
    assert not [t for t in at.sidebar.text_input if t.label == "Presenter password"]
    at.switch_page("app_pages/train.py").run()
    assert locked_state(at) == (False, False)


def test_no_page_caches_data_across_sessions() -> None:
    # st.cache_data keyed by an upload would hand one visitor's image to another; predictions live in
    # st.session_state only, and the one shared cache is the model (st.cache_resource, keyed by its path).
    sources = [REPO / "streamlit_app.py", *sorted((REPO / "app_pages").glob("*.py"))]
    for path in sources:
        assert "cache_data" not in path.read_text(), path
    assert (REPO / "streamlit_app.py").read_text().count("st.cache_resource") == 1
