"""One worker thread answers the predictions of every session, in small batches.

A room of visitors uploading at once used to queue behind a lock, one image, one forward pass and
one Grad-CAM pass at a time. Here each session hands its image to :func:`predict` and waits; one
thread takes whatever is queued when it wakes (gathering for at most ``GATHER_S`` more), groups the
requests by model and settings (a batch never mixes CAM methods, heatmap targets or models), and
answers each group with one :meth:`lesion.predict.Predictor.predict_batch` call: one forward pass,
the heatmaps and the OOD scores of the whole group, and whatever else the Predictor computes per
image. A lone visitor waits for nothing: the worker wakes on the first request.

One visitor's failure never reaches another's: an unreadable image comes back as its own
:class:`lesion.errors.InvalidImage` at its place in the batch, and if the batched call itself
fails, each request of the group is retried alone, so only the one that fails gets the error.

Nothing here imports Streamlit; the worker is started on first use and is a daemon thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from lesion.errors import InvalidImage
from lesion_app.session_cache import PREDICT_LOCK

MAX_BATCH = 16  # images of one forward pass: enough for a room, small enough to answer the first ones soon
GATHER_S = 0.003  # after waking on a lone request, how long the worker waits for company (a few ms at most)


@dataclass
class Request:
    """One image to predict with one model and settings, and the future its session waits on."""

    predictor: Any
    image: Any  # what Predictor.predict_batch reads: path, bytes, file object or PIL image
    settings: dict[str, Any]  # cam_method, cam_target: the keyword arguments of predict_batch
    future: Future = field(default_factory=Future)

    def group(self) -> Hashable:
        """Requests of one group may share a pass: same model object, same settings."""
        return (id(self.predictor), tuple(sorted(self.settings.items())))


class Batcher:
    """A queue of requests and the one thread that answers them in batches (see the module docstring)."""

    def __init__(self, max_batch: int = MAX_BATCH, gather_s: float = GATHER_S) -> None:
        self.max_batch, self.gather_s = max_batch, gather_s
        self._queue: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._start = threading.Lock()
        self._thread: threading.Thread | None = None
        self.batches: list[int] = []  # the size of each predict_batch call made, most recent last (kept short)

    def submit(self, predictor: Any, image: Any, **settings: Any) -> Future:
        """Queue one image; the Future gives its Prediction, or raises its InvalidImage or other error."""
        request = Request(predictor, image, settings)
        self._ensure_worker()
        self._queue.put(request)
        return request.future

    def predict(self, predictor: Any, image: Any, **settings: Any) -> Any:
        """The Prediction of one image, computed in a batch with whatever else is queued; raises like predict."""
        return self.submit(predictor, image, **settings).result()

    def close(self) -> None:
        """Let the worker finish what is queued and end (the app's batcher lives as long as the server)."""
        with self._start:
            if self._thread is not None and self._thread.is_alive():
                self._queue.put(None)  # type: ignore[arg-type]
                self._thread.join()
            self._thread = None

    def _ensure_worker(self) -> None:
        with self._start:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="lesion-batcher", daemon=True)
                self._thread.start()

    def _take(self) -> list[Request | None]:
        """The first request (waiting for it), then whatever is queued, gathering for at most ``gather_s``.

        None in the list: :meth:`close` asked the worker to end once these are answered.
        """
        taken = [self._queue.get()]
        deadline = time.perf_counter() + self.gather_s
        while len(taken) < self.max_batch and taken[-1] is not None:
            try:
                taken.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                taken.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        return taken

    def _work(self) -> None:
        while True:
            taken = self._take()
            closing = taken[-1] is None
            taken = [request for request in taken if request is not None]
            self._answer_all(taken)
            if closing:
                return

    def _answer_all(self, taken: list[Request]) -> None:
        """Each (model, settings) group of ``taken`` answered with one call."""
        try:
            groups: dict[Hashable, list[Request]] = defaultdict(list)
            for request in taken:
                groups[request.group()].append(request)
            for requests in groups.values():
                self._answer(requests)
        except Exception as error:  # noqa: BLE001 - never leave a session waiting on a future nobody sets
            for request in taken:
                if not request.future.done():
                    request.future.set_exception(error)

    def _answer(self, requests: list[Request]) -> None:
        """One predict_batch call for the group; if it fails as a whole, each request alone."""
        try:
            results = self._call(requests)
        except Exception as error:  # noqa: BLE001 - handed to the session it belongs to, below
            if len(requests) == 1:
                requests[0].future.set_exception(error)
            else:  # which request broke the batch is found by answering each alone
                for request in requests:
                    self._answer([request])
            return
        for request, result in zip(requests, results, strict=True):
            if isinstance(result, InvalidImage):
                request.future.set_exception(result)
            else:
                request.future.set_result(result)

    def _call(self, requests: list[Request]) -> list[Any]:
        first = requests[0]
        images = [request.image for request in requests]
        # The lock other pages take around the network (the OOD page): one pass at a time on the shared model.
        with PREDICT_LOCK:
            results = first.predictor.predict_batch(images, batch_size=len(images), with_heatmap=True, **first.settings)
        self.batches = [*self.batches[-99:], len(images)]
        return results


_BATCHER = Batcher()


def batcher() -> Batcher:
    """The server's one batcher, shared by every session."""
    return _BATCHER
