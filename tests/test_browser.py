"""The app as a user meets it: `streamlit run`, a real Chromium, two uploads, two verdicts, a heatmap.

Drives Debian's /usr/bin/chromium through Playwright against a fresh clone's state: no runs, no
LESION_CHECKPOINT, so the app answers with the bundled model (nothing is trained first). The pair
is a sample lesion the bundled model accepts and a non-lesion photo its own OOD threshold rejects,
so the check is real: the lesion must get Benign/Malignant and the photo "Not a skin lesion".
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.load import CHROMIUM_ARGS, free_port  # the same browser flags and port helper as the load test
from lesion import similar
from lesion.labels import DX_NAMES
from lesion.predict import Predictor
from lesion.runs import BUNDLED_MODEL
from lesion_app.wording import VERDICT_TEXT
from tests.test_bundled import shipped

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


@contextlib.contextmanager
def bundled_app(runs: Path, log_name: str) -> Iterator[int]:
    """``streamlit run`` as a fresh clone runs it (no runs, no LESION_CHECKPOINT: the bundled model), on a
    free port it yields; its output goes to test-artifacts/``log_name``. Stopped at the end, whatever happens."""
    port = free_port()
    env = {**os.environ, "LESION_RUNS_DIR": str(runs), "LESION_CHECKPOINT": ""}
    env.pop("LESION_BUNDLED_MODEL", None)
    command = [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port)]
    command += ["--server.headless", "true"]
    ARTIFACTS.mkdir(exist_ok=True)
    log = (ARTIFACTS / log_name).open("w")
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(port, server)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def pick_pair(checkpoint: Path) -> tuple[Path, Path]:
    """A sample lesion the model accepts and a non-lesion photo it rejects, with its own thresholds."""
    predictor = Predictor.from_checkpoint(checkpoint)
    lesions = sorted((REPO / "assets/samples/lesions").glob("*.jpg"))
    photos = sorted((REPO / "assets/samples/ood").glob("*.jpg"))
    accepted = [path for path, p in zip(lesions, predictor.predict_batch(lesions), strict=True) if p.accepted]
    rejected = [path for path, p in zip(photos, predictor.predict_batch(photos), strict=True) if not p.accepted]
    assert accepted and rejected, "the bundled model accepts no sample lesion or rejects no bundled photo"
    return accepted[0], rejected[0]


@pytest.fixture
def app_run(tmp_path: Path) -> tuple[Path, Path, Path]:
    shipped()  # fails plainly, naming the rebuild command, when the bundled model is missing or stale
    runs = tmp_path / "runs"
    runs.mkdir()
    lesion, photo = pick_pair(BUNDLED_MODEL)
    return runs, lesion, photo


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

    runs, lesion, photo = app_run
    expected = Predictor.from_checkpoint(BUNDLED_MODEL).predict(lesion, with_heatmap=False)
    assert expected.accepted and Predictor.from_checkpoint(BUNDLED_MODEL).predict(photo).verdict == "unknown"
    with bundled_app(runs, "browser-server.log") as port, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        page.goto(f"http://127.0.0.1:{port}/", timeout=120_000)
        page.get_by_text("Benign or malignant?").wait_for(timeout=120_000)
        # The uploader is drawn before the model has loaded; it accepts files once that first run ends.
        page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
            [str(lesion), str(photo)], timeout=120_000
        )
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
        # The accepted lesion shows its six most similar training cases as small pictures with their
        # confirmed diagnosis; the rejected photo shows none.
        lesion_block.get_by_text("Similar confirmed cases", exact=True).wait_for(timeout=30_000)
        # The bundled model weighs their vote into P(malignant), and says so under the figure.
        formed = similar.blend_in_words(
            expected.p_malignant,
            expected.p_network,
            expected.similar_malignant,
            expected.similar_k,
            expected.vote_weight,
        )
        assert formed and lesion_block.get_by_text(formed, exact=True).count() == 1
        widths = heatmap_widths(lesion_block)
        assert len(widths) == 1 + len(expected.similar) == 7, widths
        assert all(width <= 200 for width in sorted(widths)[:6]), widths  # thumbnails, not full photos
        for case in expected.similar:
            assert lesion_block.get_by_text(f"{DX_NAMES[case['dx']]} ({case['label']})").count() >= 1
        assert photo_block.get_by_text("Similar confirmed cases", exact=True).count() == 0
        assert photo_block.get_by_text("of the network's").count() == 0
        assert len(heatmap_widths(photo_block)) == 1
        assert lesion_block.get_by_text("With 90% confidence:").count() == 1
        page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=30_000)
        page.wait_for_timeout(1500)  # let the results table's canvas paint before the screenshot
        page.screenshot(path=str(ARTIFACTS / "browser.png"), full_page=True)
        browser.close()
