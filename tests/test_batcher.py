"""The Predict page's batching worker: a batch answers every image as a single prediction would, settings and
models are never mixed, and one visitor's failure reaches nobody else.

Each test makes its own Batcher with a long gathering window and ``max_batch`` equal to the requests it
sends, so the worker answers them in one batch (it stops gathering as soon as the batch is full); which
batches it made is read from ``Batcher.batches``.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from lesion.errors import InvalidImage
from lesion.predict import Prediction, Predictor
from lesion.runs import BUNDLED_MODEL
from lesion_app.batcher import Batcher
from tests.helpers_model import exif_rotated_jpeg, lesion_paths, ood_paths, write_tiny_checkpoint
from tests.tolerances import ood_slack, p_malignant_slack

GATHER_S = 30.0  # long: the batch is closed by reaching max_batch, never by the clock


@pytest.fixture
def make_batcher():
    """Batchers made by a test, their workers ended after it."""
    made: list[Batcher] = []

    def make(**options) -> Batcher:
        made.append(Batcher(**options))
        return made[-1]

    yield make
    for batcher in made:
        batcher.close()


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor.from_checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp("batcher") / "model.pt"))


@pytest.fixture(scope="module")
def other_predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor.from_checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp("other") / "model.pt", seed=1))


def mixed_images() -> list[bytes]:
    """Lesions, a non-lesion photo of another size and shape, and an EXIF-rotated JPEG, as upload bytes."""
    lesions = lesion_paths()
    images = [path.read_bytes() for path in (lesions[0], lesions[7], ood_paths()[0], lesions[12])]
    images.append(exif_rotated_jpeg(lesions[3], 6, (240, 130)))
    return images


def submit_all(batcher: Batcher, requests: list[tuple[Predictor, bytes, dict]]) -> list:
    """Every request submitted from its own thread (as sessions do), then each one's result or error."""
    futures: list = [None] * len(requests)

    def session(index: int) -> None:
        predictor, image, settings = requests[index]
        futures[index] = batcher.submit(predictor, image, **settings)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    outcomes = []
    for future in futures:
        try:
            outcomes.append(future.result(timeout=240))
        except Exception as error:  # noqa: BLE001 - compared below
            outcomes.append(error)
    return outcomes


def assert_same(batched: Prediction, single: Prediction, p_slack: float, ood_slacks: dict, index: int) -> None:
    assert batched.verdict == single.verdict and batched.cam_target == single.cam_target
    assert batched.cam_method == single.cam_method and batched.target == single.target
    assert abs(batched.p_malignant - single.p_malignant) <= p_slack
    for name, slack in ood_slacks.items():
        assert abs(batched.ood_scores[name] - single.ood_scores[name]) <= float(slack[index]), name
    assert batched.heatmap.shape == single.heatmap.shape == (single.image_height, single.image_width)
    np.testing.assert_allclose(batched.heatmap, single.heatmap, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny", "bundled"])
def test_a_batch_gives_each_image_its_single_prediction_and_heatmap(
    model: str, predictor: Predictor, make_batcher
) -> None:
    if model == "bundled":
        predictor = Predictor.from_checkpoint(BUNDLED_MODEL)
    images = mixed_images()
    batcher = make_batcher(max_batch=len(images), gather_s=GATHER_S)
    results = submit_all(batcher, [(predictor, image, {"cam_method": "gradcam"}) for image in images])
    assert batcher.batches == [len(images)], "the requests were not answered as one batch"
    singles = [predictor.predict(image) for image in images]
    p_slack, ood_slacks = p_malignant_slack(predictor, images), ood_slack(predictor, images)
    for index, (batched, single) in enumerate(zip(results, singles, strict=True)):
        assert isinstance(batched, Prediction), batched
        assert_same(batched, single, p_slack, ood_slacks, index)
    # Each heatmap is its own image's: no two images of the batch got the same map.
    assert not np.allclose(results[0].heatmap, results[1].heatmap)


def test_settings_and_models_are_never_mixed_in_one_batch(
    predictor: Predictor, other_predictor: Predictor, make_batcher
) -> None:
    images = mixed_images()[:3]
    kinds = [
        (predictor, {"cam_method": "gradcam"}),
        (predictor, {"cam_method": "eigencam"}),
        (predictor, {"cam_method": "gradcam", "cam_target": "benign"}),
        (other_predictor, {"cam_method": "gradcam"}),
    ]
    requests = [(model, image, settings) for model, settings in kinds for image in images]
    batcher = make_batcher(max_batch=len(requests), gather_s=GATHER_S)
    results = submit_all(batcher, requests)
    # One batch taken, answered as one predict_batch call per (model, settings) group.
    assert sorted(batcher.batches) == [len(images)] * len(kinds)
    for (model, image, settings), result in zip(requests, results, strict=True):
        single = model.predict(image, **settings)
        assert isinstance(result, Prediction), result
        assert result.cam_method == settings["cam_method"]
        p_slack, ood_slacks = p_malignant_slack(model, [image]), ood_slack(model, [image])
        # Batched with two others, so twice the single-image slack for the rounding of either pass.
        assert_same(result, single, 2 * p_slack, {k: 2 * v for k, v in ood_slacks.items()}, 0)


def test_a_corrupt_image_fails_alone_and_the_others_are_answered(predictor: Predictor, make_batcher) -> None:
    images = mixed_images()[:3]
    corrupt = images[0][:500]  # a truncated JPEG
    requests = [
        (predictor, image, {"cam_method": "gradcam"}) for image in [images[0], corrupt, b"not an image", images[1]]
    ]
    batcher = make_batcher(max_batch=len(requests), gather_s=GATHER_S)
    results = submit_all(batcher, requests)
    assert batcher.batches == [4]
    assert isinstance(results[1], InvalidImage) and isinstance(results[2], InvalidImage)
    for index, image in ((0, images[0]), (3, images[1])):
        assert isinstance(results[index], Prediction), results[index]
        assert results[index].verdict == predictor.predict(image).verdict


def test_a_batch_that_fails_as_a_whole_is_answered_request_by_request(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch, make_batcher
) -> None:
    # An unexpected error the image itself causes (not an InvalidImage) takes the whole batched call down;
    # the worker then answers each request alone, so only the session whose image did it sees the error.
    images = mixed_images()[:3]
    poisoned = images[2]
    batch = Predictor.predict_batch

    def fragile(self: Predictor, sources, *args, **kwargs):
        sources = list(sources)
        if poisoned in sources:
            raise RuntimeError("this image breaks the pass")
        return batch(self, sources, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_batch", fragile)
    batcher = make_batcher(max_batch=3, gather_s=GATHER_S)
    results = submit_all(batcher, [(predictor, image, {"cam_method": "gradcam"}) for image in images])
    assert batcher.batches == [1, 1], "after the failed batch of three, the two good images alone"
    assert isinstance(results[2], RuntimeError) and "breaks the pass" in str(results[2])
    assert all(isinstance(result, Prediction) for result in results[:2])


def test_a_lone_request_is_answered_at_once_in_a_batch_of_one(predictor: Predictor, make_batcher) -> None:
    # The default gathering window: a request alone does not wait for company that never comes.
    batcher = make_batcher()
    image = mixed_images()[0]
    result = batcher.predict(predictor, image, cam_method="gradcam")
    assert batcher.batches == [1]
    assert_same(result, predictor.predict(image), 0.0, {}, 0)
