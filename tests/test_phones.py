"""bench.phones: visitors that speak Streamlit's protocol get the same answers a browser gets.

``python -m bench.load --phones`` measures a room with them; these tests check that such a visitor really
loads the Predict page, uploads its photo and reads the verdict the model gives that photo, and that it
reports an error the page shows instead of a verdict.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import VERDICT
from bench.load import distinct_copies
from bench.phones import Recording, visit
from lesion.predict import Predictor
from lesion.runs import BUNDLED_MODEL
from lesion.verdict import VERDICT_DETAIL
from tests.test_browser import REPO, bundled_app
from tests.test_bundled import shipped


def test_phones_at_once_each_read_the_verdict_of_their_own_photo(tmp_path: Path) -> None:
    shipped()
    lesions = sorted((REPO / "assets/samples/lesions").glob("*.jpg"))[:3]
    photos = distinct_copies(lesions, 3, 1, tmp_path)
    predictor = Predictor.from_checkpoint(REPO / BUNDLED_MODEL)
    expected = [VERDICT_DETAIL[p.verdict] for p in predictor.predict_batch(photos)]
    recording = Recording(page=["/favicon.png"], later=[], answer=[])  # as a browser, fetched alongside
    runs = tmp_path / "runs"
    runs.mkdir()
    with bundled_app(runs, "phones.log") as port:
        url = f"http://127.0.0.1:{port}/"

        async def room() -> list[dict]:
            return await asyncio.gather(*(visit(url, photo, 120, recording) for photo in photos))

        results = asyncio.run(room())
    for result, verdict in zip(results, expected, strict=True):
        assert result["ok"], result
        assert VERDICT.search(result["text"])
        assert 0 < result["page_s"] < result["total_s"] and 0 < result["verdict_s"] < result["total_s"]
        assert verdict.startswith(result["text"]), (result, verdict)  # the model's own answer to that photo


def test_a_phone_reports_the_error_the_page_shows(tmp_path: Path) -> None:
    shipped()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    runs = tmp_path / "runs"
    runs.mkdir()
    with bundled_app(runs, "phones-error.log") as port:
        result = asyncio.run(visit(f"http://127.0.0.1:{port}/", broken, 60, Recording()))
    assert not result["ok"]
    assert "could not be used" in result["error"], result
    assert "verdict_s" not in result


def test_the_load_bench_mixes_a_browser_and_phones_uploading_together(tmp_path: Path) -> None:
    """``python -m bench.load --phones --together`` as a presenter runs it, with the smallest room."""
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the bench's browser needs it")
    shipped()
    command = [sys.executable, "-m", "bench.load", "--sessions", "3", "--phones", "--together", "--timeout", "120"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "lone visitor (browser), median of 3" in out and "lone visitor (phone), median of 3" in out
    assert "3 sessions at once" in out
    assert "the browsers: 1/1 answered with no error shown" in out
    assert "the phones: 2/2 answered with no error shown" in out
    assert "server stopped: True" in out
