"""Explanations: Grad-CAM of the classifier's decision for one image, and the heat map over the image as a PNG.

Grad-CAM (Selvaraju et al., 2017): the last convolution's feature maps, each weighted by the mean gradient of
the explained class's logit with respect to it, summed, kept where positive, scaled up to the input size.
Plain torch on any ImageClassifier arch: the last nn.Conv2d the model holds is the layer explained.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

METHOD = "grad-cam"
OVERLAY_MIN_SIDE = 224  # a 28x28 digit's overlay is scaled up (whole pixels) to be seen
HEAT_OPACITY = 0.6      # of the heat map where saliency is 1; the image shows through where it is 0


@dataclass(frozen=True)
class Saliency:
    """Where the model looked for `target`: HxW float32 in [0, 1] at the model's input size."""

    map: np.ndarray
    target: int
    probabilities: np.ndarray
    layer: str


def last_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The model's last nn.Conv2d (in registration order, which is the forward order of our archs)."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer to explain")
    return convs[-1]


def gradcam(model: nn.Module, x: torch.Tensor, target_index: int | None = None) -> Saliency:
    """Grad-CAM of `model` (in eval mode, as served) for the one image in `x` (1xCxHxW); the top class by default.

    The model is left as it was: no parameter gradient is kept (torch.autograd.grad), its mode is untouched,
    and the hook lives for this call only. The hook records only this thread's forward pass, so predictions
    that other threads run on the same model meanwhile are neither seen nor changed.
    """
    name, layer = last_conv(model)
    thread, kept = threading.get_ident(), []

    def keep(_module, _inputs, output):
        if threading.get_ident() == thread:
            kept.append(output)

    hook = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():  # the serving threads run in inference mode; grad mode is per thread
            # An input that needs a gradient makes the activations need one, even with frozen parameters.
            logits = model(x.detach().float().requires_grad_(True)).float()
            target = int(logits[0].argmax()) if target_index is None else int(target_index)
            [gradient] = torch.autograd.grad(logits[0, target], kept[-1])
    finally:
        hook.remove()
    activation = kept[-1].detach()
    weights = gradient.mean(dim=(2, 3), keepdim=True)  # one weight per feature map
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    if float(cam.max()) > 0:  # no positive evidence anywhere: an all-zero map
        cam = cam / cam.max()
    probabilities = torch.softmax(logits.detach()[0], dim=0)
    return Saliency(cam.cpu().numpy().astype(np.float32), target, probabilities.cpu().numpy(), name)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """HxW in [0, 1] -> HxWx3 uint8 on a blue-cyan-yellow-red scale (the "jet" colour map)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def overlay_png(pixels: np.ndarray, saliency: np.ndarray, min_side: int = OVERLAY_MIN_SIDE) -> bytes:
    """The image (CxHxW in [0, 1], 1 or 3 channels) with its saliency (HxW) laid over it, as a PNG.

    Scaled up by a whole factor until its longer side is at least `min_side`, pixels kept square and sharp.
    """
    rgb = np.repeat(pixels, 3, axis=0) if pixels.shape[0] == 1 else pixels[:3]
    image = np.clip(rgb.transpose(1, 2, 0), 0.0, 1.0) * 255
    alpha = HEAT_OPACITY * np.clip(saliency, 0.0, 1.0)[..., None]
    blended = ((1 - alpha) * image + alpha * heat_colours(saliency)).round().astype(np.uint8)
    picture = Image.fromarray(blended, "RGB")
    factor = max(1, -(-min_side // max(picture.size)))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def explanation(model: nn.Module, classes: list[str], pixels: np.ndarray, target: str | None,
                device: torch.device) -> dict:
    """One image's explanation (pixels CxHxW in [0, 1] at the model's input shape; target a class name or None
    for the predicted class): label, confidence, target, method, layer, saliency (HxW list), overlay_png."""
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None].to(device)
    x = x.contiguous(memory_format=torch.channels_last)  # as serve.classifier.run feeds the served model
    found = gradcam(model, x, None if target is None else classes.index(target))
    best = int(found.probabilities.argmax())
    return {"label": classes[best], "confidence": float(found.probabilities[best]), "target": classes[found.target],
            "method": METHOD, "layer": found.layer, "saliency": np.round(found.map, 4).tolist(),
            "overlay_png": overlay_png(pixels, found.map)}
