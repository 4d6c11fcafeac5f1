"""API keys, the audit trail, the v2 routes tests/test_v2_protocol.py leaves out, and the no-5xx promise."""

from __future__ import annotations

import hashlib

import pytest

from tests.support.http_contract import (
    KEY,
    MAX_IMAGES,
    MAX_OFFSET,
    MODEL,
    OTHER_KEY,
    PER_MINUTE,
    WRONG,
    assert_refused,
    bearer,
    cursor_of,
    drift_check,
    labelled,
    logged,
    predict,
)
from tests.support.images import noisy_png, png_header_only
from tests.support.v2_tensors import assert_refused as assert_v2_refused
from tests.support.v2_tensors import b64, binary_outputs, binary_request, bytes_tensor, pixels
from tests.support.v2_tensors import digit_png as digit  # digit(7): a gray PNG the backend labels "7"


# -- API keys: /v1/admin/*, /v1/audit and the guarded writes -------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/admin/retrain", "/v1/admin/rollback"])
def test_admin_routes_refuse_a_missing_key_401_and_a_wrong_key_403(keyed, path):
    for headers in ({}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer "}):
        response = keyed.client.post(path, headers=headers)
        assert_refused(response, 401)
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert_refused(keyed.client.post(path, headers=bearer(WRONG)), 403)
    assert_refused(keyed.client.post(path, headers=bearer(KEY.upper())), 403)
    assert keyed.store.list_audit() == []


def test_a_key_past_its_rate_limit_gets_429_with_retry_after_and_other_keys_do_not(keyed):
    for _ in range(PER_MINUTE):  # the limit is per key, over every guarded route
        assert keyed.client.get("/v1/audit", headers=bearer(KEY)).status_code == 200

    for path in ("/v1/admin/retrain", "/v1/admin/rollback"):
        response = keyed.client.post(path, headers=bearer(KEY))
        assert_refused(response, 429)
        assert 1 <= int(response.headers["Retry-After"]) <= 61
    assert_refused(keyed.client.get("/v1/audit", headers=bearer(KEY)), 429)

    assert keyed.client.get("/v1/audit", headers=bearer(OTHER_KEY)).json()["items"] == []  # nothing was started
    predict(keyed.client, digit(1))  # inference is open and not counted


def test_guarded_writes_and_the_audit_trail_need_a_key_and_audit_its_fingerprint(keyed):
    prediction_id = predict(keyed.client, digit(4))["prediction_id"]
    body = {"prediction_id": prediction_id, "label": "4"}
    assert_refused(keyed.client.post("/v1/feedback", json=body), 401)
    assert_refused(keyed.client.post("/v1/feedback", json=body, headers=bearer(WRONG)), 403)
    assert keyed.store.count_feedback() == 0

    created = keyed.client.post("/v1/feedback", json=body, headers=bearer(KEY))
    assert created.status_code == 201, created.text
    feedback_id = created.json()["feedback_id"]
    assert_refused(keyed.client.delete(f"/v1/feedback/{feedback_id}"), 401)
    assert_refused(keyed.client.delete(f"/v1/feedback/{feedback_id}", headers=bearer(WRONG)), 403)
    assert keyed.store.count_feedback() == 1
    assert keyed.client.delete(f"/v1/feedback/{feedback_id}", headers=bearer(OTHER_KEY)).status_code == 204

    assert_refused(keyed.client.get("/v1/audit"), 401)
    assert_refused(keyed.client.get("/v1/audit", headers=bearer(WRONG)), 403)
    trail = keyed.client.get("/v1/audit", headers=bearer(KEY)).json()["items"]
    actors = {e["event"]: e["actor"] for e in trail}
    assert actors == {"feedback": f"key:{hashlib.sha256(KEY.encode()).hexdigest()[:12]}",
                      "feedback_erased": f"key:{hashlib.sha256(OTHER_KEY.encode()).hexdigest()[:12]}"}
    assert KEY not in str(trail) and OTHER_KEY not in str(trail)


def test_audit_is_open_without_keys_newest_first_and_filtered_by_event(api):
    labelled(api, digit(1), "1")
    drift_check(api, "20260101T000000000000Z", drifted=False)

    everything = api.client.get("/v1/audit").json()
    feedback = api.client.get("/v1/audit", params={"event": "feedback"}).json()

    assert [e["event"] for e in everything["items"]] == ["drift_check", "feedback"]
    assert [e["event"] for e in feedback["items"]] == ["feedback"] and feedback["items"][0]["actor"] == "anonymous"
    assert api.client.get("/v1/audit", params={"event": "no_such_event"}).json()["items"] == []
    assert [e["event"] for e in api.client.get("/v1/audit", params={"limit": 1, "offset": 1}).json()["items"]] == \
        ["feedback"]
    for params in ({"limit": 0}, {"limit": 501}, {"offset": -1}, {"offset": MAX_OFFSET + 1}):
        assert_refused(api.client.get("/v1/audit", params=params), 422)


# -- /v2: what tests/test_v2_protocol.py leaves out -------------------------------------------------------------
def test_v2_is_live_but_not_ready_without_a_model(api):
    api.backend.not_ready = True
    assert api.client.get("/v2/health/live").json() == {"live": True}
    assert "not ready" in assert_v2_refused(api.client.get("/v2/health/ready"), 503)


def test_v2_infer_by_version_with_binary_tensor_data_is_logged(api):
    batch = pixels(2, 7)
    body, headers = binary_request({"inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32",
                                                "parameters": {"binary_data_size": batch.nbytes}}],
                                    "outputs": [{"name": "label", "parameters": {"binary_data": True}}]},
                                   batch.astype("<f4").tobytes())

    response = api.client.post(f"/v2/models/{MODEL}/versions/3/infer", content=body, headers=headers)

    assert response.status_code == 200, response.text
    header, blobs = binary_outputs(response)
    assert header["model_version"] == "3" and blobs == {"label": bytes_tensor(b"2", b"7")}
    assert logged(api.store) == 2


def test_v2_infer_is_refused_when_the_served_version_changes_mid_request_and_logs_nothing(api):
    api.backend.versions_answered = ["3", "4"]  # a rollout lands between the two images
    body = {"inputs": [{"name": "input", "shape": [2], "datatype": "BYTES", "data": [b64(digit(1)), b64(digit(2))]}]}
    assert "send it again" in assert_v2_refused(api.client.post(f"/v2/models/{MODEL}/infer", json=body), 503)
    assert logged(api.store) == 0


@pytest.mark.parametrize("method,path", [("GET", f"/v2/models/{MODEL}/stats"), ("POST", "/v2/repository/index"),
                                         ("GET", f"/v2/models/{MODEL}/infer")],
                         ids=["statistics extension", "repository extension", "GET on infer"])
def test_a_v2_path_or_method_that_does_not_exist_is_refused_with_the_protocols_error(shared, method, path):
    assert_v2_refused(shared.client.request(method, path), 404, 405)


# -- unknown routes and the no-5xx promise --------------------------------------------------------------------
@pytest.mark.parametrize("method,path,code", [
    ("GET", "/nope", 404), ("GET", "/v1", 404), ("GET", "/v1/predictionz", 404), ("GET", "/v1/drift/reports/", 404),
    ("POST", "/healthz", 405), ("PUT", "/v1/feedback", 405), ("GET", "/v1/predict", 405),
    ("DELETE", "/v1/predictions", 405),
])
def test_an_unknown_route_is_404_and_a_wrong_method_405(shared, method, path, code):
    assert_refused(shared.client.request(method, path), code)


AS_JSON = {"content-type": "application/json"}
BAD_REQUESTS = {  # one of each kind of bad input, on every route that takes input
    "text for an image": ("POST", "/v1/predict", {"files": {"file": ("x.png", b"text", "image/png")}}),
    "truncated PNG": ("POST", "/v1/predict", {"files": {"file": ("x.png", noisy_png()[:300], "image/png")}}),
    "pixel bomb": ("POST", "/v1/predict", {"files": {"file": ("x.png", png_header_only(30_000, 30_000))}}),
    "two files for one": ("POST", "/v1/predict", {"files": [("file", ("a.png", b"a")), ("file", ("b.png", b"b"))]}),
    "deep JSON": ("POST", "/v1/predict", {"content": b"[" * 20_000, "headers": AS_JSON}),
    "JSON not UTF-8": ("POST", "/v1/predict", {"content": b"\xff\xfe{", "headers": AS_JSON}),
    "cut multipart": ("POST", "/v1/predict", {"content": b"--x", "headers": {"content-type":
                                                                                "multipart/form-data; boundary=x"}}),
    "bad base64": ("POST", "/v1/predict", {"json": {"image_b64": "%%%"}}),
    "plain text body": ("POST", "/v1/predict", {"content": b"raw", "headers": {"content-type": "text/plain"}}),
    "far too many files": ("POST", "/v1/predict/batch", {"files": [("files", ("x.png", b"x"))] * (4 * MAX_IMAGES)}),
    "null in a batch": ("POST", "/v1/predict/batch", {"json": {"images_b64": [None]}}),
    "deep JSON batch": ("POST", "/v1/predict/batch", {"content": b"[" * 20_000, "headers": AS_JSON}),
    "deep JSON feedback": ("POST", "/v1/feedback", {"content": b"[" * 20_000, "headers": AS_JSON}),
    "NUL prediction id": ("POST", "/v1/feedback", {"json": {"prediction_id": "a\x00", "label": "1"}}),
    "huge prediction id": ("POST", "/v1/feedback", {"json": {"prediction_id": "p" * 100_000, "label": "1"}}),
    "NUL feedback id": ("DELETE", "/v1/feedback/%00", {}),
    "deep JSON cursor": ("GET", "/v1/predictions", {"params": {"cursor": cursor_of(b"[" * 5000)}}),
    "huge limit": ("GET", "/v1/predictions", {"params": {"limit": 10**30}}),
    "id not UTF-8": ("GET", "/v1/predictions/%FF%FE", {}),
    "report path too long": ("GET", "/v1/drift/reports/" + "x" * 5000 + ".html", {}),
    "deep JSON v2": ("POST", f"/v2/models/{MODEL}/infer", {"content": b"[" * 20_000}),
}


def test_no_bad_input_gets_a_server_error_and_what_was_stored_stays(api):
    prediction_id, feedback_id = labelled(api, digit(5), "5")

    answers = {name: api.client.request(method, path, **kwargs)
               for name, (method, path, kwargs) in BAD_REQUESTS.items()}

    server_errors = [f"{name}: {r.status_code}" for name, r in answers.items() if r.status_code >= 500]
    assert not server_errors, "server errors on bad input: " + ", ".join(server_errors)
    assert all(400 <= r.status_code < 500 and r.json()["detail"] for r in answers.values())
    record = api.client.get(f"/v1/predictions/{prediction_id}").json()
    assert [f["feedback_id"] for f in record["feedback"]] == [feedback_id]
    assert api.client.get("/healthz").status_code == 200
