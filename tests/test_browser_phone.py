"""The Predict page on a phone (390 x 844) in a real Chromium: the verdict within the first two screen heights,
for an upload and for a bundled sample; the gallery a compact grid of small thumbnails; heatmap settings folded.

Same set-up as tests/test_browser.py: Debian's chromium through Playwright, `streamlit run` on a fresh clone's
state, so the bundled model answers.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from bench.load import CHROMIUM_ARGS, PAGE_BOTTOM, PHONE
from lesion.predict import Predictor
from lesion.runs import BUNDLED_MODEL
from lesion_app.gallery import THUMBNAIL_SIDE, list_samples
from lesion_app.wording import VERDICT_TEXT
from tests.test_browser import ARTIFACTS, REPO, bundled_app
from tests.test_bundled import shipped

pytestmark = pytest.mark.browser
SCREENS = 2  # the verdict's bottom edge within this many screen heights of the page's top
VERDICT_BOX = '[data-testid="stAlert"]'


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the browser test needs it")
    shipped()
    runs = tmp_path_factory.mktemp("phone") / "runs"
    runs.mkdir()
    with bundled_app(runs, "browser-phone-server.log") as port:
        yield f"http://127.0.0.1:{port}/", chromium


@pytest.fixture
def phone(app_url):
    from playwright.sync_api import sync_playwright

    url, chromium = app_url
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=PHONE, is_mobile=True, has_touch=True)
        page.goto(url, timeout=120_000)
        page.get_by_text("Upload a photo or tick a sample").wait_for(timeout=120_000)
        yield page
        browser.close()


def verdict_bottom_in_screens(page, expected: str) -> float:
    box = page.locator(VERDICT_BOX).filter(has_text=expected).first
    box.wait_for(timeout=120_000)
    return box.evaluate(PAGE_BOTTOM) / PHONE["height"]


def expected_verdict(path: Path) -> str:
    return VERDICT_TEXT[Predictor.from_checkpoint(BUNDLED_MODEL).predict(path, with_heatmap=False).verdict]


def test_an_upload_gets_its_verdict_within_two_screens(phone) -> None:
    lesion = REPO / "assets" / "samples" / "lesions" / "ISIC_0000169.jpg"
    phone.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(lesion), timeout=120_000)
    screens = verdict_bottom_in_screens(phone, expected_verdict(lesion))
    phone.screenshot(path=str(ARTIFACTS / "phone-upload.png"), full_page=True)
    assert screens <= SCREENS, f"the verdict ends {screens:.2f} screen heights down the page"
    # What matters less on a phone is folded away until asked for.
    assert not phone.get_by_text("Heatmap method").is_visible()
    phone.get_by_text("Heatmap settings").click()
    phone.get_by_text("Heatmap method").wait_for(timeout=30_000)


def test_a_picked_sample_gets_its_verdict_within_two_screens_from_a_compact_gallery(phone) -> None:
    samples = [s for s in list_samples() if s.kind == "lesion"]
    thumbs = phone.locator('[data-testid="stExpander"] [data-testid="stImage"] img')
    thumbs.first.wait_for(timeout=60_000)
    # Every thumbnail loaded, and the layout settled (the same boxes twice, 300 ms apart).
    measure = "imgs => imgs.map(i => [i.complete ? i.naturalWidth : 0, i.getBoundingClientRect().top, i.getBoundingClientRect().width])"
    deadline, before, boxes = time.time() + 60, None, []
    while time.time() < deadline:
        boxes = thumbs.evaluate_all(measure)
        if boxes and min(box[0] for box in boxes) > 0 and boxes == before:
            break
        before = boxes
        time.sleep(0.3)
    widths = [box[0] for box in boxes]
    # Small files, shown small: a compact grid of several in a row (not one full-width photo a row).
    assert widths and min(widths) > 0 and max(widths) <= THUMBNAIL_SIDE, widths
    boxes = [box[1:] for box in boxes if box[2] > 0]  # the open tab's thumbnails (the other tab's are hidden)
    first_row = [width for top, width in boxes if abs(top - boxes[0][0]) < 1]
    assert len(first_row) >= 4 and max(first_row) <= 80, f"{len(first_row)} thumbnails in the first row: {boxes[:6]}"
    # Tick the last lesion of the gallery: the farthest down the page.
    sample = samples[-1]
    phone.locator(f".st-key-sample-{sample.name}").get_by_text("Use").click()
    screens = verdict_bottom_in_screens(phone, expected_verdict(sample.path))
    phone.screenshot(path=str(ARTIFACTS / "phone-sample.png"), full_page=True)
    assert screens <= SCREENS, f"the verdict ends {screens:.2f} screen heights down the page"
