"""From image files to the predictor's input batch: decode, resize, centre crop, batch, normalise.

The operations are those of the evaluation transform (:func:`lesion.transforms.eval_transform`),
applied in a cheaper order: crops travel as uint8 (a quarter of the bytes of floats) and are
normalised once per batch where the model runs. On a GPU plain JPEGs are decoded there in one
batched call, and the next chunk of a batch is read while the current one is scored (decode-ahead).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from lesion.errors import InvalidImage
from lesion.images import ImageSource, jpeg_for_device, load_image_with_size
from lesion.transforms import centre_crop_uint8, crop_origin, normalise_batch, resize_short_side_tensor

DECODE_THREADS = min(4, os.cpu_count() or 1)

Box = tuple[float, float, float, float]


@dataclass
class Prepared:
    """One decoded, preprocessed image and what is needed to map the heatmap back onto it."""

    pixels: torch.Tensor  # the network's view, 3 x S x S uint8: on the CPU, or on the device that decoded it
    original_size: tuple[int, int]  # (width, height)
    crop_box: Box  # the network's view, in original pixels
    decode_s: float
    preprocess_s: float


@dataclass(frozen=True)
class Preprocessor:
    """A checkpoint's preprocessing (sizes and normalisation) for one device."""

    image_size: int  # crop side the network sees
    resize_size: int  # shorter side before the centre crop
    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device

    def prepare(self, image: ImageSource) -> Prepared:
        """Decode and resize on the CPU (Pillow), then cut the centre crop; InvalidImage if unreadable."""
        started = time.perf_counter()
        decoded, original_size = load_image_with_size(image, self.resize_size)
        decoded_at = time.perf_counter()
        pixels = centre_crop_uint8(decoded, self.image_size)
        return Prepared(
            pixels=pixels,
            original_size=original_size,
            crop_box=self.crop_box(decoded.size, original_size),
            decode_s=decoded_at - started,
            preprocess_s=time.perf_counter() - decoded_at,
        )

    def prepare_one(self, image: ImageSource) -> Prepared:
        """One image: a plain JPEG is decoded on the GPU when the device is one."""
        if self.device.type == "cuda":
            jpeg = jpeg_for_device(image)
            prepared = self.prepare_on_device([jpeg]) if jpeg is not None else None
            if prepared:
                return prepared[0]
        return self.prepare(image)

    def _prepare_or_error(self, image: ImageSource) -> Prepared | InvalidImage:
        try:
            return self.prepare(image)
        except InvalidImage as error:
            return error

    def prepare_on_device(self, jpegs: Sequence[tuple[bytes, tuple[int, int]]]) -> list[Prepared] | None:
        """Decode JPEGs on the GPU in one batched call, then resize and crop them there.

        None when the decoder refuses the batch: the caller then takes the CPU path for these
        images, which either reads them or raises the usual InvalidImage.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        started = time.perf_counter()
        try:
            encoded = [torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()) for data, _ in jpegs]
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except Exception:  # noqa: BLE001 - any refusal (nvjpeg, memory, a torchvision without it): CPU path
            return None
        decoded_at = time.perf_counter()
        prepared = []
        for image, (_, original_size) in zip(decoded, jpegs, strict=True):
            resized = resize_short_side_tensor(image, self.resize_size)
            height, width = resized.shape[1:]
            left, top = crop_origin(width, height, self.image_size)
            crop = resized[:, top : top + self.image_size, left : left + self.image_size]
            prepared.append(Prepared(crop, original_size, self.crop_box((width, height), original_size), 0.0, 0.0))
        share = len(prepared)  # one batched decode: its time is shared equally
        preprocess_s = (time.perf_counter() - decoded_at) / share
        for item in prepared:
            item.decode_s, item.preprocess_s = (decoded_at - started) / share, preprocess_s
        return prepared

    def prepare_chunk(self, images: Sequence[ImageSource], pool: ThreadPoolExecutor) -> list[Prepared | InvalidImage]:
        """Every image of a chunk, decoded in ``pool``'s threads (and JPEGs on the GPU when there is one)."""
        results: list[Prepared | InvalidImage | None] = [None] * len(images)
        if self.device.type == "cuda":
            # Reading the files and their headers is I/O: threads. The decoding itself is one call.
            jpegs = list(pool.map(jpeg_for_device, images))
            chosen = [i for i, jpeg in enumerate(jpegs) if jpeg is not None]
            on_device = self.prepare_on_device([jpegs[i] for i in chosen]) if chosen else None
            for index, item in zip(chosen, on_device or [], strict=False):
                results[index] = item
        rest = [i for i, item in enumerate(results) if item is None]
        for index, item in zip(rest, pool.map(self._prepare_or_error, [images[i] for i in rest]), strict=True):
            results[index] = item
        return results  # type: ignore[return-value]

    def chunks(
        self, images: Sequence[ImageSource], batch_size: int
    ) -> Iterator[tuple[int, list[Prepared | InvalidImage]]]:
        """(index of the chunk's first image, its prepared images) for every ``batch_size`` chunk, in order.

        On a GPU two stages are in flight: while the caller scores chunk k, chunk k+1 is read and
        decoded (Pillow releases the GIL; JPEGs are decoded on the GPU in one batched call). On the
        CPU decoding and the forward pass share the same cores, so chunks are prepared in turn.
        """
        starts = range(0, len(images), batch_size)
        ahead_threads = 1 if self.device.type == "cuda" else 0
        with (
            ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool,
            ThreadPoolExecutor(max_workers=max(1, ahead_threads)) as ahead,
        ):

            def prepare(start: int) -> Future:
                chunk = images[start : start + batch_size]
                if ahead_threads:
                    return ahead.submit(self.prepare_chunk, chunk, pool)
                done: Future = Future()
                done.set_result(self.prepare_chunk(chunk, pool))
                return done

            pending = prepare(starts[0]) if starts else None
            for k, start in enumerate(starts):
                chunk = pending.result()
                pending = prepare(starts[k + 1]) if k + 1 < len(starts) else None
                yield start, chunk

    def batch(self, prepared: Sequence[Prepared]) -> torch.Tensor:
        """The normalised float batch on the device.

        uint8 crops travel through pinned memory and a non-blocking copy on CUDA; normalising
        happens once for the batch, where the model runs.
        """
        pixels = [item.pixels for item in prepared]
        if self.device.type == "cuda":
            on_host = [i for i, tensor in enumerate(pixels) if tensor.device.type == "cpu"]
            if on_host:
                moved = torch.stack([pixels[i] for i in on_host]).pin_memory().to(self.device, non_blocking=True)
                for j, i in enumerate(on_host):
                    pixels[i] = moved[j]
        # Stacked in their H x W x C layout (plain copies), normalised, then made contiguous once:
        # the one layout change happens on floats, batched, where the model runs.
        batch = torch.stack([tensor.permute(1, 2, 0) for tensor in pixels]).permute(0, 3, 1, 2).to(self.device)
        return normalise_batch(batch, self.mean, self.std).contiguous()

    def crop_box(self, resized: tuple[int, int], original: tuple[int, int]) -> Box:
        """The centre crop (torchvision's rounding) in original-image pixels: left, top, right, bottom."""
        (width, height), crop = resized, self.image_size
        left, top = crop_origin(width, height, crop)
        sx, sy = original[0] / width, original[1] / height
        return left * sx, top * sy, (left + crop) * sx, (top + crop) * sy
