"""Reading images as users and datasets supply them.

:func:`load_image` is the only way an image enters the model: it accepts a path, bytes, a
file object or a PIL image; applies EXIF orientation; converts any mode to RGB; refuses
non-images, truncated files, tiny images and decompression bombs with a message a presenter
can read aloud; and, given ``short_side``, resizes so the shorter side has that length
(decoding JPEGs in draft mode first, so a 50-megapixel photo costs milliseconds, not seconds).
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lesion.errors import InvalidImage

ImageSource = str | os.PathLike | bytes | bytearray | IO[bytes] | Image.Image

MIN_SIDE = 32
# Above this many pixels we refuse to decode at all (Pillow's own bomb guard is a warning at
# ~89 MP and an error at twice that; we make the limit explicit and the message plain).
MAX_PIXELS = 120_000_000
MAX_BYTES = 50 * 1024 * 1024
#: The file types read as images: what the predict CLI finds in folders and the app's uploaders accept.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif")
# Image.open emits Pillow's DecompressionBombWarning (above ~89 MP) before we can look at the size;
# we check the size ourselves right after, so the warning is only noise. warnings.catch_warnings
# swaps process-wide state, so opens are serialised (reading a header takes microseconds).
_OPEN_LOCK = threading.Lock()
EXIF_ORIENTATION = 0x0112

try:  # HEIC/HEIF from phones, where the optional plugin is installed.
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover - optional dependency
    pass


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return Path(source).name
    return getattr(source, "name", None) or "the uploaded file"


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        if len(source) > MAX_BYTES:
            raise InvalidImage(f"The file is {len(source) / 2**20:.0f} MB; the limit is {MAX_BYTES // 2**20} MB.")
        stream: IO[bytes] = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidImage(f"{path.name}: no such file.")
        if path.stat().st_size > MAX_BYTES:
            raise InvalidImage(
                f"{path.name} is {path.stat().st_size / 2**20:.0f} MB; the limit is {MAX_BYTES // 2**20} MB."
            )
        # Read into memory (at most MAX_BYTES) so no file handle outlives this call.
        stream = io.BytesIO(path.read_bytes())
    else:
        stream = source
    name = _describe(source)
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except UnidentifiedImageError:
        raise InvalidImage(f"{name} is not an image we can read (JPEG, PNG, WebP, BMP, TIFF or HEIC).") from None
    except Image.DecompressionBombError:
        raise InvalidImage(f"{name} claims to be too large to open safely.") from None
    except (OSError, ValueError) as error:  # ValueError: e.g. a PNG text chunk that inflates past Pillow's limit
        raise InvalidImage(f"{name} could not be read as an image ({error}).") from None
    return image


def load_image(source: ImageSource, short_side: int | None = None) -> Image.Image:
    """Decode ``source`` to an RGB PIL image; with ``short_side``, resize the shorter side to it."""
    return load_image_with_size(source, short_side)[0]


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is displayed, i.e. after its EXIF orientation."""
    width, height = image.size
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: exif_transpose will ignore it too
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_image_with_size(source: ImageSource, short_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`load_image`, plus the image's full (width, height) after EXIF orientation.

    With JPEG draft mode the decoded image is smaller than the file's, so the full size is read
    from the header; the predictor needs it to map its heatmap back onto the original photo.
    """
    name = _describe(source)
    image = _open(source)
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise InvalidImage(
            f"{name} is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels); "
            f"the limit is {MAX_PIXELS / 1e6:.0f} megapixels."
        )
    if min(width, height) < MIN_SIDE:
        raise InvalidImage(f"{name} is only {width} x {height} pixels; a side must be at least {MIN_SIDE} pixels.")
    original_size = _oriented_size(image)
    try:
        if short_side is not None and image.format == "JPEG":
            # Draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale directly, never below
            # the requested size; EXIF may swap the sides, so ask for the short side on both.
            scale = short_side / min(width, height)
            image.draft("RGB", (max(1, int(width * scale)) + 1, max(1, int(height * scale)) + 1))
        image.load()
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
    except InvalidImage:
        raise
    except Image.DecompressionBombError:
        raise InvalidImage(f"{name} claims to be too large to open safely.") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise InvalidImage(f"{name} is damaged or truncated and cannot be read ({error}).") from None
    if short_side is not None:
        image = resize_short_side(image, short_side)
    return image, original_size


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the full range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        top = array.max() or 1.0
        return Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    """Resize so the shorter side equals ``short_side``, keeping the aspect ratio."""
    width, height = image.size
    scale = short_side / min(width, height)
    size = (max(short_side, round(width * scale)), max(short_side, round(height * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)


def jpeg_for_device(source: ImageSource) -> tuple[bytes, tuple[int, int]] | None:
    """The bytes and (width, height) of a JPEG a GPU decoder can take as is; None for anything else.

    Only plain baseline cases qualify: a path or bytes holding a complete RGB or grayscale JPEG
    within the size limits and without an EXIF rotation. Everything else (other formats, CMYK,
    rotated, truncated, too large or too small, unreadable) returns None, so the caller sends it
    through :func:`load_image_with_size`, which decodes it on the CPU or raises the same
    :class:`InvalidImage` as always: a device decoder never changes which images are refused.
    """
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            if not path.is_file() or path.stat().st_size > MAX_BYTES:
                return None
            data = path.read_bytes()
        except OSError:
            return None
    else:
        return None
    # SOI at the start and EOI at the end (some writers pad with zeros): a cut-off file is left
    # to Pillow, which names it damaged; a device decoder might fill the rest with grey instead.
    if len(data) > MAX_BYTES or not data.startswith(b"\xff\xd8") or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        width, height = image.size
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        usable = image.format == "JPEG" and image.mode in ("RGB", "L") and orientation in (0, 1)
    except Exception:  # noqa: BLE001 - anything odd goes the CPU way, which reports it properly
        return None
    if not usable or width * height > MAX_PIXELS or min(width, height) < MIN_SIDE:
        return None
    return data, (width, height)
