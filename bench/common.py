"""What the benchmarks share: the repository root, timing, a checkpoint to measure, and the app under a browser.

Benchmarks run as modules from the repository root (``python -m bench.predict_pace``), so ``bench``,
``lesion`` and ``tests`` import without any path set-up.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch

from lesion.files import MODEL_FILE

REPO = Path(__file__).resolve().parent.parent

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The verdict box's detail line (lesion_app.wording.VERDICT_DETAIL): present only once a prediction is shown.
VERDICT = re.compile(
    r"The model leans towards a (benign|malignant) lesion|The model was not trained on photos like this"
)


def ensure_checkpoint(path: str | Path | None = None) -> Path:
    """``path``; else the newest runs/*/model.pt; else the tiny test model trained into a temporary folder."""
    if path:
        return Path(path)
    found = sorted((REPO / "runs").glob("*/model.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    if found:
        return found[0]
    from tests.conftest import DEMO, TINY_TRAINING

    run_dir = Path(tempfile.mkdtemp(prefix="lesion-bench-")) / "tiny"
    print(f"no runs/*/model.pt: training the tiny model into {run_dir} ...", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "train", f"--data={DEMO}", f"--out={run_dir}", *TINY_TRAINING]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return run_dir / MODEL_FILE


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(checkpoint: Path | None, port: int, runs_dir: Path) -> subprocess.Popen:
    """The app in its own process group; its output goes to runs_dir/streamlit.log (a pipe could fill and block it).

    ``checkpoint`` None: no LESION_CHECKPOINT, as on a fresh clone (the app picks the bundled model).
    """
    env = {
        **os.environ,
        "LESION_CHECKPOINT": str(checkpoint.resolve()) if checkpoint else "",
        "LESION_RUNS_DIR": str(runs_dir),
    }
    command = [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true"]
    command += ["--server.port", str(port), "--browser.gatherUsageStats", "false"]
    log = runs_dir / "streamlit.log"
    with log.open("wb") as stream:
        server = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )
    server.args = [*command, str(log)]  # so an error can name the log
    return server


def stop_app(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL if it lingers."""
    if server.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)


def wait_healthy(server: subprocess.Popen, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(
                f"streamlit exited with {server.returncode}: {Path(server.args[-1]).read_text()[-2000:]}"
            )
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as answer,
        ):
            if answer.read().strip() == b"ok":
                return
        time.sleep(0.3)
    raise RuntimeError(f"streamlit did not answer on port {port} within {timeout:.0f} s")


def fastest_seconds(run: Callable[[], object], reps: int, device: torch.device) -> float:
    """The fastest of ``reps`` timed calls of ``run`` after three warm-up calls, the device waited for."""
    samples = []
    for index in range(reps + 3):
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= 3:  # warmup
            samples.append(time.perf_counter() - started)
    # The minimum, not the median: on a shared machine other processes only ever add time.
    return min(samples)


def build_checkpoint(arch: str, image_size: int) -> dict:
    """A complete in-memory checkpoint: random weights, detectors fitted on random features."""
    from lesion import ood
    from lesion.checkpoint import new_checkpoint
    from lesion.model import LayerStatistics, build_model, classifier, feature_dim, forward_parts

    torch.manual_seed(0)
    model = build_model(arch, "linear").eval()
    dim = feature_dim(model)
    train_features = torch.randn(ood.KNN_BANK_SIZE + 100, dim).abs()
    train_logits = torch.randn(len(train_features), 2)
    labels = (torch.arange(len(train_features)) % 2).long()
    # Layer statistics of the widths this network's stages give, so the multi-layer detectors (the
    # default among them) are fitted and scored too; as many rows as the demo set's training fold.
    with LayerStatistics(model) as tap, tap.capture() as shapes, torch.no_grad():
        forward_parts(model, torch.zeros(1, 3, 64, 64))
    rows = 650
    train_layers = {name: torch.randn(rows, v.shape[1]).abs() for name, v in shapes.items()}
    val_layers = {name: v[:200] for name, v in train_layers.items()}
    detectors = ood.fit_detectors(
        train_features,
        labels,
        train_logits,
        train_features[:200],
        train_logits[:200],
        train_layers=train_layers,
        val_layers=val_layers,
        head=classifier(model),
    )
    ood_state = {"method": ood.DEFAULT_DETECTOR, "detectors": detectors, "keep": 0.95}
    return new_checkpoint(model, arch, "linear", image_size, ood=ood_state)
