"""The predictor: verdict, calibrated probability, heatmap and OOD scores from ONE forward pass.

An image goes through :func:`lesion.images.load_image` and the checkpoint's evaluation transform
(exactly what ``train.evaluate`` uses), then :func:`lesion.model.forward_parts` once. The layer4
activations give the heatmap (only the head is differentiated, see :mod:`lesion.explain`), the
pooled features and logits give every fitted OOD score, and the temperature-scaled softmax gives
P(malignant): for a dx model (one output per diagnosis) the sum of the malignant diagnoses'
probabilities. A checkpoint saved with ``tta`` adds one batched pass over the flipped images and
averages the logits for the probabilities only. A :class:`Predictor` holds no per-call state, so one
instance can serve many threads.

Command line::

    python -m lesion.predict --checkpoint runs/demo/model.pt --out results.csv [--heatmaps DIR] PATH...
    torchrun --nproc_per_node=4 -m lesion.predict --device cuda --checkpoint ... --out results.csv PATH...

Exit status, as for ``python -m train`` and ``python -m train.evaluate``: 0 done, 1 failed (the
checkpoint cannot be used, or no input could be read), 2 usage (the command line itself is wrong).

``predict_batch`` keeps a GPU busy: the next chunk is read and decoded (plain JPEGs on the GPU
itself) while the current one is scored; crops travel as uint8 and are normalised per batch.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lesion import explain, ood
from lesion.checkpoint import check_checkpoint, load_checkpoint
from lesion.distributed import DistInfo, all_gather_objects, barrier, batch_aligned_shard, cleanup, init_distributed
from lesion.errors import InvalidCheckpoint, InvalidImage, LesionError
from lesion.images import ImageSource, jpeg_for_device, load_image, load_image_with_size
from lesion.labels import DX_CODES
from lesion.model import LayerStatistics, build_model, classifier, forward_parts
from lesion.regularize import flip_logits
from lesion.targets import output_probabilities, side_logits, target_of_checkpoint
from lesion.transforms import (
    centre_crop_uint8,
    crop_origin,
    eval_transform,
    normalise_batch,
    resize_short_side_tensor,
)

DECODE_THREADS = min(4, os.cpu_count() or 1)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif")


@dataclass
class Prediction:
    """What the model says about one image (higher OOD score = less like the training lesions)."""

    verdict: str  # "benign", "malignant", or "unknown" when the OOD detector rejects the image
    p_malignant: float  # calibrated (temperature-scaled) probability of malignancy
    decision_threshold: float  # malignant when p_malignant >= this
    ood_score: float  # score of the active detector; nan when the checkpoint has none
    ood_threshold: float  # rejected ("unknown") when ood_score > this
    ood_method: str
    accepted: bool  # passed the OOD check
    ood_scores: dict[str, float]  # every fitted detector, from the same forward pass
    heatmap: np.ndarray | None  # (image_height, image_width) float32 in [0, 1], or None
    cam_method: str
    target: int  # class index the heatmap explains
    timings: dict[str, float]  # seconds: decode, preprocess, forward, cam, ood, total
    image_width: int  # the original image, after EXIF orientation
    image_height: int
    probabilities: dict[str, float] = field(default_factory=dict)  # calibrated, per class name
    crop_box: tuple[float, float, float, float] | None = None  # what the network saw: left, top, right, bottom
    dx_probabilities: dict[str, float] = field(default_factory=dict)  # calibrated, per dx; empty for binary models
    dx_top: str = ""  # the most probable dx; "" for a binary model or a rejected ("unknown") image
    cam_target: str = ""  # what the heatmap explains: "malignant", "benign" or a dx code

    def to_dict(self, include_heatmap: bool = False) -> dict[str, Any]:
        """Plain JSON-able values (nan becomes None; the heatmap as nested lists if asked)."""

        def plain(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {key: plain(item) for key, item in value.items()}
            return value

        result = {
            key: plain(getattr(self, key))
            for key in (
                "verdict",
                "p_malignant",
                "decision_threshold",
                "ood_score",
                "ood_threshold",
                "ood_method",
                "accepted",
                "ood_scores",
                "cam_method",
                "target",
                "timings",
                "image_width",
                "image_height",
                "probabilities",
                "crop_box",
                "dx_probabilities",
                "dx_top",
                "cam_target",
            )
        }
        if include_heatmap:
            result["heatmap"] = None if self.heatmap is None else self.heatmap.tolist()
        return result


@dataclass
class _Prepared:
    """One decoded, preprocessed image and what is needed to map the heatmap back onto it."""

    pixels: torch.Tensor  # the network's view, 3 x S x S uint8: on the CPU, or on the device that decoded it
    original_size: tuple[int, int]  # (width, height)
    crop_box: tuple[float, float, float, float]  # the network's view, in original pixels
    decode_s: float
    preprocess_s: float


class Predictor:
    """A loaded checkpoint ready to classify images; safe to share between threads."""

    def __init__(self, checkpoint: dict[str, Any], device: str = "cpu", ood_method: str | None = None) -> None:
        checkpoint = check_checkpoint(checkpoint)
        # Everything but the weights (which live in .model): holding both would double the memory.
        self.checkpoint = {key: value for key, value in checkpoint.items() if key != "state_dict"}
        self.device = torch.device(device)
        self.class_names: list[str] = list(checkpoint["class_names"])
        if "malignant" not in self.class_names:
            raise InvalidCheckpoint(f"checkpoint classes {self.class_names} have no 'malignant'.")
        self.malignant_index = self.class_names.index("malignant")
        self.target = target_of_checkpoint(checkpoint)
        # The head's outputs in order: diagnoses for a dx model (format 2), else the class names.
        self.dx_names: list[str] = list(self.target.names) if self.target.kind == "dx" else []
        self._malignant_outputs = self.target.malignant_mask().to(self.device)
        self.image_size = int(checkpoint["image_size"])
        self.resize_size = int(checkpoint["resize_size"])
        self.temperature = float(checkpoint["temperature"])
        self.decision_threshold = float(checkpoint["decision_threshold"])
        self.mean = [float(v) for v in checkpoint["mean"]]
        self.std = [float(v) for v in checkpoint["std"]]
        # Test-time flips for the probability; the heatmap and OOD scores stay on the plain pass.
        self.tta = bool(checkpoint.get("tta", False))
        # Kept for callers that preprocess one PIL image themselves; the predictor crops uint8 pixels
        # and normalises whole batches with the same operations (see lesion.transforms.normalise_batch).
        self.transform = eval_transform(self.image_size, self.mean, self.std)
        self.model = _build(checkpoint).to(self.device).eval()
        ood_entry = _ood_entry(checkpoint.get("ood"))
        # Stats as float32 on the device once, so scoring converts nothing per call. A tensor that
        # detectors fitted alike share in the checkpoint stays shared (one copy, and one packed form).
        converted: dict[int, torch.Tensor] = {}

        def on_device(value: Any) -> Any:
            if not torch.is_tensor(value):
                return value
            if id(value) not in converted:
                # Ordinary tensors even when the caller is in torch.inference_mode: inference tensors
                # keep no version counter, so an in-place edit of the statistics would go unseen.
                with torch.inference_mode(False):
                    tensor = value.float().to(self.device)
                    converted[id(value)] = tensor.clone() if tensor.is_inference() else tensor
            return converted[id(value)]

        self.detectors: dict[str, dict[str, Any]] = {
            name: {key: on_device(value) for key, value in stats.items()}
            for name, stats in ood_entry["detectors"].items()
        }
        self.ood_available = bool(self.detectors)
        try:
            self.ood_thresholds: dict[str, float] = {name: float(s["threshold"]) for name, s in self.detectors.items()}
        except (KeyError, TypeError, ValueError, ArithmeticError) as error:
            raise InvalidCheckpoint(f"the checkpoint's OOD thresholds are unreadable ({error!r})") from None
        for name, value in self.ood_thresholds.items():
            if not math.isfinite(value):  # NaN would accept every photo, +inf too, -inf reject every lesion
                raise InvalidCheckpoint(f"the checkpoint's {name} OOD threshold is not a finite number ({value})")
        if ood_method is not None:
            self.ood_method = self._check_ood_method(ood_method)
        else:
            try:
                self.ood_method = self._check_ood_method(ood_entry.get("method") or "mahalanobis", asked=False)
            except ValueError as error:
                raise InvalidCheckpoint(f"the checkpoint's OOD method is unusable: {error}") from None
        # Layer statistics cost a little per pass: collect them only when a fitted detector uses them.
        self._needs_layers = any(getattr(ood.DETECTORS.get(name), "needs_layers", False) for name in self.detectors)
        self._layer_tap = LayerStatistics(self.model) if self._needs_layers else None
        self._check_detectors_fit()

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict | None]:
        """The single pass: (layer4 activations, features, logits, layer statistics or None)."""
        capture = self._layer_tap.capture() if self._layer_tap is not None else nullcontext(None)
        with torch.no_grad(), capture as layers:
            activations, features, logits = forward_parts(self.model, batch)
        return activations, features, logits, layers

    def _ood_scores(self, features: torch.Tensor, logits: torch.Tensor, layers: dict | None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return ood.score_all(self.detectors, features, logits, layers=layers, head=classifier(self.model))

    def _check_detectors_fit(self) -> None:
        """Score one blank image now, so OOD statistics that do not fit the network are refused at load.

        (A hand-edited or hostile checkpoint would otherwise fail on the first visitor's photo.)
        """
        if not self.detectors:
            return
        blank = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
        try:
            _, features, logits, layers = self._forward(blank)
            scores = self._ood_scores(features, logits, layers)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, ArithmeticError) as error:
            raise InvalidCheckpoint(f"the checkpoint's OOD statistics do not fit its network ({error})") from None
        # Statistics that score NaN (a NaN or zero in them) would reject every photo as unscorable.
        broken = [name for name, values in scores.items() if not bool(torch.isfinite(values).all())]
        if broken:
            raise InvalidCheckpoint(f"the checkpoint's {', '.join(broken)} OOD statistics give no finite score")

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", ood_method: str | None = None) -> Predictor:
        """Load ``path`` with :func:`lesion.checkpoint.load_checkpoint`; InvalidCheckpoint if unusable."""
        return cls(load_checkpoint(path, map_location="cpu"), device=device, ood_method=ood_method)

    def _check_ood_method(self, method: str, *, asked: bool = True) -> str:
        """``method`` if this checkpoint can score it, else ValueError (``asked``: the caller named it)."""
        if method not in ood.SCORERS:
            raise ValueError(f"unknown OOD method {method!r}; choose one of {', '.join(ood.SCORERS)}")
        if not self.ood_available and asked:
            raise ValueError(
                f"this checkpoint has no fitted OOD detectors (an intermediate checkpoint?), so it cannot score "
                f"{method!r}; use a run's model.pt, or leave the OOD method unset"
            )
        if self.ood_available and method not in self.detectors:
            raise ValueError(f"this checkpoint has no fitted {method!r} detector; it has {', '.join(self.detectors)}")
        return method

    # --- preprocessing ----------------------------------------------------------------------

    def _prepare(self, image: ImageSource) -> _Prepared:
        """Decode and resize on the CPU (Pillow), then cut the centre crop; InvalidImage if unreadable."""
        started = time.perf_counter()
        decoded, original_size = load_image_with_size(image, self.resize_size)
        decoded_at = time.perf_counter()
        pixels = centre_crop_uint8(decoded, self.image_size)
        return _Prepared(
            pixels=pixels,
            original_size=original_size,
            crop_box=self._crop_box(decoded.size, original_size),
            decode_s=decoded_at - started,
            preprocess_s=time.perf_counter() - decoded_at,
        )

    def _prepare_or_error(self, image: ImageSource) -> _Prepared | InvalidImage:
        try:
            return self._prepare(image)
        except InvalidImage as error:
            return error

    def _prepare_on_device(self, jpegs: Sequence[tuple[bytes, tuple[int, int]]]) -> list[_Prepared] | None:
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
            prepared.append(_Prepared(crop, original_size, self._crop_box((width, height), original_size), 0.0, 0.0))
        share = len(prepared)  # one batched decode: its time is shared equally
        preprocess_s = (time.perf_counter() - decoded_at) / share
        for item in prepared:
            item.decode_s, item.preprocess_s = (decoded_at - started) / share, preprocess_s
        return prepared

    def _prepare_chunk(self, images: Sequence[ImageSource], pool: ThreadPoolExecutor) -> list[_Prepared | InvalidImage]:
        """Every image of a chunk, decoded in ``pool``'s threads (and JPEGs on the GPU when there is one)."""
        results: list[_Prepared | InvalidImage | None] = [None] * len(images)
        if self.device.type == "cuda":
            # Reading the files and their headers is I/O: threads. The decoding itself is one call.
            jpegs = list(pool.map(jpeg_for_device, images))
            chosen = [i for i, jpeg in enumerate(jpegs) if jpeg is not None]
            on_device = self._prepare_on_device([jpegs[i] for i in chosen]) if chosen else None
            for index, item in zip(chosen, on_device or [], strict=False):
                results[index] = item
        rest = [i for i, item in enumerate(results) if item is None]
        for index, item in zip(rest, pool.map(self._prepare_or_error, [images[i] for i in rest]), strict=True):
            results[index] = item
        return results  # type: ignore[return-value]

    def _batch(self, prepared: Sequence[_Prepared]) -> torch.Tensor:
        """The normalised float batch on the predictor's device.

        uint8 crops travel (a quarter of the bytes of floats), through pinned memory and a
        non-blocking copy on CUDA; normalising happens once for the batch, where the model runs.
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

    def _crop_box(self, resized: tuple[int, int], original: tuple[int, int]) -> tuple[float, float, float, float]:
        """The centre crop (torchvision's rounding) in original-image pixels: left, top, right, bottom."""
        (width, height), crop = resized, self.image_size
        left, top = crop_origin(width, height, crop)
        sx, sy = original[0] / width, original[1] / height
        return left * sx, top * sy, (left + crop) * sx, (top + crop) * sy

    # --- the single pass --------------------------------------------------------------------

    def _run(
        self,
        prepared: Sequence[_Prepared],
        *,
        with_heatmap: bool,
        cam_method: str,
        target: int | None,
        ood_method: str | None,
        decision_threshold: float | None,
        ood_threshold: float | None,
        cam_target: str | None = None,
    ) -> list[Prediction]:
        cam_method = explain.check_method(cam_method)
        cam_target = self.check_cam_target(cam_target)
        method = self._check_ood_method(ood_method) if ood_method else self.ood_method
        decision = self.decision_threshold if decision_threshold is None else float(decision_threshold)
        threshold = self.ood_thresholds.get(method, float("nan")) if ood_threshold is None else float(ood_threshold)
        fitted = method in self.detectors  # else nothing to check: every image is accepted
        if math.isnan(threshold) and fitted:  # before the pass: a bad argument costs no network time
            raise ValueError("the OOD threshold must be a number, not NaN")
        started = time.perf_counter()
        batch = self._batch(prepared)
        # Through _forward, so the layer tap captures this pass for the multi-layer detectors.
        activations, features, logits, layers = self._forward(batch)
        if self.tta:
            with torch.no_grad():  # after the tapped pass: flips change neither the heatmap nor the OOD scores
                class_logits = flip_logits(self.model, batch, logits)
        else:
            class_logits = logits
        outputs = output_probabilities(class_logits, self.temperature).cpu()
        p_malignant = outputs[:, self._malignant_outputs.cpu()].sum(dim=1)
        forward_s = time.perf_counter() - started

        started = time.perf_counter()
        # Default target: the class the verdict names, so the map shows the evidence for it.
        sides = ["malignant" if float(p) >= decision else "benign" for p in p_malignant]
        names = [cam_target or side for side in sides]
        if target is not None:
            names = [self._output_name(int(target))] * len(prepared)
        low_res = self._low_resolution_cams(activations, names, cam_method) if with_heatmap else None
        cam_s = time.perf_counter() - started

        started = time.perf_counter()
        computed = self._ood_scores(features, logits, layers)
        # One copy to the host for every detector: each .cpu() would wait for the device.
        detector_names = list(computed)
        stacked = [computed[name].float().reshape(-1) for name in detector_names]
        columns = torch.stack(stacked, dim=1).cpu().tolist() if detector_names else [[] for _ in prepared]
        scores = {name: [row[j] for row in columns] for j, name in enumerate(detector_names)}
        ood_s = time.perf_counter() - started

        results = []
        share = len(prepared)  # batched work is shared equally between the images of the batch
        for i, item in enumerate(prepared):
            heatmap = None
            extra = 0.0
            if low_res is not None:
                placed_at = time.perf_counter()
                heatmap = explain.place_in_image(low_res[i], item.original_size, item.crop_box)
                extra = time.perf_counter() - placed_at
            ood_scores = {name: float(values[i]) for name, values in scores.items()}  # plain floats: no tensor indexing
            ood_score = ood_scores.get(method, float("nan"))
            # No fitted detector (nan): accepted, there is nothing to check. A fitted detector that
            # cannot score this image (nan) fails closed: the photo is not taken for a lesion.
            accepted = not (ood_score > threshold) and not (fitted and math.isnan(ood_score))
            p = float(p_malignant[i])
            dx_probabilities = {name: float(outputs[i, j]) for j, name in enumerate(self.dx_names)}
            verdict = "unknown" if not accepted else ("malignant" if p >= decision else "benign")
            timings = {
                "decode": item.decode_s,
                "preprocess": item.preprocess_s,
                "forward": forward_s / share,
                "cam": cam_s / share + extra,
                "ood": ood_s / share,
            }
            timings["total"] = sum(timings.values())
            results.append(
                Prediction(
                    verdict=verdict,
                    p_malignant=p,
                    decision_threshold=decision,
                    ood_score=ood_score,
                    ood_threshold=threshold,
                    ood_method=method,
                    accepted=accepted,
                    ood_scores=ood_scores,
                    heatmap=heatmap,
                    cam_method=cam_method,
                    target=self._target_index(names[i]),
                    timings=timings,
                    image_width=item.original_size[0],
                    image_height=item.original_size[1],
                    probabilities=self._class_probabilities(outputs[i], p),
                    crop_box=tuple(float(v) for v in item.crop_box),
                    dx_probabilities=dx_probabilities,
                    dx_top=max(dx_probabilities, key=dx_probabilities.get) if dx_probabilities and accepted else "",
                    cam_target=names[i],
                )
            )
        return results

    def _low_resolution_cams(self, activations: torch.Tensor, names: list[str], cam_method: str) -> torch.Tensor:
        """CAMs at layer4's resolution from the pass's own activations; only the head is differentiated."""
        uses_grads = explain.USES_GRADIENTS[cam_method]
        leaf, _, head_logits = explain.forward_head(self.model, activations, with_grad=uses_grads)
        grads = explain.score_gradients(leaf, self._cam_scores(head_logits, names)) if uses_grads else None
        return explain.low_resolution_cams(cam_method, leaf.detach(), grads).cpu()

    # --- what the heatmap explains ------------------------------------------------------------

    @property
    def cam_targets(self) -> list[str]:
        """What a heatmap can explain: "malignant", "benign", then each diagnosis of a dx model."""
        return ["malignant", "benign", *self.dx_names]

    def check_cam_target(self, cam_target: str | None) -> str | None:
        if cam_target is not None and cam_target not in self.cam_targets:
            raise ValueError(f"unknown heatmap target {cam_target!r}; this model offers {', '.join(self.cam_targets)}")
        return cam_target

    def _output_name(self, index: int) -> str:
        """The name of output ``index`` of the head (the legacy integer ``target``)."""
        names = self.dx_names or self.class_names
        if not 0 <= index < len(names):
            raise ValueError(f"target {index} is not an output of this model (0 to {len(names) - 1})")
        return names[index]

    def _target_index(self, name: str) -> int:
        """``Prediction.target``: the class index for a side, the output index for a diagnosis."""
        return self.class_names.index(name) if name in self.class_names else self.dx_names.index(name)

    def _cam_scores(self, logits: torch.Tensor, names: list[str]) -> torch.Tensor:
        """The scalar each image's heatmap explains, (N,).

        A diagnosis (or a binary model's class): its logit, as Grad-CAM's class target. A side of
        a dx model: the log-odds of P(malignant), logsumexp(malignant logits) - logsumexp(benign
        logits), negated for benign: the evidence for the probability the verdict is drawn from.
        """
        outputs = self.dx_names or self.class_names
        if not self.dx_names:
            index = torch.tensor([outputs.index(n) for n in names], device=logits.device)
            return logits.gather(1, index.view(-1, 1))[:, 0]
        sides = side_logits(logits, self._malignant_outputs)
        log_odds = sides[:, 1] - sides[:, 0]
        sign = torch.tensor([{"malignant": 1.0, "benign": -1.0}.get(n, 0.0) for n in names], device=logits.device)
        index = torch.tensor([outputs.index(n) if n in outputs else 0 for n in names], device=logits.device)
        return torch.where(sign != 0, sign * log_odds, logits.gather(1, index.view(-1, 1))[:, 0])

    def _class_probabilities(self, outputs: torch.Tensor, p: float) -> dict[str, float]:
        """Calibrated probability per class name (benign, malignant), whatever the head."""
        if not self.dx_names:
            return {name: float(outputs[j]) for j, name in enumerate(self.class_names)}
        return {name: (p if name == "malignant" else 1.0 - p) for name in self.class_names}

    # --- public API -------------------------------------------------------------------------

    def predict(
        self,
        image: ImageSource,
        cam_method: str = "gradcam",
        target: int | None = None,
        ood_method: str | None = None,
        with_heatmap: bool = True,
        decision_threshold: float | None = None,
        ood_threshold: float | None = None,
        cam_target: str | None = None,
    ) -> Prediction:
        """Classify one image (path, bytes, file object or PIL image); InvalidImage if unreadable.

        ``cam_target`` picks what the heatmap explains: "malignant", "benign" or a diagnosis of a
        dx model (see :attr:`cam_targets`); default: the verdict's side. ``target`` (an output
        index) is the older way to pick. ``decision_threshold`` and ``ood_threshold`` override the
        checkpoint's for this call.
        """
        started = time.perf_counter()
        prepared = self._prepare_one(image)
        prediction = self._run(
            [prepared],
            with_heatmap=with_heatmap,
            cam_method=cam_method,
            target=target,
            ood_method=ood_method,
            decision_threshold=decision_threshold,
            ood_threshold=ood_threshold,
            cam_target=cam_target,
        )[0]
        prediction.timings["total"] = time.perf_counter() - started
        return prediction

    def _prepare_one(self, image: ImageSource) -> _Prepared:
        """One image: a plain JPEG is decoded on the GPU when the predictor runs on one."""
        if self.device.type == "cuda":
            jpeg = jpeg_for_device(image)
            prepared = self._prepare_on_device([jpeg]) if jpeg is not None else None
            if prepared:
                return prepared[0]
        return self._prepare(image)

    def predict_batch(
        self,
        images: Iterable[ImageSource],
        batch_size: int = 16,
        with_heatmap: bool = False,
        cam_method: str = "gradcam",
        target: int | None = None,
        ood_method: str | None = None,
        decision_threshold: float | None = None,
        ood_threshold: float | None = None,
        cam_target: str | None = None,
    ) -> list[Prediction | InvalidImage]:
        """Classify many images, one forward pass per ``batch_size`` chunk.

        An unreadable image yields its :class:`InvalidImage` at its place; the batch goes on.
        """
        images = list(images)
        batch_size = max(1, int(batch_size))
        results: list[Prediction | InvalidImage | None] = [None] * len(images)
        starts = range(0, len(images), batch_size)

        # On a GPU two stages are in flight: while the model scores chunk k, chunk k+1 is read and
        # decoded (Pillow releases the GIL; JPEGs are decoded on the GPU in one batched call). On the
        # CPU decoding and the forward pass share the same cores, so chunks are prepared in turn.
        ahead_threads = 1 if self.device.type == "cuda" else 0
        with (
            ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool,
            ThreadPoolExecutor(max_workers=max(1, ahead_threads)) as ahead,
        ):

            def prepare(start: int) -> Future:
                chunk = images[start : start + batch_size]
                if ahead_threads:
                    return ahead.submit(self._prepare_chunk, chunk, pool)
                done: Future = Future()
                done.set_result(self._prepare_chunk(chunk, pool))
                return done

            pending = prepare(starts[0]) if starts else None
            for k, start in enumerate(starts):
                chunk = pending.result()
                pending = prepare(starts[k + 1]) if k + 1 < len(starts) else None
                good: list[tuple[int, _Prepared]] = []
                for index, prepared in enumerate(chunk, start=start):
                    if isinstance(prepared, InvalidImage):
                        results[index] = prepared
                    else:
                        good.append((index, prepared))
                if good:
                    predictions = self._run(
                        [item for _, item in good],
                        with_heatmap=with_heatmap,
                        cam_method=cam_method,
                        target=target,
                        ood_method=ood_method,
                        decision_threshold=decision_threshold,
                        ood_threshold=ood_threshold,
                        cam_target=cam_target,
                    )
                    for (index, _), prediction in zip(good, predictions, strict=True):
                        results[index] = prediction
        return results  # type: ignore[return-value]

    def probabilities(self, paths: Iterable[ImageSource], batch_size: int = 32) -> np.ndarray:
        """Calibrated P(malignant) per image (what train.evaluate scores); the first bad image raises."""
        results = self.predict_batch(paths, batch_size=batch_size, with_heatmap=False)
        for result in results:
            if isinstance(result, InvalidImage):
                raise result
        return np.array([result.p_malignant for result in results], dtype=np.float64)

    def dx_metrics(self, predictions: Sequence[Prediction], dx_true: Sequence[str]) -> dict[str, Any] | None:
        """Diagnosis figures (:func:`lesion.metrics.dx_metrics`) of these predictions; None for a binary model."""
        if not self.dx_names:
            return None
        from lesion.metrics import dx_metrics

        table = [[prediction.dx_probabilities[name] for name in self.dx_names] for prediction in predictions]
        return dx_metrics(dx_true, np.array(table), self.dx_names)


def _ood_entry(entry: Any) -> dict[str, Any]:
    """The checkpoint's ``ood`` entry with ``detectors`` as {name: {key: value}}; InvalidCheckpoint if it is not."""
    entry = entry or {}
    if not isinstance(entry, dict):
        raise InvalidCheckpoint(f"the checkpoint's OOD entry is a {type(entry).__name__}, not a mapping")
    detectors = entry.get("detectors") or {}
    if not isinstance(detectors, dict) or not all(
        isinstance(name, str) and isinstance(stats, dict) for name, stats in detectors.items()
    ):
        raise InvalidCheckpoint("the checkpoint's OOD detectors are not a mapping of names to statistics")
    method = entry.get("method")
    if method is not None and not isinstance(method, str):
        raise InvalidCheckpoint(f"the checkpoint's OOD method is a {type(method).__name__}, not a name")
    return {**entry, "detectors": detectors}


def _build(checkpoint: dict[str, Any]) -> torch.nn.Module:
    """The network described by the checkpoint, with its weights; InvalidCheckpoint on any mismatch."""
    outputs = len(checkpoint.get("dx_names") or checkpoint["class_names"])
    try:
        model = build_model(checkpoint["arch"], checkpoint["head"], num_classes=outputs)
    except (ValueError, KeyError) as error:
        raise InvalidCheckpoint(
            f"the checkpoint names a model this version cannot build ({checkpoint['arch']!r}, "
            f"{checkpoint['head']!r} head): {error}"
        ) from None
    state = checkpoint["state_dict"]
    if isinstance(state, dict):
        # Exported files store float16 weights (lesion.export); the network runs in float32 on every device.
        state = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).splitlines()[1:2] or [str(error)]
        raise InvalidCheckpoint(
            f"the checkpoint's weights do not fit a {checkpoint['arch']} with a {checkpoint['head']} head "
            f"({first[0].strip()[:200]})"
        ) from None
    return model


# --- command line -------------------------------------------------------------------------


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, and image files under folders (recursive, sorted)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            found.append(path)  # a missing file gets its error in its row
    return found


def get_args_parser() -> argparse.ArgumentParser:
    """The CLI's arguments (a function, so other launchers can extend them)."""
    parser = argparse.ArgumentParser(
        prog="python -m lesion.predict", description="Classify images with a lesion checkpoint; write one CSV row each."
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders (searched recursively)")
    parser.add_argument("--checkpoint", required=True, help="a model.pt written by training")
    parser.add_argument("--out", required=True, help="CSV file to write")
    parser.add_argument(
        "--heatmaps",
        default=None,
        help="folder for <stem>-<hash>_heatmap.png overlays (the hash tells same-named inputs apart; "
        "the CSV's heatmap column names each file)",
    )
    parser.add_argument("--ood-method", default=None, choices=sorted(ood.SCORERS), help="default: the checkpoint's")
    parser.add_argument("--cam-method", default="gradcam", choices=explain.CAM_METHODS)
    parser.add_argument(
        "--cam-target",
        default=None,
        help="what heatmaps explain: malignant, benign or a dx code (default: the verdict)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return parser


def heatmap_name(path: str | Path) -> str:
    """``<stem>-<8 hex>_heatmap.png``: the hex comes from the input's absolute path, so two ``photo.jpg``
    in different folders never overwrite each other, and the same input always gets the same name."""
    digest = hashlib.sha256(str(Path(path).resolve()).encode("utf-8")).hexdigest()[:8]
    return f"{Path(path).stem}-{digest}_heatmap.png"


def _row(path: Path, result: Prediction | InvalidImage, detector_names: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"path": str(path)}
    if isinstance(result, InvalidImage):
        row["error"] = str(result)
        return row
    row.update(
        verdict=result.verdict,
        p_malignant=f"{result.p_malignant:.6f}",
        decision_threshold=f"{result.decision_threshold:.6f}",
        ood_method=result.ood_method,
        ood_score=f"{result.ood_score:.6f}",
        ood_threshold=f"{result.ood_threshold:.6f}",
        accepted=result.accepted,
        cam_method=result.cam_method if result.heatmap is not None else "",
        image_width=result.image_width,
        image_height=result.image_height,
        error="",
    )
    for name in detector_names:
        row[f"ood_{name}"] = f"{result.ood_scores[name]:.6f}"
    if result.accepted:  # a rejected photo gets no diagnosis
        row["dx_top"] = result.dx_top
        row.update({f"p_{dx}": f"{p:.6f}" for dx, p in result.dx_probabilities.items() if dx in DX_CODES})
    return row


#: One column per diagnosis of the label map, whatever the model: empty where it has no such output.
DX_COLUMNS = ["dx_top", *(f"p_{dx}" for dx in DX_CODES)]


def _score(
    predictor: Predictor, images: Sequence[Path], args: argparse.Namespace, heatmap_dir: Path | None, bar: Any
) -> Iterator[tuple[dict[str, Any], bool]]:
    """(CSV row, whether the image was read) per image, in order, scored ``--batch-size`` at a time."""
    names = list(predictor.detectors)
    # Several batches per call keep predict_batch's decode-ahead busy; few enough that rows stream
    # out and image-sized heatmaps do not pile up in memory. A whole number of batches, so the
    # batches stay those of a single run (a torchrun shard starts on a batch boundary too).
    group = args.batch_size * (2 if heatmap_dir is not None else 16)
    for start in range(0, len(images), group):
        chunk = images[start : start + group]
        results = predictor.predict_batch(
            chunk,
            batch_size=args.batch_size,
            with_heatmap=heatmap_dir is not None,
            cam_method=args.cam_method,
            cam_target=args.cam_target,
        )
        for path, result in zip(chunk, results, strict=True):
            row = _row(path, result, names)
            if isinstance(result, Prediction) and heatmap_dir is not None and result.heatmap is not None:
                target = heatmap_dir / heatmap_name(path)
                explain.overlay(load_image(path), result.heatmap).save(target)
                row["heatmap"] = str(target)
            bar.update(1)
            yield row, isinstance(result, Prediction)


def _device_for(name: str, info: DistInfo) -> str:
    """Under torchrun, a bare ``cuda`` means this process's own GPU (LOCAL_RANK)."""
    return f"cuda:{info.local_rank}" if name == "cuda" and info.enabled else name


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 done, 1 failed, 2 usage: see the module's docstring).

    Under ``torchrun --nproc_per_node=N`` each process scores a contiguous run of whole batches of the
    sorted input list (:func:`lesion.distributed.batch_aligned_shard`: each image in the same batch as
    in a single run, so with the same float arithmetic) and rank 0 writes the one CSV, rows in the
    same order as a single run.
    """
    args = get_args_parser().parse_args(argv)
    info = init_distributed("cuda" if args.device.startswith("cuda") else "cpu")
    try:
        return _main(args, info)
    finally:
        cleanup(info)


def _main(args: argparse.Namespace, info: DistInfo) -> int:
    if args.batch_size < 1:
        if info.is_main:
            print(f"error: --batch-size must be at least 1, not {args.batch_size}", file=sys.stderr)
        return 2
    images = find_images(args.paths)
    if not images:
        if info.is_main:
            print("error: no input images (give image files or folders containing .jpg, .png, ...)", file=sys.stderr)
        return 2
    try:
        return _predict_files(args, images, info)
    except (LesionError, ValueError, OSError) as error:
        # Every rank loads the same checkpoint, so such errors usually repeat on each: say it once,
        # unless it is this process's own (a rank other than 0 names itself).
        prefix = f"rank {info.rank}: " if info.enabled and not info.is_main else ""
        if info.is_main or not isinstance(error, (LesionError, ValueError)):
            print(f"error: {prefix}{error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if info.is_main:
            print("error: interrupted", file=sys.stderr)
        return 1


def _predict_files(args: argparse.Namespace, images: list[Path], info: DistInfo) -> int:
    from tqdm import tqdm

    predictor = Predictor.from_checkpoint(
        args.checkpoint, device=_device_for(args.device, info), ood_method=args.ood_method
    )
    predictor.check_cam_target(args.cam_target)
    heatmap_dir = Path(args.heatmaps) if args.heatmaps else None
    if heatmap_dir:
        heatmap_dir.mkdir(parents=True, exist_ok=True)
    names = list(predictor.detectors)
    columns = ["path", "verdict", "p_malignant", "decision_threshold", "ood_method", "ood_score", "ood_threshold"]
    columns += ["accepted", "cam_method", "image_width", "image_height", "error"] + [f"ood_{n}" for n in names]
    columns += ["heatmap"] + DX_COLUMNS
    out = Path(args.out)
    bounds = batch_aligned_shard(len(images), args.batch_size, info)
    shard = images[bounds.start : bounds.stop]
    with tqdm(total=len(shard), unit="img", file=sys.stderr, disable=not info.is_main) as bar:
        if not info.enabled:
            # One process: rows are written as they come, so a long run leaves a partial CSV behind.
            out.parent.mkdir(parents=True, exist_ok=True)
            processed = 0
            with out.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns, restval="")
                writer.writeheader()
                for row, ok in _score(predictor, images, args, heatmap_dir, bar):
                    writer.writerow(row)
                    processed += ok
        else:
            scored = list(_score(predictor, shard, args, heatmap_dir, bar))
            shards = all_gather_objects(scored, info)
            processed = sum(ok for part in shards for _, ok in part)
            if info.is_main:
                # Contiguous shards in rank order: concatenated, they are the inputs in order.
                rows = [row for part in shards for row, _ in part]
                out.parent.mkdir(parents=True, exist_ok=True)
                with out.open("w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=columns, restval="")
                    writer.writeheader()
                    writer.writerows(rows)
            barrier(info)
    if not processed:
        if info.is_main:
            print(f"error: none of the {len(images)} input(s) could be read as an image; see {out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
