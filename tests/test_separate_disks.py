"""The cluster profile on nodes that share no disk: a Ray head and a worker node on this machine, the worker
with a data directory and a HOME of its own. Everything that does work (the Serve replica, the retrain's
Tune trial and its Ray Train worker) can only run on the worker node (the head has no CPU for it), while the
driver, like a head node, has its own data directory. They meet only through the cluster profile: the MLflow
server (artifacts proxied), PostgreSQL, and a shared storage folder.

Then: predictions are served on the worker node, the images it logs land in shared storage and the retrain
learns from them, the promoted model is what every replica serves, and neither node's own data directory
holds any of the shared state.
"""

import io
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cluster.ray_cluster import free_port
from tests.support.paths import REPO
from tests.support.postgres import new_database, postgres_server
from tests.support.serving import actor_nodes

pytestmark = pytest.mark.slow

SHARED_STATE = {"rayloop.db", "mlflow.db", "blobs", "drift", "mlartifacts"}
LABELLED = 40


@pytest.fixture(scope="module")
def profile_services(tmp_path_factory):
    """PostgreSQL with the store's and MLflow's databases, and an MLflow server proxying artifacts into the
    shared folder (what the head runs in the cluster profile)."""
    from cluster import services
    from cluster.settings import load_settings

    root = tmp_path_factory.mktemp("profile")
    with postgres_server() as server:
        store_url, mlflow_db = new_database(server, "rayloop"), new_database(server, "mlflow")
        shared = root / "shared"
        host = load_settings({"RAYLOOP_DATA_DIR": str(root / "services")})  # where the server's pid and log go
        port = free_port()
        command = services.mlflow_server_command(mlflow_db, "127.0.0.1", port,
                                                 artifacts_destination=str(shared / "mlartifacts"))
        services.start(host, "mlflow", command, f"http://127.0.0.1:{port}/health", timeout=180,
                       env={**os.environ, **services.MLFLOW_SERVER_ENV})
        try:
            yield {"RAYLOOP_DATABASE_URL": store_url, "RAYLOOP_MLFLOW_URI": f"http://127.0.0.1:{port}",
                   "RAYLOOP_STORAGE_URI": str(shared)}, root
        finally:
            services.stop(host, "mlflow")


@pytest.fixture(scope="module")
def two_nodes(profile_services):
    import ray
    from ray._private.authentication.authentication_token_setup import _get_default_token_path
    from ray.cluster_utils import Cluster

    _, root = profile_services
    worker = {"HOME": str(root / "worker-home"), "RAYLOOP_DATA_DIR": str(root / "worker-data")}
    Path(worker["HOME"]).mkdir()
    # The one thing handed to the worker node on purpose: the cluster's auth token, as `ray start` needs it.
    token = {"RAY_AUTH_TOKEN_PATH": str(_get_default_token_path())} if os.environ.get("RAY_AUTH_MODE") else {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    node = cluster.add_node(num_cpus=2, env_vars={**worker, **token})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster, node.node_id, worker
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def digit_png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image[:, :, 0]).save(out, format="PNG")
    return out.getvalue()


def shared_state_in(folder: Path) -> set[str]:
    """Names of shared state (databases, blobs, reports, artifacts) anywhere below a node-local folder."""
    return {p.name for p in folder.rglob("*") if p.name in SHARED_STATE} if folder.exists() else set()


def test_a_worker_node_with_its_own_disk_serves_logs_and_retrains_through_the_cluster_profile(
        profile_services, two_nodes, tmp_path):
    from cluster import profile
    from cluster.settings import load_settings
    from control.deployment import deploy
    from control.rollout import roll_out
    from store import Store
    from train import registry
    from train.decode import load_mnist
    from train.pipeline import run_train
    from tune import job

    shared_env, root = profile_services
    cluster, worker_node, worker = two_nodes
    head_data = tmp_path / "head-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLOOP_")}
    env.update(shared_env)
    env.update({"RAYLOOP_DATA_DIR": str(head_data), "RAYLOOP_PARAMS": str(REPO / "params.yaml"),
                "RAYLOOP_RAY_ADDRESS": cluster.address, "RAYLOOP_DATA_LIMIT": "600",
                "RAYLOOP_TRAIN_NUM_WORKERS": "0", "RAYLOOP_TRAIN_EPOCHS": "1",
                "RAYLOOP_SERVICES_SERVE_PORT": str(free_port()), "RAYLOOP_SERVE_NUM_REPLICAS": "1",
                "RAYLOOP_TUNE_NUM_SAMPLES": "1", "RAYLOOP_TUNE_EPOCHS": "2", "RAYLOOP_TUNE_BATCH_SIZES": "32",
                "RAYLOOP_TUNE_LR_MIN": "0.003", "RAYLOOP_TUNE_FINE_TUNE": "false",
                "RAYLOOP_MONITOR_INTERVAL_S": "3600"})
    settings = load_settings(env)
    assert profile.node_local(settings) == []

    # A weak first champion (two steps), trained by the driver and registered through the MLflow server.
    first = run_train(load_settings({**env, "RAYLOOP_TRAIN_MAX_STEPS": "2"}))["model_version"]
    url = deploy(settings, timeout=240)
    assert set(actor_nodes("ServeReplica:rayloop:Classifier")) == {worker_node}

    images, labels, _ = load_mnist()
    with httpx.Client(base_url=url, timeout=60) as client:
        ids = []
        for i in range(LABELLED):
            answer = client.post("/v1/predict", files={"file": ("d.png", digit_png(images[i]), "image/png")})
            assert answer.status_code == 200 and answer.json()["model_version"] == first, answer.text
            ids.append(answer.json()["prediction_id"])
        for prediction_id, label in zip(ids, labels[:LABELLED]):
            feedback = client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": str(label)})
            assert feedback.status_code == 201, feedback.text

    # The images the worker node's replica logged are in shared storage, where the retrain reads them.
    store = Store.from_settings(settings)
    try:
        keys = {store.get_prediction(i).blob_key for i in ids}
        assert all(store.blobs.exists(key) for key in keys)
        assert {p.name for p in (root / "shared" / "blobs").rglob("*") if p.is_file()} == {k[2:] for k in keys}
    finally:
        store.close()

    result = job.run_job(settings, "manual", "separate-disks-test", on_promote=roll_out)
    assert sum(result.feedback.values()) == LABELLED  # every labelled image found, from the other node's writes
    assert result.promoted, result.gate.reason
    assert set(actor_nodes("RayTrainWorker")) == {worker_node}
    assert registry.describe_champion(settings)["version"] == result.challenger_version

    with httpx.Client(base_url=url, timeout=60) as client:
        served = {client.post("/v1/predict", files={"file": ("d.png", digit_png(images[i]), "image/png")}
                              ).json()["model_version"] for i in range(LABELLED, LABELLED + 20)}
    assert served == {result.challenger_version}

    # Nothing shared lives on either node's own disk, and the retrain left no trial checkpoints behind.
    assert shared_state_in(head_data) == set() and shared_state_in(Path(worker["RAYLOOP_DATA_DIR"])) == set()
    assert shared_state_in(Path(worker["HOME"])) == set()
    assert list((root / "shared" / "ray_results").iterdir()) == []
    assert any(p.is_file() for p in (root / "shared" / "mlartifacts").rglob("*"))  # the models, via the server
