"""Export a finished run as a small, self-describing model file (the app's bundled default model).

An exported checkpoint is an ordinary lesion checkpoint (``load_checkpoint`` and ``Predictor`` read
it like any other) with three differences:

- floating-point weights are stored in half precision (the predictor casts them back to float32);
- training-only state is dropped (optimizer, schedule, epoch history);
- it records its split (``split``: the data folder and the split.csv text) and its metrics are
  **re-measured** from that split on the CPU by :class:`lesion.predict.Predictor` with the halved
  weights, so the figures shipped with the file are what the file itself does.

:func:`rescore` is the one scoring function: the export calls it to measure, and the test of the
shipped file calls it to prove the stored figures still hold.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from lesion.card import render_model_card
from lesion.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from lesion.errors import LesionError
from lesion.files import CARD_FILE, METRICS_FILE, MODEL_FILE, PROJECT_ROOT, SPLIT_FILE, write_text_atomic
from lesion.model import DISPLAY_NAMES

EXPORT_VERSION = 1
# Keys only training needs: resume state and the per-epoch history (the card and the app do without).
TRAINING_ONLY = ("training", "history")
# Metrics rounding in the comparison of a re-scored file with its stored figures.
RESCORE_TOLERANCE = 0.002
# Config keys that say where and how fast a run ran, not what it learned: ignored when naming its recipe.
RUNTIME_KEYS = ("data", "metadata", "out", "cache_dir", "device", "num_workers", "resume", "log_every")


def half_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32/float64 tensors as float16; integer buffers (BatchNorm's counters) unchanged."""
    return {key: value.half() if value.is_floating_point() else value for key, value in state_dict.items()}


def _relative(path: str | Path) -> str:
    """A path inside the repository written relative to it, so the file names no builder's folders."""
    text = str(path)
    if not text:
        return text
    try:
        return str(Path(text).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return text


def _inside_repo(path: str | Path) -> bool:
    return bool(str(path)) and Path(path).resolve().is_relative_to(PROJECT_ROOT)


def split_record(run_dir: Path, data_dir: str) -> dict[str, Any]:
    """The run's split as plain values: data folder, split.csv text and its sha256."""
    split_file = Path(run_dir) / SPLIT_FILE
    if not split_file.is_file():
        raise LesionError(f"{run_dir} has no split.csv, so the exported model could not record its split.")
    text = split_file.read_text(encoding="utf-8")
    return {"data": _relative(data_dir), "csv": text, "sha256": hashlib.sha256(text.encode()).hexdigest()}


def split_frame(checkpoint: dict[str, Any]):
    """The recorded split as a frame (image_id, lesion_id, dx, label 0/1, fold) joined with image paths."""
    import pandas as pd

    from lesion import data as lesion_data
    from lesion.data import locate_data

    record = checkpoint.get("split")
    if not isinstance(record, dict) or not record.get("csv"):
        raise LesionError("this checkpoint records no split (export it with python -m train.export)")
    with io.StringIO(record["csv"]) as stream:
        split = pd.read_csv(stream, dtype=str, keep_default_na=False)
    split["label"] = [1 if name == "malignant" else 0 for name in split["label"]]
    data_dir = locate_data(record["data"])
    images, _ = lesion_data.read_metadata(data_dir)
    merged = split.merge(images[["image_id", "path"]], on="image_id", how="left")
    missing = merged.loc[merged["path"].isna(), "image_id"].tolist()
    if missing:
        raise LesionError(
            f"{len(missing)} image(s) of the recorded split are not in {data_dir} (first: {', '.join(missing[:3])})"
        )
    return merged


def _fold(frame, fold: str):
    part = frame[frame["fold"] == fold]
    if part.empty:
        raise LesionError(f"the recorded split has no {fold} images")
    return part


def explanations(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint with its ``similar`` index (training split) and ``conformal`` calibration (validation
    split) rebuilt by the Predictor from the file's own (halved) weights.

    When the recipe weighs the similar cases' vote into P(malignant) (``vote_weight``), the decision
    threshold is chosen again on validation by the recipe's rule, from the blend these weights give.
    """
    from lesion import conformal, similar
    from lesion.metrics import choose_threshold
    from lesion.predict import Predictor
    from lesion.prediction import output_rows

    config = checkpoint.get("config") or {}
    predictor = Predictor({k: v for k, v in checkpoint.items() if k not in ("similar", "conformal")}, device="cpu")
    frame = split_frame(checkpoint)
    train = _fold(frame, "train")
    features = predictor.features(train["path"].tolist())
    seed = int(config.get("seed", 0))
    weight = float(config.get("vote_weight", 0.0))
    index = similar.build_index(
        features,
        train["image_id"].tolist(),
        train["label"].tolist(),
        train["dx"].tolist(),
        seed=seed,
        k=int(config.get("vote_k", similar.VOTE_K)),
        weight=weight,
    )
    # One pass over validation, with the new index: the outputs to calibrate the sets, and the blend.
    voting = Predictor({**{k: v for k, v in checkpoint.items() if k != "conformal"}, "similar": index}, device="cpu")
    val = _fold(frame, "val")
    predictions = voting.predict_batch(
        val["path"].tolist(), batch_size=32, with_heatmap=False, ood_threshold=float("inf")
    )
    bad = [str(p) for p in predictions if not hasattr(p, "p_malignant")]
    if bad:
        raise LesionError(f"{len(bad)} val image(s) could not be read: {bad[0]}")
    names = voting.dx_names or voting.class_names
    truth = conformal.true_classes(val["dx"], val["label"], bool(voting.dx_names))
    labels = [names.index(t) if t in names else -1 for t in truth]
    outputs = output_rows(predictions, voting.dx_names, voting.class_names)
    result = {**checkpoint, "similar": index, "conformal": conformal.calibrate(outputs, labels, names, seed=seed)}
    if weight > 0:
        rule = str(config.get("threshold_rule", "youden"))
        result["decision_threshold"] = choose_threshold(
            val["label"].to_numpy(),
            [p.p_malignant for p in predictions],
            rule,
            float(config.get("target_sensitivity", 0.9)),
        )
    return result


def explanation_metrics(predictor: Any, predictions: list[Any], part) -> dict[str, Any]:
    """The similar-case vote against the softmax and the sets' coverage, on one fold (every image, OOD aside)."""
    from lesion import conformal, similar

    result: dict[str, Any] = {}
    if predictor.similar is not None:
        result["similar"] = similar.vote_metrics(
            [p.similar_malignant for p in predictions],
            [p.p_network for p in predictions],
            part["label"].tolist(),
            [p.similar_dx for p in predictions],
            part["dx"].tolist(),
            k=min(predictor.similar.k, len(predictor.similar)),  # fewer when the index holds fewer images
        )
    if predictor.conformal is not None:
        truth = conformal.true_classes(part["dx"], part["label"], bool(predictor.dx_names))
        sets = [p.dx_set for p in predictions]
        result["sets"] = conformal.measure(predictor.conformal, sets, truth, predictor.default_coverage)
    return result


def rescore(checkpoint: dict[str, Any], folds: tuple[str, ...] = ("val", "test")) -> dict[str, Any]:
    """Metrics per fold of the recorded split, measured on the CPU by the app's own Predictor.

    Probabilities come from :meth:`Predictor.predict_batch` (decode, evaluation transform, forward,
    temperature) and are judged at the checkpoint's decision threshold, as ``train.evaluate`` does.
    Every image is scored, the OOD check aside (its acceptance is measured apart), so the similar-case
    vote and the diagnosis sets are measured on the same images as the probability.
    """
    from lesion.metrics import binary_metrics, prediction_dx_metrics
    from lesion.predict import Predictor

    predictor = Predictor(checkpoint, device="cpu")
    frame = split_frame(checkpoint)
    result: dict[str, Any] = {}
    for fold in folds:
        part = _fold(frame, fold)
        predictions = predictor.predict_batch(
            part["path"].tolist(), batch_size=32, with_heatmap=False, ood_threshold=float("inf")
        )
        bad = [str(p) for p in predictions if not hasattr(p, "p_malignant")]
        if bad:
            raise LesionError(f"{len(bad)} {fold} image(s) could not be read: {bad[0]}")
        probabilities = [p.p_malignant for p in predictions]
        metrics = binary_metrics(
            part["label"].to_numpy(), probabilities, predictor.decision_threshold, part["dx"].tolist()
        )
        metrics["n_lesions"] = int(part["lesion_id"].nunique())
        dx = prediction_dx_metrics(predictions, part["dx"].tolist(), predictor.dx_names)
        if dx is not None:  # a dx head: its diagnosis figures, re-measured like the rest
            metrics["dx"] = dx
        metrics.update(explanation_metrics(predictor, predictions, part))
        metrics["ood_accepted"] = {
            name: sum(p.ood_scores[name] <= predictor.ood_thresholds[name] for p in predictions) / len(predictions)
            for name in predictor.ood_thresholds
        }
        result[fold] = json.loads(json.dumps(metrics))
    return result


def matching_recipe(config: dict[str, Any]) -> str:
    """The recipe in train/recipes whose settings the run used unchanged; '' when it was overridden."""
    from dataclasses import asdict

    from lesion.config import build_config, recipes_dir

    learned = {key: value for key, value in config.items() if key not in RUNTIME_KEYS}
    for path in sorted(recipes_dir().glob("*.toml")):
        recipe = asdict(build_config(path.stem))
        if all(recipe.get(key) == value for key, value in learned.items() if key in recipe):
            return path.stem
    return ""


def exported_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The run's model.pt with halved weights, no training state, plain paths and its split recorded."""
    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir / MODEL_FILE)
    config = dict(checkpoint.get("config") or {})
    data_dir = config.get("data") or "assets/demo"
    exported = {key: value for key, value in checkpoint.items() if key not in TRAINING_ONLY}
    exported["state_dict"] = half_weights(checkpoint["state_dict"])
    exported["config"] = {
        **config,
        "data": _relative(data_dir),
        # where the builder keeps runs is theirs: the run folder's name, or its path inside the repository
        "out": _relative(config.get("out", ""))
        if _inside_repo(config.get("out", ""))
        else Path(config.get("out", "")).name,
        "cache_dir": "",
    }
    data = dict(checkpoint.get("data") or {})
    if data.get("metadata"):
        data["metadata"] = _relative(data["metadata"])
    exported["data"] = data
    exported["split"] = split_record(run_dir, data_dir)
    exported["export"] = {
        "version": EXPORT_VERSION,
        "from_run": run_dir.name,
        "recipe": matching_recipe(config),
        "weights_dtype": "float16",
    }
    return exported


def remeasure(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Replace the stored figures with those the (halved) checkpoint gives through the Predictor."""
    from lesion.similar import VOTE_K

    measured = rescore(checkpoint)
    index = checkpoint.get("similar") or {}
    metrics = dict(checkpoint.get("metrics") or {})
    headline = metrics.get("headline") or {}
    metrics.update(
        val=measured["val"],
        test=measured["test"],
        headline_split="test",
        headline={key: measured["test"].get(key) for key in headline or measured["test"]},
        ood_test_lesions_accepted=measured["test"]["ood_accepted"],
        decision_threshold=float(checkpoint["decision_threshold"]),
        vote={"k": index.get("k", VOTE_K), "weight": index.get("weight", 0.0)},  # its share of P(malignant)
        measured_by="lesion.predict.Predictor on CPU, float16 weights (python -m train.export)",
    )
    if "dx" in measured["test"]:
        metrics["headline"]["dx_balanced_accuracy"] = measured["test"]["dx"]["balanced_accuracy"]
    metrics.pop("split_sizes", None)
    metrics["split_sizes"] = (checkpoint.get("data") or {}).get("split", {})
    return {**checkpoint, "metrics": metrics}


def export_run(run_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """Write ``out`` (the checkpoint), and ``model_card.md`` and ``metrics.json`` beside it; return the checkpoint."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / MODEL_FILE).is_file():
        raise LesionError(f"{run_dir} has no model.pt: train it to the end first (python -m train --out {run_dir})")
    checkpoint = remeasure(explanations(exported_checkpoint(run_dir)))
    save_checkpoint(checkpoint, out)
    write_text_atomic(out.parent / METRICS_FILE, json.dumps(checkpoint["metrics"], indent=2) + "\n")
    card = render_model_card(checkpoint, out.stem) + "\n" + export_note(checkpoint)
    write_text_atomic(out.parent / CARD_FILE, card)
    return checkpoint


def export_note(checkpoint: dict[str, Any]) -> str:
    """The card's paragraph on how the file was made and how to rebuild it."""
    recipe = (checkpoint.get("export") or {}).get("recipe")
    how = f"`python -m train --recipe {recipe}`" if recipe else "`python -m train` with settings of its own"
    return (
        "## How this file was made\n\n"
        f"Trained with {how} on `{checkpoint['split']['data']}` (settings under 'Recipe settings'), "
        "then exported with `python -m train.export`: weights halved to float16, training-only state dropped, "
        "and every figure above re-measured on the CPU by the app's own predictor with the halved weights. "
        f"Checkpoint format version {checkpoint['format_version']}; split.csv sha256 `{checkpoint['split']['sha256']}`.\n"
    )


def check_current(checkpoint: dict[str, Any], name: str = "checkpoint") -> None:
    """Raise LesionError when an exported file predates the current checkpoint format or export layout."""
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise LesionError(
            f"{name} has checkpoint format version {checkpoint.get('format_version')}; lesion writes "
            f"{FORMAT_VERSION}. Rebuild it (docs/bundled-model.md)."
        )
    export = checkpoint.get("export") or {}
    if export.get("version") != EXPORT_VERSION or not isinstance(checkpoint.get("split"), dict):
        raise LesionError(f"{name} was not exported by this version of train.export. Rebuild it.")


def describe(checkpoint: dict[str, Any], with_figures: bool = True) -> str:
    """One honest paragraph: what it was trained on, how, and (``with_figures``) what it reached on how many
    held-out lesions."""
    config, data, metrics = (
        checkpoint.get("config") or {},
        checkpoint.get("data") or {},
        checkpoint.get("metrics") or {},
    )
    weights = config.get("weights", "")
    start = {"none": "from random weights", "imagenet": "from ImageNet weights"}.get(weights, f"from {weights}")
    arch = DISPLAY_NAMES.get(str(checkpoint.get("arch")), str(checkpoint.get("arch", "?")))
    source = _relative(config.get("data", "")) or "?"
    trained_on = "the bundled demo set" if source == "assets/demo" else f"`{source}`"
    recipe = (checkpoint.get("export") or {}).get("recipe")
    lesions = data.get("n_lesions")
    layout = {"isic": "ISIC archive", "ham10000": "HAM10000"}.get(str(data.get("layout")), "")
    facts = ", ".join(part for part in (f"{lesions} lesions" if lesions else "", layout) if part)
    text = (
        f"{arch} trained {start} on {trained_on}"
        + (f" ({facts})" if facts else "")
        + f", {checkpoint.get('image_size')} px, "
        + (f"recipe `{recipe}`." if recipe else "custom settings.")
    )
    test = metrics.get("test") or {}
    auc = test.get("roc_auc")
    if isinstance(auc, (int, float)) and with_figures:
        held_out = test.get("n_lesions") or test.get("n")
        unit = "lesions" if test.get("n_lesions") else "images"
        text += f" Test ROC-AUC {auc:.3f} on {held_out} held-out {unit}."
    return text
