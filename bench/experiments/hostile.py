"""The hostile corpus as a table: every awkward file, what the app owes the visitor, what it gave, how fast.

    python -m bench.experiments.hostile [--checkpoint runs/x/model.pt] [--no-app]

Builds tests/hostile_corpus.py's files in a temporary folder and sends each through
``Predictor.predict`` and (unless ``--no-app``) through the Predict page with AppTest, printing one
row per case: expectation, outcome, seconds, and the verdict or the message. Then the 50-megapixel
JPEG's decode time with draft mode (what the predictor does) against a full decode of the same file
measured in the same run. Exit status 1 if any case was not handled as expected.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, ensure_checkpoint
from lesion.errors import InvalidImage
from lesion.images import load_image_with_size
from lesion.predict import Predictor
from tests.hostile_corpus import Case, build_corpus


def through_predictor(predictor: Predictor, case: Case) -> tuple[str, str, float]:
    started = time.perf_counter()
    try:
        prediction = predictor.predict(case.path)
    except InvalidImage as error:
        return "refused", str(error), time.perf_counter() - started
    except Exception as error:  # a bug: reported in the table, not raised
        return "CRASH", f"{type(error).__name__}: {error}", time.perf_counter() - started
    elapsed = time.perf_counter() - started
    shape = "x".join(map(str, prediction.heatmap.shape)) if prediction.heatmap is not None else "none"
    return "verdict", f"{prediction.verdict} p={prediction.p_malignant:.2f} heatmap {shape}", elapsed


def through_page(at, case: Case) -> tuple[str, float]:
    from tests.test_hostile import page_outcome

    at.file_uploader[0].set_value((case.upload_name, case.data, "application/octet-stream"))
    started = time.perf_counter()
    try:
        at.run(timeout=120)
    except RuntimeError as error:
        return f"HANG ({error})", time.perf_counter() - started
    elapsed = time.perf_counter() - started
    if at.exception:
        return "TRACEBACK", elapsed
    return page_outcome(at, case.upload_name)[0], elapsed


def decode_figures(path: Path, short_side: int) -> tuple[float, float]:
    """Seconds to decode ``path``: in draft mode to ``short_side`` (the predictor's way), and in full."""
    from PIL import Image

    started = time.perf_counter()
    load_image_with_size(path, short_side)
    draft = time.perf_counter() - started
    started = time.perf_counter()
    with Image.open(path) as image:
        image.load()
    return draft, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="model.pt (default: newest runs/*/model.pt, or train one)")
    parser.add_argument("--no-app", action="store_true", help="skip the Predict page (AppTest)")
    args = parser.parse_args(argv)
    checkpoint = ensure_checkpoint(args.checkpoint)
    predictor = Predictor.from_checkpoint(checkpoint)
    at = None
    if not args.no_app:
        from streamlit.testing.v1 import AppTest

        os.environ["LESION_CHECKPOINT"] = str(Path(checkpoint).resolve())
        os.environ["LESION_RUNS_DIR"] = tempfile.mkdtemp(prefix="lesion-no-runs-")
        at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120).run()

    with tempfile.TemporaryDirectory(prefix="lesion-hostile-") as folder:
        started = time.perf_counter()
        cases = build_corpus(folder)
        print(f"{len(cases)} cases built in {time.perf_counter() - started:.1f} s; checkpoint {checkpoint}\n")
        header = f"{'case':22} {'bytes':>10} {'expected':8} {'predictor':9} {'s':>6}"
        header += f" {'page':9} {'s':>6}" if at else ""
        print(header + "  answer")
        tried = handled = 0
        for case in cases:
            if case.skip:
                print(f"{case.name:22} {'':>10} {case.expectation:8} SKIPPED: {case.skip}")
                continue
            tried += 1
            outcome, answer, seconds = through_predictor(predictor, case)
            row = f"{case.name:22} {case.path.stat().st_size:>10} {case.expectation:8} {outcome:9} {seconds:6.2f}"
            ok = outcome == case.expectation
            if at is not None:
                page, page_seconds = through_page(at, case)
                row += f" {page:9} {page_seconds:6.2f}"
                ok = ok and page == case.expectation
            handled += ok
            print(f"{row}  {'' if ok else '<-- NOT AS EXPECTED '}{answer[:90]}")
        print(f"\n{handled}/{tried} cases handled as expected (verdict or plain message; no traceback, no hang)")

        big = next((case for case in cases if case.name == "jpeg-50mp"), None)
        if big is not None:
            draft, full = decode_figures(big.path, predictor.resize_size)
            print(
                f"50-megapixel JPEG ({big.path.stat().st_size / 2**20:.1f} MB): decode for the model "
                f"(draft mode, short side {predictor.resize_size}) {draft:.3f} s vs full decode {full:.3f} s "
                f"({full / draft:.0f}x faster)"
            )
    return 0 if handled == tried else 1


if __name__ == "__main__":
    sys.exit(main())
