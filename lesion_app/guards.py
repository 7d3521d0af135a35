"""The pages' shared guard: with no usable model, say what to do next and stop the page (Streamlit's idiom)."""

from __future__ import annotations

from typing import Any

import streamlit as st

from lesion_app.runs_view import NO_MODEL_HELP


def require_model() -> tuple[Any, Any]:
    """The session's (Predictor, ModelEntry); without both, show the next step and stop the script.

    The sidebar (streamlit_app.py) fills ``predictor``, ``model`` and ``model_error`` on every run.
    """
    predictor, model = st.session_state.get("predictor"), st.session_state.get("model")
    if predictor is None or model is None:
        st.info(st.session_state.get("model_error") or NO_MODEL_HELP)
        st.page_link("app_pages/train.py", label="Open the Train page", icon=":material/model_training:")
        st.stop()
    return predictor, model
