"""Predict: upload photos or pick bundled samples; verdict, probability, likely diagnoses, OOD check and heatmap."""

from __future__ import annotations

import math
from collections import OrderedDict

import streamlit as st

from lesion.errors import InvalidImage
from lesion_app.access import may_change
from lesion_app.charts import diagnosis_chart
from lesion_app.gallery import list_samples, thumbnail
from lesion_app.guards import require_model
from lesion_app.predict_view import (
    UPLOAD_TYPES,
    cached_display,
    cached_prediction,
    cam_target_label,
    display_box,
    newest_first,
    report_pdf,
    result_json,
    result_row,
    set_text,
    similar_cases,
    toggle_pick,
    top_diagnoses,
    upload_key,
    with_coverage,
)
from lesion_app.runs_view import NO_MODEL_HELP
from lesion_app.wording import VERDICT_DETAIL, VERDICT_TEXT

THUMBNAIL_WIDTH = 72  # pixels a gallery thumbnail is shown at: four in a row on a 390 px phone
CAM_LABELS = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "hirescam": "HiResCAM",
    "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM",
    "eigencam": "Eigen-CAM",
}

st.title("Benign or malignant?")
predictor, model = st.session_state.get("predictor"), st.session_state.get("model")
if model is None:
    require_model()  # says what to do next and stops
if "predictions" not in st.session_state:
    st.session_state["predictions"] = OrderedDict()

uploads = st.file_uploader("Upload one or several photos", type=UPLOAD_TYPES, accept_multiple_files=True)
# The answers come right under the uploader, above the gallery: on a phone the verdict is on the first screen.
results = st.container()
samples = list_samples()
picked = st.session_state.setdefault("picked", [])  # sample names, in the order they were ticked
# Drawn into its slot below the answers, but only after them: the verdict is sent before the 47 thumbnails,
# which cost a rerun most of its time when a room uploads at once (docs/load.md).
gallery = st.container()
gallery_drawn: list[bool] = []  # this run's


def draw_gallery() -> None:
    """The bundled samples, a tick each; drawn once a run.

    A plain expander: a lazy one (built only while open) folded on upload cost a lone visitor about 0.7 s
    more from upload to verdict in bench.load (docs/load.md).
    """
    if gallery_drawn:
        return
    gallery_drawn.append(True)
    with gallery.expander("…or pick bundled samples", expanded=not uploads):
        for tab, kind in zip(st.tabs(["Dermoscopic lesions", "Not skin lesions"]), ("lesion", "ood"), strict=True):
            # A wrapping row of small thumbnails (made once per server): a compact grid on a phone's screen too.
            grid = tab.container(horizontal=True, gap="xsmall")
            for sample in (s for s in samples if s.kind == kind):
                with grid.container(width=THUMBNAIL_WIDTH, gap=None):
                    # "stretch" in a 72 px box: an int width smaller than the file would make Streamlit resize
                    # it on every run.
                    st.image(thumbnail(sample.path), width="stretch", output_format="JPEG", alt=sample.caption)
                    # The ticks live in "picked", in the order they were made (the latest pick is answered first).
                    st.checkbox(
                        "Use",
                        value=sample.name in picked,
                        key=f"sample-{sample.name}",
                        help=sample.caption,
                        on_change=toggle_pick,
                        args=(st.session_state, sample.name),
                    )


if predictor is None and st.session_state.get("predictor_pending"):
    # The uploader and the gallery on screen first; then load the model (torch is imported here, once).
    draw_gallery()
    predictor = st.session_state["predictor_pending"]()
if predictor is None:
    results.info(st.session_state.get("model_error") or NO_MODEL_HELP)
    draw_gallery()
    st.stop()
arrivals = [(upload_key(upload), upload.name, upload.getvalue()) for upload in uploads or []]
arrivals += [(f"sample-{s.name}", s.path.name, s.path.read_bytes()) for s in samples if s.name in picked]
# The latest upload or pick first (images that came in the same run keep their order).
items = [(name, data) for _, name, data in newest_first(arrivals, st.session_state.setdefault("arrived", {}))]
if not items:
    draw_gallery()
    results.info("Upload a photo or tick a sample below to see what the model says.")  # the first run's last line
    st.stop()
# Imported once an image is there: the page was drawn before torch was imported.
from lesion.explain import CAM_METHODS, heatmap_png, overlay  # noqa: E402
from lesion.report import CasePictures, ModelFacts  # noqa: E402
from lesion.similar import blend_in_words, vote_in_words  # noqa: E402


@st.cache_resource(max_entries=4, show_spinner=False)
def case_pictures(path: str, mtime: float, _checkpoint: dict) -> CasePictures:
    """The model's similar cases' pictures: one store per server and model file, shared by every visitor."""
    return CasePictures(_checkpoint)


pictures = case_pictures(str(model.path), model.mtime, predictor.checkpoint)
facts_about_model = ModelFacts.from_checkpoint(predictor.checkpoint, model.path.stem)


@st.fragment
def show_results(items: list[tuple[str, bytes]]) -> None:
    """Controls and results: a slider or view change reruns only this part, never the uploader or gallery."""
    # What matters less on a phone stays folded away: the heatmap's method, target, opacity and view.
    settings = st.expander("Heatmap settings", icon=":material/tune:")
    left, explains, middle, right = settings.columns(4)
    cam_method = left.selectbox("Heatmap method", CAM_METHODS, format_func=lambda m: CAM_LABELS.get(m, m))
    cam_target = explains.selectbox(
        "Heatmap explains:",
        [None, *predictor.cam_targets],  # None: the verdict's side
        format_func=cam_target_label,
        help="The evidence for the verdict by default; or why the model leans to one side or one diagnosis.",
    )
    alpha = middle.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05)
    view = right.segmented_control("View", ["Overlay", "Side by side"], default="Overlay", required=True)
    coverage = predictor.default_coverage
    if predictor.conformal is not None and may_change(st.session_state):
        coverage = st.select_slider(
            "Confidence of the diagnosis sets",
            options=[0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95],
            value=predictor.default_coverage,
            format_func=lambda level: f"{level:.0%}",
            help="Each photo gets the set of diagnoses that holds the true one this often, on average over "
            "lesions like the validation ones (split-conformal). More confidence, larger sets.",
        )
    table = st.empty()

    rows = []
    for number, (name, data) in enumerate(items):
        with st.container(border=True):
            try:
                shown = cached_display(st.session_state["predictions"], data, name)
                prediction = cached_prediction(
                    st.session_state["predictions"], predictor, model, data, name, cam_method, shown, cam_target
                )
            except InvalidImage as error:
                st.error(f"**{name}** could not be used: {error}")
                continue
            prediction = with_coverage(predictor, prediction, coverage)
            rows.append(result_row(name, prediction))
            verdict = VERDICT_TEXT.get(prediction.verdict, prediction.verdict)
            show = {"benign": st.success, "malignant": st.error}.get(prediction.verdict, st.warning)
            show(f"**{verdict}** — {VERDICT_DETAIL.get(prediction.verdict, '')}")  # first: the answer, on any screen
            if described_set := set_text(predictor, prediction):
                st.markdown(f"**{described_set}**")
            picture, facts = st.columns([1, 1])
            blended = shown
            if prediction.heatmap is not None:
                blended = overlay(shown, prediction.heatmap, alpha, box=display_box(prediction, shown.size))
            picture.caption("The outlined square is what the network saw; the colours show where it looked.")
            heatmap_caption = f"{CAM_LABELS.get(cam_method, cam_method)} heatmap"
            if cam_target is not None:
                heatmap_caption += f": why {cam_target_label(cam_target)}?"
            if view == "Side by side":
                one, two = picture.columns(2)
                one.image(shown, caption=name, width="stretch")
                two.image(blended, caption=heatmap_caption, width="stretch")
            else:
                picture.image(blended, caption=f"{name}: {heatmap_caption}", width="stretch")
            facts.metric(
                "P(malignant)" if prediction.vote_weight > 0 else "P(malignant), calibrated",
                f"{prediction.p_malignant:.1%}",
                help="Above the decision threshold the verdict is malignant.",
            )
            if formed := blend_in_words(
                prediction.p_malignant,
                prediction.p_network,
                prediction.similar_malignant,
                prediction.similar_k,
                prediction.vote_weight,
            ):
                facts.caption(formed)
            facts.caption(
                f"Decision threshold {prediction.decision_threshold:.1%}"
                + (
                    " — shown for transparency only: this photo was rejected."
                    if prediction.verdict == "unknown"
                    else ""
                )
            )
            diagnoses = top_diagnoses(prediction)
            if diagnoses:  # a dx model, and a photo the OOD check accepted
                facts.markdown(
                    "**Most likely diagnoses:** "
                    + ", ".join(f"{row['diagnosis']} {row['probability']:.0%}" for row in diagnoses)
                )
                facts.altair_chart(diagnosis_chart(diagnoses), width="stretch")
            if prediction.ood_score is not None and math.isfinite(prediction.ood_score):
                facts.metric(
                    f"Out-of-distribution score ({prediction.ood_method})",
                    f"{prediction.ood_score:.4g}",
                    help="Higher means less like the lesions the model was trained on.",
                )
                facts.caption(
                    f"Rejected above {prediction.ood_threshold:.4g}: {'accepted' if prediction.accepted else 'rejected'}."
                )
            cases = similar_cases(prediction, pictures)
            if cases:
                st.markdown(
                    "**Similar confirmed cases** from the training set — "
                    + vote_in_words(prediction.similar_malignant, prediction.similar_k)
                )
                shown_cases = [case for case in cases if case["picture"] is not None]
                if len(shown_cases) == len(cases):
                    st.image(
                        [case["picture"] for case in cases], caption=[case["caption"] for case in cases], width=110
                    )
                else:  # the model's data folder is not on this machine: ids and diagnoses only
                    st.caption(
                        "Pictures not available here; "
                        + "; ".join(f"{case['image_id']}: {case['caption']}" for case in cases)
                    )
            stem = name.rsplit(".", 1)[0]
            if prediction.heatmap is not None:
                heatmap = prediction.heatmap
                facts.download_button(
                    "Heatmap PNG",
                    data=lambda h=heatmap: heatmap_png(h),
                    file_name=f"{stem}-{cam_method}-heatmap.png",
                    mime="image/png",
                    on_click="ignore",
                    key=f"png-{number}-{name}",
                )
            facts.download_button(
                "Report (PDF)",
                data=lambda n=name, p=prediction, s=shown, b=blended: report_pdf(
                    n, p, s, b if p.heatmap is not None else None, facts_about_model, pictures
                ),
                file_name=f"{stem}-report.pdf",
                mime="application/pdf",
                on_click="ignore",
                key=f"pdf-{number}-{name}",
                help="One page to keep: the photo, the heatmap, the verdict, the diagnosis set, similar cases and the model.",
            )
            facts.download_button(
                "Result JSON",
                data=result_json(name, prediction, model),
                file_name=f"{stem}-result.json",
                mime="application/json",
                on_click="ignore",
                key=f"json-{number}-{name}",
            )

    if len(rows) > 1:
        table.dataframe(rows, hide_index=True)


with results:
    show_results(items)
draw_gallery()
