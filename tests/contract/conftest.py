"""The in-process apps the HTTP contract tests run against (FastAPI's TestClient; no Ray, no Serve)."""

from __future__ import annotations

import hashlib

import pytest

from store import Store
from tests.support.http_contract import (
    KEY,
    OTHER_KEY,
    PER_MINUTE,
    drift_check,
    running,
    settings_for,
)


@pytest.fixture
def api(tmp_path):
    """A fresh app, auth off (no keys configured), as on a laptop."""
    with running(settings_for(tmp_path)) as served:
        yield served


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One app for the requests that must be refused and change nothing (see `nothing_stored`)."""
    with running(settings_for(tmp_path_factory.mktemp("shared"))) as served:
        yield served


@pytest.fixture
def keyed(tmp_path):
    """Two API keys (the second configured by its digest, as keys travel in the Serve config), rate-limited."""
    keys = f"{KEY},sha256:{hashlib.sha256(OTHER_KEY.encode()).hexdigest()}"
    with running(settings_for(tmp_path, RAYLOOP_SERVE_API_KEYS=keys,
                              RAYLOOP_SERVE_RATE_LIMIT_PER_MINUTE=str(PER_MINUTE))) as served:
        yield served


@pytest.fixture
def impatient(tmp_path):
    """A store that gives up on a locked database after 0.2 s, as it would after its real busy timeout."""
    settings = settings_for(tmp_path)
    store = Store(settings.database_url, settings.blob_root, flush_interval_s=0.05, busy_timeout_s=0.2)
    with running(settings, store) as served:
        yield served


@pytest.fixture(scope="module")
def report_folder(shared):
    """A drift folder with a real report beside things that are not reports."""
    drift_check(shared, "20260101T000000000000Z", drifted=False)
    data = shared.settings.data_dir
    folder = data / "drift"
    (folder / "notes.txt").write_text("not a report")
    (folder / "report.html.bak").write_text("not a report")
    (data / "secret.html").write_text("outside the folder")
    (folder / "outside.html").symlink_to(data / "secret.html")
    (folder / "folder.html").mkdir()
    (folder / "sub").mkdir()
    (folder / "sub" / "inner.html").write_text("nested")
    return folder
