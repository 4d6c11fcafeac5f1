"""Turning untrusted upload bytes into model pixels, refusing anything that is not a sane image."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from train.transforms import to_array


class ImageRejected(ValueError):
    """The bytes are not an image we accept; `too_large` when size (bytes or pixels) is the reason."""

    def __init__(self, detail: str, too_large: bool = False):
        super().__init__(detail)
        self.detail = detail
        self.too_large = too_large

    def __reduce__(self):  # keep both fields when Ray ships the error back to the caller
        return (ImageRejected, (self.detail, self.too_large))


def from_base64(text: str, max_bytes: int) -> bytes:
    """Strict base64 (a data: URL prefix is allowed) -> bytes."""
    if not isinstance(text, str):
        raise ImageRejected("image_b64 must be a base64 string")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    # base64 grows data by 4/3: refuse what cannot fit before decoding it.
    if len(text) > max_bytes * 4 // 3 + 4:
        raise ImageRejected(f"image larger than {max_bytes} bytes", too_large=True)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRejected("image_b64 is not valid base64") from None


def media_type(data: bytes) -> str:
    """The MIME type of image bytes by their header (application/octet-stream when PIL does not know them)."""
    try:
        with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header only
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        return "application/octet-stream"


def check_size(data: bytes, max_bytes: int) -> None:
    """Refuse empty or oversized uploads."""
    if not data:
        raise ImageRejected("empty image")
    if len(data) > max_bytes:
        raise ImageRejected(f"image is {len(data)} bytes; the limit is {max_bytes}", too_large=True)


def open_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Validate and fully decode an image; the pixel count is checked from the header first."""
    check_size(data, max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # lazy: reads the header only
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageRejected("image has no pixels")
            if width * height > max_pixels:
                raise ImageRejected(f"image is {width}x{height} pixels; the limit is {max_pixels} pixels",
                                    too_large=True)
            image.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected("image has too many pixels", too_large=True) from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image (PNG, JPEG, ... expected)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(f"cannot decode image: {exc}") from None
    return image


def prepare(data: bytes, size: int, channels: int, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Encoded image bytes -> float32 CxHxW in [0, 1] at the model's size and channel count."""
    image = open_image(data, max_bytes, max_pixels)
    try:
        array = to_array(image, size, channels)
    except (OSError, ValueError) as exc:
        raise ImageRejected(f"cannot convert image: {exc}") from None
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32) / 255.0
