"""The labelling queue: which predictions a person is asked to label, in which order, and that a label given
through it is feedback like any other (GET /v1/label-queue in-process, over a real Store on SQLite)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from store import Event
from store.label_queue import (
    Candidate,
    DriftEpisode,
    drift_episode,
    labelled_images_query,
    rank,
    unlabelled,
    unlabelled_query,
)
from tests.support.http_contract import KEY, assert_refused, bearer, predict, running, settings_for
from tests.support.images import png
from tests.test_store import query_plan

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
CLASSES = [str(i) for i in range(10)]


def probabilities(label: str, p: float, runner_up: str, q: float) -> dict[str, float]:
    """`label` at p, `runner_up` at q, the rest shared evenly (as a softmax over ten digits would)."""
    rest = (1 - p - q) / (len(CLASSES) - 2)
    return {c: p if c == label else q if c == runner_up else rest for c in CLASSES}


def candidate(name: str, label: str = "3", margin: float = 0.5, minute: int = 0, image: str | None = None) -> Candidate:
    p = (0.9 + margin) / 2
    return Candidate(name, T0 + timedelta(minutes=minute), "1", label, p, probabilities(label, p, "8", p - margin),
                     image or f"image-of-{name}")


def names(ranked: list[Candidate]) -> list[str]:
    return [c.prediction_id for c in ranked]


# -- the ranking (pure) -----------------------------------------------------------------------------------------
def test_the_closest_calls_come_first_and_the_newest_breaks_ties():
    sure, unsure, torn = candidate("sure", margin=0.8), candidate("unsure", margin=0.3), candidate("torn", margin=0.02)
    older, newer = candidate("older", margin=0.3, minute=1), candidate("newer", margin=0.3, minute=2)

    assert names(rank([sure, unsure, torn], limit=3)) == ["torn", "unsure", "sure"]
    assert names(rank([sure, unsure, torn], limit=2)) == ["torn", "unsure"]
    assert names(rank([older, newer], limit=2)) == ["newer", "older"]


@pytest.mark.parametrize("probs, margin, entropy, runner_up", [
    ({"a": 1.0, "b": 0.0}, 1.0, 0.0, "b"),
    ({"a": 0.5, "b": 0.5}, 0.0, 1.0, "b"),
    ({"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}, 0.0, 1.0, "d"),
    ({"a": 0.7, "b": 0.2, "c": 0.1}, 0.5, 0.7298, "b"),
    ({"a": 1.0}, 1.0, 0.0, None),
], ids=["certain", "a coin toss", "uniform", "leaning", "one class"])
def test_margin_entropy_and_runner_up_of_a_prediction(probs, margin, entropy, runner_up):
    c = Candidate("p", T0, "1", "a", max(probs.values()), probs, "k")
    assert (round(c.margin, 4), round(c.entropy, 4), c.runner_up) == (margin, entropy, runner_up)


def test_predictions_of_the_drift_episode_come_before_closer_calls_outside_it():
    before = candidate("before", margin=0.01, minute=1)
    during = [candidate("during-sure", margin=0.9, minute=5), candidate("during-torn", margin=0.1, minute=6)]
    after = candidate("after", margin=0.02, minute=20)

    ranked = rank([before, *during, after], limit=4, episode=DriftEpisode(T0 + timedelta(minutes=2),
                                                                          T0 + timedelta(minutes=10)))

    assert names(ranked) == ["during-torn", "during-sure", "before", "after"]
    assert names(rank([before, *during, after], limit=4)) == ["before", "after", "during-torn", "during-sure"]


def test_a_page_takes_one_predicted_class_after_another():
    threes = [candidate(f"three-{i}", label="3", margin=0.01 * i) for i in range(1, 5)]
    seven = candidate("seven", label="7", margin=0.2)
    one = candidate("one", label="1", margin=0.3)

    ranked = rank([*threes, seven, one], limit=4)

    assert names(ranked) == ["three-1", "seven", "one", "three-2"]  # not four 3s in a row


def test_an_image_predicted_more_than_once_is_queued_once_at_its_closest_call():
    again = [candidate("first", margin=0.4, image="same"), candidate("again", margin=0.1, image="same", minute=1)]

    assert names(rank([*again, candidate("other", margin=0.3)], limit=5)) == ["again", "other"]


def at(minute: int) -> datetime:
    return T0 + timedelta(minutes=minute)


@pytest.mark.parametrize("checks, episode", [
    ([], None),
    ([(3, False), (2, False), (1, False)], None),
    ([(3, True), (2, True), (1, False)], DriftEpisode(at(1), None)),
    ([(4, False), (3, True), (2, True), (1, False)], DriftEpisode(at(1), at(3))),
    ([(5, True), (4, False), (3, True), (2, False)], DriftEpisode(at(4), None)),
    ([(2, True), (1, True)], DriftEpisode(None, None)),
], ids=["no checks", "all calm", "drifting now", "drift that ended", "only the latest episode", "no calm check read"])
def test_the_latest_drift_episode_from_the_drift_checks(checks, episode):
    assert drift_episode([(at(m), drifted) for m, drifted in checks]) == episode


# -- GET /v1/label-queue ---------------------------------------------------------------------------------------
@pytest.fixture
def api(tmp_path):
    with running(settings_for(tmp_path)) as served:
        yield served


@pytest.fixture
def keyed(tmp_path):
    with running(settings_for(tmp_path, RAYLOOP_SERVE_API_KEYS=KEY)) as served:
        yield served


def logged(api, label: str, p: float, q: float, image: bytes | None) -> str:
    """A prediction of `label` at p with "8" (or "9") at q, as a replica logs it."""
    prediction_id = api.store.log_prediction(model_version="3", label=label, confidence=p, image=image,
                                             probabilities=probabilities(label, p, "8" if label != "8" else "9", q))
    assert api.store.flush()
    time.sleep(0.002)  # each prediction in its own instant
    return prediction_id


def queue(api, **params) -> dict:
    response = api.client.get("/v1/label-queue", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_queue_lists_the_closest_calls_with_their_images_and_the_classes_to_choose_from(api):
    sure = logged(api, "3", 0.90, 0.05, png(10))
    torn = logged(api, "3", 0.46, 0.44, png(20))
    unsure = logged(api, "5", 0.60, 0.30, png(30))

    answer = queue(api)

    assert [i["prediction_id"] for i in answer["items"]] == [torn, unsure, sure]
    first = answer["items"][0]
    assert (first["label"], first["runner_up"], first["margin"], first["model_version"]) == ("3", "8", 0.02, "3")
    assert answer["classes"] == CLASSES and answer["candidates"] == 3 and answer["drift_episode"] is False
    image = api.client.get(first["image_url"])
    assert image.status_code == 200 and image.content == png(20) and image.headers["content-type"] == "image/png"


def test_labelled_erased_and_imageless_predictions_are_not_queued(api):
    waiting = logged(api, "3", 0.5, 0.4, png(10))
    labelled = logged(api, "3", 0.5, 0.4, png(20))
    erased = logged(api, "3", 0.5, 0.4, png(30))
    logged(api, "3", 0.5, 0.4, None)  # its image was not kept (store.image_sample_rate)
    logged(api, "3", 0.5, 0.4, png(20))  # the labelled image sent again
    assert api.client.post("/v1/feedback", json={"prediction_id": labelled, "label": "3"}).status_code == 201
    feedback_id = api.client.post("/v1/feedback", json={"prediction_id": erased, "label": "8"}).json()["feedback_id"]
    assert api.client.delete(f"/v1/feedback/{feedback_id}").status_code == 204

    answer = queue(api)

    assert [i["prediction_id"] for i in answer["items"]] == [waiting] and answer["candidates"] == 1
    assert_refused(api.client.get(f"/v1/predictions/{erased}/image"), 404)


def test_a_label_given_through_the_queue_is_feedback_and_takes_the_prediction_out(api):
    ids = [predict(api.client, png(v))["prediction_id"] for v in (40, 120, 200)]
    first = queue(api, limit=1)["items"][0]["prediction_id"]

    created = api.client.post("/v1/feedback", json={"prediction_id": first, "label": "4"})

    assert created.status_code == 201
    assert first not in [i["prediction_id"] for i in queue(api)["items"]]
    assert sorted(i["prediction_id"] for i in queue(api)["items"]) == sorted(set(ids) - {first})
    assert [(p, label) for p, label, _ in api.store.labelled_images(window=10)] == [(first, "4")]  # a retrain's


def test_predictions_since_the_latest_drift_come_first(api):
    before = logged(api, "3", 0.46, 0.44, png(10))
    api.store.audit("drift-monitor", Event.DRIFT_CHECK, {"drifted": False})
    time.sleep(0.002)
    during = logged(api, "7", 0.95, 0.01, png(20))
    api.store.audit("drift-monitor", Event.DRIFT_CHECK, {"drifted": True})

    answer = queue(api)

    assert [(i["prediction_id"], i["drifted"]) for i in answer["items"]] == [(during, True), (before, False)]
    assert answer["drift_episode"] is True and answer["drifted_until"] is None
    assert answer["drifted_since"] < answer["items"][0]["created_at"]


def test_only_the_newest_window_of_predictions_is_read(api):
    oldest = logged(api, "3", 0.46, 0.44, png(10))
    newer = [logged(api, "3", 0.9, 0.05, png(v)) for v in (20, 30)]

    answer = queue(api, window=2)

    assert [i["prediction_id"] for i in answer["items"]] == newer[::-1] and oldest not in str(answer)
    assert (answer["window"], answer["candidates"]) == (2, 2)
    assert len(unlabelled(api.store, window=3)) == 3


def test_the_read_walks_the_newest_rows_by_index_whatever_the_table_size(api):
    for v in range(20):
        logged(api, "3", 0.5, 0.4, png(v))

    plans = {"predictions": query_plan(api.store, unlabelled_query(5)),
             "labelled images": query_plan(api.store, labelled_images_query(5))}

    assert "ix_predictions_page" in plans["predictions"] and "ix_feedback_newest" in plans["labelled images"], plans
    for name, plan in plans.items():  # a SCAN of the (at most `window`) rows the index walk picked is fine
        assert not [line for line in plan.splitlines() if line.startswith(("SCAN predictions", "SCAN feedback"))
                    and "INDEX" not in line], f"{name}: {plan}"
        assert "TEMP B-TREE" not in plan, f"{name} sorts every row: {plan}"


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"limit": -1}, {"limit": "ten"},
                                    {"window": 0}, {"window": 10_001}], ids=str)
def test_limit_and_window_out_of_bounds_are_422_with_a_reason(api, params):
    detail = assert_refused(api.client.get("/v1/label-queue", params=params), 422)
    assert next(iter(params)) in detail


def test_an_empty_queue_is_an_empty_list(api):
    assert queue(api, limit=100) == {"items": [], "classes": [], "limit": 100, "window": 2000, "candidates": 0,
                                     "drifted_since": None, "drifted_until": None, "drift_episode": False}


def test_the_queue_and_the_images_need_the_api_key_when_keys_are_configured(keyed):
    prediction_id = logged(keyed, "3", 0.5, 0.4, png(10))

    assert_refused(keyed.client.get("/v1/label-queue"), 401)
    assert_refused(keyed.client.get(f"/v1/predictions/{prediction_id}/image"), 401)
    assert_refused(keyed.client.get("/v1/label-queue", headers=bearer("wrong")), 403)
    listed = keyed.client.get("/v1/label-queue", headers=bearer(KEY)).json()["items"]
    assert [i["prediction_id"] for i in listed] == [prediction_id]
    assert keyed.client.get(listed[0]["image_url"], headers=bearer(KEY)).content == png(10)


def test_an_image_never_kept_or_of_an_unknown_prediction_is_404(api):
    imageless = logged(api, "3", 0.5, 0.4, None)

    assert "has no image" in assert_refused(api.client.get(f"/v1/predictions/{imageless}/image"), 404)
    assert_refused(api.client.get("/v1/predictions/7c1e9a52-4b0d-4f3e-9a61-2d8c5b7e0f14/image"), 404)
