"""A segmentation backend for in-process HTTP tests: the replica's own decode-and-run path (serve/classifier.py)
over a real SegmentationModel, without Ray."""

from __future__ import annotations

import numpy as np
import torch

from serve import images
from serve.classifier import LoadedModel, decode_and_run
from tests.support.fake_backend import BrightnessBackend
from train.segmodels import SegmentationModel

SEG_CLASSES = ["background", "crack"]
SEG_SIZE = 32


class DarkIsCrack(SegmentationModel):
    """The production U-Net (embedding, drift features) whose answer is "dark pixels are crack": its masks
    follow the image, so a test knows what they must be."""

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().infer(x)
        out["probabilities"] = torch.softmax(torch.cat([x - 0.5, 0.5 - x], 1) * 20, dim=1)
        out["foreground"] = (x[:, 0] < 0.5).float().mean((1, 2))
        return out


def dark_is_crack() -> SegmentationModel:
    torch.manual_seed(0)
    return DarkIsCrack("unet", SEG_CLASSES, channels=1, image_size=SEG_SIZE).eval()


class SegmentationBackend(BrightnessBackend):
    """The serve/http Backend protocol over a real segmentation model run by serve.classifier.decode_and_run."""

    def __init__(self, limits, model: SegmentationModel | None = None, version: str = "1"):
        super().__init__(limits, version=version)
        self.loaded = LoadedModel(model or dark_is_crack(), version, torch.device("cpu"))

    async def predict_image(self, data: bytes, route: float | None = None) -> dict:
        [result] = decode_and_run(self.loaded, [data], self.limits)
        if "rejected" in result:
            raise images.ImageRejected(result["rejected"], result.get("too_large", False))
        return result

    async def predict_pixels(self, pixels: np.ndarray, route: float | None = None) -> dict:
        [result] = decode_and_run(self.loaded, [np.asarray(pixels, dtype=np.float32)], self.limits)
        return result

    async def info(self) -> dict:
        model = self.loaded.model
        return {"name": "rayloop-classifier", "model_version": self.version, "task": "segmentation",
                "classes": model.classes, "input_shape": [model.channels, model.image_size, model.image_size],
                "arch": model.arch, "device": "cpu", "replica": "fake"}
