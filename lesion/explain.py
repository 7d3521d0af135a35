"""Class activation maps (Grad-CAM and relatives) on the last convolutional stage, from the prediction's own pass.

pytorch-grad-cam hooks the target layer and back-propagates through the WHOLE network, so a
heatmap costs a second forward pass and a full backward pass. The target layer's output ``A``
(ResNet: ``layer4``; EfficientNet-Lite: ``bn2``, after the last 1x1 convolution, see
:func:`lesion.model.cam_layer`) feeds the head only through global average pooling, so the gradient
of a logit with respect to ``A`` needs the head alone: we take ``A`` from the prediction's single
forward pass, detach it, re-run ``head(pool(A))`` with ``A`` as a leaf, and differentiate that.
The weighting formulas below follow pytorch-grad-cam 1.5.7 line by line (base_cam.py,
grad_cam.py, grad_cam_plusplus.py, hirescam.py, xgrad_cam.py, layer_cam.py, eigen_cam.py), and
so does the normalisation: ReLU, min-max per image, bilinear upsampling, min-max again.
:func:`reference_cam` keeps the library's plain call available; the tests check that both agree
for every method.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from lesion.model import cam_layer, classifier, pool_features

# The eps values pytorch-grad-cam uses; matching them keeps the fast path equal to the reference.
_NORMALISE_EPS = 1e-7
_GRADCAM_PLUSPLUS_EPS = 1e-6
_XGRADCAM_EPS = 1e-7


def _gradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    weights = g.mean(dim=(2, 3))
    return (weights[:, :, None, None] * a).sum(dim=1)


def _gradcam_plusplus(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # Equation 19 of https://arxiv.org/abs/1710.11063, as pytorch-grad-cam writes it.
    g2 = g**2
    g3 = g2 * g
    sum_a = a.sum(dim=(2, 3), keepdim=True)
    aij = g2 / (2 * g2 + sum_a * g3 + _GRADCAM_PLUSPLUS_EPS)
    aij = torch.where(g != 0, aij, torch.zeros_like(aij))
    weights = (g.clamp_min(0) * aij).sum(dim=(2, 3))
    return (weights[:, :, None, None] * a).sum(dim=1)


def _hirescam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (g * a).sum(dim=1)


def _xgradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    sum_a = a.sum(dim=(2, 3), keepdim=True)
    weights = (g * a / (sum_a + _XGRADCAM_EPS)).sum(dim=(2, 3))
    return (weights[:, :, None, None] * a).sum(dim=1)


def _layercam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (g.clamp_min(0) * a).sum(dim=1)


def _eigencam(a: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    # Projection of the centred activations on their first principal component. The sign of a
    # singular vector is arbitrary; we use the same LAPACK routine on the same float32 numbers as
    # pytorch-grad-cam's get_2d_projection so the sign (and so the map) is the same as its.
    # full_matrices=False gives the same first row of VT without a C x C matrix.
    batch = np.nan_to_num(a.detach().cpu().float().numpy())
    maps = []
    for activations in batch:
        flat = activations.reshape(activations.shape[0], -1).T
        flat = flat - flat.mean(axis=0)
        _, _, vt = np.linalg.svd(flat, full_matrices=False)
        maps.append((flat @ vt[0, :]).reshape(activations.shape[1:]))
    return torch.from_numpy(np.float32(maps)).to(a.device)


CAM_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "gradcam": _gradcam,
    "gradcam++": _gradcam_plusplus,
    "hirescam": _hirescam,
    "xgradcam": _xgradcam,
    "layercam": _layercam,
    "eigencam": _eigencam,
}
CAM_METHODS: tuple[str, ...] = tuple(CAM_FUNCTIONS)
USES_GRADIENTS: dict[str, bool] = {name: name != "eigencam" for name in CAM_METHODS}


def check_method(method: str) -> str:
    """Return ``method`` if it is known, else raise ValueError listing the choices."""
    if method not in CAM_FUNCTIONS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    return method


def forward_head(model: nn.Module, activations: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, ...]:
    """Re-run only ``head(pool(A))`` from the last activations: (leaf A, features, logits).

    With ``with_grad`` the leaf requires grad, so :func:`score_gradients` can differentiate the
    logits with respect to it; the rest of the network is never part of the graph.
    """
    leaf = activations.detach().requires_grad_(with_grad)
    with torch.set_grad_enabled(with_grad):  # thread-local: other threads are unaffected
        features = pool_features(model, leaf)
        logits = classifier(model)(features)
    return leaf, features, logits


def score_gradients(leaf: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """d scores[i] / d A[i] for every image i: the heatmap of any scalar of the head's output.

    Grad-CAM of one class is the case ``scores = logits[i, targets[i]]``.
    """
    (grads,) = torch.autograd.grad(scores.sum(), leaf)
    return grads


def normalise(cams: torch.Tensor) -> torch.Tensor:
    """Min-max per image to [0, 1], with pytorch-grad-cam's eps (so a flat map stays 0)."""
    flat = cams.flatten(1)
    shifted = cams - flat.min(dim=1).values.view(-1, *([1] * (cams.dim() - 1)))
    top = shifted.flatten(1).max(dim=1).values.view(-1, *([1] * (cams.dim() - 1)))
    return shifted / (_NORMALISE_EPS + top)


def low_resolution_cams(method: str, activations: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
    """CAMs at the layer's own resolution (N, h, w): weighting, ReLU, min-max."""
    cams = CAM_FUNCTIONS[check_method(method)](activations.detach().float(), None if grads is None else grads.float())
    return normalise(cams.clamp_min(0))


def upsample(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (half-pixel centres, as cv2.resize) to ``size`` = (height, width), then min-max."""
    resized = nn.functional.interpolate(cams[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return normalise(resized)


def place_in_image(
    cam: torch.Tensor, image_size: tuple[int, int], box: tuple[float, float, float, float]
) -> np.ndarray:
    """Upsample one low-resolution CAM into ``box`` (left, top, right, bottom) of an image.

    ``image_size`` is (width, height). The network only saw the centre crop, so the map covers
    that box and is 0 (no evidence either way) elsewhere.
    """
    width, height = image_size
    left, top, right, bottom = (int(round(v)) for v in box)
    left, top = max(0, left), max(0, top)
    right, bottom = min(width, max(right, left + 1)), min(height, max(bottom, top + 1))
    canvas = np.zeros((height, width), dtype=np.float32)
    canvas[top:bottom, left:right] = upsample(cam[None], (bottom - top, right - left))[0].cpu().numpy()
    return canvas


def reference_cam(
    model: nn.Module, input_tensor: torch.Tensor, method: str = "gradcam", target: int | None = None
) -> np.ndarray:
    """pytorch-grad-cam's plain call on :func:`lesion.model.cam_layer`: (N, H, W) at the input resolution.

    A second forward and a full backward pass; kept as the reference for tests and benchmarks.
    """
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = {
        "gradcam": GradCAM,
        "gradcam++": GradCAMPlusPlus,
        "hirescam": HiResCAM,
        "xgradcam": XGradCAM,
        "layercam": LayerCAM,
        "eigencam": EigenCAM,
    }
    targets = None if target is None else [ClassifierOutputTarget(int(target))] * input_tensor.shape[0]
    with classes[check_method(method)](model=model, target_layers=[cam_layer(model)]) as cam:
        result = cam(input_tensor=input_tensor, targets=targets)
    model.zero_grad(set_to_none=True)  # the library's backward leaves .grad on every parameter
    return result


def colorize(heatmap: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """A [0, 1] heatmap as an (H, W, 3) uint8 RGB array through a matplotlib colormap."""
    import matplotlib  # here, not at import: the app loads its model before it draws a heatmap

    colours = matplotlib.colormaps[colormap](np.clip(np.asarray(heatmap, dtype=np.float32), 0, 1))[..., :3]
    return (colours * 255).round().astype(np.uint8)


def overlay(
    image: Image.Image | np.ndarray,
    heatmap: np.ndarray,
    alpha: float = 0.4,
    colormap: str = "jet",
    box: tuple[float, float, float, float] | None = None,
) -> Image.Image:
    """A new RGB image: ``image`` blended with the coloured heatmap (weight ``alpha``).

    With ``box`` (the network's view: left, top, right, bottom, e.g. ``Prediction.crop_box``) the
    colour is laid only inside it and the box is outlined: outside, the model saw nothing, and
    painting "no evidence" there in the colormap's coldest colour would read as a finding.
    """
    base = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image).astype(np.uint8))
    base = base.convert("RGB")
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape != (base.height, base.width):
        heatmap = np.asarray(Image.fromarray(heatmap).resize(base.size, Image.Resampling.BILINEAR))
    pixels = np.asarray(base, dtype=np.float32)
    weight = np.full(heatmap.shape + (1,), alpha, dtype=np.float32)
    if box is not None:
        left, top, right, bottom = _box_pixels(box, base.size)
        weight[:] = 0.0
        weight[top:bottom, left:right] = alpha
    blended = (1 - weight) * pixels + weight * colorize(heatmap, colormap).astype(np.float32)
    result = Image.fromarray(np.clip(blended, 0, 255).round().astype(np.uint8))
    if box is not None:
        left, top, right, bottom = _box_pixels(box, base.size)
        width = max(1, round(min(base.size) / 150))
        ImageDraw.Draw(result).rectangle((left, top, right - 1, bottom - 1), outline=(255, 255, 255), width=width)
    return result


def _box_pixels(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    left, top, right, bottom = (int(round(v)) for v in box)
    return max(0, left), max(0, top), min(size[0], right), min(size[1], bottom)


def heatmap_png(heatmap: np.ndarray, colormap: str | None = "jet") -> bytes:
    """PNG bytes of the heatmap: coloured with ``colormap``, or 8-bit grayscale when None."""
    if colormap is None:
        pixels = (np.clip(np.asarray(heatmap, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.fromarray(colorize(heatmap, colormap))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
