"""The lesion app: benign vs malignant with Grad-CAM, OOD rejection, training and the model card.

Run with ``streamlit run streamlit_app.py``. This script is the entry point on every rerun: it
sets up the page, the sidebar (active model, its headline metrics, the disclaimer) and the
navigation; the pages in ``app_pages/`` read the active model from ``st.session_state``.

The folder is deliberately not called ``pages/``: Streamlit treats a ``pages/`` folder beside the
entry script as the legacy multipage layout on a server's first run (and on every AppTest run),
which bypasses this script, so the sidebar and the active model would be missing.
"""

from __future__ import annotations

import os

import streamlit as st

from lesion.runs import default_extra_checkpoint, default_runs_dir, list_models
from lesion_app.jobs import active_job, read_progress
from lesion_app.support import DISCLAIMER, METRIC_LABELS

st.set_page_config(page_title="lesion: skin-lesion demo", page_icon=":material/dermatology:", layout="wide")


@st.cache_resource(max_entries=3, show_spinner="Loading the model…")
def load_predictor(path: str, mtime: float):
    """One Predictor per checkpoint file version, shared by every session.

    ``mtime`` is part of the key so a checkpoint rewritten with a new threshold is reloaded.
    """
    from lesion.predict import Predictor

    return Predictor.from_checkpoint(path, device=os.environ.get("LESION_DEVICE", "cpu"))


def sidebar_model() -> None:
    """The model selector; stores the active ModelEntry and Predictor in the session."""
    models = list_models(default_runs_dir(), default_extra_checkpoint())
    if not models:
        st.session_state["model"] = st.session_state["predictor"] = st.session_state["model_error"] = None
        st.sidebar.info("No trained model yet: see the Train page.")
        return
    keys = [entry.key for entry in models]
    if st.session_state.get("model_key") not in keys:
        st.session_state["model_key"] = keys[0]
    names = {entry.key: f"{entry.name}" + (" (LESION_CHECKPOINT)" if entry.source != "run" else "") for entry in models}
    key = st.sidebar.selectbox("Model", keys, format_func=names.get, key="model_key")
    entry = models[keys.index(key)]
    st.session_state["model"] = entry
    try:
        st.session_state["predictor"] = load_predictor(str(entry.path), entry.mtime)
    except Exception as error:  # an unreadable checkpoint must not take the whole app down
        st.session_state["predictor"] = None
        st.session_state["model_error"] = (
            f"The model {entry.name} could not be loaded: {error} Pick another one in the sidebar."
        )
        st.sidebar.error(f"This model could not be loaded: {error}")
        return
    st.session_state["model_error"] = None
    if entry.metrics:
        split = {"test": "held-out test split", "val": "validation split"}.get(entry.metrics_split, entry.metrics_split)
        st.sidebar.caption(f"Measured on the {split}:")
        cols = st.sidebar.columns(2)
        for index, (name, value) in enumerate(list(entry.metrics.items())[:4]):
            cols[index % 2].metric(METRIC_LABELS.get(name, name), f"{value:.3f}")
    else:
        st.sidebar.caption("No measured metrics stored beside this model.")


def sidebar_job() -> None:
    """A running training job, visible from every page and refreshed while it runs."""
    job = active_job(default_runs_dir())
    if job is None:
        return

    @st.fragment(run_every=5)
    def job_progress() -> None:
        running = active_job(default_runs_dir())
        if running is None:
            st.rerun()  # it finished: a full rerun lists the new model in the selector above
        progress = read_progress(running.path)
        st.progress(progress["fraction"], text=f"Training {running.name}: {progress['fraction']:.0%}")

    with st.sidebar:
        job_progress()


sidebar_model()
sidebar_job()
st.sidebar.warning(DISCLAIMER, icon=":material/info:")

page = st.navigation(
    [
        st.Page("app_pages/predict.py", title="Predict", icon=":material/image_search:", default=True),
        st.Page("app_pages/ood.py", title="OOD threshold", icon=":material/tune:"),
        st.Page("app_pages/train.py", title="Train", icon=":material/model_training:"),
        st.Page("app_pages/model.py", title="Model card", icon=":material/description:"),
    ]
)
st.caption(f":material/info: {DISCLAIMER}")
page.run()
