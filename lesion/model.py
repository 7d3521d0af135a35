"""The networks: torchvision ResNets and timm's EfficientNet-Lite, each with a head of one output per class
(or diagnosis), and what the rest of the code asks of them (head, stages, Grad-CAM layer, frozen stages).

Weights are loaded by :mod:`lesion.weights`.

:func:`forward_parts` runs the network once and returns the last convolutional activations
(for Grad-CAM), the pooled penultimate features (for OOD) and the logits, so the predictor
never needs a second pass. :class:`LayerStatistics` adds, to that same pass, the channel means and
standard deviations of every stage (:func:`stage_names`) that the multi-layer OOD detectors use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torchvision import models

#: EfficientNet-Lite from timm: the networks whose ImageNet weights install offline (see lesion.weights).
EFFICIENTNET_LITES: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
RESNETS: dict[str, tuple[Callable[..., models.ResNet], str]] = {
    "resnet50": (models.resnet50, "ResNet50_Weights.IMAGENET1K_V2"),
    "resnet34": (models.resnet34, "ResNet34_Weights.IMAGENET1K_V1"),
    "resnet18": (models.resnet18, "ResNet18_Weights.IMAGENET1K_V1"),
}
ARCH_WEIGHTS: dict[str, str] = {name: weights for name, (_, weights) in RESNETS.items()}
#: The ResNets' stages, tapped by the multi-layer OOD detectors (EfficientNets name theirs in feature_info).
LAYER_NAMES = ("layer1", "layer2", "layer3", "layer4")
#: Every architecture the project builds, ResNets (torchvision) first, then timm's EfficientNet-Lite.
ARCHS: tuple[str, ...] = (*RESNETS, *EFFICIENTNET_LITES)
DISPLAY_NAMES: dict[str, str] = {
    "resnet50": "ResNet-50",
    "resnet34": "ResNet-34",
    "resnet18": "ResNet-18",
    **{name: f"EfficientNet-Lite{name[-1]}" for name in EFFICIENTNET_LITES},
}


def _linear_head(in_features: int, num_classes: int) -> nn.Module:
    return nn.Linear(in_features, num_classes)


def _mlp_head(in_features: int, num_classes: int) -> nn.Module:
    # The notebook's head: 2048 -> 512 -> ReLU -> Dropout 0.5 -> 2.
    return nn.Sequential(
        nn.Linear(in_features, 512), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(512, num_classes)
    )


HEAD_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {"linear": _linear_head, "mlp": _mlp_head}


def check_arch(arch: str) -> str:
    """Return ``arch`` if the project builds it, else raise ValueError listing the choices."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return arch


def is_resnet(model: nn.Module) -> bool:
    return isinstance(unwrap(model), models.ResNet)


def build_model(arch: str = "resnet50", head: str = "linear", num_classes: int = 2) -> nn.Module:
    """A randomly initialised network with the chosen head (weights are loaded separately)."""
    if check_arch(arch) in RESNETS:
        model: nn.Module = RESNETS[arch][0](weights=None)
    else:
        model = build_efficientnet_lite(arch)
    return replace_head(model, head, num_classes)


def build_efficientnet_lite(arch: str) -> nn.Module:
    """timm's EfficientNet-Lite, randomly initialised (timm is imported here: ResNet users never pay for it)."""
    import timm

    return timm.create_model(arch, pretrained=False)


def replace_head(model: nn.Module, head: str, num_classes: int) -> nn.Module:
    """Give ``model`` a new, randomly initialised head with ``num_classes`` outputs (the backbone is kept)."""
    new_head = HEAD_BUILDERS[head](feature_dim(model), num_classes)
    setattr(unwrap(model), "fc" if is_resnet(model) else "classifier", new_head)
    return model


def classifier(model: nn.Module) -> nn.Module:
    """The classifier head: what maps the pooled penultimate features to the logits."""
    model = unwrap(model)
    return model.fc if is_resnet(model) else model.classifier


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled penultimate features."""
    model = unwrap(model)
    return model.layer4[-1].conv1.in_channels if is_resnet(model) else int(model.num_features)


def stage_names(model: nn.Module) -> tuple[str, ...]:
    """The modules whose outputs are the network's stages, shallow to deep (the OOD taps).

    ResNets: layer1..layer4. timm models: the modules their ``feature_info`` names, one per resolution
    (for EfficientNet-Lite ``blocks.0``, ``blocks.1``, ``blocks.2``, ``blocks.4`` and ``blocks.6``).
    """
    model = unwrap(model)
    return LAYER_NAMES if is_resnet(model) else tuple(info["module"] for info in model.feature_info)


def cam_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM explains: the last convolutional stage (ResNet ``layer4[-1]``, EfficientNet ``bn2``)."""
    model = unwrap(model)
    return model.layer4[-1] if is_resnet(model) else model.bn2


def pool_features(model: nn.Module, activations: torch.Tensor) -> torch.Tensor:
    """Global average pooling of the last activations: the (N, C) penultimate features."""
    model = unwrap(model)
    return torch.flatten(model.avgpool(activations) if is_resnet(model) else model.global_pool(activations), 1)


def freezable_stages(arch: str) -> int:
    """How many stages ``--freeze-stages`` can name for ``arch``: ResNet layer1..4, EfficientNet-Lite blocks.0..6."""
    return len(LAYER_NAMES) if check_arch(arch) in RESNETS else 7


def frozen_stage_modules(model: nn.Module, stages: int) -> list[nn.Module]:
    """The stem and the first ``stages`` stages: what ``--freeze-stages`` keeps as it is (0: nothing).

    ResNet: conv1, bn1, then layer1..layer4. EfficientNet-Lite: conv_stem, bn1, then blocks.0..blocks.6.
    """
    if stages <= 0:
        return []
    model = unwrap(model)
    if is_resnet(model):
        stem, blocks = [model.conv1, model.bn1], [getattr(model, name) for name in LAYER_NAMES]
    else:
        stem, blocks = [model.conv_stem, model.bn1], list(model.blocks)
    if stages > len(blocks):
        raise ValueError(f"freeze_stages={stages}, but this network has {len(blocks)} stages")
    return stem + blocks[:stages]


def freeze_stages(model: nn.Module, stages: int) -> None:
    """No gradient for the stem and the first ``stages`` stages, and their BatchNorm statistics kept.

    Call after every ``model.train()``: it puts those modules back in eval mode, so their running
    means and variances stay the pretrained ones (a frozen layer whose BatchNorm kept learning
    would still drift).
    """
    for module in frozen_stage_modules(model, stages):
        module.eval()
        for parameter in module.parameters():
            parameter.requires_grad_(False)


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter outside the classifier head."""
    head = {id(p) for p in classifier(model).parameters()}
    return [p for p in unwrap(model).parameters() if id(p) not in head]


def forward_parts(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass: (last convolutional activations, pooled features, logits)."""
    if not is_resnet(model):
        activations = model.forward_features(x)
        features = pool_features(model, activations)
        return activations, features, model.classifier(features)
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
    """Forward hooks on the stages (:func:`stage_names`) that keep :func:`pooled_statistics` of the pass being run.

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
        self._handles = [
            model.get_submodule(name).register_forward_hook(self._hook(name)) for name in stage_names(model)
        ]

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
