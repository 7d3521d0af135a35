"""Fine-tuning's optimisation: parameter groups (head and backbone, frozen stages left out), the optimizer,
the warm-up and cosine schedule, class weights and the training and validation losses."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lesion.config import TrainConfig
from lesion.model import backbone_parameters, classifier, freeze_stages, frozen_stage_modules
from lesion.regularize import DxSideCrossEntropy, SoftTargetCrossEntropy
from lesion.targets import Target


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


def optimizer_and_schedule(
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


def criteria(
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
