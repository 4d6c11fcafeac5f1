"""Upload validation: what reaches the model is a sane image of the model's shape; everything else is refused."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from serve.images import ImageRejected, from_base64, prepare
from tests.support.images import noisy_png, png, png_header_only

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


def test_a_batch_decodes_its_uploads_and_answers_each_item_on_its_own():
    """decode_and_run: one call per batch decodes the encoded items, and a bad item fails alone."""
    import torch

    from cluster.settings import ServeSettings
    from serve.classifier import LoadedModel, decode_and_run
    from train.model import ImageClassifier

    loaded = LoadedModel(ImageClassifier("cnn", ["a", "b"], 1, 28).eval(), "3", torch.device("cpu"))
    buf = io.BytesIO()
    Image.new("L", (40, 30), 200).save(buf, "PNG")
    items = [buf.getvalue(), b"not an image", np.zeros((1, 28, 28), np.float32), np.zeros((3, 28, 28), np.float32)]

    good, bad, pixels, wrong_shape = decode_and_run(loaded, items, ServeSettings())

    assert good["label"] in ("a", "b") and good["model_version"] == "3" and "emb_0" in good["features"]
    assert pixels["label"] in ("a", "b")
    assert "rejected" in bad and not bad["too_large"]
    assert "does not fit model v3" in wrong_shape["error"]


def test_the_served_model_in_channels_last_answers_as_the_trained_one_does():
    import copy

    import torch

    from serve.classifier import LoadedModel, for_serving, run
    from train.model import ImageClassifier

    torch.manual_seed(0)
    classes = [str(i) for i in range(10)]
    model = ImageClassifier("cnn", classes, 1, 28).eval()
    pixels = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    with torch.inference_mode():
        expected = model.infer(torch.from_numpy(pixels))

    serving = for_serving(copy.deepcopy(model), torch.device("cpu"))
    served = run(LoadedModel(serving, "1", torch.device("cpu")), pixels)

    second_conv = serving.backbone[0][3].weight  # 32 -> 32 channels: its layout tells
    assert second_conv.is_contiguous(memory_format=torch.channels_last)
    assert not model.backbone[0][3].weight.is_contiguous(memory_format=torch.channels_last)
    probabilities = np.array([[answer["probabilities"][c] for c in classes] for answer in served])
    np.testing.assert_allclose(probabilities, expected["probabilities"].numpy(), atol=1e-5)
    embedding = np.array([[answer["features"][f"emb_{i}"] for i in range(8)] for answer in served])
    np.testing.assert_allclose(embedding, expected["embedding"].numpy(), atol=1e-4)
    assert [a["label"] for a in served] == [classes[i] for i in expected["probabilities"].argmax(1).tolist()]


def test_the_key_rate_limit_is_one_window_for_every_replica():
    """Two replicas' KeyCheckers over one shared window allow the limit once, not once each."""
    from fastapi import HTTPException
    from fastapi.security import HTTPAuthorizationCredentials

    from cluster.settings import ServeSettings, key_digest
    from serve.http.deps import KeyChecker, RateWindow

    shared = RateWindow()
    replicas = [KeyChecker(ServeSettings(api_keys="k1", rate_limit_per_minute=3), shared=shared.hit) for _ in range(2)]
    key = HTTPAuthorizationCredentials(scheme="Bearer", credentials="k1")
    assert [replicas[i % 2](key) for i in range(3)] == [f"key:{key_digest('k1')[:12]}"] * 3
    with pytest.raises(HTTPException) as refused:
        replicas[1](key)
    assert refused.value.status_code == 429 and int(refused.value.headers["Retry-After"]) > 0

    def unreachable(_key, _per_minute):
        raise TimeoutError("limiter actor gone")

    # Falls back to its own window.
    alone = KeyChecker(ServeSettings(api_keys="k1", rate_limit_per_minute=1), shared=unreachable)
    alone(key)
    with pytest.raises(HTTPException):
        alone(key)
