"""Synthetic distribution shifts on raw images, to exercise and demonstrate drift detection."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

# What `severity` means for each kind, and a value that clearly shifts MNIST-like digits.
SHIFT_KINDS = {
    "rotate": ("degrees, each image turned by +/- this much", 45.0),
    "noise": ("std of added gaussian noise, as a fraction of full scale", 0.3),
    "invert": ("fraction of images whose pixels are inverted", 1.0),
    "blur": ("gaussian blur radius in pixels", 2.0),
    "contrast": ("fraction of contrast removed (0 none, 1 flat gray)", 0.6),
}


def _to_pil(image: np.ndarray) -> Image.Image:
    """HxWxC uint8 -> PIL image (gray or RGB)."""
    return Image.fromarray(image[:, :, 0], "L") if image.shape[2] == 1 else Image.fromarray(image, "RGB")


def _from_pil(image: Image.Image, channels: int) -> np.ndarray:
    """PIL image -> HxWxC uint8."""
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if channels == 1 else array


def _rotate(images: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    # A random sign per image: a one-sided turn would look like a different, narrower shift.
    signs = rng.choice([-1.0, 1.0], size=len(images))
    return np.stack([_from_pil(_to_pil(im).rotate(s * degrees, resample=Image.BILINEAR), im.shape[2])
                     for im, s in zip(images, signs)])


def _noise(images: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    noisy = images.astype(np.float32) + rng.normal(0.0, std * 255.0, size=images.shape)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def _invert(images: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    out = images.copy()
    chosen = rng.random(len(images)) < fraction
    out[chosen] = 255 - out[chosen]
    return out


def _blur(images: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    blur = ImageFilter.GaussianBlur(radius)
    return np.stack([_from_pil(_to_pil(im).filter(blur), im.shape[2]) for im in images])


def _contrast(images: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    pixels = images.astype(np.float32)
    mean = pixels.mean(axis=(1, 2, 3), keepdims=True)
    return np.clip(mean + (pixels - mean) * (1.0 - amount), 0, 255).round().astype(np.uint8)


_SHIFTS = {"rotate": _rotate, "noise": _noise, "invert": _invert, "blur": _blur, "contrast": _contrast}


def shift_images(images: np.ndarray, kind: str, severity: float | None = None, seed: int = 0) -> np.ndarray:
    """Apply one kind of shift to uint8 NxHxWxC images; severity None takes the kind's default."""
    if kind not in _SHIFTS:
        raise ValueError(f"shift kind {kind!r}: expected one of {', '.join(_SHIFTS)}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"images: expected uint8 NxHxWxC with C 1 or 3, got {images.dtype} {images.shape}")
    if severity is None:
        severity = SHIFT_KINDS[kind][1]
    if severity < 0:
        raise ValueError(f"severity must be >= 0, got {severity}")
    return _SHIFTS[kind](images, float(severity), np.random.default_rng(seed))
