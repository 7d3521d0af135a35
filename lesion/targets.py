"""What the network's head predicts: the diagnosis (one output per dx) or benign / malignant.

A :class:`Target` names the head's outputs and which of them are malignant. Either way
P(malignant) is the sum of the (calibrated) softmax probabilities of the malignant outputs, so a
binary model (outputs ``benign, malignant``) and a dx model (outputs ``nv, mel, ...``) share one
formula everywhere: validation, calibration, thresholds, evaluation and prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lesion.config import TARGETS  # noqa: F401 (re-exported: the choices of TrainConfig.target)
from lesion.labels import CLASS_NAMES, DX_CODES, DX_TO_LABEL

#: A training image whose diagnosis the dx head has no output for (ISIC's "other": a benign or
#: malignant label without a diagnosis we know) is left out of the dx loss, never guessed.
IGNORE_INDEX = -100
MIN_DX_PER_SIDE = 2


@dataclass(frozen=True)
class Target:
    """The head's outputs: ``kind`` "dx" or "binary", their names, and which are malignant."""

    kind: str
    names: tuple[str, ...]
    malignant: tuple[bool, ...]
    note: str = ""  # why this target was chosen when it is not the one asked for

    @property
    def num_outputs(self) -> int:
        return len(self.names)

    def indices(self, dx: Sequence[str], labels: Sequence[int]) -> np.ndarray:
        """Per-image training target: the dx's output (IGNORE_INDEX when absent), or the 0/1 label."""
        if self.kind == "binary":
            return np.asarray(labels, dtype=np.int64)
        position = {name: i for i, name in enumerate(self.names)}
        return np.asarray([position.get(str(d), IGNORE_INDEX) for d in dx], dtype=np.int64)

    def malignant_mask(self) -> torch.Tensor:
        return torch.tensor(self.malignant, dtype=torch.bool)

    def checkpoint_entries(self) -> dict[str, Any]:
        """Keys the checkpoint carries: plain strings and bools (empty dx lists for a binary head)."""
        dx = self.kind == "dx"
        return {
            "target": self.kind,
            "dx_names": list(self.names) if dx else [],
            "dx_malignant": list(self.malignant) if dx else [],
        }


BINARY = Target("binary", tuple(CLASS_NAMES), (False, True))


def dx_target(names: Sequence[str]) -> Target:
    """A dx head over ``names`` (codes from :data:`lesion.labels.DX_TO_LABEL`)."""
    return Target("dx", tuple(names), tuple(DX_TO_LABEL[name] == "malignant" for name in names))


def choose_target(requested: str, train_dx: Sequence[str]) -> Target:
    """The head for this training data: dx when asked and each side has two diagnoses, else binary.

    The dx outputs are the known diagnoses present among the training images, in
    :data:`lesion.labels.DX_CODES` order. Falling back to binary says why in ``note``.
    """
    if requested not in TARGETS:
        raise ValueError(f"unknown target {requested!r}; choose one of {', '.join(TARGETS)}")
    if requested == "binary":
        return BINARY
    present = set(map(str, train_dx))
    names = [code for code in DX_CODES if code in present]
    per_side = {side: [n for n in names if DX_TO_LABEL[n] == side] for side in CLASS_NAMES}
    short = {side: found for side, found in per_side.items() if len(found) < MIN_DX_PER_SIDE}
    if short:
        described = "; ".join(f"{side}: {', '.join(found) or 'none'}" for side, found in short.items())
        note = (
            f"target dx needs at least {MIN_DX_PER_SIDE} diagnoses on each side in the training split "
            f"({described}), so this model learns benign / malignant only"
        )
        return Target(BINARY.kind, BINARY.names, BINARY.malignant, note)
    return dx_target(names)


def target_of_checkpoint(checkpoint: dict[str, Any]) -> Target:
    """The head a checkpoint was trained with; format-1 files (no dx keys) are binary."""
    names = list(checkpoint.get("dx_names") or [])
    if not names:
        return BINARY
    return Target("dx", tuple(names), tuple(bool(m) for m in checkpoint["dx_malignant"]))


def output_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Calibrated softmax over the head's outputs, (N, C) float32."""
    return torch.softmax(logits.float() / temperature, dim=1)


def p_malignant(probabilities: torch.Tensor, target: Target) -> torch.Tensor:
    """P(malignant) per image: the sum of the malignant outputs' probabilities, (N,)."""
    return probabilities[:, target.malignant_mask().to(probabilities.device)].sum(dim=1)


def side_logits(logits: torch.Tensor, malignant: torch.Tensor) -> torch.Tensor:
    """(N, 2) float32: log-sum-exp of the benign outputs, then of the malignant ones.

    Their softmax is (1 - P(malignant), P(malignant)) and their difference the log-odds of
    P(malignant), for any head (``malignant``: the boolean mask of :meth:`Target.malignant_mask`).
    """
    logits = logits.float()
    mask = malignant.to(logits.device)
    return torch.stack([logits[:, ~mask].logsumexp(dim=1), logits[:, mask].logsumexp(dim=1)], dim=1)


# --- what a heatmap explains -------------------------------------------------------------------


def cam_targets(target: Target) -> list[str]:
    """What a heatmap can explain: "malignant", "benign", then each diagnosis of a dx head."""
    return ["malignant", "benign", *(target.names if target.kind == "dx" else ())]


def output_name(target: Target, class_names: Sequence[str], index: int) -> str:
    """The name of output ``index`` of the head (the legacy integer heatmap ``target``)."""
    names = list(target.names) if target.kind == "dx" else list(class_names)
    if not 0 <= index < len(names):
        raise ValueError(f"target {index} is not an output of this model (0 to {len(names) - 1})")
    return names[index]


def output_index(target: Target, class_names: Sequence[str], name: str) -> int:
    """``Prediction.target``: the class index for a side, the output index for a diagnosis."""
    return list(class_names).index(name) if name in class_names else list(target.names).index(name)


def explained_scores(
    logits: torch.Tensor, names: Sequence[str], target: Target, class_names: Sequence[str]
) -> torch.Tensor:
    """The scalar each image's heatmap explains, (N,), for the CAM target ``names[i]`` of image i.

    A diagnosis (or a binary model's class): its logit, as Grad-CAM's class target. A side of
    a dx model: the log-odds of P(malignant), logsumexp(malignant logits) - logsumexp(benign
    logits), negated for benign: the evidence for the probability the verdict is drawn from.
    """
    if target.kind != "dx":
        index = torch.tensor([list(class_names).index(n) for n in names], device=logits.device)
        return logits.gather(1, index.view(-1, 1))[:, 0]
    outputs = list(target.names)
    sides = side_logits(logits, target.malignant_mask())
    log_odds = sides[:, 1] - sides[:, 0]
    sign = torch.tensor([{"malignant": 1.0, "benign": -1.0}.get(n, 0.0) for n in names], device=logits.device)
    index = torch.tensor([outputs.index(n) if n in outputs else 0 for n in names], device=logits.device)
    return torch.where(sign != 0, sign * log_odds, logits.gather(1, index.view(-1, 1))[:, 0])


def class_probabilities(
    outputs: torch.Tensor, p: float, target: Target, class_names: Sequence[str], from_p: bool = False
) -> dict[str, float]:
    """Calibrated probability per class name (benign, malignant) of one image, whatever the head
    (``from_p``: from ``p`` alone, as when the similar cases' vote is weighed into it)."""
    if target.kind != "dx" and not from_p:
        return {name: float(outputs[j]) for j, name in enumerate(class_names)}
    return {name: (p if name == "malignant" else 1.0 - p) for name in class_names}
