"""Concurrent visitors on one shared Predictor: the serial answers, exactly; and nothing leaks.

8 threads x 50 predictions (heatmaps on, mixed images and CAM methods) must equal the serial
results; afterwards no module of the model holds a hook and no weight holds a gradient (the known
failure of CAM libraries that hook the network per call). Resident memory over many predictions
with heatmaps is measured in a fresh process by bench/memory.py (``python -m bench.memory`` runs
the full 500).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.memory import leftovers
from lesion.predict import Prediction, Predictor
from tests.helpers_model import exif_rotated_jpeg

REPO = Path(__file__).resolve().parent.parent
THREADS, PER_THREAD = 8, 50
CAMS = ("gradcam", "gradcam++", "eigencam")


def _mixed_images() -> list[bytes]:
    """Lesions, non-lesion photos (large heatmaps), an RGBA PNG and an EXIF-rotated JPEG, as upload bytes."""
    lesions = sorted((REPO / "assets" / "samples" / "lesions").glob("*.jpg"))[:4]
    photos = sorted((REPO / "assets" / "samples" / "ood").glob("*.jpg"))[:2]
    images = [path.read_bytes() for path in [*lesions, *photos]]
    with Image.open(lesions[0]) as lesion:
        buffer = io.BytesIO()
        lesion.convert("RGBA").save(buffer, format="PNG")
        images.append(buffer.getvalue())
    images.append(exif_rotated_jpeg(lesions[0], 8, (200, 120)))
    return images


@pytest.fixture(scope="module")
def predictor(trained_model: Path) -> Predictor:
    return Predictor.from_checkpoint(trained_model)


def _schedule(thread: int, step: int, n_images: int) -> tuple[int, str]:
    return (thread * 7 + step * 3) % n_images, CAMS[(thread + step) % len(CAMS)]


def _same(a: Prediction, b: Prediction) -> list[str]:
    problems = []
    for key in ("verdict", "p_malignant", "ood_score", "ood_scores", "target", "image_width", "image_height"):
        if getattr(a, key) != getattr(b, key):
            problems.append(f"{key}: {getattr(a, key)!r} != {getattr(b, key)!r}")
    if a.heatmap.shape != b.heatmap.shape or not np.allclose(a.heatmap, b.heatmap, atol=1e-6, rtol=0):
        problems.append("heatmap differs")
    return problems


@pytest.fixture
def one_torch_thread():
    """One intra-op thread per call: the 8 visitor threads are the parallelism (and the serial
    reference runs with the same setting, so "exactly" is fair); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_eight_threads_give_exactly_the_serial_results(predictor: Predictor, one_torch_thread: None) -> None:
    images = _mixed_images()
    needed = {_schedule(t, s, len(images)) for t in range(THREADS) for s in range(PER_THREAD)}
    serial = {key: predictor.predict(images[key[0]], cam_method=key[1]) for key in sorted(needed)}

    results: dict[tuple[int, int], Prediction] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def visitor(thread: int) -> None:
        try:
            barrier.wait()  # all start together, so the calls really overlap
            for step in range(PER_THREAD):
                index, cam = _schedule(thread, step, len(images))
                results[(thread, step)] = predictor.predict(images[index], cam_method=cam)
        except BaseException as error:  # re-raised in the test thread
            errors.append(error)

    workers = [threading.Thread(target=visitor, args=(t,), daemon=True) for t in range(THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(240)
    assert not any(worker.is_alive() for worker in workers), "a visitor thread hung"
    assert not errors, errors[0]
    assert len(results) == THREADS * PER_THREAD

    mismatches = []
    for (thread, step), prediction in results.items():
        key = _schedule(thread, step, len(images))
        mismatches += [f"thread {thread} step {step} {key}: {p}" for p in _same(prediction, serial[key])]
    assert not mismatches, "\n".join(mismatches[:20])
    assert leftovers(predictor.model) == []


def test_no_hooks_or_gradients_are_left_after_every_cam_method(predictor: Predictor) -> None:
    image = _mixed_images()[0]
    for method in ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam"):
        predictor.predict(image, cam_method=method)
        assert leftovers(predictor.model) == [], method
    assert all(not parameter.requires_grad or parameter.grad is None for parameter in predictor.model.parameters())
    assert not predictor.model.training and torch.is_grad_enabled()


def test_the_leak_check_sees_a_leaked_hook(predictor: Predictor) -> None:
    # The check must be able to fail: a CAM library that forgets to remove its hook looks like this.
    handle = predictor.model.layer4[-1].register_forward_hook(lambda module, inputs, output: None)
    try:
        assert leftovers(predictor.model) == ["layer4.1._forward_hooks: 1"]
    finally:
        handle.remove()
    assert leftovers(predictor.model) == []


def test_resident_memory_stays_flat_over_many_predictions_with_heatmaps(trained_model: Path) -> None:
    # A fresh process, so the figure is not muddied by the rest of the test session. 100 predictions
    # (the bench runs 500): a third are 800-pixel photos with 2 MB heatmaps, so keeping heatmaps alive would
    # exceed the limit; hooks kept alive are caught by the leftovers check.
    command = [
        sys.executable,
        "-m",
        "bench.memory",
        f"--checkpoint={trained_model}",
        "--n=100",
        "--warmup=15",
        "--json",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode in (0, 1), result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["leftovers"] == []
    assert figures["growth_mb"] < 50, figures
    assert result.returncode == 0, figures
