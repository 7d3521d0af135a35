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

from lesion.runs import default_bundled_checkpoint, default_extra_checkpoint, default_runs_dir, list_models
from lesion_app.access import ADMIN_SESSION_KEY, LOCKED_HELP, admin_password, may_change, password_matches
from lesion_app.jobs import active_job, read_progress
from lesion_app.join import JOIN_CAPTION, join_address, network_address, qr_png
from lesion_app.wording import DISCLAIMER, METRIC_LABELS

st.set_page_config(page_title="lesion: skin-lesion demo", page_icon=":material/dermatology:", layout="wide")


@st.cache_resource(max_entries=3, show_spinner=False)
def load_predictor(path: str, mtime: float):
    """One Predictor per checkpoint file version, shared by every session.

    ``mtime`` is part of the key so a checkpoint rewritten with a new threshold is reloaded. Imported
    here, not at the top: torch is imported only once the page is on screen (see sidebar_model).
    """
    from lesion.predict import Predictor

    return Predictor.from_checkpoint(path, device=os.environ.get("LESION_DEVICE", "cpu"))


def _picked() -> None:
    st.session_state["model_picked"] = True


def sidebar_model(waits: bool) -> None:
    """The model selector; stores the active ModelEntry, and the Predictor or a way to wait for it, in the session.

    ``waits``: load the model now (pages that need it at once). Otherwise the session gets
    ``predictor_pending``, a function the Predict page calls once its uploader is on screen (the
    first load imports torch and reads the weights: seconds on a small CPU): it loads the model
    and fills in the sidebar (description, figures, or the loading error).
    """
    models = list_models(default_runs_dir(), default_extra_checkpoint(), default_bundled_checkpoint())
    st.session_state["models"] = models
    st.session_state["predictor_pending"] = None
    if not models:
        st.session_state["model"] = st.session_state["predictor"] = st.session_state["model_error"] = None
        st.sidebar.info("No trained model yet: see the Train page.")
        return
    keys = [entry.key for entry in models]
    # Until the visitor picks a model, the first one is in use: a run that just finished replaces the bundled one.
    if st.session_state.get("model_key") not in keys or not st.session_state.get("model_picked"):
        st.session_state["model_key"] = keys[0]
    suffix = {"LESION_CHECKPOINT": " (LESION_CHECKPOINT)", "bundled": " (bundled with the app)"}
    names = {entry.key: entry.name + suffix.get(entry.source, "") for entry in models}
    key = st.sidebar.selectbox("Model", keys, format_func=names.get, key="model_key", on_change=_picked)
    entry = models[keys.index(key)]
    st.session_state["model"] = entry
    st.session_state["predictor"] = st.session_state["model_error"] = None
    slot = st.sidebar.container()

    def finish():
        try:
            with st.spinner("Loading the model…"):
                predictor = load_predictor(str(entry.path), entry.mtime)
        except Exception as error:  # an unreadable checkpoint must not take the whole app down
            st.session_state["model_error"] = (
                f"The model {entry.name} could not be loaded: {error} Pick another one in the sidebar."
            )
            slot.error(f"This model could not be loaded: {error}")
            return None
        st.session_state["predictor"] = predictor
        show_model_facts(slot, entry, predictor)
        return predictor

    if waits:
        finish()
    else:
        st.session_state["predictor_pending"] = finish


def show_model_facts(slot, entry, predictor) -> None:
    """What the model is (bundled: read from its checkpoint) and the headline figures stored beside it."""
    if entry.source == "bundled":
        from lesion.export import describe

        slot.caption(f"**Bundled demo model.** {describe(predictor.checkpoint)}")
    if entry.metrics:
        split = {"test": "held-out test split", "val": "validation split"}.get(entry.metrics_split, entry.metrics_split)
        slot.caption(f"Measured on the {split}:")
        cols = slot.columns(2)
        for index, (name, value) in enumerate(list(entry.metrics.items())[:4]):
            cols[index % 2].metric(METRIC_LABELS.get(name, name), f"{value:.3f}")
    else:
        slot.caption("No measured metrics stored beside this model.")


def sidebar_presenter() -> None:
    """With LESION_ADMIN_PASSWORD set: the password field, once per browser session.

    The value lives only in this run (the form clears it on submit); it is never stored, logged or shown.
    """
    expected = admin_password()
    if expected is None:
        return
    if st.session_state.get(ADMIN_SESSION_KEY) is True:
        st.sidebar.caption("Presenter mode: training and saving thresholds are unlocked in this browser.")
        if st.sidebar.button("Lock", icon=":material/lock:"):
            st.session_state[ADMIN_SESSION_KEY] = False
            st.rerun()
        return
    with st.sidebar.form("presenter", clear_on_submit=True, border=False):
        given = st.text_input("Presenter password", type="password", help=LOCKED_HELP)
        submitted = st.form_submit_button("Unlock", icon=":material/lock_open:")
    if submitted:
        if given and password_matches(given, expected):
            st.session_state[ADMIN_SESSION_KEY] = True
            st.rerun()
        st.sidebar.error("Wrong password: training and saving thresholds stay locked.")


def join_code() -> None:
    """The presenter's QR code of the app's address (a toggle in the sidebar), large at the top of the page.

    Offered to whoever may change things: the presenter once unlocked, everyone when no password is set.
    """
    if not may_change(st.session_state) or not st.sidebar.toggle("Show the join QR code", key="show_join"):
        return
    # The address the presenter's browser used; a local name is swapped for this machine's network address.
    page_url = st.context.url or f"http://localhost:{st.get_option('server.port')}/"
    guess = join_address(page_url, st.get_option("server.baseUrlPath") or "", network_address())
    with st.container(border=True, horizontal_alignment="center"):
        address = st.text_input(
            "The app's address for phones",
            value=guess,
            key="join_address",
            help="Correct it if phones reach this machine by another name (a public address, a proxy).",
        ).strip()
        if not address:
            st.info("Type the address phones should open.")
            return
        st.image(qr_png(address), width="content", alt=f"QR code of {address}")  # its own size: sharp edges
        st.subheader(JOIN_CAPTION, anchor=False)
        st.markdown(f"or type **{address}**")


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


page = st.navigation(
    [
        st.Page("app_pages/predict.py", title="Predict", icon=":material/image_search:", default=True),
        st.Page("app_pages/ood.py", title="OOD threshold", icon=":material/tune:"),
        st.Page("app_pages/train.py", title="Train", icon=":material/model_training:"),
        st.Page("app_pages/model.py", title="Model card", icon=":material/description:"),
    ]
)
# The Predict page draws its uploader before it needs the model; the others need it at once.
sidebar_model(waits=page.url_path != "")
sidebar_job()
sidebar_presenter()
st.sidebar.warning(DISCLAIMER, icon=":material/info:")
st.caption(f":material/info: {DISCLAIMER}")
join_code()
page.run()
