"""The model card says what was measured, on which split, and what the model is not for."""

from __future__ import annotations

from pathlib import Path

from lesion.card import render_model_card
from lesion.checkpoint import load_checkpoint


def test_card_names_splits_thresholds_and_limits(trained_run: Path) -> None:
    checkpoint = load_checkpoint(trained_run / "model.pt")
    card = render_model_card(checkpoint, "tiny")
    assert "not a diagnosis" in card and "**test** split" in card
    assert "| train |" in card and "| val |" in card and "| test |" in card
    assert f"{checkpoint['decision_threshold']:.3f}" in card
    for method in checkpoint["ood"]["detectors"]:
        assert f"  - {method}: threshold" in card
    assert "## Intended use and limits" in card
    assert card == (trained_run / "model_card.md").read_text()


def test_a_saved_threshold_reads_as_a_sentence(trained_run: Path) -> None:
    checkpoint = load_checkpoint(trained_run / "model.pt")
    checkpoint["threshold_history"] = [
        {
            "time": "2026-11-25T23:00:00+00:00",
            "method": "knn",
            "old_method": "mahalanobis",
            "old_threshold": 0.0337,
            "new_threshold": 0.05,
        }
    ]
    card = render_model_card(checkpoint, "tiny")
    assert (
        "2026-11-25T23:00:00+00:00: knn threshold set from 0.0337 to 0.05 on the OOD page "
        "(detector in use was mahalanobis)" in card
    )
