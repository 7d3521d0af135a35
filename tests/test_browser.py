"""The app as a user meets it: `streamlit run`, a real Chromium, two uploads, two verdicts, a heatmap.

Drives Debian's /usr/bin/chromium through Playwright. The OOD threshold is set (with the app's own
save_ood_threshold) between a sample lesion and a non-lesion photo that the tiny test model tells
apart, so the check is real: the lesion must get Benign/Malignant and the photo "Not a skin lesion".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bench.load import CHROMIUM_ARGS, free_port  # the same browser flags and port helper as the load test
from lesion.predict import Predictor
from lesion.runs import save_ood_threshold
from lesion_app.support import VERDICT_TEXT

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"


def wait_healthy(port: int, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"streamlit exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("streamlit did not become healthy")


def pick_pair(checkpoint: Path) -> tuple[Path, Path, float]:
    """A sample lesion and an OOD photo the model separates, and a threshold between their scores."""
    predictor = Predictor.from_checkpoint(checkpoint)
    method = predictor.ood_method
    lesions = sorted((REPO / "assets/samples/lesions").glob("*.jpg"))
    photos = sorted((REPO / "assets/samples/ood").glob("*.jpg"))
    lesion_scores = [p.ood_scores[method] for p in predictor.predict_batch(lesions)]
    photo_scores = [p.ood_scores[method] for p in predictor.predict_batch(photos)]
    low = min(range(len(lesions)), key=lesion_scores.__getitem__)
    high = max(range(len(photos)), key=photo_scores.__getitem__)
    assert lesion_scores[low] < photo_scores[high], "the test model cannot tell any sample lesion from any photo"
    return lesions[low], photos[high], (lesion_scores[low] + photo_scores[high]) / 2


@pytest.fixture
def app_run(trained_run: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(trained_run, run)
    lesion, photo, threshold = pick_pair(run / "model.pt")
    save_ood_threshold(run / "model.pt", Predictor.from_checkpoint(run / "model.pt").ood_method, threshold)
    return run, lesion, photo


def result_block(page, name: str, other: str):
    """The bordered result container of one image (innermost block with its caption and downloads)."""
    blocks = page.locator('[data-testid="stVerticalBlock"]')
    return (
        blocks.filter(has_text=f"{name}: Grad-CAM heatmap")
        .filter(has_not_text=other)
        .filter(has_text="Result JSON")
        .last
    )


def heatmap_widths(block, timeout: float = 30) -> list[int]:
    """Natural widths of the block's images once all have loaded (an empty list if none did)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        widths = block.locator("img").evaluate_all("imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        if widths and all(width > 0 for width in widths):
            return widths
        time.sleep(0.2)
    return []


def test_upload_lesion_and_photo_in_a_real_browser(app_run: tuple[Path, Path, Path]) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the browser test needs it")
    from playwright.sync_api import sync_playwright

    run, lesion, photo = app_run
    expected = Predictor.from_checkpoint(run / "model.pt").predict(lesion, with_heatmap=False)
    assert expected.accepted and Predictor.from_checkpoint(run / "model.pt").predict(photo).verdict == "unknown"
    port = free_port()
    env = {**os.environ, "LESION_RUNS_DIR": str(run.parent), "LESION_CHECKPOINT": ""}
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "streamlit_app.py",
        "--server.port",
        str(port),
        "--server.headless",
        "true",
    ]
    ARTIFACTS.mkdir(exist_ok=True)
    log = (ARTIFACTS / "browser-server.log").open("w")
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(port, server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.goto(f"http://127.0.0.1:{port}/", timeout=120_000)
            page.get_by_text("Benign or malignant?").wait_for(timeout=120_000)
            page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files([str(lesion), str(photo)])
            lesion_block = result_block(page, lesion.name, photo.name)
            photo_block = result_block(page, photo.name, lesion.name)
            lesion_block.get_by_text("Result JSON").wait_for(timeout=120_000)
            photo_block.get_by_text("Result JSON").wait_for(timeout=120_000)
            lesion_verdict = lesion_block.locator('[data-testid="stAlert"]').first.inner_text()
            photo_verdict = photo_block.locator('[data-testid="stAlert"]').first.inner_text()
            assert lesion_verdict.startswith(VERDICT_TEXT[expected.verdict]), lesion_verdict
            assert expected.verdict in ("benign", "malignant")
            assert photo_verdict.startswith("Not a skin lesion"), photo_verdict
            assert "not trained on photos like this" in photo_verdict
            for block in (lesion_block, photo_block):
                assert heatmap_widths(block), "no heatmap image rendered"
            page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=30_000)
            page.wait_for_timeout(1500)  # let the results table's canvas paint before the screenshot
            page.screenshot(path=str(ARTIFACTS / "browser.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
