"""Access: with API keys configured no write/admin route works without the right key, keys never reach a log
file or the audit trail, and uploaded file names never place a file outside the blob directory."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from urllib.parse import unquote

import pytest

from cluster.ray_cluster import free_port
from store import Store
from tests.support.images import png
from tests.support.paths import REPO
from tests.support.serving import SMALL_UPLOADS, serving

pytestmark = pytest.mark.slow

KEY = f"access-test-key-{uuid.uuid4().hex}"
WRONG = f"wrong-key-{uuid.uuid4().hex}"
# Inference is open by design (README "Serving"), explanations too (they change nothing; serve.explain_per_minute
# bounds them); every other route that changes something, and the audit trail, needs a key.
OPEN_WRITES = {("post", "/v1/predict"), ("post", "/v1/predict/batch"), ("post", "/v2/models/{name}/infer"),
               ("post", "/v2/models/{name}/versions/{version}/infer"), ("post", "/v1/explain")}
ADMIN_READS = {("get", "/v1/audit")}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    # Access logs on, so the logs hold every request; a dashboard port nothing listens on, so a retrain
    # request reaches the job client and stops there instead of training.
    env = {**SMALL_UPLOADS, "RAYLOOP_SERVE_ACCESS_LOG": "true", "RAYLOOP_SERVICES_DASHBOARD_PORT": str(free_port())}
    with serving(tmp_path_factory.mktemp("access") / "data", api_keys=f"{KEY},second-key", env=env) as served:
        yield served


def operations(client) -> set[tuple[str, str]]:
    return {(method, path) for path, item in client.get("/openapi.json").json()["paths"].items() for method in item}


def guarded_in_schema(client) -> set[tuple[str, str]]:
    paths = client.get("/openapi.json").json()["paths"]
    return {(m, p) for p, item in paths.items() for m, op in item.items() if op.get("security")}


def call(client, method: str, path: str, headers: dict, prediction_id: str) -> int:
    """One request to a guarded route with a plausible body."""
    if (method, path) == ("post", "/v1/feedback"):
        response = client.post(path, json={"prediction_id": prediction_id, "label": "3"}, headers=headers)
    elif (method, path) == ("delete", "/v1/feedback/{feedback_id}"):
        feedback_id = client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": "4"},
                                  headers={"Authorization": f"Bearer {KEY}"}).json()["feedback_id"]
        response = client.request("DELETE", f"/v1/feedback/{feedback_id}", headers=headers)
    else:
        response = client.request(method.upper(), path, headers=headers)
    assert response.status_code < 500 or "retrain" in response.json()["detail"], response.text
    return response.status_code


def test_every_write_and_admin_route_is_guarded_in_the_schema(client):
    everything = operations(client)
    writes = {(m, p) for m, p in everything if m in {"post", "put", "patch", "delete"}} - OPEN_WRITES

    guarded = guarded_in_schema(client)

    assert writes | ADMIN_READS <= guarded, (writes | ADMIN_READS) - guarded
    assert {("post", "/v1/feedback"), ("delete", "/v1/feedback/{feedback_id}"), ("post", "/v1/admin/retrain"),
            ("post", "/v1/admin/rollback"), ("get", "/v1/audit")} <= guarded
    assert not guarded & OPEN_WRITES


def test_guarded_routes_refuse_no_key_and_a_wrong_key_and_take_the_right_one(client):
    prediction_id = client.post("/v1/predict", files={"file": ("x.png", png(), "image/png")}).json()["prediction_id"]
    answers = {}
    for method, path in sorted(guarded_in_schema(client)):
        answers[(method, path)] = (
            call(client, method, path, {}, prediction_id),
            call(client, method, path, {"Authorization": f"Bearer {WRONG}"}, prediction_id),
            call(client, method, path, {"Authorization": f"Basic {KEY}"}, prediction_id),
            call(client, method, path, {"Authorization": f"Bearer {KEY}"}, prediction_id))

    assert all(a[:3] == (401, 403, 401) for a in answers.values()), answers
    assert answers[("post", "/v1/feedback")][3] == 201
    assert answers[("delete", "/v1/feedback/{feedback_id}")][3] == 204
    assert answers[("get", "/v1/audit")][3] == 200
    assert answers[("post", "/v1/admin/rollback")][3] == 409       # authorized: only one version to roll back to
    assert answers[("post", "/v1/admin/retrain")][3] in (202, 503)  # authorized: 503 = no job service in this test
    assert all(a[3] not in (401, 403) for a in answers.values())


def test_keys_never_appear_in_logs_or_the_audit_trail(served, client):
    import ray

    auth = {"Authorization": f"Bearer {KEY}"}
    prediction_id = client.post("/v1/predict", files={"file": ("x.png", png(), "image/png")}).json()["prediction_id"]
    labelled = client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": "5"}, headers=auth)
    assert labelled.status_code == 201
    client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": "5"},
                headers={"Authorization": f"Bearer {WRONG}"})
    items = client.get("/v1/audit", headers=auth).json()["items"]
    store = Store.from_settings(served.settings)
    try:
        trail = str([vars(e) for e in store.list_audit(limit=100_000)])
    finally:
        store.close()

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [p for root in (logs, served.settings.data_dir) for p in root.rglob("*") if p.is_file()]
    leaks = [str(p) for p in files for secret in (KEY.encode(), WRONG.encode()) if secret in p.read_bytes()]

    # The Serve logs searched are the ones that logged these very requests.
    assert any(p.name.startswith("replica_rayloop_") and b"POST /v1/feedback 201" in p.read_bytes()
               for p in files)
    assert items and all(i["actor"] in ("anonymous",) or re.fullmatch(r"key:[0-9a-f]{12}", i["actor"]) for i in items)
    assert KEY not in trail and WRONG not in trail
    assert leaks == []


@pytest.mark.parametrize("filename", ["../../../{tag}", "/tmp/{tag}", "..\\..\\{tag}", "blobs/../../{tag}",
                                      "%2e%2e%2f%2e%2e%2f{tag}", "{tag}\x00.png"])
def test_upload_file_names_never_escape_the_blob_directory(served, client, filename):
    tag = f"escape-{uuid.uuid4().hex}"
    image = png(77)

    response = client.post("/v1/predict", files={"file": (filename.format(tag=tag), image, "image/png")})

    assert response.status_code == 200, response.text
    record = client.get(f"/v1/predictions/{response.json()['prediction_id']}").json()
    blobs = Path(served.settings.blob_root)
    assert (blobs / record["image_sha256"][:2] / record["image_sha256"][2:]).read_bytes() == image
    assert all(re.fullmatch(r"[0-9a-f]{2}/[0-9a-f]{62}", p.relative_to(blobs).as_posix())
               for p in blobs.rglob("*") if p.is_file())
    # Wherever a server that trusted the name would have written it: nothing there, nor anywhere in the test's tree.
    name = unquote(filename.format(tag=tag)).replace("\\", "/").replace("\x00", "")
    bases = [blobs, blobs / "ab", served.settings.data_dir, REPO, Path("/tmp"), Path("/")]
    assert not [b for b in bases if (b / name).resolve().exists()]
    assert not list(served.settings.data_dir.parent.rglob(f"{tag}*"))
