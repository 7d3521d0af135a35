"""Images as users upload them: orientation, modes, formats, sizes, bombs and non-images."""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lesion.images
from lesion.errors import InvalidImage
from lesion.images import MIN_SIDE, load_image, load_image_with_size

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = sorted((ROOT / "assets" / "samples" / "lesions").glob("*.jpg"))[0]


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _gradient(width: int = 80, height: int = 60) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8))


def test_exif_orientation_is_applied():
    # A landscape picture whose EXIF says "rotate 90° clockwise to display" (orientation 6).
    image = _gradient(80, 60)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(image, "JPEG", exif=exif, quality=95)
    loaded, size = load_image_with_size(data)
    assert loaded.size == (60, 80) and size == (60, 80)
    expected = np.asarray(image.transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    assert np.abs(np.asarray(loaded, dtype=np.int16) - expected).mean() < 4


def test_original_size_survives_draft_mode():
    with Image.open(SAMPLE) as image:
        full = image.size
    loaded, size = load_image_with_size(SAMPLE, short_side=40)
    assert size == full
    assert min(loaded.size) == 40


@pytest.mark.parametrize(
    "mode",
    ["RGBA", "LA", "P", "CMYK", "L", "1", "I;16", "I", "F"],
)
def test_any_mode_becomes_rgb(mode):
    base = _gradient()
    if mode == "I;16":
        array = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        image = Image.fromarray(array)  # 16-bit grayscale
        assert image.mode.startswith("I;16")
        data = _encode(image, "PNG")
    else:
        image = base.convert(mode)
        fmt = "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
        data = _encode(image, fmt)
    loaded = load_image(data)
    assert loaded.mode == "RGB" and loaded.size == base.size
    if mode == "I;16":
        # 16-bit values are scaled onto 8 bits (brightest pixel -> 255) instead of clipping to white.
        gray = np.asarray(base.convert("L"), dtype=np.float64)
        expected = gray * 255 / gray.max()
        assert np.abs(np.asarray(loaded, dtype=np.int16)[..., 0] - expected).max() <= 2


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    assert np.asarray(load_image(_encode(image, "PNG")))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF"])
def test_common_formats(fmt):
    loaded = load_image(_encode(_gradient(), fmt))
    assert loaded.mode == "RGB" and loaded.size == (80, 60)


def test_heic_when_the_encoder_works():
    pillow_heif = pytest.importorskip("pillow_heif")
    try:
        data = _encode(_gradient(), "HEIF")
    except Exception as error:  # pragma: no cover - depends on the wheel's encoder
        pytest.skip(f"pillow-heif cannot encode HEIF here: {error}")
    assert pillow_heif is not None
    loaded = load_image(data)
    assert loaded.mode == "RGB" and loaded.size == (80, 60)


def test_sources_path_bytes_file_and_pil_agree():
    from_path = np.asarray(load_image(SAMPLE, 73))
    from_bytes = np.asarray(load_image(SAMPLE.read_bytes(), 73))
    with SAMPLE.open("rb") as handle:
        from_file = np.asarray(load_image(handle, 73))
    with Image.open(SAMPLE) as image:
        from_pil = np.asarray(load_image(image, 73))
    assert np.array_equal(from_path, from_bytes) and np.array_equal(from_path, from_file)
    assert np.array_equal(from_path, from_pil)


def test_tiny_images_are_refused_with_a_reason():
    with pytest.raises(InvalidImage, match=f"at least {MIN_SIDE} pixels"):
        load_image(_encode(_gradient(MIN_SIDE - 1, 100), "PNG"))
    assert load_image(_encode(_gradient(MIN_SIDE, MIN_SIDE), "PNG")).size == (MIN_SIDE, MIN_SIDE)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny (wrong) data chunk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")
    )


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 frame header is patched to claim width x height."""
    data = bytearray(_encode(_gradient(), "JPEG"))
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("make", [_png_header, _jpeg_claiming], ids=["png", "jpeg"])
def test_decompression_bomb_is_refused_without_decoding(make):
    data = make(30000, 30000)
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any warning escaping would fail the test
            with pytest.raises(InvalidImage, match="too large"):
                load_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20  # decoding 900 megapixels would need 2.7 GB


def test_between_pillows_warning_and_our_limit_no_warning_escapes():
    # 100 MP: above Pillow's warning level (~89 MP), below our refusal (120 MP). The header lies
    # about the data, so decoding fails as truncated, but no DecompressionBombWarning is shown.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidImage, match="damaged or truncated"):
            load_image(_png_header(10000, 10000))


def test_over_our_limit_is_refused_with_a_plain_message():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidImage, match="megapixels"):
            load_image(_png_header(12000, 11000))


def test_large_jpeg_decodes_in_draft_mode(tmp_path, monkeypatch):
    # 50 megapixels: libjpeg's draft mode decodes it at 1/8 scale (1083 x 722), never in full.
    path = tmp_path / "big.jpg"
    Image.new("RGB", (8660, 5774), (200, 120, 90)).save(path, quality=80)
    decoded_sizes = []
    resize = lesion.images.resize_short_side

    def spy(image, short_side):
        decoded_sizes.append(image.size)
        return resize(image, short_side)

    monkeypatch.setattr(lesion.images, "resize_short_side", spy)
    loaded, size = load_image_with_size(path, short_side=256)
    assert size == (8660, 5774) and min(loaded.size) == 256
    assert decoded_sizes == [(1083, 722)]


def test_truncated_jpeg_is_refused():
    data = SAMPLE.read_bytes()
    with pytest.raises(InvalidImage, match="damaged or truncated"):
        load_image(data[: len(data) // 3])


@pytest.mark.parametrize(
    "data",
    [
        b"just some text, certainly not a picture\n" * 10,
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><rect width="100" height="100"/></svg>',
        b"",
    ],
    ids=["text", "pdf", "svg", "empty"],
)
def test_non_images_are_refused_with_a_readable_message(data):
    with pytest.raises(InvalidImage, match="not an image we can read"):
        load_image(data)


def test_zip_is_refused():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", "hello")
    with pytest.raises(InvalidImage, match="not an image"):
        load_image(buffer.getvalue())


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(InvalidImage, match="no such file"):
        load_image(tmp_path / "nope.jpg")
