"""A corpus of awkward files, built at test time (never committed): what visitors really upload.

:func:`build_corpus` writes every file into a folder and returns one :class:`Case` each, with the
outcome the app owes the visitor: ``"verdict"`` (a benign / malignant / unknown answer) or
``"refused"`` (a plain :class:`lesion.errors.InvalidImage` message). Anything else -- a traceback,
an exception of another type, a hang -- is a bug. Headers that claim huge sizes are written by
hand, so those files stay a few hundred bytes.

Used by tests/test_hostile.py and bench/experiments/hostile.py.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLE_LESION = REPO / "assets" / "samples" / "lesions" / "ISIC_0000032.jpg"
SAMPLE_PHOTO = REPO / "assets" / "samples" / "ood" / "animal_image1.jpg"
# What the Predict page's uploader accepts (lesion_app.predict_view.UPLOAD_TYPES); anything else is renamed
# with ".jpg" appended, as a visitor who wants to get past the file picker would do.
UPLOADABLE = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif"}
# The 50-megapixel photo of a modern phone (8660 x 5774 = 50.0 MP).
BIG_SIZE = (8660, 5774)


@dataclass(frozen=True)
class Case:
    """One hostile file and what the app owes the visitor for it."""

    name: str  # short identifier, e.g. "jpeg-truncated-50%"
    path: Path  # the file on disk
    expectation: str  # "verdict" or "refused"
    what: str  # one line saying what the file is
    # (height, width) the heatmap must have (the displayed size, after EXIF orientation), when checked.
    heatmap_shape: tuple[int, int] | None = None
    skip: str = ""  # non-empty: the case could not be built here, and why

    @property
    def upload_name(self) -> str:
        """The file name to give the uploader (its extension must pass the page's type filter)."""
        return self.path.name if self.path.suffix.lower() in UPLOADABLE else self.path.name + ".jpg"

    @property
    def data(self) -> bytes:
        """The file's bytes."""
        return self.path.read_bytes()


# ---------------------------------------------------------------------------- helpers


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _lesion(size: tuple[int, int] | None = None) -> Image.Image:
    with Image.open(SAMPLE_LESION) as image:
        image = image.convert("RGB")
        return image.resize(size, Image.Resampling.BILINEAR) if size else image.copy()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    """A PNG chunk with a correct CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def _png_claiming(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose IHDR claims ``width`` x ``height`` RGB pixels (its data is one empty row)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0")) + _chunk(b"IEND", b"")


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 marker is patched to claim ``width`` x ``height`` pixels."""
    data = bytearray(_encode(_lesion((64, 64)), "JPEG", quality=80))
    sof = data.find(b"\xff\xc0")
    assert sof > 0, "baseline JPEG without SOF0"
    # SOF0: FFC0, length (2), precision (1), height (2), width (2), ...
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _png_with_bad_crc(image: Image.Image, chunk: bytes) -> bytes:
    """A valid PNG, then the CRC of its first ``chunk`` chunk flipped."""
    data = bytearray(_encode(image, "PNG"))
    at = data.find(chunk) - 4  # start of the chunk (length field)
    length = struct.unpack(">I", data[at : at + 4])[0]
    crc_at = at + 8 + length
    data[crc_at] ^= 0xFF
    return bytes(data)


def _png_with_ztxt_bomb(image: Image.Image, before: bytes) -> bytes:
    """A valid PNG carrying a zTXt chunk that inflates to 64 MB (a text-chunk bomb), placed before ``before``.

    Before IDAT it is read when the file is opened; before IEND, when the pixels are decoded.
    """
    data = _encode(image, "PNG")
    at = data.find(before) - 4
    payload = b"Comment\0\0" + zlib.compress(b"\0" * (64 * 2**20), 9)
    return data[:at] + _chunk(b"zTXt", payload) + data[at:]


def _jpeg_with_garbage_exif(image: Image.Image) -> bytes:
    """A valid JPEG whose APP1 'Exif' segment holds random bytes instead of a TIFF structure."""
    data = _encode(image, "JPEG", quality=85)
    junk = b"Exif\0\0" + np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8).tobytes()
    segment = b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk
    return data[:2] + segment + data[2:]


def _pdf() -> bytes:
    return (
        b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
        b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
        b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 200]>>endobj\n"
        b"xref\n0 4\n0000000000 65535 f \ntrailer<</Size 4/Root 1 0 R>>\nstartxref\n0\n%%EOF\n"
    )


def _zip_of(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


SVG = (
    b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="200" height="200">'
    b'<circle cx="100" cy="100" r="80" fill="brown"/><script>alert(1)</script></svg>\n'
)
HTML = b"<!doctype html><html><body><img src=x onerror=alert(1)><h1>not a photo</h1></body></html>\n"


# ---------------------------------------------------------------------------- the corpus


def build_corpus(directory: str | Path, big: bool = True) -> list[Case]:
    """Write every hostile file into ``directory``; return the cases (>= 25; ``big`` adds the 50 MP photo)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, filename: str, data: bytes | None, expectation: str, what: str, **extra) -> None:
        path = directory / filename
        if data is not None:
            path.write_bytes(data)
        cases.append(Case(name, path, expectation, what, **extra))

    lesion = _lesion()  # 180 x 180 RGB
    jpeg = _encode(lesion, "JPEG", quality=90)
    png = _encode(lesion, "PNG")

    # --- not images at all
    add("empty", "empty.jpg", b"", "refused", "0 bytes")
    add("one-byte", "one_byte.jpg", b"\xff", "refused", "a single byte")
    add("random-bytes", "random.png", np.random.default_rng(0).bytes(4096), "refused", "4 KB of random bytes")
    add("text-as-jpg", "notes.jpg", b"just some text, not a picture\n" * 20, "refused", "plain text renamed .jpg")
    add("html-as-jpg", "page.jpg", HTML, "refused", "HTML with a script renamed .jpg")
    add("pdf", "document.pdf", _pdf(), "refused", "a one-page PDF")
    add("zip", "photos.zip", _zip_of("lesion.jpg", jpeg), "refused", "a ZIP holding a JPEG")
    add("svg", "drawing.svg", SVG, "refused", "an SVG with a <script>")
    add("jpeg-magic-only", "magic.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 64, "refused", "JPEG magic bytes, then zeros")

    # --- damaged images
    for percent in (10, 50, 90):
        cut = jpeg[: len(jpeg) * percent // 100]
        add(f"jpeg-truncated-{percent}%", f"truncated_{percent}.jpg", cut, "refused", f"JPEG cut at {percent} %")
    add("png-truncated-50%", "truncated_50.png", png[: len(png) // 2], "refused", "PNG cut at 50 %")
    add(
        "png-bad-crc-ihdr",
        "bad_crc_ihdr.png",
        _png_with_bad_crc(lesion, b"IHDR"),
        "refused",
        "PNG whose IHDR checksum is wrong",
    )
    # Pillow (like browsers) does not verify image-data CRCs; the pixels themselves are intact.
    add(
        "png-bad-crc-idat",
        "bad_crc_idat.png",
        _png_with_bad_crc(lesion, b"IDAT"),
        "verdict",
        "PNG whose image-data checksum is wrong (pixels intact)",
    )
    bomb = _png_with_ztxt_bomb
    add("png-ztxt-bomb-head", "ztxt_head.png", bomb(lesion, b"IDAT"), "refused", "zTXt inflating to 64 MB, before data")
    # After the pixels, Pillow stops inflating at its MAX_TEXT_CHUNK limit and drops the text: the image is fine.
    add("png-ztxt-bomb-tail", "ztxt_tail.png", bomb(lesion, b"IEND"), "verdict", "zTXt inflating to 64 MB, after data")

    # --- sizes
    add("1x1", "one_pixel.png", _encode(Image.new("RGB", (1, 1), "brown"), "PNG"), "refused", "1 x 1 pixel")
    add("10x10000", "sliver.png", _encode(_lesion((10, 10000)), "PNG"), "refused", "10 x 10000 pixels")
    add(
        "40x10000",
        "strip.png",
        _encode(_lesion((40, 10000)), "PNG"),
        "verdict",
        "40 x 10000 pixels (extreme aspect ratio)",
        heatmap_shape=(10000, 40),
    )
    add("png-claims-30000^2", "claims_huge.png", _png_claiming(30000, 30000), "refused", "PNG header: 30000 x 30000")
    add("jpeg-claims-30000^2", "claims_huge.jpg", _jpeg_claiming(30000, 30000), "refused", "JPEG SOF: 30000 x 30000")

    # --- modes and formats that must work
    gray16 = (np.asarray(lesion.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    add("png-16bit", "gray16.png", _encode(Image.fromarray(gray16), "PNG"), "verdict", "16-bit grey PNG")
    add("jpeg-cmyk", "cmyk.jpg", _encode(lesion.convert("CMYK"), "JPEG"), "verdict", "CMYK JPEG")
    rgba = lesion.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(lesion.size))
    add("png-rgba", "rgba.png", _encode(rgba, "PNG"), "verdict", "RGBA PNG with a gradient alpha")
    add("png-la", "la.png", _encode(lesion.convert("LA"), "PNG"), "verdict", "grey + alpha (LA) PNG")
    add("png-p", "palette.png", _encode(lesion.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "verdict", "P")
    add("jpeg-gray", "gray.jpg", _encode(lesion.convert("L"), "JPEG"), "verdict", "greyscale (L) JPEG")
    add("bmp", "lesion.bmp", _encode(lesion, "BMP"), "verdict", "BMP")
    add("webp", "lesion.webp", _encode(lesion, "WEBP", quality=80), "verdict", "WebP")
    frames = [lesion, lesion.rotate(90), lesion.rotate(180)]
    add(
        "gif-animated",
        "animated.gif",
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        "verdict",
        "animated GIF, 3 frames (the first is used)",
    )
    add(
        "tiff-multipage",
        "pages.tif",
        _encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "verdict",
        "3-page TIFF (the first page is used)",
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the visitor sees it portrait
    add(
        "jpeg-exif-rotated",
        "rotated.jpg",
        _encode(_lesion((240, 160)), "JPEG", exif=exif, quality=90),
        "verdict",
        "240 x 160 JPEG with EXIF orientation 6 (shown 160 x 240)",
        heatmap_shape=(240, 160),
    )
    add("jpeg-garbage-exif", "bad_exif.jpg", _jpeg_with_garbage_exif(lesion), "verdict", "JPEG with a junk EXIF block")
    add("jpeg-trailing-junk", "trailing.jpg", jpeg + b"\0" * 1000 + b"PK\x03\x04", "verdict", "JPEG + appended bytes")
    try:
        from pillow_heif import from_pillow

        buffer = io.BytesIO()
        from_pillow(lesion).save(buffer, format="HEIF", quality=80)
        add("heic", "lesion.heic", buffer.getvalue(), "verdict", "HEIC (iPhone)")
    except Exception as error:  # the encoder is optional in pillow-heif builds
        add("heic", "lesion.heic", b"", "verdict", "HEIC (iPhone)", skip=f"pillow-heif cannot encode here: {error}")

    if big:
        with Image.open(SAMPLE_PHOTO) as photo:
            large = photo.convert("RGB").resize(BIG_SIZE, Image.Resampling.BILINEAR)
        add(
            "jpeg-50mp",
            "fifty_megapixels.jpg",
            _encode(large, "JPEG", quality=85),
            "verdict",
            f"valid {BIG_SIZE[0]} x {BIG_SIZE[1]} JPEG (50 MP)",
            heatmap_shape=(BIG_SIZE[1], BIG_SIZE[0]),
        )
        del large
    return cases
