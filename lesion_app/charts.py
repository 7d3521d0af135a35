"""The app's Altair charts: the Predict page's diagnoses, the OOD page's score histogram and OOD-vs-lesion ROC curve."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import altair as alt
import pandas as pd


def histogram_chart(rows: Sequence[dict[str, Any]], threshold: float, method: str) -> Any:
    """Altair histogram of scores by kind (lesion / OOD) with the threshold as a rule."""
    frame = pd.DataFrame(rows)
    bars = (
        alt.Chart(frame)
        .mark_bar(opacity=0.6)
        .encode(
            x=alt.X("score:Q", bin=alt.Bin(maxbins=30), title=f"{method} score (higher = less like a lesion)"),
            y=alt.Y("count():Q", stack=None, title="images"),
            color=alt.Color(
                "kind:N", title=None, scale=alt.Scale(domain=["lesion", "OOD photo"], range=["#2a9d8f", "#e76f51"])
            ),
        )
    )
    rule = (
        alt.Chart(pd.DataFrame({"threshold": [threshold]}))
        .mark_rule(color="black", strokeDash=[6, 3])
        .encode(x="threshold:Q")
    )
    return (bars + rule).properties(height=260)


def roc_chart(points: Sequence[dict[str, float]], operating: dict[str, float]) -> Any:
    """Altair ROC curve with the current operating point marked."""
    x, y = "lesions rejected", "OOD photos rejected"
    curve = (
        alt.Chart(pd.DataFrame(points))
        .mark_line(interpolate="step-after")
        .encode(x=alt.X(f"{x}:Q", scale=alt.Scale(domain=[0, 1])), y=alt.Y(f"{y}:Q", scale=alt.Scale(domain=[0, 1])))
    )
    point = (
        alt.Chart(pd.DataFrame([operating]))
        .mark_point(color="red", size=120, filled=True)
        .encode(x=f"{x}:Q", y=f"{y}:Q")
    )
    return (curve + point).properties(height=260)


def diagnosis_chart(rows: Sequence[dict[str, Any]]) -> Any:
    """A small horizontal Altair bar chart of :func:`top_diagnoses`."""
    frame = pd.DataFrame(rows)
    return (
        alt.Chart(frame)
        .mark_bar(color="#457b9d")
        .encode(
            x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"), title=None),
            y=alt.Y("diagnosis:N", sort="-x", title=None),
            tooltip=[alt.Tooltip("diagnosis:N"), alt.Tooltip("probability:Q", format=".1%")],
        )
        .properties(height=30 * len(frame) + 10)
    )
