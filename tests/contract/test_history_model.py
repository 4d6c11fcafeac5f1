"""/v1/predictions, /v1/model, /v1/drift and its reports in-process: paging, cursors, what is never served."""

from __future__ import annotations

import pytest

from store.events import Event
from tests.support.fake_backend import CLASSES
from tests.support.http_contract import (
    KEY,
    MAX_OFFSET,
    MODEL,
    UNKNOWN_IDS,
    assert_refused,
    bearer,
    cursor_of,
    drift_check,
    predict,
    running,
    settings_for,
)
from tests.support.v2_tensors import digit_png as digit  # digit(7): a gray PNG the backend labels "7"


# -- /v1/predictions ----------------------------------------------------------------------------------------
def test_history_pages_newest_first_by_offset_and_by_cursor(api):
    ids = [predict(api.client, digit(d))["prediction_id"] for d in range(5)]
    newest_first = ids[::-1]

    def page(**params) -> dict:
        response = api.client.get("/v1/predictions", params={"limit": 2, **params})
        assert response.status_code == 200, response.text
        return response.json()

    first = page()
    second = page(cursor=first["next_cursor"])
    third = page(cursor=second["next_cursor"])

    assert first["total"] == 5 and first["limit"] == 2
    assert [[p["prediction_id"] for p in p_["items"]] for p_ in (first, second, third)] == \
        [newest_first[:2], newest_first[2:4], newest_first[4:]]
    assert third["next_cursor"] is None
    assert [p["prediction_id"] for p in page(offset=2)["items"]] == newest_first[2:4]
    assert page(offset=5)["items"] == []


@pytest.mark.parametrize("cursor", ["garbage", "é", cursor_of(b"null"), cursor_of(b"[1, 2]"), cursor_of(b'{"a": 1}'),
                                    cursor_of(b'["not a time", "id"]'), cursor_of(b"\xff\xfe"),
                                    cursor_of(b"[" * 5000)],
                         ids=["not base64", "non-ASCII", "null", "numbers", "an object", "not a time", "not UTF-8",
                              "JSON nested too deep"])
def test_an_invalid_cursor_is_400(shared, cursor):
    assert_refused(shared.client.get("/v1/predictions", params={"cursor": cursor}), 400)


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 501}, {"limit": -1}, {"limit": "ten"}, {"offset": -1},
                                    {"offset": MAX_OFFSET + 1}, {"offset": 2**64}, {"offset": "1.5"}], ids=str)
def test_paging_out_of_bounds_is_422(shared, params):
    assert_refused(shared.client.get("/v1/predictions", params=params), 422)


@pytest.mark.parametrize("params", [{"limit": 1}, {"limit": 500}, {"offset": MAX_OFFSET}], ids=str)
def test_paging_at_the_bounds_is_answered(api, params):
    predict(api.client, digit(1))
    response = api.client.get("/v1/predictions", params=params)
    assert response.status_code == 200 and response.json()["total"] == 1
    assert len(response.json()["items"]) == (0 if "offset" in params else 1)


@UNKNOWN_IDS
def test_an_unknown_prediction_is_404(shared, unknown):
    assert_refused(shared.client.get(f"/v1/predictions/{unknown}"), 404)


# -- /v1/model ------------------------------------------------------------------------------------------------
def test_model_without_a_champion_names_only_the_served_version(api):
    body = api.client.get("/v1/model").json()
    assert body["name"] == MODEL and body["version"] is None and body["served_version"] == "3"
    assert body["classes"] == CLASSES and body["arch"] == "cnn" and body["metrics"] == {}


def test_model_with_a_champion_describes_it_beside_the_served_version(tmp_path):
    champion = {"name": MODEL, "version": "4", "run_id": "run-4", "created": 1767225600000,
                "metrics": {"test_accuracy": 0.97}, "tags": {"trained_at": "2026-01-01T00:00:00+00:00",
                                                             "data_version": "mnist-v2", "arch": "resnet"}}
    with running(settings_for(tmp_path), champion=champion) as api:
        body = api.client.get("/v1/model").json()

    assert body == {"name": MODEL, "version": "4", "served_version": "3", "metrics": {"test_accuracy": 0.97},
                    "trained_at": "2026-01-01T00:00:00+00:00", "data_version": "mnist-v2", "arch": "resnet",
                    "classes": CLASSES, "run_id": "run-4", "task": "classification"}


# -- /v1/drift and its reports -------------------------------------------------------------------------------


def test_drift_says_no_check_yet_before_the_monitor_ran(api):
    assert api.client.get("/v1/drift").json()["status"] == "no check yet"


def test_drift_shows_the_latest_check_and_serves_its_report(api):
    drift_check(api, "20260101T000000000000Z", drifted=False)
    drift_check(api, "20260102T000000000000Z", drifted=True)

    body = api.client.get("/v1/drift").json()

    assert body["status"] == "checked" and body["drifted"] is True and body["share"] == 0.5
    assert body["features"] == {"brightness": 0.001, "confidence": 0.4} and body["drifted_features"] == ["brightness"]
    assert body["embedding_score"] == 0.12 and body["window_size"] == 200 and body["model_version"] == "3"
    assert body["report_url"] == "/v1/drift/reports/20260102T000000000000Z.html"
    assert body["decided_by"] == "calibrated" and body["evidently_drifted"] is False
    assert body["calibrated"]["fired"] == ["embedding_mmd2"] and body["calibrated"]["false_alarm_rate"] == 0.001
    report = api.client.get(body["report_url"])
    assert report.status_code == 200 and report.text == "<html>report 20260102T000000000000Z</html>"
    assert report.headers["content-type"].startswith("text/html")
    as_json = api.client.get("/v1/drift/reports/20260101T000000000000Z.json")
    assert as_json.json() == {"stem": "20260101T000000000000Z"}


def test_drift_says_when_the_monitors_checks_fail_until_one_succeeds_again(api):
    drift_check(api, "20260101T000000000000Z", drifted=False)
    api.store.audit("drift-monitor", Event.DRIFT_CHECK_FAILED, {"error": "OperationalError: database is locked"})

    failing = api.client.get("/v1/drift")

    assert failing.status_code == 200  # the API answers; the monitor's failure is its content
    assert failing.json()["status"] == "check failed: OperationalError: database is locked"
    assert failing.json()["checked_at"] is not None and failing.json()["drifted"] is None
    drift_check(api, "20260102T000000000000Z", drifted=True)
    assert api.client.get("/v1/drift").json()["status"] == "checked"


def test_drift_report_true_asks_the_monitor_for_a_check_now_and_links_its_report(api):
    drift_check(api, "20260101T000000000000Z", drifted=False)  # the monitor's last check
    folder = api.settings.data_dir / "drift"
    (folder / "20260102T000000000000Z.html").write_text("<html>asked for</html>")
    api.backend.drift_answer = {"status": "checked", "model_version": "3", "report": {
        "drifted": False, "share": 0.0, "scores": {"brightness": 0.3}, "drifted_columns": [], "embedding_score": 0.001,
        "embedding_drifted": False, "window_size": 120, "reference_size": 500,
        "checked_at": "2026-01-02T00:00:00+00:00", "html_path": str(folder / "20260102T000000000000Z.html"),
        "json_path": str(folder / "20260102T000000000000Z.json")}}

    latest = api.client.get("/v1/drift").json()  # the plain read asks the monitor for nothing
    assert latest["report_url"].endswith("20260101T000000000000Z.html") and api.backend.drift_requests == 0
    body = api.client.get("/v1/drift", params={"report": "true"}).json()

    assert api.backend.drift_requests == 1
    assert body["status"] == "checked" and body["drifted"] is False and body["window_size"] == 120
    assert body["checked_at"].startswith("2026-01-02") and body["model_version"] == "3"
    assert body["report_url"] == "/v1/drift/reports/20260102T000000000000Z.html"
    assert api.client.get(body["report_url"]).text == "<html>asked for</html>"


def test_drift_report_says_why_no_check_could_run(api):
    api.backend.drift_answer = {"status": "waiting for 50 predictions of v3", "model_version": "3", "report": None}
    body = api.client.get("/v1/drift?report=1").json()
    assert body["status"] == "waiting for 50 predictions of v3" and body["report_url"] is None


def test_drift_report_without_a_monitor_says_so_and_the_plain_check_still_answers(api):
    asked = api.client.get("/v1/drift?report=true")
    assert asked.status_code == 200 and asked.json()["report_url"] is None
    assert asked.json()["status"] == "the drift monitor is not running (`rayloop up` starts it)"
    assert api.client.get("/v1/drift").json()["status"] == "no check yet"


def test_drift_report_needs_the_api_key_when_keys_are_configured_and_the_plain_check_does_not(keyed):
    assert keyed.client.get("/v1/drift").status_code == 200
    assert_refused(keyed.client.get("/v1/drift?report=true"), 401)
    assert_refused(keyed.client.get("/v1/drift?report=true", headers=bearer("wrong")), 403)
    assert keyed.backend.drift_requests == 0
    asked = keyed.client.get("/v1/drift?report=true", headers=bearer(KEY))
    assert asked.status_code == 200 and keyed.backend.drift_requests == 1


def test_drift_report_flag_must_be_a_boolean(shared):
    assert_refused(shared.client.get("/v1/drift?report=maybe"), 422)


BAD_REPORT_NAMES = {
    "parent": "%2E%2E", "traversal": "..%2Frayloop.db", "encoded dots": "%2e%2e%2frayloop.db",
    "backslash": "..%5Csecret.html", "absolute": "%2Fetc%2Fpasswd", "wrong suffix": "notes.txt",
    "suffix after suffix": "report.html.bak", "NUL byte": "a%00.html", "name too long": "x" * 300 + ".html",
    "path too long": "x" * 5000 + ".html", "symlink out": "outside.html", "a directory": "folder.html",
    "missing": "missing.html", "a sub-folder": "sub/inner.html",
}


@pytest.mark.parametrize("name", BAD_REPORT_NAMES.values(), ids=BAD_REPORT_NAMES.keys())
def test_a_report_name_outside_the_folder_or_not_a_report_is_404(shared, report_folder, name):
    assert shared.client.get("/v1/drift/reports/20260101T000000000000Z.html").status_code == 200
    assert_refused(shared.client.get(f"/v1/drift/reports/{name}"), 404)


@pytest.mark.parametrize("name", ["r.html", "a%00.html", "x" * 300 + ".html", "x" * 5000 + ".html"],
                         ids=["missing", "NUL byte", "name too long", "path too long"])
def test_a_report_name_is_404_before_the_first_check_wrote_the_folder(api, name):
    assert not (api.settings.data_dir / "drift").exists()
    assert_refused(api.client.get(f"/v1/drift/reports/{name}"), 404)
