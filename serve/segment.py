"""A segmentation answer as the client sees it: the mask at the image's own size, as a PNG, and its area.

The replica answers with class ids at the model's input size (small to ship between processes); this scales
them to the uploaded image's width x height with nearest neighbours (a class id is never blended), encodes a
PNG (0/255 for one class, the class ids otherwise: train.masks.encode_mask_png) and measures the area.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from train.masks import encode_mask_png


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image's header (the replica has already checked and decoded the upload)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def full_size(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Class ids HxW scaled to size (width, height) with nearest neighbours."""
    if mask.shape[::-1] == tuple(size):
        return mask
    return np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8)).resize(size, Image.NEAREST))


def mask_fields(mask: np.ndarray, data: bytes) -> dict:
    """mask_png_b64, area_pixels and area_percent (foreground: every class but 0), width and height."""
    width, height = image_size(data)
    scaled = full_size(mask, (width, height))
    area = int(np.count_nonzero(scaled))
    return {"mask_png_b64": base64.b64encode(encode_mask_png(scaled)).decode("ascii"), "area_pixels": area,
            "area_percent": round(100.0 * area / max(1, width * height), 4), "width": width, "height": height}
