"""Image decoding and conversion shared by training and serving, so both see the same pixels."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def is_grayscale(image: Image.Image) -> bool:
    """True when the image carries one channel of intensity."""
    return image.mode in GRAY_MODES


def to_array(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """PIL image -> uint8 array HxWxC at the model's size and channel count."""
    if image.mode in {"RGBA", "LA", "P", "PA"}:
        # Transparent pixels become white, the background a person would see.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if channels == 1 else array


def decode(data: bytes) -> Image.Image:
    """Bytes -> fully loaded PIL image (raises PIL.UnidentifiedImageError/OSError on bad data)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def to_tensor(batch: np.ndarray) -> "torch.Tensor":
    """uint8 NxHxWxC -> float32 NxCxHxW in [0, 1], the registered model's input."""
    import torch  # here, not at the top: Ray Data decode tasks import this module and need no torch

    return torch.from_numpy(np.require(batch, requirements=["C", "W"])).permute(0, 3, 1, 2).float().div_(255.0)
