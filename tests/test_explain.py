"""The single-pass CAMs equal pytorch-grad-cam's plain call, for every method."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lesion import explain
from lesion.model import build_model, classifier, forward_parts
from lesion.weights import load_backbone_weights
from tests.helpers_model import batch_of, lesion_paths

# Both paths compute the same float32 formulas; what differs is the order of sums (torch vs
# numpy) and the resize (torch bilinear vs cv2.resize). Observed differences are < 5e-6 after
# the [0, 1] normalisation; 1e-4 leaves room for other BLAS builds.
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["resnet18", "efficientnet_lite0"])
def model_and_batch(request):
    """Each architecture family: the fast path must hold for ResNet's layer4 and EfficientNet's bn2 alike."""
    torch.manual_seed(0)
    model = build_model(request.param, "linear").eval()
    if request.param == "resnet18":
        return model, batch_of(lesion_paths()[:2])
    # A randomly initialised EfficientNet gives near-constant 2 x 2 maps at 64 px (often all zero after the
    # ReLU, which would match anything): its ImageNet weights at 128 px give a 4 x 4 map worth comparing.
    load_backbone_weights(model, "imagenet", request.param)
    return model, batch_of(lesion_paths()[:2], 128)


def target_gradients(leaf: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d logit[i, targets[i]] / d A[i] for every image i, through the library's score_gradients."""
    return explain.score_gradients(leaf, logits.gather(1, targets.view(-1, 1).to(logits.device)).squeeze(1))


def fast_cams(model, batch, method: str, target: int | None) -> np.ndarray:
    with torch.no_grad():
        activations, _, logits = forward_parts(model, batch)
    uses_grads = explain.USES_GRADIENTS[method]
    leaf, _, head_logits = explain.forward_head(model, activations, with_grad=uses_grads)
    targets = logits.argmax(dim=1) if target is None else torch.full((len(batch),), target)
    grads = target_gradients(leaf, head_logits, targets) if uses_grads else None
    low = explain.low_resolution_cams(method, leaf.detach(), grads)
    return explain.upsample(low, tuple(batch.shape[-2:])).numpy()


CASES = [(method, None) for method in explain.CAM_METHODS] + [
    (method, 1)
    for method in explain.CAM_METHODS
    if explain.USES_GRADIENTS[method]  # eigencam has no target
]


@pytest.mark.parametrize(("method", "target"), CASES)
def test_fast_path_matches_pytorch_grad_cam(model_and_batch, method, target):
    model, batch = model_and_batch
    reference = explain.reference_cam(model, batch, method, target)
    fast = fast_cams(model, batch, method, target)
    assert fast.shape == reference.shape == (2, *batch.shape[-2:])
    assert fast.min() >= 0 and fast.max() <= 1
    assert reference.max() > 0.5  # a real map, not an all-zero one that would match anything
    np.testing.assert_allclose(fast, reference, atol=TOLERANCE)


def test_targets_change_the_map(model_and_batch):
    model, batch = model_and_batch
    assert not np.allclose(fast_cams(model, batch, "gradcam", 0), fast_cams(model, batch, "gradcam", 1), atol=0.05)


def test_no_hooks_or_gradients_are_left_behind(model_and_batch):
    model, batch = model_and_batch
    explain.reference_cam(model, batch[:1], "gradcam", 1)
    fast_cams(model, batch[:1], "gradcam++", 1)
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
    # Neither path leaves .grad on the network's parameters (the fast one never touches them).
    assert all(p.grad is None for p in model.parameters())


def test_fast_path_differentiates_only_the_head(model_and_batch):
    model, batch = model_and_batch
    with torch.no_grad():
        activations, _, _ = forward_parts(model, batch[:1])
    assert not activations.requires_grad  # the backbone ran without a graph
    leaf, _, logits = explain.forward_head(model, activations, with_grad=True)
    assert logits.grad_fn is not None and leaf.is_leaf
    grads = target_gradients(leaf, logits, torch.tensor([1]))
    # For a linear head after average pooling, dlogit/dA is fc.weight[c] / (h * w) everywhere.
    h, w = activations.shape[-2:]
    expected = (classifier(model).weight[1] / (h * w))[:, None, None].expand_as(grads[0])
    assert torch.allclose(grads[0], expected, atol=1e-7)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown CAM method"):
        explain.check_method("scorecam")


def test_place_in_image_fills_only_the_crop_box():
    cam = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    placed = explain.place_in_image(cam, (100, 60), (20, 10, 80, 50))
    assert placed.shape == (60, 100) and placed.dtype == np.float32
    assert placed[:10].max() == 0 and placed[50:].max() == 0 and placed[:, :20].max() == 0 and placed[:, 80:].max() == 0
    inside = placed[10:50, 20:80]
    assert inside.min() == pytest.approx(0, abs=1e-6) and inside.max() == pytest.approx(1, abs=1e-6)
    assert inside[0, -1] > inside[0, 0]  # the hot corner stays top right


def test_overlay_returns_a_new_rgb_image_and_leaves_the_original():
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    before = np.asarray(image).copy()
    heatmap = np.linspace(0, 1, 30 * 40, dtype=np.float32).reshape(30, 40)
    result = explain.overlay(image, heatmap, alpha=0.5)
    assert result is not image and result.mode == "RGB" and result.size == (40, 30)
    assert np.array_equal(np.asarray(image), before)
    assert np.array_equal(np.asarray(explain.overlay(image, heatmap, alpha=0.0)), before)
    assert np.array_equal(np.asarray(explain.overlay(image, heatmap, alpha=1.0)), explain.colorize(heatmap))
    # A heatmap of another size (and a numpy image) is resized to the image.
    small = explain.overlay(before, heatmap[::3, ::3], colormap="viridis")
    assert small.size == (40, 30)


def test_heatmap_png_is_a_png_of_the_heatmap():
    heatmap = np.zeros((20, 30), dtype=np.float32)
    heatmap[5, 7] = 1.0
    coloured = Image.open(io.BytesIO(explain.heatmap_png(heatmap)))
    assert coloured.format == "PNG" and coloured.size == (30, 20) and coloured.mode == "RGB"
    gray = Image.open(io.BytesIO(explain.heatmap_png(heatmap, colormap=None)))
    assert gray.mode == "L" and np.asarray(gray)[5, 7] == 255 and np.asarray(gray).sum() == 255


def test_overlay_with_box_colours_only_what_the_network_saw() -> None:
    from lesion.explain import overlay

    image = Image.new("RGB", (120, 80), (10, 200, 30))
    heatmap = np.zeros((80, 120), dtype=np.float32)
    out = np.asarray(overlay(image, heatmap, alpha=0.5, box=(20.0, 0.0, 100.0, 80.0)))
    assert (out[40, 5] == (10, 200, 30)).all(), "outside the box the photo is left as it is"
    assert not (out[40, 60] == (10, 200, 30)).all(), "inside the box the heatmap colour is laid over"
    assert (out[40, 20] == (255, 255, 255)).all(), "the box is outlined"
