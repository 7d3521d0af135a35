"""lesion_app: the pure helpers behind the pages (gallery, predict view, OOD view, runs view, wording)."""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from lesion.errors import InvalidImage
from lesion_app.gallery import list_samples, training_folds
from lesion_app.ood_view import assess, slider_range
from lesion_app.predict_view import UPLOAD_TYPES, cached_display, display_box, display_image
from lesion_app.runs_view import metrics_rows
from lesion_app.session_cache import CACHE_ENTRIES
from lesion_app.wording import format_duration


def test_samples_cover_every_bundled_image_with_a_caption() -> None:
    samples = list_samples()
    assert sum(s.kind == "lesion" for s in samples) == 40 and sum(s.kind == "ood" for s in samples) == 7
    assert all(s.path.is_file() and s.caption.startswith(s.name) for s in samples)
    assert any("melanoma (malignant)" in s.caption for s in samples)
    assert any("car photo (not a lesion)" in s.caption for s in samples)


def test_training_folds_read_split_csv(tmp_path: Path) -> None:
    assert training_folds(None) == {} and training_folds(tmp_path) == {}
    (tmp_path / "split.csv").write_text(
        "image_id,lesion_id,dx,label,fold\nISIC_1,L1,nv,benign,train\nISIC_2,L2,mel,malignant,test\n"
    )
    assert training_folds(tmp_path) == {"ISIC_1": "train", "ISIC_2": "test"}


def test_display_box_scales_the_crop_to_the_shown_image() -> None:
    prediction = SimpleNamespace(crop_box=(100.0, 0.0, 500.0, 400.0), image_width=600, image_height=400)
    assert display_box(prediction, (300, 200)) == pytest.approx((50.0, 0.0, 250.0, 200.0))
    assert display_box(SimpleNamespace(crop_box=None, image_width=1, image_height=1), (1, 1)) is None


def jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 80, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_display_images_are_bounded_cached_and_bad_ones_named() -> None:
    big = jpeg((3000, 2000))
    shown = display_image(big, "big.jpg")
    assert max(shown.size) == 1024 and shown.size[0] / shown.size[1] == pytest.approx(1.5, rel=0.01)
    cache: OrderedDict = OrderedDict()
    assert cached_display(cache, big, "big.jpg") is cached_display(cache, big, "renamed.jpg")  # keyed by content
    with pytest.raises(InvalidImage, match="notes.txt"):
        display_image(b"hello", "notes.txt")
    for number in range(CACHE_ENTRIES + 5):
        cached_display(cache, jpeg((40 + number, 40)), f"{number}.jpg")
    assert len(cache) == CACHE_ENTRIES  # a long session does not keep every image it ever saw


def test_slider_range_covers_scores_and_threshold_on_a_round_step() -> None:
    low, high, step = slider_range([12.3, 48.0, 160.4], [42.2])
    assert low <= 12.3 and high >= 160.4 and step in (0.1, 0.2, 0.5, 1.0)
    assert slider_range([], []) == (0.0, 1.0, 0.01)
    low, high, step = slider_range([0.01, 0.02], [0.015])
    assert low <= 0.01 and high >= 0.02 and step <= (high - low) / 100


def test_format_duration_and_metric_rows() -> None:
    assert [format_duration(s) for s in (None, 42, 720, 7500)] == ["unknown", "42 s", "12 min", "2 h 05 min"]
    rows = metrics_rows({"val": {"roc_auc": 0.8, "confusion": {"tp": 1}}, "test": {"roc_auc": 0.7, "n": 20}})
    assert rows == [
        {"metric": "roc_auc", "validation": 0.8, "test": 0.7},
        {"metric": "n", "validation": None, "test": 20.0},
    ]


def test_uploaders_accept_exactly_the_image_types_the_library_reads() -> None:
    from lesion.images import IMAGE_EXTENSIONS

    assert [f".{kind}" for kind in UPLOAD_TYPES] == list(IMAGE_EXTENSIONS)


def test_one_assessment_per_threshold_counts_by_the_predictors_rule() -> None:
    import numpy as np

    values = np.array([0.1, 0.4, float("nan"), 0.2, 0.9])
    is_ood = np.array([False, False, False, True, True])
    result = assess(values, is_ood, 0.3, msp=np.array([0.1, 0.1, 0.1, 0.1, 0.3]))
    assert result.accepted.tolist() == [True, False, False, True, False]  # NaN: rejected, as the predictor does
    assert (result.evaluation["lesions_accepted"], result.evaluation["ood_accepted"]) == (1, 1)
    assert result.operating == {"lesions rejected": 2 / 3, "OOD photos rejected": 0.5}
    assert result.notebook["ood_accepted"] == 1 and result.roc  # max softmax below 0.8 (score above 0.2) rejected
