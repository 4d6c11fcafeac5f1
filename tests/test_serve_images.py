"""Upload validation: what reaches the model is a sane image of the model's shape; everything else is refused."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from serve.images import ImageRejected, from_base64, prepare
from tests.test_serve_api import noisy_png, png, png_header_only

LIMITS = {"max_bytes": 100_000, "max_pixels": 1024 * 1024}


def test_any_image_becomes_model_pixels_in_unit_range():
    for data in (png(), noisy_png(), png(value=(9, 9, 9), mode="RGB", size=(50, 20))):
        pixels = prepare(data, size=28, channels=1, **LIMITS)
        assert pixels.shape == (1, 28, 28) and pixels.dtype == np.float32
        assert 0.0 <= pixels.min() and pixels.max() <= 1.0


def test_rgb_models_get_three_channels_from_gray_uploads():
    assert prepare(png(), size=32, channels=3, **LIMITS).shape == (3, 32, 32)


@pytest.mark.parametrize("data,too_large", [
    (b"", False),
    (b"GIF89a but not really", False),
    (noisy_png()[:200], False),
    (b"\0" * 100_001, True),
    (png_header_only(5000, 5000), True),
])
def test_bad_bytes_are_rejected_with_the_reason(data, too_large):
    with pytest.raises(ImageRejected) as rejected:
        prepare(data, size=28, channels=1, **LIMITS)
    assert rejected.value.too_large is too_large and rejected.value.detail


def test_a_decompression_bomb_is_refused_from_its_header_alone():
    bomb = png_header_only(60_000, 60_000)  # 3.6 G pixels; decoding would need gigabytes
    with pytest.raises(ImageRejected, match="pixels"):
        prepare(bomb, size=28, channels=1, max_bytes=10**6, max_pixels=10**9)


def test_base64_is_strict_and_size_limited():
    data = png()
    assert from_base64(base64.b64encode(data).decode(), 1000) == data
    assert from_base64("data:image/png;base64," + base64.b64encode(data).decode(), 1000) == data
    with pytest.raises(ImageRejected):
        from_base64("not*base64", 1000)
    with pytest.raises(ImageRejected) as rejected:
        from_base64(base64.b64encode(b"x" * 5000).decode(), 1000)
    assert rejected.value.too_large


def test_jpeg_uploads_work():
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(buf, "JPEG")
    assert prepare(buf.getvalue(), size=28, channels=1, **LIMITS).shape == (1, 28, 28)
