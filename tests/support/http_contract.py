"""Helpers of the in-process HTTP contract tests (tests/contract/): an app over a fake model backend and a real
Store on SQLite, and the small requests and checks those tests share."""

from __future__ import annotations

import base64
import json
import sqlite3
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from cluster.settings import Settings, load_settings
from serve.http import create_app
from store import Event, Store
from tests.support.fake_backend import BrightnessBackend
from tests.support.paths import REPO

MAX_UPLOAD = 20_000


MAX_IMAGES = 4


BODY_LIMIT = MAX_UPLOAD * 4 // 3 + 65536  # what the app lets a single-image request body grow to


KEY, OTHER_KEY, WRONG = f"key-{uuid.uuid4().hex}", f"other-{uuid.uuid4().hex}", f"wrong-{uuid.uuid4().hex}"


UNKNOWN_UUID = "7c1e9a52-4b0d-4f3e-9a61-2d8c5b7e0f14"  # shaped like the ids the API hands out; never handed out


PER_MINUTE = 5


MODEL = "rayloop-classifier"


MAX_OFFSET = 2**31 - 1  # the largest offset the API takes (what a 32-bit database integer holds)


@dataclass
class Api:
    client: TestClient
    store: Store
    settings: Settings
    backend: BrightnessBackend


def settings_for(tmp_path, **env: str) -> Settings:
    return load_settings({"RAYLOOP_DATA_DIR": str(tmp_path / "data"), "RAYLOOP_PARAMS": str(REPO / "params.yaml"),
                          "RAYLOOP_SERVE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
                          "RAYLOOP_SERVE_MAX_BATCH_IMAGES": str(MAX_IMAGES),
                          "RAYLOOP_STORE_FLUSH_INTERVAL_S": "0.05", **env})


@contextmanager
def running(settings: Settings, store: Store | None = None, champion: dict | None = None):
    store = store or Store.from_settings(settings)
    backend = BrightnessBackend(settings.serve, champion=champion)
    # Server errors come back as 500 answers, as a client would see them, rather than as exceptions.
    with TestClient(create_app(backend, store, settings), raise_server_exceptions=False) as client:
        yield Api(client, store, settings, backend)
    store.close()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_refused(response, *codes: int) -> str:
    assert response.status_code in codes, (response.status_code, response.text[:300])
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    return detail


def predict(client, image: bytes) -> dict:
    response = client.post("/v1/predict", files={"file": ("x.png", image, "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


def logged(store: Store) -> int:
    """Predictions in the database once the background writer has written what it was handed."""
    assert store.flush()
    return store.count_predictions()


@contextmanager
def nothing_stored(store: Store):
    """The requests in the block leave no prediction and no feedback behind."""
    before = logged(store), store.count_feedback()
    yield
    assert (logged(store), store.count_feedback()) == before


def multipart(field: str, *images: bytes, boundary: str = "contract-test-boundary") -> tuple[bytes, dict]:
    """A multipart body written out by hand, so it can be streamed without a Content-Length."""
    parts = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="x.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n" for image in images)
    return parts + f"--{boundary}--\r\n".encode(), {"content-type": f"multipart/form-data; boundary={boundary}"}


def chunked(body: bytes, size: int = 16384):
    """The body as a stream: the client sends it chunked, with no Content-Length."""
    for start in range(0, len(body), size):
        yield body[start:start + size]


UNKNOWN_IDS = pytest.mark.parametrize("unknown", ["nope", UNKNOWN_UUID, "a%00b", "x" * 37],
                                      ids=["not an id", "an id never handed out", "NUL byte", "too long"])


@contextmanager
def database_locked(settings: Settings):
    """Another writer holds SQLite's write lock, as a long transaction elsewhere would."""
    holder = sqlite3.connect(settings.database_url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def labelled(api: Api, image: bytes, label: str) -> tuple[str, str]:
    """A prediction of `image` and the feedback `label` for it: (prediction id, feedback id)."""
    prediction_id = predict(api.client, image)["prediction_id"]
    created = api.client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": label})
    assert created.status_code == 201, created.text
    return prediction_id, created.json()["feedback_id"]


def cursor_of(value: bytes) -> str:
    return base64.urlsafe_b64encode(value).decode()


def drift_check(api: Api, stem: str, drifted: bool) -> None:
    """What the monitor writes after a check: the reports and a `drift_check` audit event."""
    folder = api.settings.data_dir / "drift"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.html").write_text(f"<html>report {stem}</html>")
    (folder / f"{stem}.json").write_text(json.dumps({"stem": stem}))
    api.store.audit("drift-monitor", Event.DRIFT_CHECK, {
        "drifted": drifted, "share": 0.5 if drifted else 0.0, "scores": {"brightness": 0.001, "confidence": 0.4},
        "drifted_columns": ["brightness"] if drifted else [], "embedding_score": 0.12, "embedding_drifted": drifted,
        "window_size": 200, "reference_size": 500, "checked_at": "2026-01-01T00:00:00+00:00",
        "html_path": str(folder / f"{stem}.html"), "json_path": str(folder / f"{stem}.json"), "model_version": "3",
        "decided_by": "calibrated", "evidently_drifted": False,
        "calibrated": {"drift": drifted, "fired": ["embedding_mmd2"] if drifted else [], "false_alarm_rate": 0.001,
                       "window_size": 200, "statistics": {"embedding_mmd2": {
                           "value": 0.2, "threshold": 0.01, "p_value": 6.7e-5 if drifted else 0.4, "fired": drifted}}}})
