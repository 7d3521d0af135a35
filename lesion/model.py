"""The network: a torchvision ResNet with a head of one output per class (or diagnosis), and weight loading.

:func:`forward_parts` runs the network once and returns the last convolutional activations
(for Grad-CAM), the pooled penultimate features (for OOD) and the logits, so the predictor
never needs a second pass. :class:`LayerStatistics` adds, to that same pass, the channel means and
standard deviations of every residual stage (layer1..layer4) that the multi-layer OOD detectors use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from lesion.errors import WeightsUnavailable

ARCH_BUILDERS: dict[str, Callable[..., models.ResNet]] = {
    "resnet50": models.resnet50,
    "resnet34": models.resnet34,
    "resnet18": models.resnet18,
}

ARCH_WEIGHTS: dict[str, str] = {
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
}


def _linear_head(in_features: int, num_classes: int) -> nn.Module:
    return nn.Linear(in_features, num_classes)


def _mlp_head(in_features: int, num_classes: int) -> nn.Module:
    # The notebook's head: 2048 -> 512 -> ReLU -> Dropout 0.5 -> 2.
    return nn.Sequential(
        nn.Linear(in_features, 512), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(512, num_classes)
    )


HEAD_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {"linear": _linear_head, "mlp": _mlp_head}


def build_model(arch: str = "resnet50", head: str = "linear", num_classes: int = 2) -> models.ResNet:
    """A randomly initialised ResNet with the chosen head (weights are loaded separately)."""
    if arch not in ARCH_BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCH_BUILDERS)}")
    model = ARCH_BUILDERS[arch](weights=None)
    model.fc = HEAD_BUILDERS[head](model.fc.in_features, num_classes)
    return model


def replace_head(model: models.ResNet, head: str, num_classes: int) -> models.ResNet:
    """Give ``model`` a new, randomly initialised head with ``num_classes`` outputs (the backbone is kept)."""
    model.fc = HEAD_BUILDERS[head](feature_dim(model), num_classes)
    return model


def classifier(model: nn.Module) -> nn.Module:
    """The classifier head: what maps the pooled penultimate features to the logits."""
    return unwrap(model).fc


def feature_dim(model: models.ResNet) -> int:
    """Width of the pooled penultimate features."""
    return model.layer4[-1].conv1.in_channels


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """ImageNet weights through torchvision's weights API (downloads into its cache once)."""
    weights = models.get_weight(ARCH_WEIGHTS[arch])
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # URLError, socket errors, hash mismatch: all mean "not available"
        raise WeightsUnavailable(
            f"ImageNet weights for {arch} could not be downloaded ({type(error).__name__}: {error}). "
            "On a machine without internet, either train from scratch with --weights=none, or copy "
            f"torchvision's file ({Path(weights.url).name}) here and pass --weights=/path/to/that/file."
        ) from None


def local_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file (torchvision's cached file, or one saved by torch.save)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailable(
            f"weights file not found: {path}. Use --weights=imagenet to download, or --weights=none to start from scratch."
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsUnavailable(f"{path} is not a readable weights file: {error}") from None
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise WeightsUnavailable(f"{path} does not hold a state dict")
    return loaded


def load_backbone_weights(model: models.ResNet, source: str, arch: str) -> str:
    """Load ``imagenet``, ``none`` or a file into everything but the head; return a description."""
    if source == "none":
        return "random initialisation"
    state = imagenet_state_dict(arch) if source == "imagenet" else local_state_dict(source)
    # The classifier head is new (2 classes); everything else must match exactly.
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise WeightsUnavailable(
            f"weights from {source} do not fit {arch}: {len(missing)} missing and {len(unexpected)} unexpected "
            f"tensors (first: {(missing + unexpected)[:3]})"
        )
    return "ImageNet (torchvision)" if source == "imagenet" else f"local file {source}"


def backbone_parameters(model: models.ResNet) -> list[nn.Parameter]:
    """Every parameter outside the classifier head."""
    head = {id(p) for p in model.fc.parameters()}
    return [p for p in model.parameters() if id(p) not in head]


def forward_parts(model: models.ResNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass: (layer4 activations, pooled features, logits)."""
    x = model.conv1(x)
    x = model.bn1(x)
    x = model.relu(x)
    x = model.maxpool(x)
    x = model.layer1(x)
    x = model.layer2(x)
    x = model.layer3(x)
    activations = model.layer4(x)
    features = torch.flatten(model.avgpool(activations), 1)
    logits = model.fc(features)
    return activations, features, logits


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


LAYER_NAMES = ("layer1", "layer2", "layer3", "layer4")


def pooled_statistics(activations: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 2C) float32: each channel's spatial mean, then its spatial standard deviation."""
    # float32 whatever the autocast dtype: bf16 sums over 56 x 56 positions lose too many digits.
    x = activations.float()
    return _pooled_one_kernel(x) if x.is_cuda else _pooled_two_pass(x)


def _pooled_two_pass(x: torch.Tensor) -> torch.Tensor:
    """:func:`pooled_statistics` in two passes (mean, then the mean square about it), for a CPU.

    The same figures as torch.std_mean to ~1e-7, and 4-8x faster on the CPU, where std_mean over the
    spatial dims is single-threaded.
    """
    flat = x.flatten(2)
    mean = flat.mean(dim=2)
    std = (flat - mean.unsqueeze(2)).square().mean(dim=2).sqrt()
    return torch.cat([mean, std], dim=1)


def _pooled_one_kernel(x: torch.Tensor) -> torch.Tensor:
    """:func:`pooled_statistics` in one reduction kernel: for a GPU, where each launched operation costs
    ~10 microseconds at batch 1 (the two passes are 5 launches a stage)."""
    std, mean = torch.std_mean(x, dim=(2, 3), correction=0)
    return torch.cat([mean, std], dim=1)


class LayerStatistics:
    """Forward hooks on layer1..layer4 that keep :func:`pooled_statistics` of the pass being run.

    Hooks fire in the thread that runs the forward pass, and each thread collects into its own
    dict, so one instance on a shared model serves several threads at once. Outside
    :meth:`capture` the hooks do nothing (training passes pay nothing). ``close`` (or leaving the
    ``with`` block) removes the hooks.

        with LayerStatistics(model) as tap, tap.capture() as layers:
            activations, features, logits = forward_parts(model, x)
        layers["layer1"]  # (N, 2 * channels of layer1)
    """

    def __init__(self, model: nn.Module) -> None:
        model = unwrap(model)
        self._local = threading.local()
        self._handles = [getattr(model, name).register_forward_hook(self._hook(name)) for name in LAYER_NAMES]

    def _hook(self, name: str) -> Callable[..., None]:
        def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            store = getattr(self._local, "store", None)
            if store is not None:
                store[name] = pooled_statistics(output.detach())

        return keep

    @contextmanager
    def capture(self) -> Iterator[dict[str, torch.Tensor]]:
        """Collect the statistics of the passes run inside the block into the yielded dict."""
        store: dict[str, torch.Tensor] = {}
        self._local.store = store
        try:
            yield store
        finally:
            self._local.store = None

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> LayerStatistics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
