"""The training loop: one entry point for the CLI, the app's Train page (as a subprocess) and torchrun.

``run_training(config)`` reads the data, splits it by lesion, trains with early stopping on
validation ROC-AUC, writes best.pt and last.pt every epoch (resumable), and then hands the best
epoch to :mod:`lesion.finalize` (calibration, thresholds, OOD statistics, test metrics, model card).
Progress goes to events.jsonl; rank 0 alone writes files.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from lesion import data as lesion_data
from lesion.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from lesion.config import TrainConfig
from lesion.distributed import DistInfo, barrier, cleanup, init_distributed, mean_across_ranks
from lesion.epochs import StopFlag, train_one_epoch, validate
from lesion.errors import LesionError
from lesion.events import EventWriter
from lesion.files import BEST_FILE, CONFIG_FILE, LAST_FILE, MODEL_FILE, SPLIT_FILE, write_text_atomic
from lesion.finalize import finalize
from lesion.labels import CLASS_NAMES
from lesion.loaders import make_loader
from lesion.model import build_model, replace_head
from lesion.optimization import criteria, optimizer_and_schedule, set_backbone_trainable
from lesion.regularize import Regularizer
from lesion.resume import TrainState, resume, training_state
from lesion.targets import Target, choose_target
from lesion.transforms import resize_size
from lesion.weights import load_backbone_weights, provenance

EventCallback = Callable[[dict[str, Any]], None]


class StoppedBeforeModel(LesionError):
    """The user stopped the run before any epoch completed: nothing to finalize."""


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """``auto`` picks this rank's GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", info.local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


# ---------------------------------------------------------------- data


def prepare_data(
    config: TrainConfig, run_dir: Path, info: DistInfo
) -> tuple[pd.DataFrame, dict[str, Any], lesion_data.ImageCache]:
    """Read, subset, split (or reuse the saved split on resume) and warm the cache."""
    split_path = run_dir / SPLIT_FILE
    df, summary = lesion_data.read_metadata(
        lesion_data.locate_data(config.data), config.metadata or None, skip_bad=config.skip_bad_images
    )
    if config.max_images:
        df = lesion_data.select_subset(df, config.max_images, config.seed)
    if split_path.is_file() and config.resume:
        saved = lesion_data.read_split(split_path)[["image_id", "fold"]]
        df = df.merge(saved, on="image_id", how="inner")
    else:
        df = lesion_data.split_by_lesion(df, config.val_fraction, config.test_fraction, config.seed)
    cache = lesion_data.ImageCache(config.cache_dir or lesion_data.default_cache_dir(), resize_size(config.image_size))
    if info.is_main:
        df, unreadable = lesion_data.check_images(df, cache, config.skip_bad_images, workers=max(1, config.num_workers))
        summary.setdefault("skipped", {})["unreadable"] = [
            str(u[0]) if isinstance(u, tuple) else str(u) for u in unreadable
        ]
        lesion_data.write_split(df, split_path)
    barrier(info)
    if not info.is_main:
        df = df[df["image_id"].isin(set(lesion_data.read_split(split_path)["image_id"]))]
    summary["split"] = {
        fold: {name: int(((df["fold"] == fold) & (df["label"] == i)).sum()) for i, name in enumerate(CLASS_NAMES)}
        for fold in ("train", "val", "test")
    }
    summary["n_images"] = int(len(df))
    summary["n_lesions"] = int(df["lesion_id"].nunique())
    return df.reset_index(drop=True), summary, cache


def run_training(config: TrainConfig, on_event: EventCallback | None = None) -> Path:
    """Train, finalize and return the path of model.pt. Raises LesionError with a plain message."""
    info = init_distributed("cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    run_dir = Path(config.out) if config.out else default_run_dir()
    events = _ListeningWriter(run_dir, info.is_main, on_event)
    stop = StopFlag()
    stop.install()
    try:
        return _train(config, run_dir, info, events, stop)
    except (LesionError, OSError) as error:
        reason = "stopped" if isinstance(error, StoppedBeforeModel) else "failed"
        events.emit("error", message=str(error), reason=reason, kind=type(error).__name__)
        raise
    except Exception as error:
        events.emit("error", message=f"{type(error).__name__}: {error}", reason="failed", kind=type(error).__name__)
        raise
    finally:
        stop.restore()
        cleanup(info)


class _ListeningWriter(EventWriter):
    """An EventWriter that also hands each event to a callback (the CLI's progress bar)."""

    def __init__(self, run_dir: Path, enabled: bool, callback: EventCallback | None) -> None:
        super().__init__(run_dir, enabled)
        self.callback = callback if enabled else None

    def emit(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        event = super().emit(kind, **fields)
        if self.callback:
            self.callback(event)
        return event


def _train(config: TrainConfig, run_dir: Path, info: DistInfo, events: EventWriter, stop: StopFlag) -> Path:
    """The run from top to bottom: config, weights, data, head, loop over epochs, finalize."""
    device = resolve_device(config.device, info)
    _write_config(config, run_dir, info)
    seed_everything(config.seed)
    # Weights first: an offline machine or a wrong file should fail before minutes of decoding.
    model = build_model(config.arch, config.head)
    weights_note = load_backbone_weights(model, config.weights, config.arch)
    df, summary, cache = prepare_data(config, run_dir, info)
    summary["weights"] = weights_note
    summary["weights_source"] = provenance(config.arch, config.weights)
    train_df, val_df = (df[df["fold"] == fold].reset_index(drop=True) for fold in ("train", "val"))
    target, train_df = _choose_head(config, model, train_df, summary)
    set_backbone_trainable(model, True, config.freeze_stages)  # before DDP and the optimizer see the parameters
    train_model = _place(model, config, device, info)
    loader = make_loader(config, train_df, cache, info, train=True, device=device, target=target, persistent=True)
    val_loader = make_loader(config, val_df, cache, info, train=False, device=device, target=target, persistent=True)
    optimizer, scheduler = optimizer_and_schedule(
        model, config, min(len(loader), config.max_steps_per_epoch or len(loader))
    )
    criterion, val_criterion = criteria(config, target, train_df, device)
    regularizer = Regularizer(config, model, num_classes=target.num_outputs)
    state = TrainState()
    if config.resume and (run_dir / LAST_FILE).is_file():
        state = resume(run_dir / LAST_FILE, model, optimizer, scheduler, regularizer)
    events.emit("start", **_start_fields(config, summary, weights_note, device, info, state, target))

    for epoch in range(state.epoch + 1, config.epochs + 1):
        if stop.requested or (config.patience and state.bad_epochs >= config.patience):
            break
        epoch_start = time.perf_counter()
        set_backbone_trainable(model, epoch > config.freeze_backbone_epochs, config.freeze_stages)
        _seed_epoch(loader, config, epoch)
        train_loss, seen, stopped = train_one_epoch(
            train_model, loader, optimizer, scheduler, criterion, device=device, config=config, epoch=epoch,
            events=events, stop=stop, regularizer=regularizer,
        )  # fmt: skip
        if stopped:
            break  # keep the last complete epoch's checkpoint: a partial epoch would break resume
        train_loss = mean_across_ranks(train_loss, seen, info)
        val = validate(
            regularizer.eval_model(model), val_df, cache, config, info, device, val_criterion, target, loader=val_loader
        )
        improved = _record_epoch(state, config, epoch, train_loss, val, scheduler.get_last_lr()[0], epoch_start)
        events.emit("epoch", **state.history[-1])
        if info.is_main:
            _save_epoch(
                run_dir, config, model, regularizer, optimizer, scheduler, state, summary, target, events, improved
            )
        barrier(info)

    del loader, val_loader  # their persistent workers end here, before finalize starts its own
    return _finish(config, model, df, cache, device, run_dir, summary, state, target, info, events, stop)


def _write_config(config: TrainConfig, run_dir: Path, info: DistInfo) -> None:
    """The run folder, and config.json with the full config (rank 0)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config.out = str(run_dir)
    if info.is_main:
        write_text_atomic(run_dir / CONFIG_FILE, json.dumps(asdict(config), indent=2) + "\n")


def _place(model: nn.Module, config: TrainConfig, device: torch.device, info: DistInfo) -> nn.Module:
    """Move ``model`` to the device (channels_last on CUDA) and return what the loop trains: compiled, DDP."""
    model.to(device)
    if config.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    train_model: nn.Module = model
    if config.compile and device.type == "cuda":
        train_model = torch.compile(model)
    if info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            train_model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # A frozen backbone gives its parameters no gradient in the first epochs.
            find_unused_parameters=config.freeze_backbone_epochs > 0,
        )
    return train_model


def _start_fields(
    config: TrainConfig,
    summary: dict[str, Any],
    weights_note: str,
    device: torch.device,
    info: DistInfo,
    state: TrainState,
    target: Target,
) -> dict[str, Any]:
    """What the ``start`` event says: config, sizes, weights, device, resume point, head, process."""
    return {
        "config": asdict(config),
        "sizes": summary["split"],
        "n_images": summary["n_images"],
        "weights": weights_note,
        "device": str(device),
        "world_size": info.world_size,
        "resumed_from_epoch": state.epoch,
        "target": target.kind,
        "outputs": list(target.names),
        "target_note": target.note,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


def _seed_epoch(loader: DataLoader, config: TrainConfig, epoch: int) -> None:
    """Sampling, augmentation and dropout of an epoch depend on the seed and the epoch only (resume replays them)."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(config.seed * 1_000_003 + epoch)
    torch.manual_seed(config.seed * 1_000_003 + epoch)


def _record_epoch(
    state: TrainState,
    config: TrainConfig,
    epoch: int,
    train_loss: float,
    val: dict[str, Any],
    lr: float,
    epoch_start: float,
) -> bool:
    """Early-stopping bookkeeping and the epoch's history row; True when validation ROC-AUC improved."""
    auc = val["roc_auc"] if val["roc_auc"] is not None else -1.0
    improved = auc > state.best_auc
    state.epoch = epoch
    if improved:
        state.best_auc, state.best_epoch, state.bad_epochs = auc, epoch, 0
    else:
        state.bad_epochs += 1
    state.history.append(
        {
            "epoch": epoch,
            "epochs": config.epochs,
            "train_loss": train_loss,
            "val_loss": val["loss"],
            "val_roc_auc": val["roc_auc"],
            "val_balanced_accuracy": val["balanced_accuracy"],
            "val_sensitivity": val["sensitivity"],
            "val_specificity": val["specificity"],
            "lr": lr,
            "seconds": time.perf_counter() - epoch_start,
            "best_epoch": state.best_epoch,
        }
    )
    return improved


def _save_epoch(
    run_dir: Path,
    config: TrainConfig,
    model: nn.Module,
    regularizer: Regularizer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    state: TrainState,
    summary: dict[str, Any],
    target: Target,
    events: EventWriter,
    improved: bool,
) -> None:
    """best.pt when validation improved (the EMA weights when enabled), and last.pt with the resume state."""
    epoch, best_path, last_path = state.epoch, run_dir / BEST_FILE, run_dir / LAST_FILE
    if improved:
        kept = regularizer.eval_model(model)
        save_checkpoint(make_checkpoint(config, kept, summary, epoch, target, history=state.history), best_path)
        events.emit("checkpoint", path=str(best_path), kind="best", epoch=epoch)
    last = make_checkpoint(config, model, summary, epoch, target, history=state.history)
    last["training"] = training_state(optimizer, scheduler, state, regularizer)
    save_checkpoint(last, last_path)
    events.emit("checkpoint", path=str(last_path), kind="last", epoch=epoch)


def _finish(
    config: TrainConfig,
    model: nn.Module,
    df: pd.DataFrame,
    cache: lesion_data.ImageCache,
    device: torch.device,
    run_dir: Path,
    summary: dict[str, Any],
    state: TrainState,
    target: Target,
    info: DistInfo,
    events: EventWriter,
    stop: StopFlag,
) -> Path:
    """The best epoch becomes model.pt (calibrated, thresholds, OOD, test metrics, card) on rank 0."""
    if state.best_epoch == 0:
        if stop.requested:
            raise StoppedBeforeModel("Stopped before the first epoch finished, so there is no model to keep.")
        raise LesionError("Training ended before the first epoch finished; no model was saved.")
    if info.is_main:
        model.load_state_dict(load_checkpoint(run_dir / BEST_FILE)["state_dict"])
        result = finalize(
            config, model, df, cache, device, run_dir, summary, state.history, stopped=stop.requested, target=target
        )
        events.emit(
            "done",
            metrics=result["metrics_summary"],
            path=str(result["path"]),
            stopped_by_user=stop.requested,
            best_epoch=state.best_epoch,
        )
    barrier(info)
    return run_dir / MODEL_FILE


def _choose_head(
    config: TrainConfig, model: nn.Module, train_df: pd.DataFrame, summary: dict[str, Any]
) -> tuple[Target, pd.DataFrame]:
    """Pick the head for the training split (dx or binary), give ``model`` that head, note it in ``summary``.

    A dx head learns only from images whose diagnosis it has an output for; the others (ISIC's
    "other") still count in every benign / malignant figure. Returns the target and the frame to train on.
    """
    target = choose_target(config.target, train_df["dx"].tolist())
    if target.num_outputs != len(CLASS_NAMES):
        # Seeded, so a resumed run builds the same (then overwritten) head and runs stay reproducible.
        torch.manual_seed(config.seed)
        replace_head(model, config.head, target.num_outputs)
    kept = train_df
    if target.kind == "dx":
        kept = train_df[train_df["dx"].isin(target.names)].reset_index(drop=True)
    summary["target"] = {
        "requested": config.target,
        "kind": target.kind,
        "outputs": list(target.names),
        "note": target.note,
        "train_images_without_dx_output": int(len(train_df) - len(kept)),
    }
    return target, kept
