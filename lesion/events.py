"""Progress events: ``events.jsonl``, one JSON object a line, appended and flushed.

Kinds: ``start`` (config, sizes), ``step`` (epoch, batch, batches, loss, images_per_s),
``epoch`` (train and validation metrics), ``checkpoint`` (path, kind), ``done`` (metrics, path),
``error`` (message). Every event also has ``event`` (its kind) and ``time`` (Unix seconds).
The CLI's progress bar and the app's Train page read the same file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lesion.files import EVENTS_FILE


class EventWriter:
    """Append events to a run folder's events.jsonl; a no-op when ``enabled`` is false (rank > 0)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self.enabled = enabled

    def emit(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        event = {"event": kind, "time": time.time(), **fields}
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps(event, default=_plain) + "\n"
            with self.path.open("a", encoding="utf-8") as stream:
                stream.write(line)
                stream.flush()
                os.fsync(stream.fileno())
        return event


def _plain(value: Any) -> Any:
    """JSON fallback for numpy / torch scalars and paths."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def read_events(run_dir: str | Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Events after byte ``offset``, and the new offset. A half-written last line is left for later."""
    path = Path(run_dir) / EVENTS_FILE
    if not path.is_file():
        return [], offset
    with path.open("rb") as stream:
        stream.seek(offset)
        data = stream.read()
    events = []
    consumed = 0
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        consumed += len(raw)
        try:
            events.append(json.loads(raw))
        except json.JSONDecodeError:
            continue
    return events, offset + consumed


def iter_events(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """All complete events of a run, in order."""
    events, _ = read_events(run_dir)
    yield from events
