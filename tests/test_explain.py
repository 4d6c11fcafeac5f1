"""Explanations on the model side: Grad-CAM on a real (untrained) ImageClassifier, the overlay PNG, and the
replica's explain() (decode limits, unknown classes, one at a time). The HTTP route: tests/contract/test_explain.py.
"""

from __future__ import annotations

import asyncio
import io
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.settings import ServeSettings
from serve.classifier import LoadedModel, ModelServer, for_serving
from serve.explain import gradcam, last_conv, overlay_png
from tests.support.images import noisy_png, png, png_header_only
from train.model import ImageClassifier

CLASSES = [str(i) for i in range(10)]


def served_model(arch: str = "cnn") -> ImageClassifier:
    torch.manual_seed(0)
    return for_serving(ImageClassifier(arch, CLASSES, 1, 28), torch.device("cpu"))


def a_stroke() -> torch.Tensor:
    """A bright vertical bar on black, like a "1": 1x1x28x28."""
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 5:23, 12:16] = 1.0
    return x


@pytest.fixture(scope="module", params=["cnn", "resnet18"])
def model(request) -> ImageClassifier:
    return served_model(request.param)


# -- Grad-CAM -----------------------------------------------------------------------------------------------
def test_the_map_covers_the_input_in_zero_one_and_follows_the_image(model):
    found = gradcam(model, a_stroke())

    assert found.map.shape == (28, 28) and found.map.dtype == np.float32
    assert found.map.min() == 0.0 and found.map.max() == pytest.approx(1.0)
    assert found.map.std() > 0.05  # not a constant map for a non-constant image
    assert found.target == int(found.probabilities.argmax())
    assert found.probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_another_target_class_gives_another_map(model):
    maps = [gradcam(model, a_stroke(), target).map for target in range(3)]

    assert not np.allclose(maps[0], maps[1]) and not np.allclose(maps[1], maps[2])
    assert gradcam(model, a_stroke(), 2).target == 2


def test_explaining_leaves_the_served_model_as_it_was(model):
    x = a_stroke()
    before = model.infer(x)["probabilities"]

    gradcam(model, x, 3)

    assert all(p.grad is None for p in model.parameters())  # nothing accumulated for a later step
    assert not any(m.training for m in model.modules())      # eval mode kept: dropout and batch norm as served
    assert not last_conv(model)[1]._forward_hooks            # the hook went with the call
    assert torch.equal(model.infer(x)["probabilities"], before)


def test_the_layer_explained_is_the_models_last_convolution():
    assert last_conv(served_model("cnn"))[0] == "backbone.2.3"
    with pytest.raises(ValueError, match="no Conv2d"):
        last_conv(torch.nn.Linear(3, 2))


# -- the overlay ---------------------------------------------------------------------------------------------
def test_the_overlay_is_a_png_of_the_image_scaled_up_in_whole_pixels():
    pixels = np.zeros((1, 28, 28), np.float32)
    saliency = np.zeros((28, 28), np.float32)
    saliency[0, 0] = 1.0

    image = Image.open(io.BytesIO(overlay_png(pixels, saliency)))

    assert image.format == "PNG" and image.mode == "RGB" and image.size == (224, 224)  # 28 x 8
    red, green, blue = image.getpixel((0, 0))      # the most salient pixel: red over the black image
    assert red > 50 and green == blue == 0
    assert image.getpixel((223, 223)) == (0, 0, 0)  # no saliency: the image itself
    assert Image.open(io.BytesIO(overlay_png(np.ones((3, 300, 200), np.float32), np.zeros((300, 200))))).size \
        == (200, 300)  # big enough already: as it is


# -- the replica's explain() ----------------------------------------------------------------------------------
def replica(limits: ServeSettings) -> ModelServer:
    """A ModelServer over an untrained model, without MLflow or Serve (only what explain() reads)."""
    server = ModelServer.__new__(ModelServer)
    server.settings = SimpleNamespace(serve=limits)
    server.loaded = LoadedModel(served_model(), "7", torch.device("cpu"))
    server._explaining = asyncio.Semaphore(1)
    return server


def test_the_replica_explains_an_upload_with_the_model_version():
    answer = asyncio.run(replica(ServeSettings()).explain(noisy_png(), target="4"))

    assert answer["model_version"] == "7" and answer["target"] == "4" and answer["label"] in CLASSES
    assert np.array(answer["saliency"]).shape == (28, 28)
    assert Image.open(io.BytesIO(answer["overlay_png"])).size == (224, 224)


@pytest.mark.parametrize("data,too_large", [(b"not an image", False), (png(size=(100, 100)), True),
                                            (png_header_only(30_000, 30_000), True)],
                         ids=["not an image", "over the byte limit", "over the pixel limit"])
def test_the_replica_refuses_what_predictions_refuse(data, too_large):
    limits = ServeSettings(max_upload_bytes=len(png(size=(100, 100))) - 1, max_pixels=4096 * 4096)

    answer = asyncio.run(replica(limits).explain(data))

    assert set(answer) == {"rejected", "too_large"} and answer["too_large"] is too_large


def test_the_replica_names_the_classes_when_the_target_is_not_one():
    answer = asyncio.run(replica(ServeSettings()).explain(png(), target="cat"))

    assert set(answer) == {"unknown_target"} and "'cat'" in answer["unknown_target"] and "0, 1, 2" in answer[
        "unknown_target"]


def test_explanations_on_one_replica_run_one_at_a_time(monkeypatch):
    import serve.classifier

    server, running, most = replica(ServeSettings()), [0], [0]

    def slow(*args):
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            time.sleep(0.05)
            return {"label": "1"}
        finally:
            running[0] -= 1

    monkeypatch.setattr(serve.classifier, "explained", slow)

    async def three():
        return await asyncio.gather(*(server.explain(png()) for _ in range(3)))

    assert [a["label"] for a in asyncio.run(three())] == ["1", "1", "1"] and most[0] == 1


def test_the_real_replica_explains_through_the_http_api(tmp_path):
    from fastapi.testclient import TestClient

    from serve.app import LocalBackend
    from serve.http import create_app
    from store import Store
    from tests.support.http_contract import settings_for

    settings = settings_for(tmp_path)
    server = replica(settings.serve)
    store = Store.from_settings(settings)
    with TestClient(create_app(LocalBackend(server, settings), store, settings)) as client:
        good = client.post("/v1/explain", files={"file": ("x.png", noisy_png(), "image/png")})
        png_answer = client.post("/v1/explain?format=png&target=9", files={"file": ("x.png", png(), "image/png")})
        bad = client.post("/v1/explain", files={"file": ("x.png", b"not an image", "image/png")})
        unknown = client.post("/v1/explain?target=cat", files={"file": ("x.png", png(), "image/png")})
    store.close()

    assert good.status_code == 200 and good.json()["layer"] == "backbone.2.3" and good.json()["model_version"] == "7"
    assert png_answer.status_code == 200 and png_answer.headers["x-target"] == "9"
    assert (bad.status_code, unknown.status_code) == (400, 422)
