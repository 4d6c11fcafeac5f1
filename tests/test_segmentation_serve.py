"""Segmentation over HTTP, in process: the mask at the image's size, its area, and masks as feedback (validated,
durable, erasable). The model runs through the replica's own decode-and-run path (tests/support/seg_backend.py)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve.http import create_app
from store import Store
from tests.support.http_contract import settings_for
from tests.support.seg_backend import SegmentationBackend
from train.masks import encode_mask_png, encode_rle, mask_from_json


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def crack_photo(width: int = 120, height: int = 80) -> tuple[bytes, np.ndarray]:
    """A light gray photo with a dark vertical band (the "crack"), and the band as a 0/1 mask."""
    photo = np.full((height, width), 200, np.uint8)
    photo[:, 40:60] = 20
    return png(photo), (photo < 128).astype(np.uint8)


@pytest.fixture
def seg(tmp_path):
    settings = settings_for(tmp_path)
    store = Store.from_settings(settings)
    backend = SegmentationBackend(settings.serve)
    with TestClient(create_app(backend, store, settings), raise_server_exceptions=False) as client:
        yield client, store
    store.close()


def predict(client, data: bytes) -> dict:
    answer = client.post("/v1/predict", json={"image_b64": b64(data)})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_prediction_answers_with_the_mask_at_the_image_size_and_its_area(seg):
    client, _ = seg
    data, truth = crack_photo()
    body = predict(client, data)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png_b64"]))))
    assert mask.shape == (80, 120) and set(np.unique(mask)) <= {0, 255}
    # The model sees a 32-px copy; scaled back, the band is where the crack is, give or take a model pixel.
    agree = ((mask > 0) == (truth > 0)).mean()
    assert agree > 0.95, agree
    assert body["area_pixels"] == int((mask > 0).sum())
    assert body["area_percent"] == pytest.approx(100 * body["area_pixels"] / (80 * 120), abs=1e-3)
    assert (body["width"], body["height"]) == (120, 80)
    assert body["label"] == "crack" and 0.5 < body["confidence"] <= 1
    assert body["probabilities"]["crack"] == pytest.approx(20 / 120, abs=0.05)


def test_an_image_without_a_crack_has_an_empty_mask(seg):
    client, _ = seg
    body = predict(client, png(np.full((50, 50), 230, np.uint8)))
    assert body["label"] == "background" and body["area_pixels"] == 0 and body["area_percent"] == 0


def test_a_corrected_mask_is_stored_durably_and_erased_with_its_feedback(seg):
    client, store = seg
    data, truth = crack_photo()
    prediction_id = predict(client, data)["prediction_id"]
    corrected = truth.copy()
    corrected[:10] = 0  # the user erased the crack's top
    sent = client.post("/v1/feedback", json={"prediction_id": prediction_id,
                                             "mask_png_b64": b64(encode_mask_png(corrected))})
    assert sent.status_code == 201, sent.text
    feedback_id = sent.json()["feedback_id"]
    assert (mask_from_json(store.feedback_mask(feedback_id)) == corrected).all()
    assert store.get_prediction(prediction_id).feedback[0].label == "crack"
    assert client.delete(f"/v1/feedback/{feedback_id}").status_code == 204
    assert store.feedback_mask(feedback_id) is None


def test_a_mask_as_coco_rle_is_taken_too(seg):
    client, store = seg
    data, truth = crack_photo()
    prediction_id = predict(client, data)["prediction_id"]
    for compressed in (False, True):
        sent = client.post("/v1/feedback", json={"prediction_id": prediction_id,
                                                 "mask_rle": encode_rle(truth, compressed=compressed)})
        assert sent.status_code == 201, sent.text
        assert (mask_from_json(store.feedback_mask(sent.json()["feedback_id"])) == truth).all()


@pytest.mark.parametrize("change, status, says", [
    (lambda body, truth: {**body, "mask_png_b64": b64(encode_mask_png(truth[:, :100]))}, 422, "its image is 120x80"),
    (lambda body, truth: {**body, "mask_png_b64": b64(encode_mask_png(truth * 3))}, 422, "outside the known classes"),
    (lambda body, truth: {**body, "mask_png_b64": "not base64!"}, 422, "not valid base64"),
    (lambda body, truth: {**body, "mask_png_b64": b64(b"GIF89a not a png")}, 422, "not a readable PNG"),
    (lambda body, truth: {"prediction_id": body["prediction_id"], "mask_rle": {"size": [80, 120], "counts": [5, 5]}},
     422, "add up to"),
    (lambda body, truth: {"prediction_id": body["prediction_id"], "mask_rle": encode_rle(truth[:40])},
     422, "its image is 120x80"),
    (lambda body, truth: {**body, "label": "crack"}, 422, "exactly one of"),
    (lambda body, truth: {"prediction_id": body["prediction_id"], "label": "crack"}, 422, "send the corrected mask"),
    (lambda body, truth: {"prediction_id": body["prediction_id"]}, 422, "exactly one of"),
    (lambda body, truth: {**body, "prediction_id": "7c1e9a52-4b0d-4f3e-9a61-2d8c5b7e0f14"}, 404, "no prediction"),
])
def test_a_bad_mask_is_refused_with_the_reason_and_nothing_is_stored(seg, change, status, says):
    client, store = seg
    data, truth = crack_photo()
    body = {"prediction_id": predict(client, data)["prediction_id"], "mask_png_b64": b64(encode_mask_png(truth))}
    answer = client.post("/v1/feedback", json=change(body, truth))
    assert answer.status_code == status, answer.text
    assert says in answer.json()["detail"]
    assert store.count_feedback() == 0


def test_a_mask_for_a_prediction_whose_image_is_gone_is_a_conflict(seg):
    client, store = seg
    data, truth = crack_photo()
    prediction_id = predict(client, data)["prediction_id"]
    store.writer.wait_for(prediction_id)
    store.blobs.delete(store.get_prediction(prediction_id).blob_key)
    answer = client.post("/v1/feedback", json={"prediction_id": prediction_id,
                                               "mask_png_b64": b64(encode_mask_png(truth))})
    assert answer.status_code == 409 and "no longer kept" in answer.json()["detail"]


def test_the_v2_protocol_answers_with_the_mask_tensor(seg):
    client, _ = seg
    pixels = np.full((1, 32, 32), 0.9, np.float32)
    pixels[0, :, 10:14] = 0.1
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32],
                        "data": pixels.ravel().tolist()}]}
    answer = client.post("/v2/models/rayloop-classifier/infer", json=body)
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert set(outputs) == {"probabilities", "label", "mask"}
    mask = outputs["mask"]
    assert (mask["datatype"], mask["shape"]) == ("UINT8", [1, 32, 32])
    assert (np.asarray(mask["data"]).reshape(32, 32) == (pixels[0] < 0.5)).all()
    meta = client.get("/v2/models/rayloop-classifier").json()
    assert {"name": "mask", "datatype": "UINT8", "shape": [-1, 32, 32]} in meta["outputs"]


def test_a_classifier_refuses_to_be_asked_for_a_mask_and_logs_nothing(tmp_path):
    from tests.support.http_contract import running

    with running(settings_for(tmp_path)) as api:
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.5] * 784}],
                "outputs": [{"name": "mask"}]}
        answer = api.client.post("/v2/models/rayloop-classifier/infer", json=body)
        assert answer.status_code == 400 and "segmentation model" in answer.json()["error"]
        assert api.store.count_predictions() == 0
