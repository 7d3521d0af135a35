"""Rebuild docs/predict-page.png: the Predict page of the real app answering a bundled sample lesion.

    python docs/make_screenshot.py [--out docs/predict-page.png]

Starts ``streamlit run streamlit_app.py`` on a free localhost port with the bundled model (no runs,
no LESION_CHECKPOINT: the app as a fresh clone shows it), drives Debian's chromium through
Playwright, ticks the first bundled sample lesion the model accepts, waits for the verdict and the
heatmap, the diagnosis set and the similar cases, folds the sample gallery away and saves a screenshot. The server is stopped at
the end, whatever happens.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # a script in docs/, run from anywhere: the checkout's packages

from bench.common import CHROMIUM_ARGS, free_port, start_app, stop_app, wait_healthy  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
MAX_BYTES = 900_000  # the PNG stays well under 1 MB


def accepted_sample() -> str:
    """The file stem of the first gallery lesion the bundled model accepts."""
    from lesion.predict import Predictor
    from lesion.runs import BUNDLED_MODEL
    from lesion_app.gallery import list_samples

    lesions = [sample for sample in list_samples() if sample.kind == "lesion"]
    predictor = Predictor.from_checkpoint(BUNDLED_MODEL)
    for sample in lesions:
        if predictor.predict(sample.path, with_heatmap=False).accepted:
            return sample.name
    raise RuntimeError("the bundled model accepts none of the sample lesions")


def shrink(png: bytes) -> bytes:
    """The screenshot, quantised to a palette when the full-colour file is too large."""
    if len(png) <= MAX_BYTES:
        return png
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def screenshot(out: Path) -> None:
    from playwright.sync_api import sync_playwright

    name = accepted_sample()
    port = free_port()
    runs = Path(tempfile.mkdtemp(prefix="lesion-screenshot-"))
    os.environ.pop("LESION_BUNDLED_MODEL", None)  # the app as a fresh clone shows it: the shipped model
    server = start_app(None, port, runs)
    try:
        wait_healthy(server, port, timeout=120)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            # The page scrolls inside its own frame, so the viewport is the whole picture.
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            page.goto(f"http://127.0.0.1:{port}/", timeout=120_000)
            page.get_by_text("Benign or malignant?").wait_for(timeout=120_000)
            box = page.locator(f".st-key-sample-{name}").get_by_text("Use")
            box.wait_for(timeout=120_000)
            box.click()
            page.get_by_text("Result JSON").wait_for(timeout=180_000)
            page.get_by_text("…or pick bundled samples").click()  # fold the gallery: the result moves up
            page.get_by_text("Similar confirmed cases", exact=True).wait_for(timeout=60_000)
            page.locator('[data-testid="stImage"] img').first.wait_for(timeout=60_000)  # results sit above the gallery
            page.wait_for_timeout(2000)  # let the heatmap and the chart paint
            if name not in page.content():
                raise RuntimeError(f"the page does not show {name}")
            out.write_bytes(shrink(page.screenshot(full_page=True)))
            browser.close()
    finally:
        stop_app(server)
    print(f"{out} ({out.stat().st_size // 1024} KB): {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "predict-page.png"))
    screenshot(Path(parser.parse_args(argv).out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
