"""Right to erasure: DELETE /v1/feedback/{id} removes the label and its image, audits only the id, and the
next retrain does not learn from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from store import Store, UnknownFeedback
from tests.support.images import CLASSES, png
from tests.support.serving import SMALL_UPLOADS, serving

KEY = "erasure-test-key-not-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("erasure") / "data", api_keys=KEY, env=SMALL_UPLOADS) as served:
        yield served


@pytest.fixture
def store(served):
    s = Store.from_settings(served.settings)
    yield s
    s.close()


def predict(client, image: bytes) -> dict:
    response = client.post("/v1/predict", files={"file": ("x.png", image, "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


def label(client, prediction_id: str, value: str) -> str:
    response = client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": value}, headers=AUTH)
    assert response.status_code == 201, response.text
    return response.json()["feedback_id"]


def blob_path(served, sha256: str):
    return Path(served.settings.blob_root) / sha256[:2] / sha256[2:]


@pytest.mark.slow
def test_erased_feedback_and_its_image_are_gone_and_the_next_retrain_does_not_use_them(served, client, store):
    from tune.job import feedback_samples

    erased_prediction = predict(client, png(11))
    kept_prediction = predict(client, png(12))
    erased_id = label(client, erased_prediction["prediction_id"], "4")
    kept_id = label(client, kept_prediction["prediction_id"], "6")
    image = blob_path(served, client.get(f"/v1/predictions/{erased_prediction['prediction_id']}")
                      .json()["image_sha256"])
    assert image.is_file()
    before = feedback_samples(store, CLASSES, 10_000)
    assert erased_prediction["prediction_id"] in before.ids

    response = client.delete(f"/v1/feedback/{erased_id}", headers=AUTH)

    assert response.status_code == 204 and response.content == b""
    record = client.get(f"/v1/predictions/{erased_prediction['prediction_id']}").json()
    assert record["feedback"] == [] and record["image_sha256"] is None
    assert not image.exists()
    after = feedback_samples(store, CLASSES, 10_000)  # what the retrain job learns from next
    assert erased_prediction["prediction_id"] not in after.ids
    assert kept_prediction["prediction_id"] in after.ids
    assert erased_id not in {f.id for f in store.list_feedback(limit=100_000)}
    assert kept_id in {f.id for f in store.list_feedback(limit=100_000)}


@pytest.mark.slow
def test_the_erasure_is_audited_by_id_and_actor_without_the_data(served, client, store):
    prediction = predict(client, png(21))
    feedback_id = label(client, prediction["prediction_id"], "9")

    assert client.delete(f"/v1/feedback/{feedback_id}", headers=AUTH).status_code == 204

    events = client.get("/v1/audit", params={"event": "feedback_erased"}, headers=AUTH).json()["items"]
    erased = [e for e in events if e["details"].get("feedback_id") == feedback_id]
    assert len(erased) == 1
    assert erased[0]["details"] == {"feedback_id": feedback_id} and erased[0]["actor"].startswith("key:")
    # The label is gone from the trail too: the original feedback event keeps only ids.
    mentions = [e for e in store.list_audit(limit=100_000) if feedback_id in str(e.details)]
    assert {e.event for e in mentions} == {"feedback", "feedback_erased"}
    assert all("label" not in e.details for e in mentions)
    assert KEY not in str([vars(e) for e in store.list_audit(limit=100_000)])


@pytest.mark.slow
def test_an_image_another_prediction_shares_stays(served, client):
    first, second = predict(client, png(31)), predict(client, png(31))  # same bytes: one blob
    feedback_id = label(client, first["prediction_id"], "1")
    sha256 = client.get(f"/v1/predictions/{second['prediction_id']}").json()["image_sha256"]

    assert client.delete(f"/v1/feedback/{feedback_id}", headers=AUTH).status_code == 204

    assert client.get(f"/v1/predictions/{first['prediction_id']}").json()["image_sha256"] is None
    assert client.get(f"/v1/predictions/{second['prediction_id']}").json()["image_sha256"] == sha256
    assert blob_path(served, sha256).read_bytes() == png(31)


@pytest.mark.slow
def test_erasure_needs_a_key_and_an_existing_feedback(client):
    feedback_id = label(client, predict(client, png(41))["prediction_id"], "2")

    assert client.delete(f"/v1/feedback/{feedback_id}").status_code == 401
    assert client.delete(f"/v1/feedback/{feedback_id}", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.delete(f"/v1/feedback/{feedback_id}", headers=AUTH).status_code == 204
    again = client.delete(f"/v1/feedback/{feedback_id}", headers=AUTH)
    assert again.status_code == 404 and again.json()["detail"]
    assert client.delete("/v1/feedback/no-such-feedback", headers=AUTH).status_code == 404


def test_the_store_erases_on_sqlite_and_postgresql(database_url, tmp_path):
    store = Store(database_url, tmp_path / "blobs", flush_interval_s=0.02)
    try:
        shared = [store.log_prediction(model_version="1", label="3", confidence=0.9, probabilities={"3": 0.9},
                                       image=b"same image") for _ in range(2)]
        alone = store.log_prediction(model_version="1", label="3", confidence=0.9, probabilities={"3": 0.9},
                                     image=b"only image")
        erased = [store.add_feedback(shared[0], "7"), store.add_feedback(alone, "8")]
        keys = [store.get_prediction(p).blob_key for p in (shared[0], alone)]

        for feedback_id in erased:
            store.erase_feedback(feedback_id, actor="key:abc")

        assert store.list_feedback() == []
        assert store.blobs.exists(keys[0]) and not store.blobs.exists(keys[1])
        assert store.get_prediction(shared[1]).blob_key == keys[0] and store.get_prediction(alone).blob_key is None
        trail = [e for e in store.list_audit(limit=1000) if e.event.startswith("feedback")]
        assert all("label" not in e.details for e in trail)
        assert sorted(e.details["feedback_id"] for e in trail if e.event == "feedback_erased") == sorted(erased)
        with pytest.raises(UnknownFeedback):
            store.erase_feedback(erased[0])
    finally:
        store.close()
