"""One training epoch and one validation pass, and the flag that stops a run between batches."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from lesion import data as lesion_data
from lesion.config import TrainConfig
from lesion.distributed import DistInfo, all_gather_objects
from lesion.events import EventWriter
from lesion.loaders import autocast_for, collect_outputs, make_loader
from lesion.metrics import binary_metrics
from lesion.model import freeze_stages, unwrap
from lesion.regularize import Regularizer
from lesion.targets import BINARY, IGNORE_INDEX, Target, output_probabilities, p_malignant
from lesion.transforms import BatchAugment


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
