"""The training loop: one entry point for the CLI, the app's Train page (as a subprocess) and torchrun.

``run_training(config)`` reads the data, splits it by lesion, trains with early stopping on
validation ROC-AUC, writes best.pt and last.pt every epoch (resumable), and then hands the best
epoch to :mod:`lesion.finalize` (calibration, thresholds, OOD statistics, test metrics, model card).
Progress goes to events.jsonl; rank 0 alone writes files.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
from lesion.distributed import DistInfo, all_gather_objects, barrier, cleanup, init_distributed, mean_across_ranks
from lesion.errors import LesionError
from lesion.events import EventWriter
from lesion.files import BEST_FILE, CONFIG_FILE, LAST_FILE, MODEL_FILE, SPLIT_FILE, write_text_atomic
from lesion.finalize import finalize
from lesion.labels import CLASS_NAMES
from lesion.loaders import autocast_for, collect_outputs, make_loader
from lesion.metrics import binary_metrics
from lesion.model import (
    backbone_parameters,
    build_model,
    classifier,
    freeze_stages,
    frozen_stage_modules,
    replace_head,
    unwrap,
)
from lesion.regularize import DxSideCrossEntropy, Regularizer, SoftTargetCrossEntropy
from lesion.targets import BINARY, IGNORE_INDEX, Target, choose_target, output_probabilities, p_malignant
from lesion.transforms import BatchAugment, resize_size
from lesion.weights import load_backbone_weights, provenance

EventCallback = Callable[[dict[str, Any]], None]


class StoppedBeforeModel(LesionError):
    """The user stopped the run before any epoch completed: nothing to finalize."""


class StopFlag:
    """Set by SIGTERM / SIGINT: finish the batch, keep the last checkpoint, finalize the best epoch.

    A second signal restores the default handler, so pressing Ctrl-C twice still kills at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        # Signal handlers can only be set from the main thread; elsewhere (a caller's thread)
        # the run simply cannot be stopped by a signal.
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))


@dataclass
class TrainState:
    """What resume needs besides the weights and optimizer."""

    epoch: int = 0  # epochs completed
    best_auc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


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


# ---------------------------------------------------------------- model and optimisation


def _adamw(params: list, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _adam(params: list, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """The head at ``lr``, the backbone at ``lr * backbone_lr_scale``; frozen stages left out.

    A pretrained backbone wants smaller steps than the new head (the head starts from random
    weights; the backbone already holds what ImageNet taught it). Both follow the same warm-up and
    schedule: LambdaLR scales each group's own learning rate.
    """
    frozen = {id(p) for p in _frozen_parameters(model, config)}
    head = [p for p in classifier(model).parameters()]
    backbone = [p for p in backbone_parameters(model) if id(p) not in frozen]
    return [
        {"params": head, "lr": config.lr},
        {"params": backbone, "lr": config.lr * config.backbone_lr_scale},
    ]


def _frozen_parameters(model: nn.Module, config: TrainConfig) -> list[nn.Parameter]:
    return [p for module in frozen_stage_modules(model, config.freeze_stages) for p in module.parameters()]


OPTIMIZER_BUILDERS: dict[str, Callable[[list, TrainConfig], torch.optim.Optimizer]] = {"adamw": _adamw, "adam": _adam}


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warmup, then cosine decay to zero (or constant)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def class_weights(labels: np.ndarray, num_classes: int = 2) -> torch.Tensor:
    """Inverse-frequency weights, total / (classes x count) (what the notebook's class weights did).

    Per output of the head: per diagnosis for a dx head. Labels left out of the loss (negative) do not count.
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(float)
    weights = counts.sum() / (num_classes * np.maximum(counts, 1.0))
    return torch.tensor(weights, dtype=torch.float32)


def set_backbone_trainable(model: nn.Module, trainable: bool, frozen_stages: int = 0) -> None:
    """Backbone parameters get gradients or not; the first ``frozen_stages`` stages never do."""
    for parameter in backbone_parameters(model):
        parameter.requires_grad_(trainable)
    freeze_stages(model, frozen_stages)


# ---------------------------------------------------------------- checkpoints


def training_state(optimizer, scheduler, state: TrainState, regularizer: Regularizer | None = None) -> dict[str, Any]:
    return {
        **(regularizer.state_dict() if regularizer is not None else {}),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": {k: v for k, v in asdict(state).items() if k != "history"},
        "history_json": json.dumps(state.history),
        "torch_rng": torch.get_rng_state(),
    }


# ---------------------------------------------------------------- loops


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    criterion: nn.Module,
    *,
    device: torch.device,
    config: TrainConfig,
    epoch: int,
    events: EventWriter,
    stop: StopFlag,
    regularizer: Regularizer | None = None,
) -> tuple[float, int, bool]:
    """One pass over the training loader; returns (mean loss, images seen, stopped early)."""
    model.train()
    freeze_stages(unwrap(model), config.freeze_stages)  # frozen stages keep their BatchNorm statistics
    batches = len(loader)
    if config.max_steps_per_epoch:
        batches = min(batches, config.max_steps_per_epoch)
    # The loss is summed on the device: a per-step .item() would make the host wait for every step.
    total_loss = torch.zeros((), device=device)
    seen, window_images, window_start = 0, 0, time.perf_counter()
    memory_format = torch.channels_last if config.channels_last and device.type == "cuda" else torch.contiguous_format
    augment = BatchAugment(config.augment, config.image_size).to(device).train()
    for batch_index, (images, labels) in enumerate(loader):
        if batch_index >= batches or stop.requested:
            break
        images = augment(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        images, targets = regularizer.mix(images, labels) if regularizer is not None else (images, labels)
        with autocast_for(device, config.amp):
            loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if regularizer is not None:
            regularizer.after_step(model)
        total_loss += loss.detach().float() * len(labels)
        seen += len(labels)
        window_images += len(labels)
        if (batch_index + 1) % config.log_every == 0 or batch_index + 1 == batches:
            elapsed = time.perf_counter() - window_start
            events.emit(
                "step",
                epoch=epoch,
                batch=batch_index + 1,
                batches=batches,
                loss=round(loss.item(), 5),
                lr=scheduler.get_last_lr()[0],
                images_per_s=round(window_images / max(elapsed, 1e-9), 2),
            )
            window_images, window_start = 0, time.perf_counter()
    return total_loss.item() / max(seen, 1), seen, stop.requested


def validate(
    model: nn.Module,
    frame: pd.DataFrame,
    cache: lesion_data.ImageCache,
    config: TrainConfig,
    info: DistInfo,
    device: torch.device,
    criterion: nn.Module,
    target: Target = BINARY,
    loader: DataLoader | None = None,
) -> dict[str, Any]:
    """Validation metrics over the whole split, each rank scoring its shard; every rank gets the result.

    The loss is on the head's outputs; the metrics on P(malignant), the sum of the malignant outputs.
    ``loader`` is the training loop's own validation loader (its workers persist; its labels must
    be ``target``'s); made here if None.
    """
    if loader is None:
        loader = make_loader(config, frame, cache, info, train=False, device=device, target=target)
    out = collect_outputs(model, loader, device, config)
    indices = list(loader.sampler)
    gathered = all_gather_objects((indices, out["logits"], out["labels"]), info)
    order = torch.tensor([i for part in gathered for i in part[0]])
    logits = torch.cat([part[1] for part in gathered])[torch.argsort(order)]
    labels = torch.cat([part[2] for part in gathered])[torch.argsort(order)]
    scored = labels != IGNORE_INDEX
    loss = criterion(logits[scored], labels[scored]).item() if bool(scored.any()) else float("nan")
    probabilities = p_malignant(output_probabilities(logits), target).numpy()
    metrics = binary_metrics(frame["label"].to_numpy(), probabilities, 0.5, frame["dx"].tolist())
    return {"loss": loss, **metrics}


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
    optimizer, scheduler = _optimizer_and_schedule(
        model, config, min(len(loader), config.max_steps_per_epoch or len(loader))
    )
    criterion, val_criterion = _criteria(config, target, train_df, device)
    regularizer = Regularizer(config, model, num_classes=target.num_outputs)
    state = TrainState()
    if config.resume and (run_dir / LAST_FILE).is_file():
        state = _resume(run_dir / LAST_FILE, model, optimizer, scheduler, regularizer)
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


def _optimizer_and_schedule(
    model: nn.Module, config: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer over :func:`parameter_groups`, and the warm-up then cosine (or constant) schedule per step."""
    optimizer = OPTIMIZER_BUILDERS[config.optimizer](parameter_groups(model, config), config)
    total_steps = steps_per_epoch * config.epochs
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, config.schedule)
    )
    return optimizer, scheduler


def _criteria(
    config: TrainConfig, target: Target, train_df: pd.DataFrame, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """The training loss (with the benign / malignant term for a dx head) and the validation loss."""
    train_labels = target.indices(train_df["dx"].tolist(), train_df["label"].tolist())
    weight = class_weights(train_labels, target.num_outputs).to(device) if config.balance == "class_weights" else None
    criterion: nn.Module = SoftTargetCrossEntropy(weight=weight, label_smoothing=config.label_smoothing)
    if target.kind == "dx" and config.side_loss > 0:
        side_weight = class_weights(train_df["label"].to_numpy(), 2) if config.balance == "class_weights" else None
        criterion = DxSideCrossEntropy(
            target.malignant_mask(),
            dx_weight=weight,
            side_weight_per_class=side_weight,
            side_weight=config.side_loss,
            label_smoothing=config.label_smoothing,
        ).to(device)
    return criterion, nn.CrossEntropyLoss(weight=weight.cpu() if weight is not None else None)


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


def _resume(path: Path, model: nn.Module, optimizer, scheduler, regularizer: Regularizer | None = None) -> TrainState:
    """Restore weights, optimizer, schedule, EMA, RNG and early-stopping state from last.pt."""
    checkpoint = load_checkpoint(path)
    training = checkpoint.get("training")
    if not training:
        raise LesionError(f"{path} has no training state to resume from.")
    model.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    torch.set_rng_state(training["torch_rng"])
    if regularizer is not None:
        regularizer.load_state_dict(training)
    state = TrainState(**training["state"])
    state.history = json.loads(training["history_json"])
    return state
