"""The app as a presenter meets it: start-up to first verdict, slider reruns, and resident memory.

    python -m bench.app [--bundled | --checkpoint runs/x/model.pt | --arch resnet50] [--moves 5]

Launches Chromium first (Playwright, the Debian package), then starts ``streamlit run
streamlit_app.py`` and measures, in one run:

- start-up: ``streamlit run`` -> server healthy -> page shown -> first prediction rendered
  (verdict text and a loaded heatmap image) after uploading a bundled lesion;
- the baseline rerun that calls the network: switching the CAM method (a new heatmap);
- the rerun when only the opacity slider moves, ``--moves`` times, and the ratio to the baseline.
  The server appends a line to $LESION_PREDICT_COUNTER for every image the network scores
  (bench/predict_counter/sitecustomize.py, loaded only here), so the bench proves the slider moves made none;
- resident memory (psutil RSS) of the server process and its children with the model loaded
  (goal: under 1.5 GB).

With ``--bundled`` the app starts as on a fresh clone: no runs, no LESION_CHECKPOINT, so it answers
with the bundled model (assets/models). Without ``--checkpoint`` it uses the newest runs/*/model.pt, or trains the tiny test model; with
``--arch resnet50`` it trains a throwaway ResNet-50 (1 epoch, 60 images, 224 px) to measure memory
with the full-size network. The server is always stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.common import CHROMIUM_ARGS, REPO, VERDICT, ensure_checkpoint, free_port, start_app, stop_app, wait_healthy
from lesion.files import MODEL_FILE

LESION = REPO / "assets" / "samples" / "lesions" / "ISIC_0000169.jpg"
MEMORY_GOAL_MB = 1536
COUNTING = Path(__file__).resolve().parent / "predict_counter"  # its sitecustomize.py counts predictions


def train_throwaway(arch: str) -> Path:
    """A full-size network trained for one epoch on a few images (memory depends on the arch, not the accuracy)."""
    run_dir = Path(tempfile.mkdtemp(prefix="lesion-bench-app-")) / arch
    print(f"training a throwaway {arch} into {run_dir} ...", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "train", f"--data={REPO / 'assets' / 'demo'}", f"--out={run_dir}", "--recipe=demo"]
    command += [f"--arch={arch}", "--image-size=224", "--epochs=1", "--max-images=60", "--batch-size=16"]
    command += ["--num-workers=0", "--weights=none"]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return run_dir / MODEL_FILE


def calls(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants, in MB."""
    process = psutil.Process(pid)
    total = 0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += member.memory_info().rss
    return total / 2**20


def overlay_src(page) -> str:
    image = page.locator('[data-testid="stImage"]').filter(has_text="heatmap").locator("img").first
    return image.get_attribute("src") or ""


def wait_new_overlay(page, before: str, timeout_s: float = 120) -> float:
    """Seconds until the heatmap image is replaced by a new, fully loaded one."""
    started = time.perf_counter()
    deadline = started + timeout_s
    while time.perf_counter() < deadline:
        src = overlay_src(page)
        if src and src != before:
            loaded = page.locator(f'img[src="{src}"]').first.evaluate("i => i.complete && i.naturalWidth > 0")
            if loaded:
                return time.perf_counter() - started
        time.sleep(0.02)
    page.screenshot(path=str(REPO / "test-artifacts" / "bench-app-failure.png"))
    raise RuntimeError(f"the heatmap was not redrawn within {timeout_s:.0f} s (screenshot in test-artifacts/)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="model.pt (default: newest runs/*/model.pt, or train one)")
    parser.add_argument("--arch", default=None, help="without --checkpoint: train a throwaway model of this arch")
    parser.add_argument("--bundled", action="store_true", help="a fresh clone: the bundled model, no runs")
    parser.add_argument("--moves", type=int, default=5, help="opacity slider moves to time")
    args = parser.parse_args(argv)
    if not shutil.which("chromium"):
        print("error: no chromium on PATH (apt install chromium)", file=sys.stderr)
        return 2
    if args.bundled:
        from lesion.runs import BUNDLED_MODEL

        checkpoint = BUNDLED_MODEL
    elif args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        checkpoint = train_throwaway(args.arch) if args.arch else ensure_checkpoint()
    from lesion.checkpoint import load_checkpoint

    info = load_checkpoint(checkpoint)
    print(f"checkpoint {checkpoint} ({info['arch']}, {info['image_size']} px), {os.cpu_count()} CPU cores")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="lesion-bench-app-") as scratch, sync_playwright() as playwright:
        counter = Path(scratch) / "predict-calls.txt"
        # start_app passes os.environ to the server; predict_counter/sitecustomize.py counts its network calls.
        os.environ["LESION_PREDICT_COUNTER"] = str(counter)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(COUNTING), os.environ.get("PYTHONPATH")]))
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        port = free_port()
        started = time.perf_counter()
        server = start_app(None if args.bundled else checkpoint, port, Path(scratch))
        try:
            wait_healthy(server, port, timeout=180)
            healthy = time.perf_counter() - started
            page.goto(f"http://127.0.0.1:{port}/", timeout=180_000)
            upload = page.locator('[data-testid="stFileUploaderDropzoneInput"]')
            upload.wait_for(state="attached", timeout=180_000)
            shown = time.perf_counter() - started
            upload.set_input_files(str(LESION), timeout=180_000)  # enabled once the first script run ends
            page.get_by_text(VERDICT).first.wait_for(timeout=180_000)
            wait_new_overlay(page, "", timeout_s=180)
            first = time.perf_counter() - started
            print(
                f"streamlit run -> healthy {healthy:.2f} s -> page shown {shown:.2f} s -> first prediction rendered "
                f"{first:.2f} s (upload -> verdict + heatmap {first - shown:.2f} s)"
            )

            # Baseline: a rerun that must call the network (a different CAM method).
            before_calls, before = calls(counter), overlay_src(page)
            page.locator('[data-testid="stSelectbox"]').filter(has_text="Heatmap method").click()
            page.get_by_role("option", name="Eigen-CAM").click()  # HiResCAM equals Grad-CAM on a ResNet
            baseline = wait_new_overlay(page, before)
            assert calls(counter) == before_calls + 1, "switching the CAM method should call the network once"

            # The slider: opacity only, no network.
            thumb = page.locator('[data-testid="stSlider"]').filter(has_text="Heatmap opacity").get_by_role("slider")
            before_calls, moves = calls(counter), []
            for number in range(args.moves):
                before = overlay_src(page)
                thumb.focus()
                page.keyboard.press("ArrowLeft" if number % 2 else "ArrowRight")
                moves.append(wait_new_overlay(page, before))
            slider_calls = calls(counter) - before_calls
            median = statistics.median(moves)
            print(
                f"rerun that calls the network (CAM method switch): {baseline:.3f} s; opacity slider rerun: median "
                f"{median:.3f} s over {len(moves)} moves (min {min(moves):.3f}, max {max(moves):.3f}) = "
                f"{median / baseline:.2f}x the network rerun"
            )
            print(f"network calls during {len(moves)} slider moves: {slider_calls} (counted by the app itself)")
            rss = tree_rss_mb(server.pid)
            verdict = "within" if rss < MEMORY_GOAL_MB else "OVER"
            print(
                f"app resident memory with one {info['arch']} loaded: {rss:.0f} MB ({verdict} the {MEMORY_GOAL_MB} MB goal)"
            )
        finally:
            stop_app(server)
            browser.close()
    print(f"server stopped: {server.poll() is not None}")
    return 0 if slider_calls == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
