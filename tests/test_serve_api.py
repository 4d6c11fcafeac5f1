"""The serving contract (README "Serving") against a real local Ray Serve over HTTP."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.images import CLASSES, jpeg, noisy_png, png, png_header_only
from tests.support.load import Load
from tests.support.registry import register_tiny_model

# The module runs on tests/conftest.py's `served` (Ray + Serve with a tiny champion) and `client`.
pytestmark = pytest.mark.slow

KEY = "test-key-not-secret"


def assert_refused(response: httpx.Response, *codes: int) -> None:
    assert response.status_code in codes, (response.status_code, response.text)
    assert isinstance(response.json()["detail"], str) and response.json()["detail"]


# -- the happy path ----------------------------------------------------------------------------------
def test_healthz_says_ok_once_the_model_is_loaded(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_predict_multipart_png_returns_a_label_of_the_model(client):
    response = client.post("/v1/predict", files={"file": ("digit.png", png(), "image/png")})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] in CLASSES and body["model_version"] == "1"
    assert set(body["probabilities"]) == set(CLASSES)
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-3
    assert body["confidence"] == pytest.approx(max(body["probabilities"].values()), abs=1e-5)


def test_predict_accepts_json_base64_and_any_image_format(client):
    for data in (png(), jpeg(), png(value=(1, 2, 3, 0), mode="RGBA", size=(64, 20))):
        response = client.post("/v1/predict", json={"image_b64": base64.b64encode(data).decode()})
        assert response.status_code == 200, response.text


def test_batch_answers_one_prediction_per_image_in_order(client):
    files = [("files", (f"{i}.png", png(i * 20), "image/png")) for i in range(5)]
    response = client.post("/v1/predict/batch", files=files)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 5

    as_json = client.post("/v1/predict/batch", json={"images_b64": [base64.b64encode(png()).decode()] * 3})
    assert as_json.status_code == 200 and len(as_json.json()["predictions"]) == 3


def test_a_prediction_is_in_the_history_with_its_features_and_image(client, served):
    prediction_id = client.post("/v1/predict", files={"file": ("x.png", png(7), "image/png")}).json()["prediction_id"]

    record = client.get(f"/v1/predictions/{prediction_id}")

    assert record.status_code == 200
    body = record.json()
    assert body["features"]["predicted_class"] == body["label"] and "emb_0" in body["features"]
    blob = Path(served.settings.blob_root) / body["image_sha256"][:2] / body["image_sha256"][2:]
    assert blob.read_bytes() == png(7)


def test_history_pages_by_offset_and_by_cursor(client):
    ids = [client.post("/v1/predict", files={"file": ("x.png", png(i), "image/png")}).json()["prediction_id"]
           for i in range(4)]
    # History is written off the request path by whichever replica answered: wait for ours (the record
    # route waits for a just-answered id), so no row lands between the pages compared below.
    assert all(client.get(f"/v1/predictions/{i}").status_code == 200 for i in ids)

    first = client.get("/v1/predictions", params={"limit": 2}).json()
    second = client.get("/v1/predictions", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    by_offset = client.get("/v1/predictions", params={"limit": 2, "offset": 2}).json()

    assert first["total"] >= 4 and len(first["items"]) == 2
    assert [p["prediction_id"] for p in second["items"]] == [p["prediction_id"] for p in by_offset["items"]]
    assert not {p["prediction_id"] for p in first["items"]} & {p["prediction_id"] for p in second["items"]}


def test_feedback_is_stored_and_shown_with_its_prediction(client):
    prediction_id = client.post("/v1/predict", files={"file": ("x.png", png(), "image/png")}).json()["prediction_id"]

    created = client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": "7"})

    assert created.status_code == 201, created.text
    record = client.get(f"/v1/predictions/{prediction_id}").json()
    assert [(f["feedback_id"], f["label"]) for f in record["feedback"]] == [(created.json()["feedback_id"], "7")]
    page = client.get("/v1/predictions", params={"limit": 5}).json()["items"]
    listed = next(item for item in page if item["prediction_id"] == prediction_id)
    assert [f["label"] for f in listed["feedback"]] == ["7"]  # the history page carries feedback too


def test_model_describes_the_champion_and_the_served_version(client):
    body = client.get("/v1/model").json()
    assert body["name"] == "rayloop-classifier" and body["version"] == "1" and body["served_version"] == "1"
    assert body["data_version"] == "tiny-v1" and body["classes"] == CLASSES


def test_drift_says_no_check_yet_before_the_monitor_ran(client):
    response = client.get("/v1/drift")
    assert response.status_code == 200 and response.json()["status"] == "no check yet"


def test_audit_lists_feedback_events_when_auth_is_off(client):
    client.post("/v1/feedback", json={
        "prediction_id": client.post("/v1/predict",
                                     files={"file": ("x.png", png(), "image/png")}).json()["prediction_id"],
        "label": "1"})
    events = client.get("/v1/audit", params={"event": "feedback"}).json()["items"]
    assert events and events[0]["event"] == "feedback" and events[0]["actor"] == "anonymous"


def test_openapi_docs_are_served(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/feedback", "/v2/models/{name}/infer"} <= set(paths)


# -- Open Inference Protocol v2 ----------------------------------------------------------------------
def test_v2_ready_and_model_metadata(client):
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2/models/rayloop-classifier").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert {o["name"] for o in meta["outputs"]} == {"probabilities", "label"}
    assert client.get("/v2/models/other-model").status_code == 404


def test_v2_infer_fp32_tensor(client):
    pixels = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    response = client.post("/v2/models/rayloop-classifier/infer", json={"id": "r1", "inputs": [
        {"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": pixels.reshape(-1).tolist()}]})

    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["probabilities"]["shape"] == [2, 10] and len(outputs["label"]["data"]) == 2
    assert response.json()["id"] == "r1" and response.json()["model_version"] == "1"


def test_v2_infer_bytes_of_encoded_images(client):
    response = client.post("/v2/models/rayloop-classifier/infer", json={"inputs": [
        {"name": "input", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png()).decode()]}]})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][1]["data"][0] in CLASSES


@pytest.mark.parametrize("tensor", [
    {"name": "input", "shape": [1, 3, 28, 28], "datatype": "FP32", "data": [0.5] * (3 * 28 * 28)},
    {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 10},
    {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [7.0] * (28 * 28)},
    {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ["a"] * (28 * 28)},
    {"name": "input", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]},
    {"name": "input", "shape": [1], "datatype": "INT64", "data": [1]},
])
def test_v2_infer_refuses_bad_tensors(client, tensor):
    assert_refused(client.post("/v2/models/rayloop-classifier/infer", json={"inputs": [tensor]}), 400, 413, 422)


# -- bad input never 5xx -----------------------------------------------------------------------------
@pytest.mark.parametrize("name,data,codes", [
    ("not an image", b"hello, I am text", (400,)),
    ("empty", b"", (400, 422)),
    ("truncated", noisy_png()[:len(noisy_png()) // 2], (400,)),
    ("too many bytes", b"\x89PNG" + b"\0" * 300_000, (413,)),
    ("too many pixels", png_header_only(30_000, 30_000), (413,)),
])
def test_bad_uploads_are_refused_with_a_detail(client, name, data, codes):
    assert_refused(client.post("/v1/predict", files={"file": ("x.png", data, "image/png")}), *codes)


@pytest.mark.parametrize("body", [
    {"image_b64": "%%% not base64 %%%"},
    {"image_b64": 12},
    {"picture": "abc"},
    [1, 2, 3],
    {"image_b64": base64.b64encode(b"not an image").decode()},
])
def test_bad_json_is_refused_with_a_detail(client, body):
    assert_refused(client.post("/v1/predict", json=body), 400, 422)


def test_malformed_json_and_wrong_content_type_are_refused(client):
    assert_refused(client.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"}),
                   400, 422)
    assert_refused(client.post("/v1/predict", content=b"raw", headers={"content-type": "text/plain"}), 415)
    assert_refused(client.post("/v1/predict", files={"other": ("x.png", png(), "image/png")}), 422)


def test_empty_and_partly_bad_batches_are_refused(client):
    assert_refused(client.post("/v1/predict/batch", json={"images_b64": []}), 422)
    good, bad = base64.b64encode(png()).decode(), base64.b64encode(b"nope").decode()
    response = client.post("/v1/predict/batch", json={"images_b64": [good, bad]})
    assert_refused(response, 400)
    assert "image 1" in response.json()["detail"]


def test_feedback_for_an_unknown_prediction_is_404(client):
    assert_refused(client.post("/v1/feedback", json={"prediction_id": "nope", "label": "3"}), 404)
    assert_refused(client.get("/v1/predictions/nope"), 404)


def test_feedback_with_a_label_the_model_does_not_know_is_refused(client):
    prediction_id = client.post("/v1/predict", files={"file": ("x.png", png(), "image/png")}).json()["prediction_id"]
    assert_refused(client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": "cat"}), 422)
    assert_refused(client.post("/v1/feedback", json={"prediction_id": prediction_id}), 422)


def test_bad_pagination_is_refused(client):
    assert_refused(client.get("/v1/predictions", params={"limit": 0}), 422)
    assert_refused(client.get("/v1/predictions", params={"cursor": "garbage"}), 400)


def test_the_server_still_answers_after_bad_input(client):
    assert client.post("/v1/predict", files={"file": ("x.png", png(), "image/png")}).status_code == 200


# -- batching ----------------------------------------------------------------------------------------
def test_concurrent_requests_share_a_forward_pass(served):
    from control.deployment import ask_classifier

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as c:
            answers = await asyncio.gather(*(c.post("/v1/predict", files={"file": ("x.png", png(i), "image/png")})
                                             for i in range(32)))
        return [a.status_code for a in answers]

    assert asyncio.run(burst()) == [200] * 32
    stats = ask_classifier("stats")
    assert max(stats["batch_sizes"]) > 1
    assert max(stats["batch_sizes"]) <= served.settings.serve.max_batch_size


# -- rolling model update ----------------------------------------------------------------------------
def test_a_new_model_version_rolls_out_without_failed_requests(served, client):
    from control.deployment import ask_classifier, deploy

    version = register_tiny_model(served.settings, accuracy="0.2")

    def replicas() -> set[str]:  # calls land on random replicas: 30 reach each of two (all but surely)
        return {ask_classifier("info")["replica"] for _ in range(30)}

    replicas_before = replicas()
    assert len(replicas_before) == served.settings.serve.num_replicas

    with Load(served.url, threads=1, linger_s=1.0) as load:
        deploy(served.settings, version)

    statuses = load.statuses()
    assert statuses and set(statuses) == {200}
    # Only user_config changed, so the running replicas reconfigured in place: no restart, no cold start.
    assert replicas() == replicas_before
    assert client.get("/v1/model").json()["served_version"] == version
    assert client.post("/v1/predict", files={"file": ("x.png", png(), "image/png")}).json()["model_version"] == version


# -- durability and auth (these restart Serve, so they come last) ------------------------------------
def test_feedback_survives_a_serve_restart_and_auth_guards_writes(served):
    from ray import serve as rayserve

    from control.deployment import deploy

    with served.client() as c:
        prediction_id = c.post("/v1/predict", files={"file": ("x.png", png(3), "image/png")}).json()["prediction_id"]
        feedback_id = c.post("/v1/feedback", json={"prediction_id": prediction_id, "label": "3"}).json()["feedback_id"]

    rayserve.shutdown()
    keyed = dataclasses.replace(served.settings, serve=dataclasses.replace(
        served.settings.serve, api_keys=f"{KEY},another-key", rate_limit_per_minute=5))
    deploy(keyed, timeout=240)

    with served.client() as c:
        record = c.get(f"/v1/predictions/{prediction_id}")
        assert record.status_code == 200
        assert [f["feedback_id"] for f in record.json()["feedback"]] == [feedback_id]

        body = {"prediction_id": prediction_id, "label": "4"}
        assert_refused(c.post("/v1/feedback", json=body), 401)
        assert_refused(c.post("/v1/feedback", json=body, headers={"Authorization": "Bearer wrong"}), 403)
        assert_refused(c.get("/v1/audit"), 401)
        assert c.post("/v1/predict", files={"file": ("x.png", png(), "image/png")}).status_code == 200

        auth = {"Authorization": f"Bearer {KEY}"}
        assert c.post("/v1/feedback", json=body, headers=auth).status_code == 201
        events = c.get("/v1/audit", headers=auth).json()["items"]
        assert events[0]["actor"].startswith("key:") and KEY not in str(events)
        statuses = [c.get("/v1/audit", headers=auth).status_code for _ in range(5)]
        assert statuses[-1] == 429
