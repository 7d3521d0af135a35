"""Join by QR code: the address a phone should open, a QR code that a reader decodes back to it, and who sees it.

The QR codes are read back with OpenCV's detector (installed with grad-cam), an implementation independent of
segno, the library that draws them.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from lesion_app.join import JOIN_CAPTION, join_address, network_address, qr_png

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "a room full of phones"
TOGGLE = "Show the join QR code"


def decoded(png: bytes) -> str:
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert image is not None, "not a PNG OpenCV can read"
    text, points, _ = cv2.QRCodeDetector().detectAndDecode(image)
    assert points is not None, "no QR code found in the image"
    return text


@pytest.mark.parametrize(
    "address",
    [
        "http://192.168.1.23:8501/",
        "https://lesion-demo.example.org/app/",
        "http://[fd00::17]:8501/",
        "https://a-much-longer-host-name.lesion-demo.example.org:8443/with/a/base/path/",
    ],
)
def test_the_qr_code_reads_back_as_the_address(address: str) -> None:
    png = qr_png(address)
    assert decoded(png) == address
    height, width = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE).shape
    assert height == width and 300 <= width <= 440, "large enough to scan across a room, never scaled up past 440"


def test_no_qr_code_of_nothing() -> None:
    with pytest.raises(ValueError):
        qr_png("")


def test_the_address_a_phone_can_open() -> None:
    # A local name means nothing to a phone: this machine's network address takes its place, port kept.
    assert join_address("http://localhost:8501/ood?x=1#top", "", "192.168.1.23") == "http://192.168.1.23:8501/"
    assert join_address("http://127.0.0.1:8502/", "", "10.0.0.5") == "http://10.0.0.5:8502/"
    assert join_address("http://localhost:8501/", "", "fd00::17") == "http://[fd00::17]:8501/"
    # Without a network address the local name stays (the presenter can correct it on the page).
    assert join_address("http://localhost:8501/train", "", None) == "http://localhost:8501/"
    # A public name is kept as the presenter's browser used it, with the base path and not the page's.
    assert (
        join_address("https://demo.example.org/lesion/ood", "lesion", "10.0.0.5") == "https://demo.example.org/lesion/"
    )
    assert join_address(None, "", "10.0.0.5") == ""


def test_the_network_address_is_not_a_loopback_one() -> None:
    address = network_address()
    assert address is None or (not address.startswith("127.") and address.count(".") == 3)


def open_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, password: str | None) -> AppTest:
    monkeypatch.setenv("LESION_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("LESION_CHECKPOINT", raising=False)
    if password is None:
        monkeypatch.delenv("LESION_ADMIN_PASSWORD", raising=False)
    else:
        monkeypatch.setenv("LESION_ADMIN_PASSWORD", password)
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=180)
    at.switch_page("app_pages/model.py")  # a light page: the join code sits above every page
    at.run()
    assert not at.exception, at.exception
    return at


def shown_address(at: AppTest) -> str | None:
    """The address written under the code ("or type **...**"), None if there is none."""
    lines = [m.value for m in at.main.markdown if m.value.startswith("or type **")]
    return lines[0].removeprefix("or type **").removesuffix("**") if lines else None


def toggles(at: AppTest) -> list:
    return [toggle for toggle in at.sidebar.toggle if toggle.label == TOGGLE]


def test_only_the_presenter_can_show_the_join_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_app(monkeypatch, tmp_path, PASSWORD)
    assert toggles(at) == [], "a visitor must not put a QR code on the page"
    field = next(t for t in at.sidebar.text_input if t.label == "Presenter password")
    field.input(PASSWORD)
    next(b for b in at.sidebar.button if b.label == "Unlock").click()
    at.run()
    assert not at.exception, at.exception
    toggles(at)[0].set_value(True)
    at.run()
    assert not at.exception, at.exception
    assert [h.value for h in at.main.subheader] == [JOIN_CAPTION]
    address = at.main.text_input(key="join_address").value
    # AppTest has no browser URL: the app's default port on this machine's network address.
    assert address == join_address("http://localhost:8501/", "", network_address())
    assert len(at.main.image) == 1 and shown_address(at) == address


def test_the_presenter_can_correct_the_address_and_hide_the_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = open_app(monkeypatch, tmp_path, None)  # no password: local use, everything open
    toggles(at)[0].set_value(True)
    at.run()
    at.main.text_input(key="join_address").input("https://lesion-demo.example.org/").run()
    assert not at.exception, at.exception
    assert shown_address(at) == "https://lesion-demo.example.org/"
    at.main.text_input(key="join_address").input("").run()
    assert [i.value for i in at.main.info if "Type the address" in i.value]
    assert not at.main.image
    toggles(at)[0].set_value(False)
    at.run()
    assert not at.exception and JOIN_CAPTION not in [h.value for h in at.main.subheader]
