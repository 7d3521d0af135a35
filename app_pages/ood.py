"""OOD threshold: move a slider, see which photos and lesions pass, and save the choice into the model."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import streamlit as st

from lesion.errors import InvalidImage, LesionError
from lesion.ood import DETECTORS
from lesion.runs import save_ood_threshold
from lesion_app.access import LOCKED_HELP, may_change
from lesion_app.charts import histogram_chart, roc_chart
from lesion_app.gallery import list_samples, training_folds
from lesion_app.guards import require_model
from lesion_app.ood_view import assess, cached_ood_scores, slider_range
from lesion_app.predict_view import UPLOAD_TYPES, display_image

METHOD_NOTES = {name: detector.note for name, detector in DETECTORS.items()}

st.title("Out-of-distribution threshold")
predictor, model = require_model()
thresholds = dict(predictor.ood_thresholds or {})
if not thresholds:
    st.info("This model has no fitted out-of-distribution detectors, so there is no threshold to tune.")
    st.stop()
if "ood_scores" not in st.session_state:
    st.session_state["ood_scores"] = OrderedDict()
if flash := st.session_state.pop("ood_flash", None):
    st.success(flash)
st.write(
    "Photos scoring **above** the threshold are answered *Not a skin lesion*. Move the slider: the gallery, "
    "the counts and the charts follow at once, without running the network again."
)

methods = sorted(thresholds, key=lambda m: (m != predictor.ood_method, m == "msp", m))
method = st.selectbox(
    "Detector",
    methods,
    format_func=lambda m: f"{m} ({METHOD_NOTES.get(m, m)})" + (" — in use" if m == predictor.ood_method else ""),
)

with st.expander("Add your own images"):
    own_ood = st.file_uploader("Photos that are not skin lesions", type=UPLOAD_TYPES, accept_multiple_files=True)
    own_lesions = st.file_uploader("Dermoscopic lesion images", type=UPLOAD_TYPES, accept_multiple_files=True)

# (name, bytes, kind, caption, shown image or path)
gallery = [
    (s.path.name, s.path.read_bytes(), "OOD photo" if s.kind == "ood" else "lesion", s.caption, str(s.path))
    for s in list_samples()
]
for uploads, kind in ((own_ood, "OOD photo"), (own_lesions, "lesion")):
    for upload in uploads or []:
        data = upload.getvalue()
        try:
            shown = display_image(data, upload.name)
        except InvalidImage as error:
            st.error(f"**{upload.name}** could not be used: {error}")
            continue
        gallery.append((f"your {kind}: {upload.name}", data, kind, f"{upload.name} (uploaded as {kind})", shown))

with st.spinner("Scoring the gallery once…"):
    scored = cached_ood_scores(st.session_state["ood_scores"], predictor, model, [(g[0], g[1]) for g in gallery])
# An image the network could not read has no score. In order, not by name: two uploads may share one.
kept = [(g, s) for g, s in zip(gallery, scored, strict=True) if s is not None]
gallery, scores = [g for g, _ in kept], [s for _, s in kept]
if not gallery:
    st.warning(
        "None of the gallery images could be read, so there is nothing to set the threshold against. "
        "Upload readable photos and lesion images above."
    )
    st.stop()
values = np.array([s[method] for s in scores])
is_ood = np.array([g[2] == "OOD photo" for g in gallery])

low, high, step = slider_range(values, [thresholds[method]])
decimals = max(0, int(-np.floor(np.log10(step))))
slider_key = f"ood-threshold-{model.key}-{method}"
if slider_key not in st.session_state:
    st.session_state[slider_key] = float(np.clip(round(thresholds[method], decimals), low, high))
threshold = st.slider(f"Threshold on the {method} score", low, high, step=step, format=f"%.{decimals}f", key=slider_key)
msp = np.array([s["msp"] for s in scores]) if "msp" in thresholds else None
assessment = assess(values, is_ood, threshold, msp)
ours = assessment.evaluation

counts = st.columns(4)
counts[0].metric("OOD photos accepted", f"{ours['ood_accepted']} of {int(is_ood.sum())}")
counts[1].metric("Lesions rejected", f"{ours['lesions_rejected']} of {int((~is_ood).sum())}")
counts[2].metric("Separation (ROC-AUC)", f"{ours['roc_auc']:.3f}")
counts[3].metric("Saved threshold", f"{thresholds[method]:.{decimals}f}")
spread = (predictor.detectors.get(method) or {}).get("rejection_spread") or {}
if spread.get("median") is not None:
    st.caption(
        f"The saved threshold was fitted to reject {spread['target']:.0%} of validation lesions. Refitted on "
        f"bootstrap resamples of the validation split, it rejects {spread['median']:.1%} of the lesions each "
        f"resample left out (95 % of resamples: {spread['low']:.1%} to {spread['high']:.1%}): expect about "
        "that share of new lesions answered *Not a skin lesion*."
    )

if assessment.notebook is not None:
    notebook = assessment.notebook
    st.table(
        [
            {
                "rule": "Notebook: max softmax below 0.8 is rejected",
                "OOD photos accepted": f"{notebook['ood_accepted']} of {int(is_ood.sum())}",
                "lesions rejected": f"{notebook['lesions_rejected']} of {int((~is_ood).sum())}",
            },
            {
                "rule": f"This setting: {method} above {threshold:.{decimals}f} is rejected",
                "OOD photos accepted": f"{ours['ood_accepted']} of {int(is_ood.sum())}",
                "lesions rejected": f"{ours['lesions_rejected']} of {int((~is_ood).sum())}",
            },
        ]
    )

left, right = st.columns(2)
# A NaN score (the detector could not score that image; it is rejected) has no place on the axis.
rows = [{"kind": g[2], "score": float(v)} for g, v in zip(gallery, values, strict=True) if np.isfinite(v)]
left.altair_chart(histogram_chart(rows, threshold, method), width="stretch")
right.altair_chart(roc_chart(assessment.roc, assessment.operating), width="stretch")

# The bundled file is versioned with the app and its figures are re-checked by a test: it stays as shipped.
read_only = model.source == "bundled"
locked = not may_change(st.session_state)
if read_only:
    st.caption("The bundled model is kept as shipped; train your own model (Train page) to save a threshold into it.")
elif locked:
    st.caption(LOCKED_HELP)
save = st.button(
    f"Save {method} at {threshold:.{decimals}f} to the model", type="primary", disabled=read_only or locked
)
if save and not (read_only or locked):
    try:
        save_ood_threshold(model.path, method, threshold)
    except (LesionError, OSError) as error:
        st.error(f"The threshold was not saved: {error}")
    else:
        st.session_state["ood_flash"] = (
            f"Saved: {method} with threshold {threshold:.{decimals}f} is now this model's OOD check; "
            "the Predict page uses it from now on."
        )
        st.rerun()

folds = training_folds(model.run.path if model.run else None)
if model.run is None:
    st.caption(
        "This model has no run folder here, so we cannot tell whether the sample lesions were in its training data."
    )
elif any(name.rsplit(".", 1)[0] in folds for name, *_ in gallery):
    st.caption(
        "Sample lesions marked *seen in training* were in this model's training or validation data; they look easier than new lesions."
    )
else:
    st.caption("None of the bundled sample lesions is in this model's split.csv: they are new to it.")

st.subheader("Gallery")
for tab, kind in zip(st.tabs(["Not skin lesions", "Lesions"]), ("OOD photo", "lesion"), strict=True):
    members = [(g, v, a) for g, v, a in zip(gallery, values, assessment.accepted, strict=True) if g[2] == kind]
    columns = tab.columns(6)
    for index, ((name, _, _, caption, shown), value, accepted) in enumerate(members):
        fold = folds.get(name.rsplit(".", 1)[0])
        seen = f" · seen in training ({fold})" if fold in ("train", "val") else (" · in its test split" if fold else "")
        # Green when the check is right (lesion accepted, photo rejected), red when it is wrong.
        colour = "green" if accepted == (kind == "lesion") else "red"
        mark = f":{colour}[{'accepted' if accepted else 'rejected'}]"
        with columns[index % 6]:
            st.image(shown, width="stretch")
            st.markdown(f"{mark} · score {value:.{decimals}f}  \n{caption}{seen}")
