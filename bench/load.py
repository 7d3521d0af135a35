"""A room full of phones: 10, 20, 30 concurrent browser sessions against the running app, each uploading a photo.

    python -m bench.load [--checkpoint runs/x/model.pt] [--sessions 10 20 30] [--desktop] [--tabs]
                         [--phones [--browsers K]] [--together] [--profile DIR]

Starts ``streamlit run streamlit_app.py`` headless on a free port (default: the bundled model, as on a
fresh clone; ``--checkpoint`` names another model.pt), opens one Chromium (Playwright, the Debian
package) and measures, in one run:

- a warm-up visit (the model is loaded), then one visitor alone, three times (the baseline: the median);
- for each ``--sessions`` count, that many browser contexts at once, each loading the page, uploading a
  different lesion (a bundled sample re-encoded with one pixel changed, so no two uploads share a cached
  answer, across counts too) and waiting for its verdict.

"page" is the time until the first run is fully drawn (the "Upload a photo or tick a sample" line at its
end); "upload -> verdict" the time from handing the file to the page until the verdict's text is visible.
For each count it prints p50 and p95 of both, their ratio to the lone visitor's, where the verdict sat
(in screen heights from the top of the page), and whether every session was answered with no error shown
(an exception box, a traceback or a "could not be used" message). Sessions use a phone's viewport
(390 x 844) unless ``--desktop``. With ``--profile DIR`` py-spy samples the server during the largest
count and the top functions (own time and including callees) are printed and written to DIR.
With ``--phones`` the warm-up visit records what the browser fetched, and in each round all visitors but
``--browsers`` (default 1) are :mod:`bench.phones` visitors that ask the server for the same things over
Streamlit's own protocol and draw nothing: the server's side of a room is measured without 30 renderers
on its cores (real phones bring their own). Each kind is compared with a lone visitor of its own kind.
With ``--together`` every visitor of a round uploads at one moment, once all its pages are loaded. The
server is always stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from PIL import Image

from bench.common import (
    CHROMIUM_ARGS,
    REPO,
    VERDICT,
    free_port,
    start_app,
    stop_app,
    wait_healthy,
)
from bench.phones import Recording
from bench.phones import visit as phones_visit

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
READY = "Upload a photo or tick a sample"  # the last line of the Predict page's first run
# An element's bottom edge in pixels from the top of the page, whatever scrolls (the window or a container).
PAGE_BOTTOM = """e => {
    let y = e.getBoundingClientRect().bottom + window.scrollY;
    for (let a = e.parentElement; a; a = a.parentElement) y += a.scrollTop;
    return y;
}"""
ERRORS = '[data-testid="stException"], :text("Traceback"), :text("could not be used")'


class Together:
    """The presenter's "now upload": visitors wait, page loaded, until all of the round have theirs."""

    def __init__(self, count: int) -> None:
        self.waiting, self.count, self.event = 0, count, asyncio.Event()

    async def arrive(self) -> None:
        self.waiting += 1
        self._check()
        await self.event.wait()

    def leave(self) -> None:
        """A visitor failed before arriving: nobody waits for it."""
        self.count -= 1
        self._check()

    def _check(self) -> None:
        if self.waiting >= self.count:
            self.event.set()


async def visit(
    browser,
    url: str,
    image: Path,
    timeout_s: float,
    viewport: dict,
    shared=None,
    record: bool = False,
    together: Together | None = None,
) -> dict:
    """One visitor: load the page, upload ``image``, wait for the verdict; times in seconds.

    ``shared``: a browser context to open a tab in (a session of its own, the browser's cache shared);
    None: a context of its own, as a separate phone. ``record``: the result's "recording" holds what the
    browser fetched from the server (a :class:`bench.phones.Recording`, for ``--phones``). ``together``: wait
    there, page loaded, until every visitor of the round has loaded theirs, then upload.
    """
    context = shared or await browser.new_context(viewport=viewport)
    result = {"image": image.name, "ok": False, "error": "", "kind": "browser"}
    page, arrived = None, False
    try:
        page = await context.new_page()
        if record:
            result["recording"], upload_starts = Recording.attach(page, url)
        started = time.perf_counter()
        await page.goto(url, wait_until="domcontentloaded", timeout=timeout_s * 1000)
        await page.get_by_text(READY).first.wait_for(state="visible", timeout=timeout_s * 1000)
        result["page_s"] = time.perf_counter() - started
        if together is not None:
            arrived = True
            await together.arrive()
        if record:
            upload_starts()
        uploaded = time.perf_counter()
        await page.locator("input[type=file]").first.set_input_files(str(image), timeout=timeout_s * 1000)
        verdict = page.get_by_text(VERDICT).first
        await verdict.wait_for(state="visible", timeout=timeout_s * 1000)
        result["verdict_s"] = time.perf_counter() - uploaded
        result["total_s"] = time.perf_counter() - started  # what the visitor lives: opening the page to the verdict
        result["text"] = (await verdict.inner_text()).split("\n")[0][:80]
        result["screens"] = await verdict.evaluate(PAGE_BOTTOM) / viewport["height"]
        if record:
            await page.wait_for_load_state("networkidle", timeout=timeout_s * 1000)  # the answer's pictures and code
        if await page.locator(ERRORS).count():
            result["error"] = "an error is shown"
        else:
            result["ok"] = True
    except Exception as error:  # reported per session; the bench goes on with the others
        result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    finally:
        if together is not None and not arrived:
            together.leave()
        if shared is None:
            await context.close()
        elif page is not None:
            await page.close()
    return result


def niced_chromium(niceness: int, folder: Path) -> str:
    """Chromium's path, or a wrapper that starts it at ``niceness`` (0: chromium itself)."""
    chromium = shutil.which("chromium")
    if not niceness:
        return chromium
    wrapper = folder / "chromium-niced"
    wrapper.write_text(f'#!/bin/sh\nexec nice -n {int(niceness)} "{chromium}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


async def run_sessions(
    url: str,
    rounds: list[list[tuple[Path, str]]],
    timeout_s: float,
    viewport: dict,
    chromium: str,
    between=None,
    tabs: bool = False,
    phones: bool = False,
    together: bool = False,
) -> list:
    """Each round's images uploaded by as many concurrent sessions, rounds one after the other, one browser.

    ``rounds``: each visitor's image and kind, "browser" or "phone" (a :mod:`bench.phones` visitor:
    Streamlit's protocol, no browser, asking for what the first round's browser fetched, recorded when
    ``phones``). ``tabs``: every browser session a tab of one browser context (one cache); else each in a
    context of its own. ``together``: in each round, every visitor uploads once all pages are loaded.
    """
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        shared = await browser.new_context(viewport=viewport) if tabs else None
        try:
            answers, recording = [], None
            for number, images in enumerate(rounds):
                if between is not None:
                    between(number, "start")
                started = time.perf_counter()
                moment = Together(len(images)) if together else None
                visits = (
                    phones_visit(url, image, timeout_s, recording, moment)
                    if kind == "phone"
                    else visit(browser, url, image, timeout_s, viewport, shared, phones and recording is None, moment)
                    for image, kind in images
                )
                results = await asyncio.gather(*visits)
                answers.append((list(results), time.perf_counter() - started))
                if phones and recording is None:
                    recording = results[0].get("recording")
                    if recording is None:
                        raise RuntimeError(f"the browser's first visit failed: {results[0]['error']}")
                if between is not None:
                    between(number, "end")
            return answers
        finally:
            await browser.close()


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process ``pid`` and its children so far."""
    import psutil

    process = psutil.Process(pid)
    total = 0.0
    for each in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = each.cpu_times()
            total += times.user + times.system
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def distinct_copies(sources: list[Path], count: int, tag: int, folder: Path) -> list[Path]:
    """``count`` uploads made from ``sources`` in turn, each with one pixel set from (tag, index): distinct bytes."""
    made = []
    for index in range(count):
        source = sources[index % len(sources)]
        with Image.open(source) as image:
            copy = image.convert("RGB")
        copy.putpixel((0, 0), (tag % 256, index % 256, (tag * 7 + index) % 256))
        path = folder / f"{source.stem}-{tag}-{index}.jpg"
        copy.save(path, quality=95)
        made.append(path)
    return made


class Profiler:
    """py-spy sampling the server between two calls (raw collapsed stacks), if py-spy is installed."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid, self.out, self.process = pid, out, None

    def start(self) -> None:
        command = ["py-spy", "record", "--pid", str(self.pid), "--format", "raw", "--rate", "50", "--nonblocking"]
        self.process = subprocess.Popen(
            [*command, "-o", str(self.out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(60)


# Where the server's time goes, by what a sample's stack contains (a sample may count in several).
CATEGORIES = {
    "page script runs (all of it)": ("exec_func_with_error_handling",),
    "  st.image in the script": ("elements/image.py",),
    "  the prediction (wait or work)": ("predict_view.py", "batcher.py"),
    "network forward pass": ("forward_parts",),
    "heatmaps (Grad-CAM)": ("_low_resolution_cams",),
    "OOD scores": ("_ood_scores",),
    "decoding and preprocessing": ("lesion/preprocess.py", "lesion/images.py"),
    "file watcher (every module's path after each run)": ("local_sources_watcher",),
    "full garbage collection after each run": ("=ScriptRunner._on_script_finished (scriptrunner/script_runner.py)",),
    "media files (images served)": ("media_file",),
    "websocket writes": ("websocket.py", "_SelectorSocketTransport.write"),
}
# Where a sampled thread waits rather than works (py-spy counts some waits as active): left out of the shares.
WAITING = (
    "Condition.wait (threading.py)",
    "Event.wait (threading.py)",
    "EpollSelector.select (selectors.py)",
    "_worker (futures/thread.py)",
    "Queue.get (queue.py)",
    "SimpleQueue.get",
    "PollingPathWatcher._schedule.<locals>.task (watcher/polling_path_watcher.py)",  # its sleep between polls
    "sleep",
)
# Frames every thread's stack starts with: their inclusive share says nothing.
GENERIC = ("threading.py", "runpy", "click/", "asyncio/", "web/bootstrap.py", "web/cli.py", "streamlit/__main__.py")


def top_functions(raw: Path, count: int = 15) -> tuple[list, list, list, int, int]:
    """Shares of the busy samples: own time of the busiest functions, time including callees, per category;
    the busy samples and the waiting ones (a thread in one of WAITING, left out).

    A function is named ``name (folder/file.py)``: the lines of one function are added together.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    total = waiting = 0
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        n = int(samples)
        frames = [_function(frame) for frame in stack.split(";")]
        if frames[-1] in WAITING or frames[-1].startswith(WAITING[-1]):
            waiting += n
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            if not any(generic in frame for generic in GENERIC):
                inclusive[frame] += n
        for label, marks in CATEGORIES.items():
            # "=name": the function the thread is in itself (time in C code, such as gc.collect, shows there).
            if any(frames[-1] == mark[1:] if mark.startswith("=") else mark in stack for mark in marks):
                categories[label] += n
    share = max(total, 1)
    return (
        [(name, n / share) for name, n in own.most_common(count)],
        [(name, n / share) for name, n in inclusive.most_common(count)],
        [(label, categories[label] / share) for label in CATEGORIES],
        total,
        waiting,
    )


def _function(frame: str) -> str:
    """'name (path/to/file.py:12)' -> 'name (file.py)'; py-spy's raw frames name the file and line."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(where).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else where
    return f"{name} ({short})"


def summary(results: list[dict], base: dict | None, label: str) -> str:
    done = [r for r in results if r["ok"]]
    lines = [
        f"{label}: {len(done)}/{len(results)} answered with no error shown" + ("" if done == results else " -- NOT ALL")
    ]
    if not done:
        return "\n".join(lines)
    for key, what in (("page_s", "page"), ("verdict_s", "upload -> verdict"), ("total_s", "page opened -> verdict")):
        values = [r[key] for r in done]
        p50, p95 = statistics.median(values), percentile(values, 95)
        ratio = f" ({p50 / base[key]:.1f}x / {p95 / base[key]:.1f}x the lone visitor)" if base else ""
        lines.append(f"  {what}: p50 {p50:.2f} s, p95 {p95:.2f} s, max {max(values):.2f} s{ratio}")
    screens = [r["screens"] for r in done if r["screens"] == r["screens"]]  # none (NaN) from --phones visitors
    if screens:
        lines.append(f"  the verdict's bottom edge: at most {max(screens):.2f} screen heights down the page")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="model.pt (default: the bundled model, as on a fresh clone)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[10, 20, 30], help="concurrent sessions, per round")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a session may wait for each step")
    parser.add_argument("--desktop", action="store_true", help=f"a {DESKTOP['width']} px wide window, not a phone's")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy the server during the largest round")
    parser.add_argument(
        "--browser-nice",
        type=int,
        default=10,
        help="run Chromium at this niceness (0: as the server): phones bring their own CPUs, these browsers share the server's",
    )
    parser.add_argument(
        "--tabs",
        action="store_true",
        help="each session a tab of one browser context (the app's scripts parsed from one cache), not a context each",
    )
    parser.add_argument(
        "--phones",
        action="store_true",
        help="after the browser's warm-up, visitors that speak Streamlit's protocol and draw nothing (bench/phones.py): "
        "the server's side alone, as when real phones bring their own CPUs",
    )
    parser.add_argument(
        "--browsers",
        type=int,
        default=1,
        help="with --phones: how many of each round's visitors are real browsers (their own figures, beside the phones')",
    )
    parser.add_argument(
        "--together",
        action="store_true",
        help="the presenter's 'now upload': each round's visitors upload at one moment, once every page is loaded",
    )
    parser.add_argument("--verbose", action="store_true", help="one line per session")
    args = parser.parse_args(argv)
    if not shutil.which("chromium"):
        print("error: no chromium on PATH (apt install chromium)", file=sys.stderr)
        return 2
    if args.profile and not shutil.which("py-spy"):
        print("error: --profile needs py-spy (python3 -m pip install py-spy)", file=sys.stderr)
        return 2
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    viewport = DESKTOP if args.desktop else PHONE
    lesions = sorted((REPO / "assets" / "samples" / "lesions").glob("*.jpg"))
    photos = sorted((REPO / "assets" / "samples" / "ood").glob("*.jpg"))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="lesion-load-") as scratch:
        folder = Path(scratch)
        (folder / "runs").mkdir()
        # The warm-up (a browser), then the lone visitor three times, of each kind measured: non-lesion photos,
        # distinct from every round's lesions.
        kinds = ["browser", "phone"] if args.phones else ["browser"]
        lone = distinct_copies(photos, 1 + 3 * len(kinds), 0, folder)
        rounds = [[(lone[0], "browser")]]
        rounds += [[(lone[1 + 3 * k + j], kind)] for k, kind in enumerate(kinds) for j in range(3)]
        first = len(rounds)
        for k, n in enumerate(args.sessions):
            browsers = min(args.browsers, n) if args.phones else n
            who = ["browser"] * browsers + ["phone"] * (n - browsers)
            rounds.append(list(zip(distinct_copies(lesions, n, k + 1, folder), who, strict=True)))
        largest = first + max(range(len(args.sessions)), key=lambda k: args.sessions[k])
        server = start_app(checkpoint, port, folder / "runs")
        profiler = Profiler(server.pid, args.profile / "server.raw") if args.profile else None
        if profiler:
            args.profile.mkdir(parents=True, exist_ok=True)

        cpu: dict[int, float] = {}

        def between(number: int, when: str) -> None:
            # The server's CPU seconds (its process and any children) during each round.
            cpu[number] = server_cpu_seconds(server.pid) - cpu.get(number, 0.0)
            if profiler and number == largest:
                profiler.start() if when == "start" else profiler.stop()

        try:
            started = time.perf_counter()
            wait_healthy(server, port)
            print(f"model {checkpoint or 'bundled'}; app up on port {port} in {time.perf_counter() - started:.1f} s")
            print(
                f"viewport {viewport['width']} x {viewport['height']}; browser at niceness {args.browser_nice}; "
                + ("every session a tab of one context" if args.tabs else "a browser context per session")
                + (
                    f"; in each round {args.browsers} browser(s), the other visitors bench.phones (Streamlit's "
                    "protocol, nothing drawn)"
                    if args.phones
                    else ""
                )
                + ("; every visitor uploads once all the round's pages are loaded" if args.together else "")
            )
            chromium = niced_chromium(args.browser_nice, folder)
            url = f"http://127.0.0.1:{port}/"
            answers = asyncio.run(
                run_sessions(
                    url, rounds, args.timeout, viewport, chromium, between, args.tabs, args.phones, args.together
                )
            )
        finally:
            stop_app(server)
    warm = answers[0][0][0]
    print("warm-up visit (loads the model): " + (f"verdict {warm['verdict_s']:.2f} s" if warm["ok"] else warm["error"]))
    bases: dict[str, dict] = {}
    complete = True
    for k, kind in enumerate(kinds):
        alone = [answer[0][0] for answer in answers[1 + 3 * k : 4 + 3 * k]]
        who = "lone visitor" if not args.phones else f"lone visitor ({kind})"
        if all(r["ok"] for r in alone):
            bases[kind] = {key: statistics.median(r[key] for r in alone) for key in ("page_s", "verdict_s", "total_s")}
            print(
                f"{who}, median of 3: page {bases[kind]['page_s']:.2f} s, upload -> verdict "
                f"{bases[kind]['verdict_s']:.2f} s (each: {', '.join(format(r['verdict_s'], '.2f') for r in alone)} s)"
            )
        else:
            print(f"{who} FAILED: {[r['error'] for r in alone if not r['ok']]}")
            complete = False
    for number, ((results, wall), count) in enumerate(zip(answers[first:], args.sessions, strict=True), first):
        if args.verbose:
            for position, r in enumerate(results, 1):
                said = (
                    f"page {r['page_s']:.2f} s, verdict {r['verdict_s']:.2f} s" if r["ok"] else f"FAILED {r['error']}"
                )
                print(f"  session {position:2d} {r['kind']} {r['image']}: {said}")
        label = f"{count} sessions at once (all done within {wall:.1f} s)"
        for kind in kinds:
            group = [r for r in results if r["kind"] == kind]
            if group:
                print(summary(group, bases.get(kind), f"{label}, the {kind}s" if args.phones else label))
        print(f"  server CPU time during the round: {cpu[number]:.1f} s in {wall:.1f} s of wall time")
        complete = complete and all(r["ok"] for r in results)
    if profiler and (args.profile / "server.raw").is_file():
        own, inclusive, categories, samples, waits = top_functions(args.profile / "server.raw")
        text = [
            f"py-spy, {samples} busy samples of the server's threads during {args.sessions[largest - first]} sessions "
            f"at once ({waits} more waiting, left out); shares of the busy ones"
        ]
        text += ["own time:"] + [f"  {share:6.1%}  {name}" for name, share in own]
        text += ["including callees:"] + [f"  {share:6.1%}  {name}" for name, share in inclusive]
        text += ["by what the stack contains:"] + [f"  {share:6.1%}  {name}" for name, share in categories]
        (args.profile / "top.txt").write_text("\n".join(text) + "\n")
        print("\n".join(text))
    print(f"server stopped: {server.poll() is not None}")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
