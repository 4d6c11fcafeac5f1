"""POST /v1/explain in-process: the explanation as JSON or PNG, refusals like /v1/predict's, its own rate limit,
and never on the prediction path."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.support.http_contract import (
    KEY,
    MAX_UPLOAD,
    OTHER_KEY,
    assert_refused,
    bearer,
    nothing_stored,
    predict,
    running,
    settings_for,
)
from tests.support.images import noisy_png, png_header_only
from tests.support.v2_tensors import b64
from tests.support.v2_tensors import digit_png as digit  # digit(7): a gray PNG the backend labels "7"


def explain(client, image: bytes, **params) -> dict:
    response = client.post("/v1/explain", files={"file": ("x.png", image, "image/png")}, params=params)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def limited(tmp_path):
    """Two explanations a minute per client; two API keys configured."""
    with running(settings_for(tmp_path, RAYLOOP_SERVE_EXPLAIN_PER_MINUTE="2",
                              RAYLOOP_SERVE_API_KEYS=f"{KEY},{OTHER_KEY}")) as served:
        yield served


def test_an_explanation_says_where_the_evidence_for_the_prediction_lies(api):
    body = explain(api.client, noisy_png())

    assert set(body) == {"label", "confidence", "model_version", "target", "method", "layer", "saliency",
                         "overlay_png_b64"}
    assert body["target"] == body["label"] and body["method"] == "grad-cam" and body["model_version"] == "3"
    saliency = np.array(body["saliency"])
    assert saliency.shape == (28, 28) and saliency.min() >= 0 and saliency.max() <= 1 and saliency.std() > 0
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png_b64"])))
    assert overlay.format == "PNG" and overlay.size == (224, 224)


def test_an_explanation_takes_base64_json_and_a_target_class(api):
    response = api.client.post("/v1/explain", params={"target": "2"}, json={"image_b64": b64(digit(7))})

    assert response.status_code == 200, response.text
    assert (response.json()["label"], response.json()["target"]) == ("7", "2")


def test_format_png_answers_the_overlay_itself(api):
    response = api.client.post("/v1/explain", params={"format": "png"},
                               files={"file": ("x.png", digit(4), "image/png")})

    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (224, 224)
    assert (response.headers["x-label"], response.headers["x-target"], response.headers["x-model-version"]) \
        == ("4", "4", "3")


@pytest.mark.parametrize("params", [{"target": "cat"}, {"format": "gif"}], ids=["unknown class", "unknown format"])
def test_an_unknown_target_or_format_is_422(shared, params):
    detail = assert_refused(shared.client.post("/v1/explain", params=params,
                                               files={"file": ("x.png", digit(1), "image/png")}), 422)
    assert ("cat" in detail) if "target" in params else ("format" in detail)


@pytest.mark.parametrize("request_kwargs,code", [
    ({"files": {"file": ("x.png", b"hello, I am text", "image/png")}}, 400),
    ({"files": {"file": ("x.png", b"", "image/png")}}, 400),
    ({"json": {"image_b64": "%%% not base64 %%%"}}, 400),
    ({"files": {"file": ("x.png", b"\x89PNG" + b"\0" * MAX_UPLOAD, "image/png")}}, 413),
    ({"files": {"file": ("x.png", png_header_only(30_000, 30_000), "image/png")}}, 413),
    ({"content": b"raw bytes", "headers": {"content-type": "image/png"}}, 415),
    ({"files": [("file", ("a.png", digit(1), "image/png")), ("file", ("b.png", digit(2), "image/png"))]}, 422),
], ids=["not an image", "empty file", "bad base64", "over the byte limit", "over the pixel limit",
        "not multipart or JSON", "two files"])
def test_a_bad_upload_is_refused_as_predict_refuses_it(shared, request_kwargs, code):
    with nothing_stored(shared.store):
        assert_refused(shared.client.post("/v1/explain", **request_kwargs), code)


def test_explanations_are_rate_limited_per_client_apart_from_predictions(limited):
    client = limited.client
    for _ in range(2):
        explain(client, digit(3))

    refused = client.post("/v1/explain", files={"file": ("x.png", digit(3), "image/png")})

    assert_refused(refused, 429)
    assert 1 <= int(refused.headers["retry-after"]) <= 61
    assert predict(client, digit(3))["label"] == "3"  # predictions are not counted against it
    for _ in range(2):  # each API key is a client of its own, even from the same address
        assert client.post("/v1/explain", headers=bearer(KEY),
                           files={"file": ("x.png", digit(3), "image/png")}).status_code == 200
    assert client.post("/v1/explain", headers=bearer(OTHER_KEY),
                       files={"file": ("x.png", digit(3), "image/png")}).status_code == 200
    assert_refused(client.post("/v1/explain", headers=bearer(KEY), files={"file": ("x.png", digit(3), "image/png")}),
                   429)


def test_no_limit_when_explain_per_minute_is_zero(tmp_path):
    with running(settings_for(tmp_path, RAYLOOP_SERVE_EXPLAIN_PER_MINUTE="0")) as served:
        for _ in range(5):
            explain(served.client, digit(5))


def test_an_explanation_stores_nothing_and_predictions_never_explain(api):
    with nothing_stored(api.store):
        explain(api.client, digit(6))
    assert api.backend.explained == 1

    predict(api.client, digit(6))
    api.client.post("/v1/predict/batch", files=[("files", ("a.png", digit(1), "image/png"))])

    assert api.backend.explained == 1


def test_the_openapi_document_describes_the_route(api):
    spec = api.client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/explain"]["post"]

    assert {p["name"] for p in operation["parameters"]} == {"target", "format"}
    assert {"multipart/form-data", "application/json"} <= set(operation["requestBody"]["content"])
    assert "image/png" in operation["responses"]["200"]["content"] and "429" in operation["responses"]
    assert json.dumps(spec["components"]["schemas"]["Explanation"])
