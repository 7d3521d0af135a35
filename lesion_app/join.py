"""Join by QR code: the app's address as the phones in the room should open it, drawn as a large QR code.

Nothing here imports Streamlit: the entry script passes in the page's URL (``st.context.url``).
"""

from __future__ import annotations

import contextlib
import io
import socket
from urllib.parse import urlsplit, urlunsplit

import segno

# Host names that mean "this machine" to the presenter's browser and nothing to a phone.
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"}
JOIN_CAPTION = "Open this on your phone"
QR_SIDE = 440  # pixels the code aims at (quiet zone included): readable across a room, whole modules only
QUIET_ZONE = 4  # modules of white around the code, as the standard asks


def network_address() -> str | None:
    """This machine's address on its network (the one a phone on the same Wi-Fi reaches); None if there is none.

    Connecting a UDP socket sends nothing: it only asks the kernel which local address would be used.
    """
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1 (RFC 5737): never routed anywhere, never contacted
        address = probe.getsockname()[0]
        if address and not address.startswith("127."):
            return address
    return None


def join_address(page_url: str | None, base_path: str = "", local_ip: str | None = None) -> str:
    """The address to open on a phone: the app's root (its first page) on the host the presenter's browser used.

    A local host name (localhost, 127.x) means nothing to a phone: it is replaced by ``local_ip`` when there
    is one. ``base_path`` is Streamlit's ``server.baseUrlPath``. Empty when the page's URL is unknown.
    """
    if not page_url:
        return ""
    parts = urlsplit(page_url)
    host = parts.hostname or ""
    netloc = parts.netloc
    if (host in LOCAL_HOSTS or host.startswith("127.")) and local_ip:
        shown = f"[{local_ip}]" if ":" in local_ip else local_ip
        netloc = shown + (f":{parts.port}" if parts.port else "")
    path = "/" + (base_path.strip("/") + "/" if base_path.strip("/") else "")
    return urlunsplit((parts.scheme or "http", netloc, path, "", ""))


def qr_png(address: str, side: int = QR_SIDE) -> bytes:
    """A QR code of ``address`` as PNG bytes, close to ``side`` pixels wide (error correction M).

    Each module is a whole number of pixels (at least 4), so the page can show the image at its own size:
    scaled by the browser, a code's edges would blur.
    """
    if not address:
        raise ValueError("no address to encode")
    code = segno.make(address, error="m", micro=False)
    modules = code.symbol_size(scale=1, border=QUIET_ZONE)[0]
    buffer = io.BytesIO()
    code.save(buffer, kind="png", scale=max(4, side // modules), border=QUIET_ZONE)
    return buffer.getvalue()
