"""Model card: what the active model is, what it was measured on, its thresholds and its limits."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from lesion.card import INTENDED_USE, render_model_card
from lesion.files import CARD_FILE, METRICS_FILE, PLOTS_DIR
from lesion.runs import read_json
from lesion_app.guards import require_model
from lesion_app.runs_view import checkpoint_summary, metrics_rows
from lesion_app.wording import METRIC_LABELS

PLOT_CAPTIONS = {
    "roc": "ROC curve",
    "pr": "Precision-recall curve",
    "calibration": "Calibration (reliability)",
    "confusion": "Confusion matrix at the decision threshold",
    "dx_confusion": "Diagnosis confusion matrix (most probable diagnosis)",
    "curves": "Training and validation curves",
}


st.title("Model card")
predictor, model = require_model()

folder = Path(model.path).parent
info = checkpoint_summary(predictor.checkpoint, folder.name)
metrics = read_json(folder / METRICS_FILE) or info["metrics"]
split = metrics.get("headline_split") or model.metrics_split or "test"
st.caption(f"{model.path} · {info['arch']} at {info['image_size']} px · created {info['created']}")

top = st.columns(4)
top[0].metric("Decision threshold", f"{info['decision_threshold']:.3f}", help="On calibrated P(malignant)")
method = info["ood_method"]
if method in info["ood_thresholds"]:
    top[1].metric(f"OOD check ({method})", f"{info['ood_thresholds'][method]:.4g}", help="Scores above are rejected")
for column, key in zip(top[2:], ("roc_auc", "balanced_accuracy"), strict=True):
    if key in model.metrics:
        column.metric(f"{METRIC_LABELS[key]} ({split} split)", f"{model.metrics[key]:.3f}")

card, numbers, plots, limits = st.tabs(["Model card", "Metrics and thresholds", "Plots", "Intended use and limits"])
with card:
    card_file = folder / CARD_FILE
    if card_file.is_file():
        st.markdown(card_file.read_text(encoding="utf-8"))
    else:
        st.markdown(render_model_card(predictor.checkpoint, folder.name))
with numbers:
    st.markdown(f"Measured once after training; the headline figures come from the **{split}** split.")
    rows = metrics_rows(metrics)
    if rows:
        st.dataframe(rows, hide_index=True)
    else:
        st.caption("No metrics are stored with this model.")
    st.markdown("**Out-of-distribution detectors** (higher score = less like a lesion; above the threshold = rejected)")
    st.dataframe(
        [
            {
                "detector": m,
                "threshold": t,
                "in use": m == method,
                "new lesions rejected (bootstrap, 95 % range)": info["ood_rejection_spread"].get(m, ""),
            }
            for m, t in info["ood_thresholds"].items()
        ],
        hide_index=True,
    )
    if info["threshold_history"]:
        st.markdown("**Threshold changes saved from the app**")
        st.dataframe(info["threshold_history"], hide_index=True)
with plots:
    images = [(folder / PLOTS_DIR / f"{name}.png", caption) for name, caption in PLOT_CAPTIONS.items()]
    images = [(path, caption) for path, caption in images if path.is_file()]
    if not images:
        st.caption("No plots beside this checkpoint.")
    columns = st.columns(2)
    for index, (path, caption) in enumerate(p for p in images if p[0].stem != "curves"):
        columns[index % 2].image(str(path), caption=f"{caption} ({split} split)")
    for path, caption in (p for p in images if p[0].stem == "curves"):
        st.image(str(path), caption=caption, width="stretch")  # two panels side by side: give it the full width
with limits:
    st.markdown(INTENDED_USE)
