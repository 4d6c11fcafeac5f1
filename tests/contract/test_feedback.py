"""/v1/feedback and its erasure in-process: durable before the 201, 404/422/503 as the contract says."""

from __future__ import annotations

import pytest

from store import Event, Store
from tests.support.http_contract import (
    UNKNOWN_IDS,
    assert_refused,
    database_locked,
    labelled,
    logged,
    nothing_stored,
    predict,
)
from tests.support.images import noisy_png
from tests.support.v2_tensors import digit_png as digit  # digit(7): a gray PNG the backend labels "7"


# -- /v1/feedback ---------------------------------------------------------------------------------------------
def test_feedback_is_201_and_shown_with_its_prediction_and_in_the_history(api):
    prediction_id = predict(api.client, digit(3))["prediction_id"]

    created = api.client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": "8"})

    assert created.status_code == 201, created.text
    feedback_id = created.json()["feedback_id"]
    record = api.client.get(f"/v1/predictions/{prediction_id}").json()
    assert [(f["feedback_id"], f["label"], f["source"]) for f in record["feedback"]] == [(feedback_id, "8", "api")]
    [listed] = api.client.get("/v1/predictions").json()["items"]
    assert [f["label"] for f in listed["feedback"]] == ["8"]


def test_feedback_is_in_the_database_before_the_201(api):
    prediction_id = predict(api.client, digit(3))["prediction_id"]

    feedback_id = api.client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": "8"}).json()[
        "feedback_id"]

    other = Store(api.settings.database_url, api.settings.blob_root, flush_interval_s=0.05)  # another process's view
    try:
        assert [(f.id, f.prediction_id, f.label) for f in other.list_feedback()] == [(feedback_id, prediction_id, "8")]
        [event] = other.list_audit(event_name=Event.FEEDBACK)
        assert event.details["feedback_id"] == feedback_id and event.actor == "anonymous"
    finally:
        other.close()


@UNKNOWN_IDS
def test_feedback_for_an_unknown_prediction_is_404(shared, unknown):
    with nothing_stored(shared.store):
        body = {"prediction_id": unknown.replace("%00", "\x00"), "label": "3"}  # %00 is for paths
        assert_refused(shared.client.post("/v1/feedback", json=body), 404)


@pytest.mark.parametrize("label", ["cat", "", "10", " 3"])
def test_feedback_with_a_label_that_is_not_one_of_the_classes_is_422(shared, label):
    prediction_id = predict(shared.client, digit(3))["prediction_id"]
    with nothing_stored(shared.store):
        assert_refused(shared.client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": label}), 422)


@pytest.mark.parametrize("body", [
    {}, {"label": "3"}, {"prediction_id": "x"}, {"prediction_id": 12, "label": "3"},
    {"prediction_id": "x", "label": ["3"]}, [1, 2], "{not json", None,
], ids=["nothing", "no prediction_id", "no label", "numeric id", "label a list", "a JSON array", "not JSON", "no body"])
def test_feedback_with_missing_or_mistyped_fields_is_422(shared, body):
    kwargs = {"content": body} if isinstance(body, str) else {} if body is None else {"json": body}
    with nothing_stored(shared.store):
        response = shared.client.post("/v1/feedback", headers={"content-type": "application/json"}, **kwargs)
        assert_refused(response, 422)


def test_feedback_the_database_does_not_take_is_503_with_retry_after_and_nothing_is_acknowledged(impatient):
    api = impatient
    prediction_id = predict(api.client, digit(3))["prediction_id"]
    body = {"prediction_id": prediction_id, "label": "5"}
    assert logged(api.store) == 1

    with database_locked(api.settings):
        refused = api.client.post("/v1/feedback", json=body)

    assert_refused(refused, 503)
    assert refused.headers["Retry-After"].isdigit() and "feedback_id" not in refused.json()
    assert api.store.count_feedback() == 0 and api.store.list_audit(event_name=Event.FEEDBACK) == []
    assert api.client.post("/v1/feedback", json=body).status_code == 201  # the same request, sent again
    assert [f.label for f in api.store.list_feedback()] == ["5"]


# -- DELETE /v1/feedback/{id} --------------------------------------------------------------------------------


def test_erasing_feedback_removes_the_label_and_the_image(api):
    image = noisy_png(40)
    prediction_id, feedback_id = labelled(api, image, "6")
    key = api.client.get(f"/v1/predictions/{prediction_id}").json()["image_sha256"]
    assert api.store.blobs.get(key) == image

    erased = api.client.delete(f"/v1/feedback/{feedback_id}")

    assert erased.status_code == 204 and erased.content == b""
    record = api.client.get(f"/v1/predictions/{prediction_id}").json()
    assert record["feedback"] == [] and record["image_sha256"] is None
    assert not api.store.blobs.exists(key)
    trail = {e["event"]: e["details"] for e in api.client.get("/v1/audit").json()["items"]}
    assert trail == {"feedback": {"feedback_id": feedback_id, "prediction_id": prediction_id, "source": "api",
                                  "erased": True},
                     "feedback_erased": {"feedback_id": feedback_id}}
    assert api.store.count_feedback() == 0


@UNKNOWN_IDS
def test_erasing_unknown_feedback_is_404(shared, unknown):
    assert_refused(shared.client.delete(f"/v1/feedback/{unknown}"), 404)


def test_erasing_feedback_twice_is_404_the_second_time(api):
    _, feedback_id = labelled(api, digit(2), "2")
    assert api.client.delete(f"/v1/feedback/{feedback_id}").status_code == 204
    assert_refused(api.client.delete(f"/v1/feedback/{feedback_id}"), 404)


def test_an_erasure_the_database_does_not_take_is_503_and_the_feedback_stays(impatient):
    api = impatient
    prediction_id, feedback_id = labelled(api, noisy_png(30), "1")

    with database_locked(api.settings):
        refused = api.client.delete(f"/v1/feedback/{feedback_id}")

    assert_refused(refused, 503)
    record = api.client.get(f"/v1/predictions/{prediction_id}").json()
    assert [f["feedback_id"] for f in record["feedback"]] == [feedback_id]
    assert api.store.blobs.get(record["image_sha256"]) == noisy_png(30)
