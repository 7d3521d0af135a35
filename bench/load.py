"""Ten visitors at once: concurrent browser sessions against the running app, each uploading a photo.

    python -m bench.load [--checkpoint runs/x/model.pt] [--sessions 10] [--timeout 180]

Starts ``streamlit run streamlit_app.py`` headless on a free port with LESION_CHECKPOINT set to the
model (default: the newest runs/*/model.pt; with none, the tiny test model is trained into a
temporary folder first), opens one Chromium (Playwright, the Debian package) with ``--sessions``
browser contexts, and in each, concurrently: loads the page, uploads a different bundled lesion and
waits for its verdict. One session alone runs first as the baseline. Prints per-session times,
p50 / p95 / max of upload-to-verdict latency (and their ratio to the lone session) and whether
every session completed. The server is always killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    CHROMIUM_ARGS,
    REPO,
    VERDICT,
    ensure_checkpoint,
    free_port,
    start_app,
    stop_app,
    wait_healthy,
)


async def visit(browser, url: str, image: Path, timeout_s: float) -> dict:
    """One visitor: load the page, upload ``image``, wait for the verdict; times in seconds."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    result = {"image": image.name, "ok": False, "error": ""}
    try:
        page = await context.new_page()
        started = time.perf_counter()
        await page.goto(url, wait_until="domcontentloaded", timeout=timeout_s * 1000)
        upload = page.locator("input[type=file]").first
        await upload.wait_for(state="attached", timeout=timeout_s * 1000)
        result["page_s"] = time.perf_counter() - started
        uploaded = time.perf_counter()
        await upload.set_input_files(str(image))
        await page.get_by_text(VERDICT).first.wait_for(state="visible", timeout=timeout_s * 1000)
        result["verdict_s"] = time.perf_counter() - uploaded
        result["text"] = (await page.get_by_text(VERDICT).first.inner_text()).split("\n")[0][:80]
        if await page.get_by_text("Traceback").count():
            result["error"] = "a traceback is shown"
        else:
            result["ok"] = True
    except Exception as error:  # reported per session; the bench goes on with the others
        result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    finally:
        await context.close()
    return result


async def run_sessions(url: str, images: list[Path], timeout_s: float) -> tuple[list[dict], float]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        try:
            started = time.perf_counter()
            results = await asyncio.gather(*(visit(browser, url, image, timeout_s) for image in images))
            return list(results), time.perf_counter() - started
        finally:
            await browser.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="model.pt (default: newest runs/*/model.pt, or train one)")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a session may wait for its verdict")
    args = parser.parse_args(argv)
    if not shutil.which("chromium"):
        print("error: no chromium on PATH (apt install chromium)", file=sys.stderr)
        return 2
    checkpoint = ensure_checkpoint(args.checkpoint)
    lesions = sorted((REPO / "assets" / "samples" / "lesions").glob("*.jpg"))
    images = [lesions[i % len(lesions)] for i in range(args.sessions)]
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="lesion-load-") as runs_dir:
        server = start_app(checkpoint, port, Path(runs_dir))
        try:
            started = time.perf_counter()
            wait_healthy(server, port)
            print(f"checkpoint {checkpoint}; app up on port {port} in {time.perf_counter() - started:.1f} s")
            url = f"http://127.0.0.1:{port}/"
            # The baseline: one visitor alone (a bundled OOD photo, so no session below reuses its result).
            alone, _ = asyncio.run(
                run_sessions(url, [sorted((REPO / "assets/samples/ood").glob("*.jpg"))[0]], args.timeout)
            )
            results, wall = asyncio.run(run_sessions(url, images, args.timeout))
        finally:
            stop_app(server)
    for number, result in enumerate(results, 1):
        if result["ok"]:
            print(
                f"session {number:2d} {result['image']}: page {result['page_s']:.2f} s, "
                f"upload -> verdict {result['verdict_s']:.2f} s ({result['text']})"
            )
        else:
            print(f"session {number:2d} {result['image']}: FAILED {result['error']}")
    base = alone[0]
    if base["ok"]:
        print(f"baseline, one session alone: page {base['page_s']:.2f} s, upload -> verdict {base['verdict_s']:.2f} s")
    else:
        print(f"baseline session FAILED: {base['error']}")
    done = [r["verdict_s"] for r in results if r["ok"]]
    if done:
        p50, p95 = statistics.median(done), percentile(done, 95)
        ratio = (
            f" ({p50 / base['verdict_s']:.1f}x / {p95 / base['verdict_s']:.1f}x the lone session)" if base["ok"] else ""
        )
        print(
            f"upload -> verdict latency over {len(done)} concurrent sessions: p50 {p50:.2f} s, p95 {p95:.2f} s, "
            f"max {max(done):.2f} s{ratio}; page load p50 {statistics.median(r['page_s'] for r in results if r['ok']):.2f} s; "
            f"all sessions within {wall:.1f} s"
        )
    complete = len(done) == len(results)
    print(f"{len(done)}/{len(results)} sessions completed" + ("" if complete else " -- NOT ALL"))
    print(f"server stopped: {server.poll() is not None}")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
