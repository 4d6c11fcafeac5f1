"""A model backend for in-process HTTP tests: it decodes uploads exactly as the real classifier does
(serve/images.py, with the same limits) and labels an image by its mean brightness in tenths.

It answers what serve/app.py's HandleBackend answers over the real ModelServer: prediction dicts with
label, confidence, probabilities, model_version and drift features, explanations whose saliency is the
image's brightness; a refused image raises images.ImageRejected (HandleBackend._checked turns the replica's
"rejected" answer into that).
"""

from __future__ import annotations

import numpy as np

from control.monitor import MonitorUnavailable
from serve import images
from serve.explain import overlay_png

CLASSES = [str(i) for i in range(10)]
INPUT_SHAPE = (1, 28, 28)


def brightness_label(pixels: np.ndarray) -> str:
    """0.55 mean brightness -> "5"."""
    return str(min(9, int(float(np.mean(pixels)) * 10)))


class BrightnessBackend:
    """The serve/http Backend protocol over a brightness "model" at version `version`.

    champion: what the registry says (None: no champion yet). not_ready: info() raises, as a replica
    whose model is not loaded. answer_error: every prediction answers {"error": ...}, as the real
    replica does when a model swap lands between decoding and the forward pass.
    """

    def __init__(self, limits, version: str = "3", champion: dict | None = None):
        self.limits = limits
        self.version = version
        self.champion_record = champion
        self.not_ready = False
        self.answer_error: str | None = None
        self.versions_answered: list[str] = []  # a version per prediction, when set: a rollout mid-request
        self.drift_answer: dict | None = None
        self.drift_requests = 0
        self.explained = 0  # explanations answered

    async def predict_image(self, data: bytes, route: float | None = None) -> dict:
        channels, size, _ = INPUT_SHAPE
        pixels = images.prepare(data, size, channels, self.limits.max_upload_bytes, self.limits.max_pixels)
        return self.predicted(pixels)

    async def predict_pixels(self, pixels: np.ndarray, route: float | None = None) -> dict:
        pixels = np.asarray(pixels, dtype=np.float32)
        if tuple(pixels.shape) != INPUT_SHAPE:
            raise images.ImageRejected(f"tensor shape {list(pixels.shape)} != model input {list(INPUT_SHAPE)}")
        return self.predicted(pixels)

    async def explain(self, data: bytes, target: str | None = None) -> dict:
        """The "model" looks at brightness, so the brightest pixels are where its evidence lies."""
        if target is not None and target not in CLASSES:
            return {"unknown_target": f"target {target!r} is not a class of model v{self.version}"}
        channels, size, _ = INPUT_SHAPE
        pixels = images.prepare(data, size, channels, self.limits.max_upload_bytes, self.limits.max_pixels)
        gray = pixels.mean(0)
        saliency = (gray - gray.min()) / max(float(np.ptp(gray)), 1e-6)
        label = brightness_label(pixels)
        self.explained += 1
        return {"label": label, "confidence": 0.91, "model_version": self.version, "target": target or label,
                "method": "grad-cam", "layer": "brightness", "saliency": saliency.round(4).tolist(),
                "overlay_png": overlay_png(pixels, saliency)}

    def predicted(self, pixels: np.ndarray) -> dict:
        if self.answer_error:
            return {"error": self.answer_error}
        label = brightness_label(pixels)
        probabilities = {c: 0.91 if c == label else 0.01 for c in CLASSES}
        version = self.versions_answered.pop(0) if self.versions_answered else self.version
        brightness = round(float(np.mean(pixels)), 5)
        features = {"confidence": 0.91, "predicted_class": label, "brightness": brightness,
                    "contrast": round(float(np.std(pixels)), 5), "emb_0": brightness, "emb_1": 0.0}
        return {"label": label, "confidence": 0.91, "probabilities": probabilities, "model_version": version,
                "features": features}

    async def info(self) -> dict:
        if self.not_ready:
            raise RuntimeError("no model loaded")
        return {"name": "rayloop-classifier", "model_version": self.version, "classes": CLASSES,
                "input_shape": list(INPUT_SHAPE), "arch": "cnn", "device": "cpu", "replica": "fake"}

    async def champion(self) -> dict | None:
        return self.champion_record

    async def drift_report(self) -> dict:
        self.drift_requests += 1
        if self.drift_answer is None:
            raise MonitorUnavailable("the drift monitor is not running (`rayloop up` starts it)")
        return self.drift_answer
