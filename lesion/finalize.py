"""After the last epoch: calibrate, choose the decision threshold, fit OOD, test, write the run's reports.

Order matters for honesty: temperature, decision threshold and OOD thresholds are fitted on the
validation split only; the test split is touched once, at the end, to measure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lesion import conformal, ood, similar
from lesion import data as lesion_data
from lesion.checkpoint import make_checkpoint, save_checkpoint
from lesion.config import TrainConfig
from lesion.distributed import DistInfo
from lesion.files import METRICS_FILE, MODEL_FILE, write_text_atomic
from lesion.loaders import collect_outputs, make_loader
from lesion.metrics import (
    HEADLINE_METRICS,
    binary_metrics,
    choose_threshold,
    dx_metrics,
    expected_calibration_error,
    fit_temperature,
)
from lesion.model import classifier, stage_names
from lesion.targets import BINARY, IGNORE_INDEX, Target, output_probabilities, p_malignant


def _outputs(model, frame, cache, config, device, target: Target) -> dict[str, torch.Tensor]:
    loader = make_loader(config, frame, cache, DistInfo(), train=False, device=device, target=target)
    out = collect_outputs(model, loader, device, config, features=True)
    out["binary"] = torch.tensor(frame["label"].to_numpy(), dtype=torch.long)  # 0 benign, 1 malignant
    return out


def _layers(out: dict[str, torch.Tensor], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The per-stage statistics collect_outputs kept beside the features."""
    return {name: out[name] for name in names if name in out}


def _p_malignant(logits: torch.Tensor, target: Target, temperature: float = 1.0) -> np.ndarray:
    """Calibrated P(malignant): the sum of the malignant outputs' softmax probabilities."""
    return p_malignant(output_probabilities(logits, temperature), target).numpy()


def _split_metrics(
    out: dict[str, torch.Tensor],
    frame: pd.DataFrame,
    temperature: float,
    threshold: float,
    target: Target,
    probabilities: np.ndarray,
) -> dict:
    """``probabilities``: the verdict's P(malignant), the network's or its blend with the similar cases' vote."""
    labels = out["binary"].numpy()
    metrics = binary_metrics(labels, probabilities, threshold, frame["dx"].tolist())
    metrics["ece_before_scaling"] = expected_calibration_error(labels, _p_malignant(out["logits"], target))
    # Temperature scaling's own effect, on the network's probability (``ece`` above is the verdict's).
    metrics["ece_after_scaling"] = expected_calibration_error(labels, _p_malignant(out["logits"], target, temperature))
    if target.kind == "dx":
        dx_probabilities = output_probabilities(out["logits"], temperature).numpy()
        metrics["dx"] = dx_metrics(frame["dx"].tolist(), dx_probabilities, target.names)
    return metrics


def _similar_index(
    outs: dict[str, dict[str, torch.Tensor]], frames: dict[str, pd.DataFrame], config: TrainConfig
) -> tuple[dict[str, Any], dict[str, list[similar.Similar]]]:
    """The similar-cases index (training split), and what it finds for each validation and test image."""
    train = frames["train"]
    index = similar.build_index(
        outs["train"]["features"],
        train["image_id"].tolist(),
        train["label"].tolist(),
        train["dx"].tolist(),
        seed=config.seed,
        k=config.vote_k,
        weight=config.vote_weight,
    )
    search = similar.SimilarIndex(index)
    return index, {fold: search.search(outs[fold]["features"]) for fold in ("val", "test")}


def _explanations(
    outs: dict[str, dict[str, torch.Tensor]],
    frames: dict[str, pd.DataFrame],
    temperature: float,
    target: Target,
    test_metrics: dict[str, Any],
    seed: int,
    found: list[similar.Similar],
    k: int,
) -> dict[str, Any]:
    """The conformal calibration (validation split); the similar cases (``found`` on test) measured.

    Both are measured on the test split into ``test_metrics``: the ``k``-neighbour vote against the
    network's softmax (``similar``) and the sets' coverage and size at the default coverage (``sets``).
    """
    test = frames["test"]
    test_metrics["similar"] = similar.vote_metrics(
        [f.malignant_share for f in found],
        _p_malignant(outs["test"]["logits"], target, temperature),
        test["label"].tolist(),
        [f.dx_vote for f in found],
        test["dx"].tolist(),
        k=found[0].k if found else k,  # fewer when the index holds fewer images
    )
    names = list(target.names)
    val_labels = outs["val"]["labels"].numpy()  # the head's output per image (IGNORE_INDEX: none)
    sets = conformal.calibrate(
        output_probabilities(outs["val"]["logits"], temperature).numpy(),
        np.where(val_labels < 0, -1, val_labels),
        names,
        seed=seed,
    )
    chosen = conformal.prediction_sets(
        sets, output_probabilities(outs["test"]["logits"], temperature).numpy(), sets["default_coverage"]
    )
    truth = conformal.true_classes(test["dx"], test["label"], target.kind == "dx")
    test_metrics["sets"] = conformal.measure(sets, chosen, truth, sets["default_coverage"])
    return sets


def finalize(
    config: TrainConfig,
    model: nn.Module,
    df: pd.DataFrame,
    cache: lesion_data.ImageCache,
    device: torch.device,
    run_dir: Path,
    summary: dict[str, Any],
    history: list[dict[str, Any]],
    stopped: bool = False,
    target: Target = BINARY,
) -> dict[str, Any]:
    """Write model.pt, metrics.json, plots/ and model_card.md; return paths and headline metrics.

    With a dx head the temperature is fitted on the dx logits, and P(malignant) (threshold,
    binary metrics) is the sum of the calibrated malignant dx probabilities.
    """
    frames = {fold: df[df["fold"] == fold].reset_index(drop=True) for fold in ("train", "val", "test")}
    outs = {fold: _outputs(model, frame, cache, config, device, target) for fold, frame in frames.items()}
    val, test = outs["val"], outs["test"]

    scored = val["labels"] != IGNORE_INDEX  # images with an output of the head (all, for binary)
    temperature = fit_temperature(val["logits"][scored], val["labels"][scored])
    index, found = _similar_index(outs, frames, config)
    # The verdict's P(malignant): the network's, blended with the similar cases' vote when the recipe
    # weighs it in. The threshold is chosen on it, on validation.
    verdict_p = {
        fold: similar.blended(
            _p_malignant(outs[fold]["logits"], target, temperature),
            [f.malignant_share for f in found[fold]],
            config.vote_weight,
        )
        for fold in ("val", "test")
    }
    threshold = choose_threshold(
        val["binary"].numpy(), verdict_p["val"], config.threshold_rule, config.target_sensitivity
    )
    head = ood.cpu_copy(classifier(model))  # the features are on the CPU
    stages = stage_names(model)
    # OOD sees the un-flipped pass, as in the predictor (the same as "logits" without test-time flips).
    detectors = ood.fit_detectors(
        outs["train"]["features"],
        outs["train"]["binary"],  # benign / malignant: every image has one (a dx may be unscored)
        outs["train"]["plain_logits"],
        val["features"],
        val["plain_logits"],
        keep=config.ood_keep,
        k=config.knn_k,
        train_layers=_layers(outs["train"], stages),
        val_layers=_layers(val, stages),
        head=head,
    )
    metrics = {
        fold: _split_metrics(outs[fold], frames[fold], temperature, threshold, target, verdict_p[fold])
        for fold in ("val", "test")
    }
    test_scores = {
        name: ood.score(name, stats, test["features"], test["plain_logits"], layers=_layers(test, stages), head=head)
        for name, stats in detectors.items()
    }
    metrics["ood_test_lesions_accepted"] = {
        name: float((test_scores[name] <= detectors[name]["threshold"]).float().mean()) for name in detectors
    }
    metrics["ood_rejection_spread"] = {name: stats["rejection_spread"] for name, stats in detectors.items()}
    sets = _explanations(outs, frames, temperature, target, metrics["test"], config.seed, found["test"], config.vote_k)
    best_epoch = max(history, key=lambda r: r["val_roc_auc"] if r["val_roc_auc"] is not None else -1)["epoch"]
    report = {
        "headline_split": "test",
        "headline": {key: metrics["test"].get(key) for key in HEADLINE_METRICS},
        "target": target.kind,
        "target_note": target.note,
        "decision_threshold": threshold,
        "threshold_rule": config.threshold_rule,
        "vote": {"k": config.vote_k, "weight": config.vote_weight},  # the similar cases' share of P(malignant)
        "temperature": temperature,
        "ood_method": config.ood_method,
        "ood_thresholds": {name: float(stats["threshold"]) for name, stats in detectors.items()},
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "stopped_by_user": stopped,
        "split_sizes": summary["split"],
        **metrics,
    }
    if target.kind == "dx":
        report["headline"]["dx_balanced_accuracy"] = metrics["test"]["dx"]["balanced_accuracy"]
    checkpoint = make_checkpoint(
        config,
        model,
        summary,
        best_epoch,
        target,
        decision_threshold=float(threshold),
        temperature=float(temperature),
        ood={"method": config.ood_method, "detectors": detectors, "keep": config.ood_keep},
        metrics=json.loads(json.dumps(report)),
        history=history,
        similar=index,
        conformal=sets,
    )
    path = save_checkpoint(checkpoint, run_dir / MODEL_FILE)
    write_text_atomic(run_dir / METRICS_FILE, json.dumps(report, indent=2) + "\n")
    _plots(run_dir, test, verdict_p["test"], threshold, report["test"], history, target)
    from lesion.card import write_model_card

    write_model_card(run_dir)
    return {"path": path, "metrics_summary": {"split": "test", **report["headline"]}}


def _plots(
    run_dir: Path,
    test: dict[str, torch.Tensor],
    probabilities: np.ndarray,
    threshold: float,
    test_metrics: dict,
    history: list,
    target: Target,
) -> None:
    from lesion.plots import plot_dx_confusion, save_all_plots

    save_all_plots(
        run_dir,
        test["binary"].numpy(),
        _p_malignant(test["logits"], target),
        probabilities,  # the verdict's P(malignant)
        threshold,
        test_metrics["confusion"],
        [{"event": "epoch", **record} for record in history],
        split="test",
    )
    if "dx" in test_metrics:
        plot_dx_confusion(test_metrics["dx"], run_dir / "plots" / "dx_confusion.png", split="test")
