"""The Gradio demo end to end: its API through gradio_client, and a person's clicks in headless Chromium.

The demo runs in this process on a free port and calls a real Ray Serve (the `served` fixture of
tests/conftest.py) over HTTP; what it stores is checked through Serve's HTTP API, as a client would.
"""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from cluster.ray_cluster import free_port
from tests.support.browser import chromium_page
from tests.support.images import png


@pytest.fixture(scope="module")
def demo_url(served):
    """The demo for the served model, running in a background thread on a free port."""
    from ui.app import build_demo, launch

    demo = build_demo(served.settings)
    yield launch(demo, "127.0.0.1", free_port(), block=False)
    demo.close()


@pytest.fixture(scope="module")
def dead_demo_url(tmp_path_factory):
    """A demo whose Serve URL points at a port nothing listens on."""
    from cluster.settings import load_settings
    from ui.app import build_demo, launch

    settings = load_settings({"RAYLOOP_DATA_DIR": str(tmp_path_factory.mktemp("dead")),
                              "RAYLOOP_SERVE_URL": f"http://127.0.0.1:{free_port()}"})
    demo = build_demo(settings)
    yield launch(demo, "127.0.0.1", free_port(), block=False)
    demo.close()


@pytest.fixture
def digit(tmp_path) -> Path:
    path = tmp_path / "digit.png"
    path.write_bytes(png(200))
    return path


def stored_feedback(served, prediction_id: str) -> list[str]:
    with served.client() as c:
        record = c.get(f"/v1/predictions/{prediction_id}")
    assert record.status_code == 200, record.text
    return [f["label"] for f in record.json()["feedback"]]


def draw_a_seven(page) -> None:
    """Drag the mouse over the sketchpad like a person drawing a 7 (the demo picks the brush by itself)."""
    from playwright.sync_api import expect

    expect(page.get_by_text("select the draw tool to start")).to_be_hidden(timeout=15_000)
    box = page.locator("#sketch canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 40, y - 60)
    page.mouse.down()
    page.mouse.move(x + 40, y - 60, steps=10)
    page.mouse.move(x - 10, y + 70, steps=10)
    page.mouse.up()


# -- no Serve needed -----------------------------------------------------------------------------------
def test_a_sketch_becomes_a_centred_light_on_dark_digit():
    from ui.app import sketch_png

    canvas = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).line([(200, 40), (210, 120)], fill=(0, 0, 0, 255), width=14)  # a "1", top right

    digit = Image.open(io.BytesIO(sketch_png({"composite": canvas, "background": None, "layers": []})))

    assert digit.size == (28, 28) and digit.mode == "L"
    assert digit.getpixel((14, 14)) > 200 and digit.getpixel((1, 1)) == 0
    assert sketch_png({"composite": Image.new("RGBA", (280, 280)), "layers": []}) is None
    assert sketch_png(None) is None


def test_the_timeline_says_which_way_the_gate_went():
    from ui.app import describe_event

    waiting = describe_event("gate_decision", {"outcome": "not_enough_evidence", "passed": False,
                                               "challenger_version": "3", "champion_version": "2",
                                               "reason": "only 8 feedback holdout items"})
    assert waiting.startswith("challenger v3 waits for more evidence at the gate against champion v2: only 8")
    assert "failed the gate" in describe_event("gate_decision", {"outcome": "reject", "passed": False})
    assert "passed the gate" in describe_event("gate_decision", {"passed": True})  # events before outcomes


def test_the_demo_calls_the_configured_serve_with_the_first_plain_api_key(tmp_path):
    from cluster.settings import load_settings
    from ui.app import api_key, serve_url

    derived = load_settings({"RAYLOOP_DATA_DIR": str(tmp_path), "RAYLOOP_SERVICES_SERVE_PORT": "8123"})
    keyed = load_settings({"RAYLOOP_DATA_DIR": str(tmp_path), "RAYLOOP_SERVE_URL": "http://ray-head:8000/",
                           "RAYLOOP_API_KEYS": "sha256:0123abcd, first-key ,second-key"})

    assert (serve_url(derived), api_key(derived)) == ("http://127.0.0.1:8123", None)
    assert (serve_url(keyed), api_key(keyed)) == ("http://ray-head:8000", "first-key")


def test_the_demo_queue_waits_for_work_without_polling_every_millisecond(tmp_path):
    from cluster.settings import load_settings
    from ui.app import build_demo, quiet_queue

    demo = build_demo(load_settings({"RAYLOOP_DATA_DIR": str(tmp_path)}))
    demo.queue()
    queue = demo._queue
    assert queue.sleep_when_free <= 0.001 or sys.platform == "win32"  # Gradio's own poll, which we slow down
    quiet_queue(demo)
    assert queue.sleep_when_free == 0.05 and queue.progress_update_sleep_when_free == 0.1
    demo.close()


def test_the_demo_says_serve_is_down_instead_of_failing(dead_demo_url, digit):
    from gradio_client import Client, handle_file

    client = Client(dead_demo_url, verbose=False)

    *_, status = client.predict(handle_file(digit), None, api_name="/predict")
    _, history_note = client.predict(api_name="/history")
    drift, _, links = client.predict(api_name="/monitoring")
    *_, label_note = client.predict(api_name="/label_queue")

    for message in (status, history_note, drift, label_note):
        assert "Serve is not reachable" in message and "make up" in message
    assert "[Ray dashboard](http://127.0.0.1:8265)" in links and "Grafana" in links
    assert "Predict an image first" in client.predict("", "3", api_name="/feedback")


def test_the_label_tab_walks_a_person_through_the_queue_one_click_each(tmp_path):
    from tests.support.http_contract import running, settings_for
    from ui.client import ServeClient
    from ui.label import LabelDesk

    with running(settings_for(tmp_path)) as served:  # the HTTP API in-process, over a fake model
        ids = [served.client.post("/v1/predict", files={"file": ("x.png", png(v), "image/png")}).json()["prediction_id"]
               for v in (40, 120, 200)]
        api = ServeClient("http://testserver")
        api.http = served.client
        desk = LabelDesk(api, problem=lambda message: f"⚠ {message}")

        state, image, about, choice, _ = desk.refresh()
        shown = state["item"]["prediction_id"]
        assert image.size == (28, 28) and f"The model says **{state['item']['label']}**" in about
        assert choice["choices"] == [str(i) for i in range(10)] and choice["interactive"] and choice["value"] is None

        state, _, _, _, saved = desk.label(state, "7")  # one click on "7"
        assert "Saved" in saved and state["labelled"] == 1 and state["item"]["prediction_id"] != shown
        skipped = state["item"]["prediction_id"]
        state, *_ = desk.skip(state)
        assert state["item"]["prediction_id"] not in (shown, skipped)
        last = state["item"]["prediction_id"]
        state, image, about, choice, _ = desk.label(state, "2")  # nothing left but the skipped one

        assert image is None and "Nothing to label" in about and not choice["interactive"]
        labels = {p: [f["label"] for f in served.client.get(f"/v1/predictions/{p}").json()["feedback"]] for p in ids}
        assert labels == {shown: ["7"], skipped: [], last: ["2"]}
        assert desk.refresh(state)[0]["item"] is None  # skipped for the rest of the session


def test_the_label_tab_says_when_the_queue_needs_an_api_key(tmp_path):
    from tests.support.http_contract import running, settings_for
    from ui.client import ServeClient
    from ui.label import LabelDesk

    with running(settings_for(tmp_path, RAYLOOP_SERVE_API_KEYS="a-key")) as served:
        api = ServeClient("http://testserver")
        api.http = served.client  # no key sent
        state, image, _, choice, note = LabelDesk(api, problem=lambda message: f"⚠ {message}").refresh()

    assert "refused the label queue (401)" in note and "RAYLOOP_API_KEYS" in note
    assert state["item"] is None and image is None and not choice["interactive"]


def test_the_explain_button_lays_the_models_evidence_over_the_image(tmp_path):
    from tests.support.http_contract import running, settings_for
    from ui.app import chosen_image
    from ui.client import ServeClient
    from ui.explain import Explainer

    with running(settings_for(tmp_path, RAYLOOP_SERVE_EXPLAIN_PER_MINUTE="1")) as served:
        api = ServeClient("http://testserver")
        api.http = served.client
        explainer = Explainer(api, problem=lambda message: f"⚠ {message}", chosen=chosen_image)
        upload = tmp_path / "digit.png"
        upload.write_bytes(png(200))

        overlay, note = explainer.explain(str(upload), None, "upload")
        _, again = explainer.explain(str(upload), None, "upload")
        _, empty = explainer.explain(None, None, "sketch")

    assert overlay.size == (224, 224) and "found **7**" in note and "model v3" in note and "Grad-CAM" in note
    assert "refused to explain this image (429)" in again and "The sketchpad is empty" in empty
    assert served.store.count_predictions() == 0  # explaining is not predicting: nothing logged


# -- against a real Ray Serve --------------------------------------------------------------------------
@pytest.mark.slow
def test_the_demo_api_predicts_and_stores_feedback(served, demo_url, digit):
    from gradio_client import Client, handle_file

    client = Client(demo_url, verbose=False)

    answer, plot, prediction_id, correct, raw, _ = client.predict(handle_file(digit), None, api_name="/predict")
    other = next(c for c in raw["probabilities"] if c != raw["label"])
    saved = client.predict(prediction_id, other, api_name="/feedback")

    assert f"Prediction: {raw['label']}" in answer and "model version **1**" in answer
    assert raw["prediction_id"] == prediction_id and correct["value"] == raw["label"]
    assert [label for label, _ in plot["data"]][0] == raw["label"] and len(plot["data"]) == 5  # top-5 bars
    assert "Feedback saved" in saved
    assert stored_feedback(served, prediction_id) == [other]
    history, note = client.predict(api_name="/history")
    assert {row[1]: row[5] for row in history["data"]}[prediction_id] == other
    assert "1 of them have feedback" in note


@pytest.mark.slow
def test_the_demo_explains_bad_input(demo_url, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(demo_url, verbose=False)
    text = tmp_path / "notes.png"
    text.write_text("I am not an image")

    *_, refused = client.predict(handle_file(text), None, api_name="/predict")
    *_, nothing = client.predict(None, None, api_name="/predict")
    wrong_label = client.predict("no-such-prediction", "3", api_name="/feedback")

    assert "Serve refused this image (400): not an image" in refused
    assert "Upload an image first" in nothing
    assert "refused the feedback (404)" in wrong_label


@pytest.mark.slow
def test_monitoring_shows_the_latest_drift_check_and_the_retrain_timeline(served, demo_url):
    from gradio_client import Client

    from store import Store

    report = served.settings.data_dir / "drift" / "drift-ui-test.html"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("<html>an Evidently report</html>")
    store = Store.from_settings(served.settings)
    try:  # what the monitor and a retrain job write, in that order
        store.audit("drift-monitor", "drift_check", {
            "drifted": True, "share": 0.5, "scores": {"brightness": 0.001}, "drifted_columns": ["brightness"],
            "embedding_score": 0.03, "model_version": "1", "window_size": 200, "html_path": str(report),
            "decided_by": "calibrated", "evidently_drifted": False, "calibrated": {
                "drift": True, "fired": ["class_tv"], "false_alarm_rate": 0.001, "window_size": 200, "statistics": {
                    "class_tv": {"value": 0.4, "threshold": 0.2, "p_value": 6.7e-5, "fired": True},
                    "confidence_ks": {"value": 0.1, "threshold": 0.2, "p_value": 0.3, "fired": False}}},
            "estimated_accuracy": {"accuracy": 0.62, "low": 0.57, "high": 0.67, "predictions": 200}})
        store.audit("drift-monitor", "retrain_triggered", {"trigger": "drift", "job": "raysubmit_1"})
        store.audit("retrain-job", "gate_decision", {"passed": True, "reason": "better on the feedback holdout",
                                                     "champion_version": "1", "challenger_version": "2"})
        store.audit("retrain-job", "promoted", {"version": "2", "previous": "1"})
    finally:
        store.close()

    drift, timeline, links = Client(demo_url, verbose=False).predict(api_name="/monitoring")

    assert "drift detected" in drift and "50% of features" in drift and "brightness" in drift
    assert "at most 0.001 false alarms a check: class_tv p=6.7e-05 (fired), confidence_ks p=0.3" in drift
    assert "Evidently's own rule says no drift" in drift
    assert "Accuracy estimated from the model's confidence (no labels): 0.62 (90% interval 0.57-0.67)" in drift
    report_link = re.search(r"\[Open the Evidently report\]\((\S+)\)", drift).group(1)
    assert httpx.get(report_link).text == "<html>an Evidently report</html>"
    rows = {row[1]: row[3] for row in timeline["data"]}
    assert rows["promoted"] == "v2 is the champion (was v1)"
    assert rows["gate_decision"].startswith("challenger v2 passed the gate against champion v1")
    assert "trigger=drift" in rows["retrain_triggered"]
    assert "MLflow UI" in links


@pytest.mark.slow
def test_asking_for_the_evidently_report_without_a_drift_monitor_says_why(served, demo_url):
    from gradio_client import Client

    drift, _, links = Client(demo_url, verbose=False).predict(api_name="/drift_report")
    assert "No drift check could run now: the drift monitor is not running" in drift, drift
    assert "`rayloop up` starts it" in drift and "MLflow UI" in links


@pytest.mark.slow
def upload_and_predict(page, image) -> None:
    """What a person does first on the Predict tab: choose the image, wait for it to show, press Predict."""
    from playwright.sync_api import expect

    page.locator("#upload input[type=file]").set_input_files(image)
    expect(page.locator("#upload img")).to_be_visible(timeout=15_000)
    page.get_by_role("button", name="Predict", exact=True).click()


def test_a_person_predicts_corrects_and_browses_in_chromium(served, demo_url, dead_demo_url, digit):
    from playwright.sync_api import expect

    with chromium_page() as page:
        page.goto(demo_url)
        expect(page.locator("#header")).to_contain_text("Serving", timeout=30_000)

        upload_and_predict(page, digit)
        expect(page.locator("#answer")).to_contain_text("model version 1", timeout=30_000)
        expect(page.locator("#top-k")).to_be_visible()
        prediction_id = page.locator("#prediction-id textarea, #prediction-id input").first.input_value()
        predicted = page.locator("#correct-label input").input_value()
        other = "3" if predicted != "3" else "4"

        page.locator("#correct-label input").click()
        page.get_by_role("option", name=other, exact=True).click()
        page.get_by_role("button", name="Send feedback").click()
        expect(page.locator("#status")).to_contain_text("Feedback saved", timeout=30_000)
        if os.environ.get("RAYLOOP_SCREENSHOTS"):
            folder = Path(os.environ["RAYLOOP_SCREENSHOTS"])
            folder.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=folder / "demo.png", full_page=True)
        assert stored_feedback(served, prediction_id) == [other]

        page.get_by_role("tab", name="Sketch").click()
        draw_a_seven(page)
        page.get_by_role("button", name="Predict", exact=True).click()
        expect(page.locator("#prediction-id textarea, #prediction-id input").first).not_to_have_value(
            prediction_id, timeout=30_000)
        sketched_id = page.locator("#prediction-id textarea, #prediction-id input").first.input_value()
        expect(page.locator("#answer")).to_contain_text("model version 1")

        page.get_by_role("button", name="Explain", exact=True).click()
        expect(page.locator("#explain-overlay img")).to_be_visible(timeout=30_000)

        page.get_by_role("tab", name="History").click()
        expect(page.locator("#history")).to_contain_text(prediction_id, timeout=30_000)
        expect(page.locator("#history")).to_contain_text(sketched_id)

        # Unlabelled predictions (the sketch among them): the Label tab asks for one, and one click saves it.
        page.get_by_role("tab", name="Label").click()
        expect(page.locator("#label-about")).to_contain_text("The model says", timeout=30_000)
        expect(page.locator("#label-image img")).to_be_visible()
        asked = re.search(r"prediction\s+([0-9a-f-]{36})", page.locator("#label-about").inner_text()).group(1)
        page.locator("#label-choice").get_by_text("7", exact=True).click()
        expect(page.locator("#label-status")).to_contain_text("Saved", timeout=30_000)
        expect(page.locator("#label-status")).to_contain_text(asked)

        page.get_by_role("tab", name="Monitoring").click()
        expect(page.locator("#drift")).to_contain_text("drift check", timeout=30_000)
        expect(page.locator("#rollout")).to_contain_text("No staged rollout yet", timeout=30_000)
        expect(page.locator("#loop-plot")).to_be_visible()
        for name in ("Ray dashboard", "MLflow UI", "Grafana"):
            expect(page.locator("#links").get_by_role("link", name=name)).to_have_attribute("href", re.compile(r"^http://"))

        down = page.context.browser.new_page()
        down.goto(dead_demo_url)
        expect(down.locator("#header")).to_contain_text("Serve is not reachable", timeout=30_000)
        upload_and_predict(down, digit)
        expect(down.locator("#status")).to_contain_text("Serve is not reachable", timeout=30_000)
