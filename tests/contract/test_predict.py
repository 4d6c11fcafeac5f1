"""/healthz, /v1/predict and /v1/predict/batch in-process: answers, refusals, nothing logged when refused."""

from __future__ import annotations

import json

import pytest

from store import Store
from tests.support.fake_backend import CLASSES
from tests.support.http_contract import (
    BODY_LIMIT,
    MAX_IMAGES,
    MAX_UPLOAD,
    assert_refused,
    chunked,
    database_locked,
    logged,
    multipart,
    nothing_stored,
    predict,
)
from tests.support.images import jpeg, noisy_png, png_header_only
from tests.support.v2_tensors import b64
from tests.support.v2_tensors import digit_png as digit  # digit(7): a gray PNG the backend labels "7"


# -- /healthz and /v1/predict ---------------------------------------------------------------------------------
def test_healthz_is_ok_with_the_served_model_version(api):
    response = api.client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok", "model_version": "3"}


def test_predict_takes_a_multipart_file_and_answers_the_prediction(api):
    body = predict(api.client, digit(7))

    assert set(body) == {"prediction_id", "label", "confidence", "probabilities", "model_version"}
    assert body["label"] == "7" and body["model_version"] == "3"
    assert set(body["probabilities"]) == set(CLASSES) and sum(body["probabilities"].values()) == pytest.approx(1)
    assert body["confidence"] == max(body["probabilities"].values())


@pytest.mark.parametrize("text", [b64(digit(2)), "data:image/png;base64," + b64(digit(2)), b64(jpeg())],
                         ids=["base64 PNG", "data URL", "base64 JPEG"])
def test_predict_takes_json_base64_of_any_image_format(api, text):
    response = api.client.post("/v1/predict", json={"image_b64": text})
    assert response.status_code == 200, response.text
    assert response.json()["label"] in CLASSES


def test_a_prediction_is_logged_with_its_drift_features_and_its_image(api):
    answer = predict(api.client, digit(4))

    record = api.client.get(f"/v1/predictions/{answer['prediction_id']}")

    assert record.status_code == 200
    body = record.json()
    assert {k: body[k] for k in answer} == answer and body["feedback"] == []
    assert body["features"]["predicted_class"] == "4" and "emb_0" in body["features"]
    assert api.store.blobs.get(body["image_sha256"]) == digit(4)


@pytest.mark.parametrize("data,code", [
    (b"hello, I am text", 400),
    (noisy_png()[:len(noisy_png()) // 2], 400),
    (b"", 400),
    (b"\x89PNG" + b"\0" * MAX_UPLOAD, 413),
    (png_header_only(30_000, 30_000), 413),
], ids=["not an image", "truncated PNG", "empty file", "over the byte limit", "over the pixel limit"])
def test_a_bad_upload_is_refused_and_nothing_is_logged(shared, data, code):
    with nothing_stored(shared.store):
        assert_refused(shared.client.post("/v1/predict", files={"file": ("x.png", data, "image/png")}), code)


@pytest.mark.parametrize("body,code", [
    (json.dumps({"image_b64": "%%% not base64 %%%"}), 400),
    (json.dumps({"image_b64": "é" * 8}), 400),
    (json.dumps({"image_b64": b64(b"not an image")}), 400),
    (json.dumps({"image_b64": "data:,"}), 400),
    (json.dumps({"image_b64": b64(b"\0" * (MAX_UPLOAD + 1))}), 413),
    (json.dumps({"image_b64": 12}), 422),
    (json.dumps({"picture": b64(digit(1))}), 422),
    (json.dumps([b64(digit(1))]), 422),
    ("null", 422),
    ("", 400),
    ("{not json", 400),
    ("[" * 20_000, 400),
], ids=["bad base64", "non-ASCII base64", "base64 of text", "empty data URL", "over the byte limit",
        "a number", "no image_b64", "a JSON array", "null", "empty body", "not JSON", "JSON nested too deep"])
def test_bad_json_is_refused_and_nothing_is_logged(shared, body, code):
    with nothing_stored(shared.store):
        response = shared.client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
        assert_refused(response, code)


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", "image/png", None])
def test_a_body_that_is_neither_multipart_nor_json_is_415(shared, content_type):
    headers = {"content-type": content_type} if content_type else {}
    assert_refused(shared.client.post("/v1/predict", content=digit(1), headers=headers), 415)


def test_a_missing_or_wrong_multipart_field_is_422(shared):
    with nothing_stored(shared.store):
        assert "file" in assert_refused(shared.client.post("/v1/predict", files={"image": ("x.png", digit(1))}), 422)
        assert_refused(shared.client.post("/v1/predict", data={"file": "not a file"}, files={"x": ("x", b"x")}), 422)


def test_two_files_for_a_single_prediction_are_refused(shared):
    files = [("file", ("a.png", digit(1), "image/png")), ("file", ("b.png", digit(2), "image/png"))]
    with nothing_stored(shared.store):
        assert_refused(shared.client.post("/v1/predict", files=files), 422)


def test_malformed_multipart_is_400(shared):
    response = shared.client.post("/v1/predict", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert_refused(response, 400)


def test_an_upload_declaring_a_body_past_the_limit_is_413(shared):
    body, headers = multipart("file", b"\x89PNG" + b"\0" * BODY_LIMIT)
    as_json = json.dumps({"image_b64": "A" * BODY_LIMIT})
    with nothing_stored(shared.store):
        assert "the limit is" in assert_refused(shared.client.post("/v1/predict", content=body, headers=headers), 413)
        assert_refused(shared.client.post("/v1/predict", content=as_json, headers={"content-type": "application/json"}),
                       413)


def test_an_upload_streaming_past_the_limit_without_a_length_is_413(api):
    body, headers = multipart("file", b"\x89PNG" + b"\0" * BODY_LIMIT)
    assert_refused(api.client.post("/v1/predict", content=chunked(body), headers=headers), 413)
    as_json = json.dumps({"image_b64": "A" * BODY_LIMIT}).encode()
    assert_refused(api.client.post("/v1/predict", content=chunked(as_json),
                                   headers={"content-type": "application/json"}), 413)
    small, headers = multipart("file", digit(6))  # a stream within the limit is read whole
    assert api.client.post("/v1/predict", content=chunked(small, 100), headers=headers).json()["label"] == "6"


def test_a_model_that_answers_an_error_is_503_and_nothing_is_logged(api):
    api.backend.answer_error = "image shape [1, 28, 28] does not fit model v4 input [3, 32, 32]; retry"
    assert "retry" in assert_refused(api.client.post("/v1/predict", files={"file": ("x.png", digit(1))}), 503)
    assert logged(api.store) == 0


# -- /v1/predict/batch -------------------------------------------------------------------------------------------
def test_a_batch_answers_one_prediction_per_image_in_order(api):
    files = [("files", (f"{d}.png", digit(d), "image/png")) for d in (1, 5, 9)]
    as_multipart = api.client.post("/v1/predict/batch", files=files)
    as_json = api.client.post("/v1/predict/batch", json={"images_b64": [b64(digit(d)) for d in (8, 0)]})

    assert [p["label"] for p in as_multipart.json()["predictions"]] == ["1", "5", "9"]
    assert [p["label"] for p in as_json.json()["predictions"]] == ["8", "0"]
    ids = [p["prediction_id"] for r in (as_multipart, as_json) for p in r.json()["predictions"]]
    assert len(set(ids)) == 5 and logged(api.store) == 5


@pytest.mark.parametrize("bad", [b64(b"GIF89a not really"), "%%% not base64 %%%", b64(b"\0" * (MAX_UPLOAD + 1))],
                         ids=["not an image", "not base64", "over the byte limit"])
def test_a_batch_with_one_bad_image_is_refused_whole_naming_its_position(api, bad):
    images = [b64(digit(1)), b64(digit(2)), bad, b64(digit(3))]

    response = api.client.post("/v1/predict/batch", json={"images_b64": images})

    assert assert_refused(response, 400, 413).startswith("image 2")
    assert logged(api.store) == 0, "all or nothing: a refused batch left predictions the client never saw"


@pytest.mark.parametrize("count", [MAX_IMAGES + 1, 3 * MAX_IMAGES])
def test_more_images_than_the_batch_limit_is_413(shared, count):
    files = [("files", (f"{i}.png", digit(1), "image/png")) for i in range(count)]
    with nothing_stored(shared.store):
        assert_refused(shared.client.post("/v1/predict/batch", json={"images_b64": [b64(digit(1))] * count}), 413)
        assert_refused(shared.client.post("/v1/predict/batch", files=files), 413)


@pytest.mark.parametrize("request_kwargs", [
    {"json": {"images_b64": []}},
    {"json": {"images_b64": "not a list"}},
    {"json": {"image_b64": b64(digit(1))}},
    {"files": {"file": ("x.png", digit(1))}},
], ids=["empty list", "not a list", "the single-image field", "no multipart files field"])
def test_an_empty_or_missing_batch_is_422(shared, request_kwargs):
    assert_refused(shared.client.post("/v1/predict/batch", **request_kwargs), 422)


def test_a_prediction_is_in_the_database_before_it_is_answered(api):
    answered = predict(api.client, digit(3))

    other = Store(api.settings.database_url, api.settings.blob_root)  # another process's view, no waiting
    try:
        assert other.get_prediction(answered["prediction_id"], wait_s=0).label == answered["label"]
    finally:
        other.close()


def test_a_prediction_the_database_does_not_take_is_503_and_not_answered(impatient):
    api = impatient
    api.store.writer.retry_s = 0.5  # give up on the locked database soon, as after the real two minutes
    with database_locked(api.settings):
        refused = api.client.post("/v1/predict", files={"file": ("d.png", digit(3), "image/png")})

    assert_refused(refused, 503)
    assert refused.headers["Retry-After"].isdigit() and "prediction_id" not in refused.json()
    assert logged(api.store) == 0
    assert predict(api.client, digit(3))["label"] == "3"  # sent again once the store takes writes
