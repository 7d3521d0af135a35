"""What a run carries from epoch to epoch, and how last.pt saves it and a resumed run restores it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lesion.checkpoint import load_checkpoint
from lesion.errors import LesionError
from lesion.regularize import Regularizer


@dataclass
class TrainState:
    """What resume needs besides the weights and optimizer."""

    epoch: int = 0  # epochs completed
    best_auc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def training_state(optimizer, scheduler, state: TrainState, regularizer: Regularizer | None = None) -> dict[str, Any]:
    return {
        **(regularizer.state_dict() if regularizer is not None else {}),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": {k: v for k, v in asdict(state).items() if k != "history"},
        "history_json": json.dumps(state.history),
        "torch_rng": torch.get_rng_state(),
    }


def resume(path: Path, model: nn.Module, optimizer, scheduler, regularizer: Regularizer | None = None) -> TrainState:
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
