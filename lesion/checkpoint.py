"""The checkpoint: one file, readable with ``torch.load(path, weights_only=True)``.

It holds tensors and plain Python values only (never pickled objects) and everything needed
to use the model without its run folder. Keys (format version 2; version 1 files, written before
the dx head, lack the three dx keys and are read as binary models):

==================  =================================================================
format              the string ``"lesion-checkpoint"``
format_version      int; files of a newer version are refused
arch, head          e.g. ``"resnet50"``, ``"linear"``
class_names         ``["benign", "malignant"]``: the verdict's classes, whatever the head
target              ``"dx"`` (one output per diagnosis) or ``"binary"`` (the head outputs class_names)
dx_names            the dx head's outputs in order, e.g. ``["nv", "mel", ...]``; ``[]`` for a binary head
dx_malignant        one bool per dx_names entry: P(malignant) sums the malignant ones; ``[]`` for binary
image_size          crop side the network sees
resize_size         shorter side images are resized to before the centre crop
mean, std           normalisation, lists of 3 floats
state_dict          the model's tensors
decision_threshold  threshold on calibrated P(malignant)
temperature         calibration temperature (logits are divided by it)
ood                 ``{"method": str, "detectors": {name: {"threshold": float, ...stats}}}``
metrics             ``{"val": {...}, "test": {...}}`` plain floats and lists
data                summary of the data and split (layout, counts per split and label, skipped)
config              the training config as a dict
epoch               epochs completed
tta                 optional bool (default false): average the logits over flips (test-time augmentation)
training            optional: optimizer / scheduler / scaler / RNG state for resume (last.pt)
created             ISO time
==================  =================================================================
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lesion.errors import InvalidCheckpoint
from lesion.files import atomic_write

if TYPE_CHECKING:  # only for the annotation: lesion.config needs nothing from here
    from lesion.config import TrainConfig

FORMAT = "lesion-checkpoint"
FORMAT_VERSION = 2
REQUIRED_KEYS = (
    "format",
    "format_version",
    "arch",
    "head",
    "class_names",
    "image_size",
    "resize_size",
    "mean",
    "std",
    "state_dict",
    "decision_threshold",
    "temperature",
    "ood",
)


def new_checkpoint(
    model: nn.Module,
    arch: str,
    head: str,
    image_size: int,
    ood: dict[str, Any] | None = None,
    decision_threshold: float = 0.5,
    temperature: float = 1.0,
    **extra: Any,
) -> dict[str, Any]:
    """A checkpoint dict with every key of the contract; ``extra`` adds or overrides keys.

    The one place a checkpoint is assembled: training, benchmarks and test fixtures all call it.
    """
    from lesion import __version__
    from lesion.labels import CLASS_NAMES
    from lesion.model import unwrap
    from lesion.ood import DEFAULT_DETECTOR
    from lesion.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_size

    model = unwrap(model)
    checkpoint = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "head": head,
        "class_names": list(CLASS_NAMES),
        "target": "binary",
        "dx_names": [],
        "dx_malignant": [],
        "image_size": image_size,
        "resize_size": resize_size(image_size),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "state_dict": {key: value.detach().cpu().clone() for key, value in model.state_dict().items()},
        "decision_threshold": float(decision_threshold),
        "temperature": float(temperature),
        "ood": ood if ood is not None else {"method": DEFAULT_DETECTOR, "detectors": {}, "keep": 0.95},
        "metrics": {},
        "data": {},
        "config": {},
        "epoch": 0,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "lesion_version": __version__,
    }
    checkpoint.update(extra)
    return checkpoint


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """Write atomically: a temporary file in the same folder, fsync, then rename.

    If the write fails (disk full, killed process) the previous file at ``path`` is untouched.
    """
    with atomic_write(path, "wb", fsync=True) as stream:
        torch.save(checkpoint, stream)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint; anything not ours, newer, truncated or pickled is refused."""
    path = Path(path)
    if not path.is_file():
        raise InvalidCheckpoint(f"No checkpoint at {path}.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses any object that is not a tensor or a plain value: this is what a
        # checkpoint carrying code (or a full pickled model from another tool) looks like.
        raise InvalidCheckpoint(
            f"{path.name} contains Python objects that could run code, so it was not loaded. "
            f"Only checkpoints written by lesion are accepted. ({str(error).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError, TypeError) as error:
        # Not a zip: torch falls back to its legacy format, whose weights-only unpickler fails on
        # arbitrary bytes with KeyError / IndexError (seen with a text file named model.pt).
        detail = (
            f": {error}" if isinstance(error, (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError)) else ""
        )
        raise InvalidCheckpoint(
            f"{path.name} is not a readable checkpoint (truncated, damaged, or not a checkpoint at all){detail}"
        ) from None
    return check_checkpoint(checkpoint, path.name)


def check_checkpoint(checkpoint: Any, name: str = "checkpoint") -> dict[str, Any]:
    """Validate the structure of a loaded checkpoint dict."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise InvalidCheckpoint(f"{name} is not a lesion checkpoint (no 'format: {FORMAT}' marker).")
    version = checkpoint.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InvalidCheckpoint(
            f"{name} has format version {version}; this version of lesion reads up to {FORMAT_VERSION}. Upgrade lesion."
        )
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise InvalidCheckpoint(f"{name} is incomplete: missing {', '.join(missing)}.")
    problem = _value_problem(checkpoint)
    if problem:
        # A file can be well-formed and still nonsensical (hand-edited or hostile); refuse it here
        # rather than let it give NaN probabilities or fail on the first prediction.
        raise InvalidCheckpoint(f"{name} has an impossible value: {problem}.")
    return checkpoint


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _value_problem(checkpoint: dict[str, Any]) -> str:
    """The first value that no model can use, described; '' when all are plausible."""
    image_size, resize = checkpoint["image_size"], checkpoint["resize_size"]
    if not isinstance(image_size, int) or not 16 <= image_size <= 4096:
        return f"image_size {image_size!r}"
    if not isinstance(resize, int) or not image_size <= resize <= 2 * image_size:
        return f"resize_size {resize!r} for image_size {image_size}"
    if not _is_number(checkpoint["temperature"]) or checkpoint["temperature"] <= 0:
        return f"temperature {checkpoint['temperature']!r}"
    if not _is_number(checkpoint["decision_threshold"]) or not 0 <= checkpoint["decision_threshold"] <= 1:
        return f"decision_threshold {checkpoint['decision_threshold']!r}"
    for key in ("mean", "std"):
        values = checkpoint[key]
        if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(map(_is_number, values)):
            return f"{key} {values!r}"
    if any(value <= 0 for value in checkpoint["std"]):
        return f"std {checkpoint['std']!r}"
    if not isinstance(checkpoint.get("tta", False), bool):
        return f"tta {checkpoint['tta']!r}"
    names = checkpoint["class_names"]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return f"class_names {names!r}"
    return _dx_problem(checkpoint.get("dx_names") or [], checkpoint.get("dx_malignant") or [])


def _dx_problem(names: Any, malignant: Any) -> str:
    """A dx head needs distinct names, one bool each, and outputs on both sides ('' when fine or binary)."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return f"dx_names {names!r}"
    if not names:
        return ""
    if len(set(names)) != len(names):
        return f"dx_names {names!r} (repeated)"
    if not isinstance(malignant, (list, tuple)) or len(malignant) != len(names):
        return f"dx_malignant {malignant!r} for dx_names {names!r}"
    if not all(isinstance(m, bool) for m in malignant) or all(malignant) or not any(malignant):
        return f"dx_malignant {malignant!r} (needs benign and malignant diagnoses)"
    return ""


def ood_entry(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``ood`` entry with ``detectors`` as {name: {key: value}}; InvalidCheckpoint if it is not."""
    entry = checkpoint.get("ood") or {}
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


def resolve_ood_method(entry: dict[str, Any], detectors: dict[str, Any], asked: str | None = None) -> str:
    """The OOD method a predictor uses: the one asked for (ValueError if it cannot score), else the entry's own.

    The entry's own method must be fitted (InvalidCheckpoint otherwise); an entry that names none is read
    as :data:`lesion.ood.UNNAMED_DETECTOR`, as checkpoints written before the method was recorded were.
    """
    from lesion import ood

    if asked is not None:
        return ood.check_method(asked, detectors)
    try:
        return ood.check_method(entry.get("method") or ood.UNNAMED_DETECTOR, detectors, asked=False)
    except ValueError as error:
        raise InvalidCheckpoint(f"the checkpoint's OOD method is unusable: {error}") from None


def ood_thresholds(detectors: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each fitted detector's threshold as a float; InvalidCheckpoint if one is unreadable or not finite."""
    try:
        thresholds = {name: float(stats["threshold"]) for name, stats in detectors.items()}
    except (KeyError, TypeError, ValueError, ArithmeticError) as error:
        raise InvalidCheckpoint(f"the checkpoint's OOD thresholds are unreadable ({error!r})") from None
    for name, value in thresholds.items():
        if not math.isfinite(value):  # NaN would accept every photo, +inf too, -inf reject every lesion
            raise InvalidCheckpoint(f"the checkpoint's {name} OOD threshold is not a finite number ({value})")
    return thresholds


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """The network described by the checkpoint, with its weights; InvalidCheckpoint on any mismatch."""
    from lesion.model import build_model

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


def make_checkpoint(
    config: TrainConfig, model: nn.Module, summary: dict[str, Any], epoch: int, target: Any = None, **extra: Any
) -> dict[str, Any]:
    """A checkpoint of a training run: its config, data summary and epoch; finalize adds calibration and OOD.

    Used by the training loop (best.pt, last.pt) and by finalize (model.pt), so both write one shape.
    ``target`` (a :class:`lesion.targets.Target`, default binary) adds the dx head's keys.
    """
    if target is not None:
        extra = {**target.checkpoint_entries(), **extra}
    extra.setdefault("ood", {"method": config.ood_method, "detectors": {}, "keep": config.ood_keep})
    extra.setdefault("tta", config.tta)
    return new_checkpoint(
        model,
        config.arch,
        config.head,
        config.image_size,
        data=summary,
        config=dataclasses.asdict(config),
        epoch=epoch,
        **extra,
    )


def explanation_entries(checkpoint: dict[str, Any], feature_width: int) -> tuple[dict | None, dict | None]:
    """The checkpoint's ``similar`` and ``conformal`` entries, each None when absent (older checkpoints).

    InvalidCheckpoint when one is there but cannot serve this network (wrong width, names or values):
    a hand-edited file is refused at load, not on the first visitor's photo.
    """
    from lesion import conformal, similar

    index, sets = checkpoint.get("similar"), checkpoint.get("conformal")
    if index is not None and (problem := similar.check_index(index, feature_width)):
        raise InvalidCheckpoint(f"the checkpoint is unusable: {problem}")
    if sets is not None:
        names = checkpoint.get("dx_names") or checkpoint["class_names"]
        if problem := conformal.check_entry(sets, names):
            raise InvalidCheckpoint(f"the checkpoint is unusable: {problem}")
    return index, sets
