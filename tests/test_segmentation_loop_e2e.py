"""Crack segmentation through the whole loop from `rayloop up` with the generated crack set: serve masks, take
corrected masks as feedback on a surface the champion never saw (asphalt), retrain with Ray Tune, gate on
per-image IoU, and swap the winner in under load without a failed request."""

import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from store import Event, Store
from tests.support.load import Load
from tests.support.system import system_up
from train.cracks import render
from train.mask_metrics import iou
from train.masks import encode_mask_png, read_mask

pytestmark = pytest.mark.slow
SHIFT = "asphalt"  # the demo set is concrete
FEEDBACK, JUDGED = 120, 60  # shifted images corrected by a person / kept aside to measure the swap


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def predicted_masks(client: httpx.Client, photos: list[bytes]) -> tuple[list[str], np.ndarray, set[str]]:
    """(prediction ids, predicted 0/1 masks, versions that answered)."""
    ids, masks, versions = [], [], set()
    for data in photos:
        answer = client.post("/v1/predict", files={"file": ("crack.png", data, "image/png")})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        ids.append(body["prediction_id"])
        masks.append(read_mask(base64.b64decode(body["mask_png_b64"])))
        versions.add(body["model_version"])
    return ids, np.stack(masks), versions


def test_cracks_on_a_new_surface_are_corrected_retrained_gated_and_swapped_in(tmp_path, monkeypatch):
    # Half the crack set at 64 px, 5 epochs for the first champion and 3 for one Tune trial, no drift checks (the
    # retrain is asked for), no staged rollout (tests/test_canary_serve.py covers it): the loop's own steps in
    # minutes on two cores (at the defaults: 12 minutes, bench/RESULTS.md).
    quick = {"RAYLOOP_DATA_LIMIT": "400", "RAYLOOP_DATA_IMAGE_SIZE": "64", "RAYLOOP_TRAIN_EPOCHS": "5",
             "RAYLOOP_TUNE_NUM_SAMPLES": "1", "RAYLOOP_TUNE_EPOCHS": "3", "RAYLOOP_MONITOR_INTERVAL_S": "3600",
             "RAYLOOP_ROLLOUT_STAGED": "false"}
    with system_up(tmp_path / "data", monkeypatch, RAYLOOP_DATASET="segmentation-demo", **quick) as system:
        store = Store.from_settings(system.settings)
        try:
            demo = f"http://127.0.0.1:{system.env['RAYLOOP_SERVICES_UI_PORT']}"
            loop_on_asphalt(system.url, store, demo)
        finally:
            store.close()


def loop_on_asphalt(url: str, store: Store, demo: str) -> None:
    """Predict, correct, retrain under load, and measure the swap (the steps of the test above). The retrain is
    asked for as a person does: the demo's Monitoring tab, Retrain now (its Gradio API, the button's function)."""
    from gradio_client import Client

    shots = [render(seed=99, index=i, size=96, texture=SHIFT) for i in range(FEEDBACK + JUDGED)]
    photos, truth = [png(photo) for photo, _ in shots], np.stack([mask for _, mask in shots])
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/v1/model").json()["task"] == "segmentation"
        explained = client.post("/v1/explain", files={"file": ("crack.png", photos[0], "image/png")})
        assert explained.status_code == 409 and "segments" in explained.json()["detail"]
        _, before, [champion] = predicted_masks(client, photos[FEEDBACK:])
        ids, _, _ = predicted_masks(client, photos[:FEEDBACK])
        for prediction_id, mask in zip(ids, truth[:FEEDBACK]):
            corrected = base64.b64encode(encode_mask_png(mask)).decode()
            sent = client.post("/v1/feedback", json={"prediction_id": prediction_id, "mask_png_b64": corrected})
            assert sent.status_code == 201, sent.text
        with Load(url, threads=1) as load:
            started = time.monotonic()
            note = Client(demo, verbose=False).predict(api_name="/retrain")
            assert note.startswith("Retrain job `") and "started" in note, note
            while not store.list_audit(limit=1, event_name=Event.RETRAIN_FINISHED):
                failed = store.list_audit(limit=1, event_name=Event.RETRAIN_FAILED)
                assert not failed, failed[0].details
                assert time.monotonic() - started < 1200, "the retrain did not finish in 20 minutes"
                time.sleep(2)
            [gate] = store.list_audit(limit=1, event_name=Event.GATE_DECISION)
            assert gate.details["passed"] is True, gate.details["reason"]
            while client.get("/v1/model").json()["served_version"] == champion:
                assert time.monotonic() - started < 1500, "the new champion was never served"
                time.sleep(1)
        _, after, versions = predicted_masks(client, photos[FEEDBACK:])
    assert versions and champion not in versions
    iou_before, iou_after = iou(before, truth[FEEDBACK:]).mean(), iou(after, truth[FEEDBACK:]).mean()
    print(f"asphalt IoU {iou_before:.3f} -> {iou_after:.3f}; gate: {gate.details['reason']}")
    assert iou_after - iou_before >= 0.2, (iou_before, iou_after)
    assert len(load.answers) > 50 and not load.failed(), load.failed()[:5]
