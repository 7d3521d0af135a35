"""The predictor: verdict, calibrated probability, heatmap and OOD scores from ONE forward pass.

An image goes through :mod:`lesion.preprocess` (exactly the evaluation transform that
``train.evaluate`` uses), then :func:`lesion.model.forward_parts` once. The last stage's
activations give the heatmap (only the head is differentiated, see :mod:`lesion.explain`), the
pooled features and logits give every fitted OOD score, and the temperature-scaled softmax gives
P(malignant) (:func:`lesion.targets.p_malignant`). :func:`lesion.verdict.decide` turns them into the
verdict. A checkpoint saved with ``tta`` adds one batched pass over the flipped images and averages
the logits for the probabilities only. A :class:`Predictor` holds no per-call state, so one instance
can serve many threads.

The command line lives in :mod:`train.predict`; ``python -m lesion.predict`` runs it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lesion import conformal, explain, ood
from lesion.checkpoint import (
    check_checkpoint,
    explanation_entries,
    load_checkpoint,
    model_from_checkpoint,
    ood_entry,
    ood_thresholds,
    resolve_ood_method,
)
from lesion.errors import InvalidCheckpoint, InvalidImage
from lesion.images import ImageSource
from lesion.model import LayerStatistics, classifier, feature_dim, forward_parts
from lesion.prediction import Outcome, Prediction, Settings, make_prediction, set_inputs
from lesion.preprocess import Prepared, Preprocessor
from lesion.regularize import flip_logits
from lesion.similar import SimilarIndex, blended
from lesion.targets import (
    cam_targets,
    class_probabilities,
    explained_scores,
    output_index,
    output_name,
    output_probabilities,
    p_malignant,
    target_of_checkpoint,
)
from lesion.verdict import side


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
        self.image_size = int(checkpoint["image_size"])
        self.resize_size = int(checkpoint["resize_size"])
        self.temperature = float(checkpoint["temperature"])
        self.decision_threshold = float(checkpoint["decision_threshold"])
        self.mean = [float(v) for v in checkpoint["mean"]]
        self.std = [float(v) for v in checkpoint["std"]]
        self.preprocessor = Preprocessor(self.image_size, self.resize_size, self.mean, self.std, self.device)
        # Test-time flips for the probability; the heatmap and OOD scores stay on the plain pass.
        self.tta = bool(checkpoint.get("tta", False))
        self.model = model_from_checkpoint(checkpoint).to(self.device).eval()
        entry = ood_entry(checkpoint)
        self.detectors: dict[str, dict[str, Any]] = ood.stats_on_device(entry["detectors"], self.device)
        self.ood_available = bool(self.detectors)
        self.ood_thresholds: dict[str, float] = ood_thresholds(self.detectors)
        self.ood_method = resolve_ood_method(entry, self.detectors, ood_method)
        # Layer statistics cost a little per pass: collect them only when a fitted detector uses them.
        needs_layers = any(getattr(ood.DETECTORS.get(name), "needs_layers", False) for name in self.detectors)
        self._layer_tap = LayerStatistics(self.model) if needs_layers else None
        self._check_detectors_fit()
        # Explanations beside the verdict (absent from checkpoints written before them): the nearest
        # training lesions, and the conformal set of the head's outputs.
        index, self.conformal = explanation_entries(checkpoint, feature_dim(self.model))
        self.similar = SimilarIndex(index, self.device) if index is not None else None
        self.default_coverage = float((self.conformal or {}).get("default_coverage", conformal.DEFAULT_COVERAGE))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", ood_method: str | None = None) -> Predictor:
        """Load ``path`` with :func:`lesion.checkpoint.load_checkpoint`; InvalidCheckpoint if unusable."""
        return cls(load_checkpoint(path, map_location="cpu"), device=device, ood_method=ood_method)

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

    # --- the single pass --------------------------------------------------------------------

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict | None]:
        """The single pass: (last-stage activations, features, logits, layer statistics or None)."""
        capture = self._layer_tap.capture() if self._layer_tap is not None else nullcontext(None)
        with torch.no_grad(), capture as layers:
            activations, features, logits = forward_parts(self.model, batch)
        return activations, features, logits, layers

    def _ood_scores(self, features: torch.Tensor, logits: torch.Tensor, layers: dict | None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return ood.score_all(self.detectors, features, logits, layers=layers, head=classifier(self.model))

    def _settings(
        self,
        cam_method: str = "gradcam",
        target: int | None = None,
        ood_method: str | None = None,
        decision_threshold: float | None = None,
        ood_threshold: float | None = None,
        cam_target: str | None = None,
        coverage: float | None = None,
    ) -> Settings:
        """One call's arguments checked and completed from the checkpoint, before any network time is spent."""
        method = ood.check_method(ood_method, self.detectors) if ood_method else self.ood_method
        threshold = self.ood_thresholds.get(method, float("nan")) if ood_threshold is None else float(ood_threshold)
        fitted = method in self.detectors  # else nothing to check: every image is accepted
        if math.isnan(threshold) and fitted:
            raise ValueError("the OOD threshold must be a number, not NaN")
        return Settings(
            cam_method=explain.check_method(cam_method),
            cam_target=self.check_cam_target(cam_target),
            output=None if target is None else output_name(self.target, self.class_names, int(target)),
            ood_method=method,
            decision_threshold=self.decision_threshold if decision_threshold is None else float(decision_threshold),
            ood_threshold=threshold,
            fitted=fitted,
            coverage=self.default_coverage if coverage is None else conformal.check_coverage(coverage),
        )

    def _run(self, prepared: Sequence[Prepared], *, with_heatmap: bool, **options: Any) -> list[Prediction]:
        """The single pass over prepared images, then each image's Prediction (``options``: see :meth:`predict`)."""
        settings = self._settings(**options)
        timer = _Timer()
        batch = self.preprocessor.batch(prepared)
        # Through _forward, so the layer tap captures this pass for the multi-layer detectors.
        activations, features, logits, layers = self._forward(batch)
        if self.tta:
            with torch.no_grad():  # after the tapped pass: flips change neither the heatmap nor the OOD scores
                class_logits = flip_logits(self.model, batch, logits)
        else:
            class_logits = logits
        outputs = output_probabilities(class_logits, self.temperature).cpu()
        network = p_malignant(outputs, self.target).tolist()
        timer.lap("forward")
        # The similar cases first: with a weighted vote they are part of P(malignant), hence of the verdict.
        similar = self.similar.search(features) if self.similar is not None else [None] * len(prepared)
        weight = self.similar.weight if self.similar is not None else 0.0
        probabilities = [
            blended(p, found.malignant_share, weight) if found is not None else p
            for p, found in zip(network, similar, strict=True)
        ]
        timer.lap("similar")
        # Default target: the class the verdict names, so the map shows the evidence for it.
        names = [settings.output or settings.cam_target or side(p, settings.decision_threshold) for p in probabilities]
        low_res = self._low_resolution_cams(activations, names, settings.cam_method) if with_heatmap else None
        timer.lap("cam")
        scores = _rows_on_host(self._ood_scores(features, logits, layers), len(prepared))
        timer.lap("ood")
        sets = (
            conformal.prediction_sets(
                self.conformal,
                set_inputs(outputs.numpy(), network, weight, self.class_names, self.dx_names),
                settings.coverage,
            )
            if self.conformal is not None
            else [[] for _ in prepared]
        )
        timer.lap("similar")
        results = []
        for i, item in enumerate(prepared):
            timings = timer.shares(len(prepared), decode=item.decode_s, preprocess=item.preprocess_s)
            heatmap = None
            if low_res is not None:
                placed_at = time.perf_counter()
                heatmap = explain.place_in_image(low_res[i], item.original_size, item.crop_box)
                timings["cam"] += time.perf_counter() - placed_at
            timings["total"] = sum(timings.values())
            outcome = Outcome(
                p_malignant=probabilities[i],
                p_network=network[i],
                vote_weight=weight,
                probabilities=class_probabilities(
                    outputs[i], probabilities[i], self.target, self.class_names, from_p=weight > 0
                ),
                dx_probabilities={name: float(outputs[i, j]) for j, name in enumerate(self.dx_names)},
                ood_scores=scores[i],
                cam_target=names[i],
                target=output_index(self.target, self.class_names, names[i]),
                similar=similar[i],
                output_set=sets[i],
            )
            results.append(make_prediction(item, settings, outcome, heatmap, timings))
        return results

    def _low_resolution_cams(self, activations: torch.Tensor, names: list[str], cam_method: str) -> torch.Tensor:
        """CAMs at the last stage's resolution from the pass's own activations; only the head is differentiated."""
        uses_grads = explain.USES_GRADIENTS[cam_method]
        leaf, _, head_logits = explain.forward_head(self.model, activations, with_grad=uses_grads)
        scores = explained_scores(head_logits, names, self.target, self.class_names)
        grads = explain.score_gradients(leaf, scores) if uses_grads else None
        return explain.low_resolution_cams(cam_method, leaf.detach(), grads).cpu()

    # --- what the heatmap explains ------------------------------------------------------------

    @property
    def cam_targets(self) -> list[str]:
        """What a heatmap can explain: "malignant", "benign", then each diagnosis of a dx model."""
        return cam_targets(self.target)

    def check_cam_target(self, cam_target: str | None) -> str | None:
        if cam_target is not None and cam_target not in self.cam_targets:
            raise ValueError(f"unknown heatmap target {cam_target!r}; this model offers {', '.join(self.cam_targets)}")
        return cam_target

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
        coverage: float | None = None,
    ) -> Prediction:
        """Classify one image (path, bytes, file object or PIL image); InvalidImage if unreadable.

        ``cam_target`` picks what the heatmap explains: "malignant", "benign" or a diagnosis of a
        dx model (see :attr:`cam_targets`); default: the verdict's side. ``target`` (an output
        index) is the older way to pick. ``decision_threshold`` and ``ood_threshold`` override the
        checkpoint's for this call; ``coverage`` is the diagnosis set's (default: the checkpoint's, 0.9).
        """
        started = time.perf_counter()
        options = dict(cam_method=cam_method, target=target, ood_method=ood_method, cam_target=cam_target)
        options.update(decision_threshold=decision_threshold, ood_threshold=ood_threshold, coverage=coverage)
        self._settings(**options)  # a bad argument costs no decoding time
        prediction = self._run([self.preprocessor.prepare_one(image)], with_heatmap=with_heatmap, **options)[0]
        prediction.timings["total"] = time.perf_counter() - started
        return prediction

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
        coverage: float | None = None,
    ) -> list[Prediction | InvalidImage]:
        """Classify many images, one forward pass per ``batch_size`` chunk.

        An unreadable image yields its :class:`InvalidImage` at its place; the batch goes on. On a
        GPU the next chunk is decoded while this one is scored (:meth:`lesion.preprocess.Preprocessor.chunks`).
        """
        options = dict(cam_method=cam_method, target=target, ood_method=ood_method, cam_target=cam_target)
        options.update(decision_threshold=decision_threshold, ood_threshold=ood_threshold, coverage=coverage)
        self._settings(**options)  # a bad argument costs no decoding time
        results: list[Prediction | InvalidImage] = []
        for _, chunk in self.preprocessor.chunks(list(images), max(1, int(batch_size))):
            good = [item for item in chunk if not isinstance(item, InvalidImage)]
            scored = iter(self._run(good, with_heatmap=with_heatmap, **options) if good else [])
            results.extend(item if isinstance(item, InvalidImage) else next(scored) for item in chunk)
        return results

    def features(self, images: Iterable[ImageSource], batch_size: int = 32) -> torch.Tensor:
        """Pooled penultimate features per image, float32 on the CPU (what the similar-cases index holds).

        The first unreadable image raises its InvalidImage.
        """
        rows = []
        for _, chunk in self.preprocessor.chunks(list(images), max(1, int(batch_size))):
            for item in chunk:
                if isinstance(item, InvalidImage):
                    raise item
            rows.append(self._forward(self.preprocessor.batch(chunk))[1].float().cpu())
        return torch.cat(rows) if rows else torch.empty(0, feature_dim(self.model))

    def p_malignant(self, images: Iterable[ImageSource], batch_size: int = 32) -> np.ndarray:
        """Calibrated P(malignant) per image (what train.evaluate scores); the first bad image raises."""
        results = self.predict_batch(images, batch_size=batch_size, with_heatmap=False)
        for result in results:
            if isinstance(result, InvalidImage):
                raise result
        return np.array([result.p_malignant for result in results], dtype=np.float64)


class _Timer:
    """Seconds of each stage of a batched pass, shared equally between the batch's images."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._since = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._since  # a stage may lap twice
        self._since = now

    def shares(self, images: int, **own: float) -> dict[str, float]:
        """``own`` (this image's decode and preprocess), then each batched stage divided by ``images``."""
        return {**own, **{stage: seconds / images for stage, seconds in self.seconds.items()}}


def _rows_on_host(scores: dict[str, torch.Tensor], rows: int) -> list[dict[str, float]]:
    """{detector: score} per image as plain floats, copied to the host once (each .cpu() waits for the device)."""
    names = list(scores)
    if not names:
        return [{} for _ in range(rows)]
    columns = torch.stack([scores[name].float().reshape(-1) for name in names], dim=1).cpu().tolist()
    return [dict(zip(names, row, strict=True)) for row in columns]


if __name__ == "__main__":  # python -m lesion.predict: the command line of train.predict
    from train.predict import main

    sys.exit(main())
