"""Training regularisers beyond augmentation: mixup / cutmix, an EMA of the weights, and flip TTA.

* :class:`BatchMix` mixes a normalised batch on the training device (after :class:`BatchAugment`)
  and turns the labels into soft targets that sum to 1 per image.
* :class:`SoftTargetCrossEntropy` accepts hard labels (exactly ``nn.CrossEntropyLoss``) or soft
  targets, with class weights and label smoothing either way.
* :class:`ModelEma` keeps an exponential moving average of the weights; its state goes into last.pt
  so a resumed run continues the same average.
* :func:`flip_logits` averages the logits over horizontal and vertical flips (test-time augmentation).

:class:`Regularizer` bundles what the training loop needs, so the loop only calls a few hooks.
Every random draw comes from torch's global CPU generator, which the loop reseeds every epoch:
a seeded run is reproducible and resume matches an uninterrupted run.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lesion.errors import LesionError
from lesion.model import unwrap
from lesion.targets import side_logits

# Views averaged by test-time augmentation: the image, flipped left-right, upside-down, and both.
FLIP_DIMS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))


# ---------------------------------------------------------------- mixup and cutmix


def _beta(alpha: float) -> float:
    """One draw from Beta(alpha, alpha) on torch's global generator."""
    gamma = torch.distributions.Gamma(torch.tensor([alpha, alpha]), torch.tensor([1.0, 1.0])).sample()
    return float(gamma[0] / gamma.sum())


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A random box covering about ``1 - lam`` of the image: (top, bottom, left, right), clipped."""
    cut = math.sqrt(1.0 - lam)
    box_h, box_w = int(height * cut), int(width * cut)
    cy, cx = int(torch.randint(0, height, ())), int(torch.randint(0, width, ()))
    top, bottom = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
    left, right = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
    return top, bottom, left, right


class BatchMix:
    """Mixup and cutmix on a batch: each mixed image is paired with another image of the batch.

    With probability ``prob`` a batch is mixed, by mixup or cutmix (one of the two at random when
    both alphas are positive); the soft target is the same blend of the two one-hot labels (for
    cutmix, weighted by the pasted box's true area).
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, prob: float, num_classes: int = 2) -> None:
        self.mixup_alpha, self.cutmix_alpha, self.prob, self.num_classes = mixup_alpha, cutmix_alpha, prob, num_classes

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, soft targets of shape (n, num_classes)); targets are one-hot when the batch is not mixed."""
        targets = F.one_hot(labels, self.num_classes).float()
        if not self.enabled or len(labels) < 2 or float(torch.rand(())) >= self.prob:
            return images, targets
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or float(torch.rand(())) < 0.5)
        partner = torch.randperm(len(labels)).to(images.device)
        if use_cutmix:
            lam = _beta(self.cutmix_alpha)
            top, bottom, left, right = cutmix_box(images.shape[2], images.shape[3], lam)
            images = images.clone()
            images[:, :, top:bottom, left:right] = images[partner, :, top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (images.shape[2] * images.shape[3])
        else:
            lam = _beta(self.mixup_alpha)
            images = images * lam + images[partner] * (1.0 - lam)
        return images, targets * lam + targets[partner] * (1.0 - lam)


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy for hard labels or soft targets, with class weights and label smoothing.

    Hard labels go to ``F.cross_entropy`` unchanged. Soft targets ``t`` (rows summing to 1) are
    smoothed, ``t' = (1 - eps) t + eps / C``, and weighted like the hard case:
    ``sum_n sum_c w_c t'_nc (-log p_nc) / sum_n sum_c w_c t'_nc``, which equals the weighted hard
    loss when ``t`` is one-hot and eps is 0, so mixed and plain batches share one scale.
    """

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not target.is_floating_point():
            return F.cross_entropy(logits, target, weight=self.weight, label_smoothing=self.label_smoothing)
        classes = logits.shape[1]
        target = target.float() * (1.0 - self.label_smoothing) + self.label_smoothing / classes
        weighted = target * (self.weight.view(1, -1) if self.weight is not None else 1.0)
        log_p = F.log_softmax(logits.float(), dim=1)
        return -(weighted * log_p).sum() / weighted.sum()


class DxSideCrossEntropy(nn.Module):
    """A dx head's loss plus ``side_weight`` x the benign / malignant cross-entropy of P(malignant).

    P(malignant) is the softmax mass of the malignant outputs, so the side term's two logits are
    the log-sum-exp of each side's outputs; its target is the side of the dx target (the malignant
    share of a soft, mixed target). Each term is a :class:`SoftTargetCrossEntropy` with its own class
    weights (per diagnosis, per side). The side term trains the ranking the app's verdict uses
    directly, while the dx term still spreads the mass over the diagnoses.
    """

    def __init__(
        self,
        malignant: torch.Tensor,
        dx_weight: torch.Tensor | None = None,
        side_weight_per_class: torch.Tensor | None = None,
        side_weight: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_buffer("malignant", malignant.bool(), persistent=False)
        self.dx = SoftTargetCrossEntropy(dx_weight, label_smoothing)
        self.side = SoftTargetCrossEntropy(side_weight_per_class, label_smoothing)
        self.side_weight = side_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sides = side_logits(logits, self.malignant)
        if target.is_floating_point():
            malignant_share = (target.float() * self.malignant.float()).sum(dim=1)
            side_target = torch.stack([1.0 - malignant_share, malignant_share], dim=1)
        else:
            # Images without a dx output (ignored by the dx term) are ignored here too.
            side_target = torch.where(target >= 0, self.malignant[target.clamp_min(0)].long(), target)
        return self.dx(logits, target) + self.side_weight * self.side(sides, side_target)


# ---------------------------------------------------------------- EMA of the weights


class ModelEma:
    """An exponential moving average of a model's weights and buffers.

    After each optimizer step: ``ema = d * ema + (1 - d) * weights`` with
    ``d = min(decay, (1 + updates) / (10 + updates))``, so the first steps, when the weights move
    most, are not frozen behind a random start. Integer buffers (BatchNorm's batch count) are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1); got {decay}")
        self.module = copy.deepcopy(unwrap(model)).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        current = unwrap(model).state_dict()
        for key, average in self.module.state_dict().items():
            value = current[key].detach()
            if average.is_floating_point():
                average.lerp_(value.to(average.dtype), 1.0 - decay)
            else:
                average.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (it goes into last.pt)."""
        return {
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()},
            "updates": self.updates,
            "decay": self.decay,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["state_dict"])
        self.updates = int(state["updates"])


# ---------------------------------------------------------------- test-time flips


@torch.no_grad()
def flip_logits(model: nn.Module, images: torch.Tensor, plain_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Mean logits over the image and its horizontal, vertical and double flips.

    ``plain_logits`` (the un-flipped pass, already run by the caller) saves one forward pass; the
    three flipped views go through the network as one batch.
    """
    if plain_logits is None:
        plain_logits = model(images)
    flipped = torch.cat([torch.flip(images, dims) for dims in FLIP_DIMS[1:]])
    views = model(flipped).float().view(len(FLIP_DIMS) - 1, len(images), -1)
    return (plain_logits.float() + views.sum(0)) / len(FLIP_DIMS)


# ---------------------------------------------------------------- what the training loop calls


class Regularizer:
    """The loop's hooks: ``mix`` after augmentation, ``after_step`` after the optimizer,
    ``eval_model`` for validation and checkpoints, ``state_dict`` / ``load_state_dict`` for resume."""

    def __init__(self, config: Any, model: nn.Module, num_classes: int = 2) -> None:
        self.mixer = BatchMix(config.mixup_alpha, config.cutmix_alpha, config.mix_prob, num_classes)
        self.ema = ModelEma(model, config.ema_decay) if config.ema_decay > 0 else None

    def mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and soft targets; untouched images and hard labels when mixing is off."""
        return self.mixer(images, labels) if self.mixer.enabled else (images, labels)

    def after_step(self, model: nn.Module) -> None:
        if self.ema is not None:
            self.ema.update(model)

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The weights to validate and keep: the EMA when enabled, else the model itself."""
        return self.ema.module if self.ema is not None else model

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is not None:
            if "ema" not in state:
                raise LesionError("last.pt has no EMA state, but this run averages the weights (ema_decay > 0)")
            self.ema.load_state_dict(state["ema"])
