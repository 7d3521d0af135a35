"""Visitors without a browser: Streamlit's own protocol, so the server's side of a room is measured alone.

On this machine the browsers of ``bench.load`` run on the server's two cores: 20 Chromium renderers drawing
the page starve the server they measure, while a room's real phones bring their own processors. A
``Phone`` here asks the server for everything a phone's browser asks for, in the same order, and draws
nothing:

- the page: ``GET /`` and ``/_stcore/health`` (which sets the XSRF cookie), then the static files a real browser fetched before
  opening its websocket, six connections at a time, gzip accepted, as a browser does;
- the websocket ``/_stcore/stream`` (the ``streamlit`` subprotocol with the XSRF token, deflate as a
  browser negotiates it), the first run requested as the frontend requests it, every message read and
  parsed, and each picture or file a message names (``/media/...``) fetched;
- the upload: ``file_urls_request``, the multipart ``PUT`` to the URL the server gives, a rerun with
  the uploader's new state, and again every message read and every picture fetched, with the static
  files a browser loads for the answer's elements.

The static files come from a :class:`Recording` of one real browser visit (``bench.load``'s warm-up),
so the list follows the installed Streamlit. Times are taken as a browser's are: "page" when the
Predict page's last line (``READY``) arrives, "upload -> verdict" when the verdict's text arrives; a
visit counts as answered when the verdict came and no exception element or "could not be used" message
was sent. Parsing on this side costs a little CPU on the same cores; far less than a browser's drawing.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from bench.common import VERDICT

READY = "Upload a photo or tick a sample"
MEDIA = re.compile(rb"/media/[0-9a-f]{16,}\.(?:jpg|jpeg|png|webp|gif|svg|json)")
COULD_NOT = "could not be used"
CONNECTIONS = 6  # a browser's connections per host


@dataclass
class Recording:
    """The paths a real browser fetched from the server during one visit, by when it fetched them."""

    page: list[str] = field(default_factory=list)  # before its websocket opened
    later: list[str] = field(default_factory=list)  # after, until the page was drawn
    answer: list[str] = field(default_factory=list)  # after the upload (the answer's elements' code)

    @classmethod
    def attach(cls, page, url: str) -> tuple[Recording, Callable[[], None]]:
        """Record the requests of ``page`` (Playwright) to the app at ``url``; returns the recording and a
        function to call when the upload starts."""
        recording = cls()
        state = {"phase": "page"}
        origin = urlsplit(url).netloc

        def on_request(request) -> None:
            parts = urlsplit(request.url)
            if request.method != "GET" or parts.netloc != origin:
                return  # the upload's PUT is made by the phone itself; other hosts are not the server
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            if path.startswith("/media/") or path in ("/", "/_stcore/health"):
                return  # media come from the messages themselves; the phone asks for these two first
            getattr(recording, state["phase"]).append(path)

        page.on("request", on_request)
        page.on("websocket", lambda _: state.update(phase="later") if state["phase"] == "page" else None)
        return recording, lambda: state.update(phase="answer")


class _Connection:
    """One keep-alive HTTP/1.1 connection; bodies read whole (Content-Length or chunked)."""

    def __init__(self, host: str, port: int, cookie: str) -> None:
        self.host, self.port, self.cookie = host, port, cookie
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Accept-Encoding: gzip, deflate"]
        lines += ["Connection: keep-alive", "User-Agent: lesion-bench-phone"]
        if self.cookie:
            lines.append(f"Cookie: {self.cookie}")
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body or method in ("PUT", "POST"):
            lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError(f"{method} {path}: the server closed the connection")
        status = int(status_line.split()[1])
        head: dict[str, str] = {}
        cookies = []
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            head[name.strip().lower()] = value.strip()
            if name.strip().lower() == "set-cookie":
                cookies.append(value.strip())
        if head.get("transfer-encoding", "").lower() == "chunked":
            data = bytearray()
            while (size := int((await self.reader.readline()).split(b";")[0], 16)) > 0:
                data += await self.reader.readexactly(size)
                await self.reader.readline()
            await self.reader.readline()
        elif "content-length" in head:
            data = await self.reader.readexactly(int(head["content-length"]))
        elif status in (204, 304):
            data = b""
        else:
            data = await self.reader.read()
            self.close()
        if head.get("connection", "").lower() == "close":
            self.close()
        return status, head, bytes(data), cookies

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class _Fetcher:
    """A browser's pool of six connections to the server; GETs queued and fetched in the background."""

    def __init__(self, host: str, port: int, cookie: str) -> None:
        self.connections = [_Connection(host, port, cookie) for _ in range(CONNECTIONS)]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.failures: list[str] = []
        self.bytes = 0
        self.workers = [asyncio.create_task(self._work(c)) for c in self.connections]

    async def _work(self, connection: _Connection) -> None:
        while True:
            path, done = await self.queue.get()
            try:
                status, head, data, _ = await connection.request("GET", path)
                self.bytes += len(data)
                if status >= 400:
                    self.failures.append(f"GET {path}: HTTP {status}")
                elif head.get("content-encoding") == "gzip":
                    zlib.decompress(data, 16 + zlib.MAX_WBITS)  # the browser inflates what it gets
            except (OSError, ValueError, asyncio.IncompleteReadError, zlib.error) as error:
                self.failures.append(f"GET {path}: {type(error).__name__}")
                connection.close()
            finally:
                done.set_result(None)
                self.queue.task_done()

    def fetch(self, paths) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = []
        for path in paths:
            done = loop.create_future()
            self.queue.put_nowait((path, done))
            futures.append(done)
        return futures

    async def close(self) -> None:
        for worker in self.workers:
            worker.cancel()
        for worker in self.workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        for connection in self.connections:
            connection.close()


def _multipart(name: str, data: bytes, content_type: str = "image/jpeg") -> tuple[bytes, str]:
    boundary = f"----lesionbench{uuid.uuid4().hex}"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


class Phone:
    """One visitor speaking Streamlit's protocol; :meth:`visit` gives the same fields as ``bench.load.visit``."""

    def __init__(self, url: str, recording: Recording, timeout_s: float) -> None:
        parts = urlsplit(url)
        self.url, self.host, self.port = url, parts.hostname, parts.port or 80
        self.recording, self.timeout_s = recording, timeout_s
        self.session_id = self.page_hash = self.uploader_id = ""
        self.error = ""
        self.messages = 0
        self.file_urls = None  # the server's answer to the upload's file_urls_request

    async def visit(self, image: Path, together=None) -> dict:
        """``together``: a ``bench.load.Together`` to wait at, page loaded, before uploading."""
        result = {"image": image.name, "ok": False, "error": "", "screens": float("nan"), "kind": "phone"}
        fetcher, arrived = None, False
        try:
            started = time.perf_counter()
            first = _Connection(self.host, self.port, "")
            status, _, _, _ = await first.request("GET", "/")
            if status != 200:
                raise RuntimeError(f"GET / answered HTTP {status}")
            status, _, _, cookies = await first.request("GET", "/_stcore/health")  # sets the XSRF cookie
            first.close()
            xsrf = next((c.split(";")[0] for c in cookies if c.startswith("_streamlit_xsrf=")), "")
            token = xsrf.partition("=")[2].strip('"')
            fetcher = _Fetcher(self.host, self.port, xsrf)
            await asyncio.gather(*fetcher.fetch(self.recording.page))  # the frontend's code, then its websocket
            later = fetcher.fetch(self.recording.later)
            async with asyncio.timeout(self.timeout_s):
                await self._open(token, xsrf)
                await self._rerun([])
                await self._read(fetcher, until=lambda text: READY in text)
                result["page_s"] = time.perf_counter() - started
                await self._read(fetcher, until=None)  # the rest of the first run
            await asyncio.gather(*later)
            if not self.uploader_id:
                raise RuntimeError("the page sent no file uploader")
            if together is not None:
                arrived = True
                await together.arrive()
            uploaded = time.perf_counter()
            async with asyncio.timeout(self.timeout_s):
                state = await self._upload(image, token, xsrf, fetcher)
                answer = fetcher.fetch(self.recording.answer)
                await self._rerun([state])
                verdict = await self._read(fetcher, until=lambda text: VERDICT.search(text) is not None)
                result["verdict_s"] = time.perf_counter() - uploaded
                result["total_s"] = time.perf_counter() - started
                result["text"] = verdict
                await self._read(fetcher, until=None)
                await asyncio.gather(*answer)
                await fetcher.queue.join()  # every picture the answer named
            if self.error:
                result["error"] = self.error
            elif fetcher.failures:
                result["error"] = f"{len(fetcher.failures)} fetches failed, e.g. {fetcher.failures[0]}"
            else:
                result["ok"] = True
        except Exception as error:  # reported per visitor; the bench goes on with the others
            result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        finally:
            if together is not None and not arrived:
                together.leave()
            with contextlib.suppress(Exception):
                await self.socket.close()
            if fetcher is not None:
                await fetcher.close()
        return result

    async def _open(self, token: str, xsrf: str) -> None:
        from websockets.asyncio.client import connect

        origin = f"http://{self.host}:{self.port}"
        self.socket = await connect(
            f"ws://{self.host}:{self.port}/_stcore/stream",
            subprotocols=["streamlit", token] if token else ["streamlit"],
            additional_headers={"Origin": origin, **({"Cookie": xsrf} if xsrf else {})},
            max_size=None,
            open_timeout=self.timeout_s,
        )

    async def _rerun(self, widgets: list) -> None:
        from streamlit.proto.BackMsg_pb2 import BackMsg

        message = BackMsg()
        rerun = message.rerun_script
        rerun.widget_states.widgets.extend(widgets)
        rerun.page_script_hash = self.page_hash
        context = rerun.context_info
        context.timezone, context.timezone_offset, context.locale = "UTC", 0, "en-US"
        context.url, context.is_embedded, context.color_scheme = self.url, False, "light"
        await self.socket.send(message.SerializeToString())

    async def _read(self, fetcher: _Fetcher, until) -> str:
        """Messages until one's text satisfies ``until`` (its text returned), or, ``until`` None, the run's end."""
        while True:
            kind, text = self._take(await self.socket.recv(), fetcher)
            if kind == "script_finished":
                if until is None:
                    return ""
                if self.error:
                    raise RuntimeError(self.error)  # the run ended on an error: no verdict will come
            elif until is not None and text and until(text):
                match = VERDICT.search(text)
                return match.group(0) if match else READY

    def _take(self, data: bytes, fetcher: _Fetcher) -> tuple[str, str]:
        """One ForwardMsg as the frontend takes it: the session's state kept, the pictures it names fetched.

        Returns its kind and, for a delta, its text ("" otherwise).
        """
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        self.messages += 1
        message = ForwardMsg()
        message.ParseFromString(data)
        kind = message.WhichOneof("type")
        fetcher.fetch(path.decode() for path in dict.fromkeys(MEDIA.findall(data)))
        if kind == "new_session":
            self.session_id = message.new_session.initialize.session_id
            self.page_hash = message.new_session.page_script_hash or self.page_hash
        elif kind == "navigation":
            self.page_hash = message.navigation.page_script_hash or self.page_hash
        elif kind == "file_urls_response":
            self.file_urls = message.file_urls_response
        elif kind == "delta":
            element = message.delta.new_element
            which = element.WhichOneof("type") if message.delta.WhichOneof("type") == "new_element" else None
            if which == "file_uploader":
                self.uploader_id = element.file_uploader.id
            elif which == "exception":
                self.error = self.error or f"an exception was shown: {element.exception.message[:120]}"
            text = data.decode("utf-8", "ignore")
            if COULD_NOT in text:
                self.error = self.error or "a 'could not be used' message was shown"
            return kind, text
        return kind, ""

    async def _upload(self, image: Path, token: str, xsrf: str, fetcher: _Fetcher):
        """The file handed to the uploader; returns its widget state for the rerun."""
        from streamlit.proto.BackMsg_pb2 import BackMsg
        from streamlit.proto.WidgetStates_pb2 import WidgetState

        data = image.read_bytes()
        request = BackMsg()
        request.file_urls_request.request_id = str(uuid.uuid4())
        request.file_urls_request.file_names.append(image.name)
        request.file_urls_request.session_id = self.session_id
        self.file_urls = None
        await self.socket.send(request.SerializeToString())
        while self.file_urls is None:
            self._take(await self.socket.recv(), fetcher)
        if self.file_urls.error_msg:
            raise RuntimeError(f"file_urls_response: {self.file_urls.error_msg}")
        urls = self.file_urls.file_urls[0]
        body, content_type = _multipart(image.name, data)
        connection = _Connection(self.host, self.port, xsrf)
        headers = {"Content-Type": content_type, **({"X-Xsrftoken": token} if token else {})}
        status, _, answer, _ = await connection.request("PUT", urlsplit(urls.upload_url).path, body, headers)
        connection.close()
        if status >= 300:
            raise RuntimeError(f"upload answered HTTP {status}: {answer[:120]!r}")
        state = WidgetState(id=self.uploader_id)
        info = state.file_uploader_state_value.uploaded_file_info.add()
        info.file_id, info.name, info.size = urls.file_id, image.name, len(data)
        info.file_urls.CopyFrom(urls)
        return state


async def visit(url: str, image: Path, timeout_s: float, recording: Recording, together=None) -> dict:
    """One visitor without a browser: the page, the upload, the verdict (see the module's docstring)."""
    return await Phone(url, recording, timeout_s).visit(image, together)
