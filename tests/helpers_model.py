"""A tiny but complete checkpoint for tests: resnet18, random weights, 64 px, OOD fitted.

The detectors are fitted with :func:`lesion.ood.fit_detectors` on the features of real sample
lesions (the first 24 for "training", the next 8 for the thresholds), and the file is written by
:func:`lesion.checkpoint.save_checkpoint` with every key the checkpoint docstring lists. Building it
takes about a second on 2 cores, so each test module can make its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lesion import ood
from lesion.checkpoint import new_checkpoint, save_checkpoint
from lesion.config import TrainConfig
from lesion.images import load_image
from lesion.labels import label_index
from lesion.model import LayerStatistics, build_model, forward_parts
from lesion.transforms import eval_transform, resize_size

REPO = Path(__file__).resolve().parent.parent
SAMPLE_LESIONS = REPO / "assets" / "samples" / "lesions"
SAMPLE_OOD = REPO / "assets" / "samples" / "ood"
IMAGE_SIZE = 64


def lesion_paths() -> list[Path]:
    """The bundled sample lesions, in a fixed order."""
    return sorted(SAMPLE_LESIONS.glob("*.jpg"))


def ood_paths() -> list[Path]:
    """The bundled non-lesion photos, in a fixed order."""
    return sorted(SAMPLE_OOD.glob("*.jpg"))


def lesion_labels() -> dict[str, int]:
    """image_id -> class index, from the samples' labels.csv."""
    table = pd.read_csv(SAMPLE_LESIONS / "labels.csv")
    return {row.image_id: label_index(row.label) for row in table.itertuples()}


def batch_of(paths: list[Path], image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """The predictor's preprocessing (load_image + eval_transform), stacked."""
    transform = eval_transform(image_size)
    return torch.stack([transform(load_image(p, resize_size(image_size))) for p in paths])


def tiny_checkpoint_dict(
    seed: int = 0, with_ood: bool = True, arch: str = "resnet18", image_size: int = IMAGE_SIZE
) -> dict[str, Any]:
    """The checkpoint as a dict (not yet written)."""
    torch.manual_seed(seed)
    model = build_model(arch, "linear").eval()
    paths = lesion_paths()
    labels = lesion_labels()
    detectors: dict[str, dict] = {}
    if with_ood:
        with torch.no_grad(), LayerStatistics(model) as tap, tap.capture() as layers:
            _, features, logits = forward_parts(model, batch_of(paths[:32], image_size))
        train_labels = torch.tensor([labels[p.stem] for p in paths[:24]])
        detectors = ood.fit_detectors(
            features[:24],
            train_labels,
            logits[:24],
            features[24:32],
            logits[24:32],
            keep=0.95,
            k=3,
            train_layers={name: values[:24] for name, values in layers.items()},
            val_layers={name: values[24:32] for name, values in layers.items()},
            head=model.fc,
        )
    config = TrainConfig(arch=arch, weights="none", image_size=image_size, epochs=1, knn_k=3)
    return new_checkpoint(
        model,
        arch,
        "linear",
        image_size,
        ood={"method": "mahalanobis", "detectors": detectors, "keep": 0.95},
        temperature=1.5,
        metrics={"val": {"roc_auc": 0.5}, "test": {}},
        data={"layout": "samples", "counts": {"train": 24, "val": 8}},
        config=config.__dict__.copy(),
        epoch=1,
    )


def write_tiny_checkpoint(path: str | Path, **options: Any) -> Path:
    """Build :func:`tiny_checkpoint_dict` and write it with save_checkpoint."""
    return save_checkpoint(tiny_checkpoint_dict(**options), path)


def count_predictions(monkeypatch: Any, path: Path) -> Path:
    """Append one line to ``path`` for every image a Predictor scores (``predict`` or ``predict_batch``).

    The app tests prove with it that moving a slider runs no network; AppTest runs the app in this process.
    """
    from lesion.predict import Predictor

    predict, predict_batch = Predictor.predict, Predictor.predict_batch

    def note(count: int) -> None:
        with path.open("a", encoding="utf-8") as stream:
            stream.write("scored\n" * count)

    def counted_predict(self: Predictor, image: Any, *args: Any, **kwargs: Any) -> Any:
        note(1)
        return predict(self, image, *args, **kwargs)

    def counted_batch(self: Predictor, images: Any, *args: Any, **kwargs: Any) -> Any:
        images = list(images)
        note(len(images))
        return predict_batch(self, images, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict", counted_predict)
    monkeypatch.setattr(Predictor, "predict_batch", counted_batch)
    return path


def exif_rotated_jpeg(path: Path, orientation: int, size: tuple[int, int]) -> bytes:
    """``path`` resized to ``size`` as JPEG bytes carrying EXIF orientation ``orientation`` (6, 8: rotated)."""
    import io

    from PIL import Image

    with Image.open(path) as image:
        buffer = io.BytesIO()
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.convert("RGB").resize(size).save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()
