"""Multi-node for real: a Ray cluster of three nodes on this machine (a head and two workers, each a
raylet of its own), Ray Train workers and Serve replicas placed on different nodes, all of them
writing the same MLflow registry and the same store.

Node sizes force the spread: the head has no CPU for work, each worker node has one CPU, and a
training worker or a Classifier replica (0.75 CPU) needs most of one, so two never share a node.
"""

import os

import httpx
import pytest

from cluster.ray_cluster import free_port
from tests.support.images import png
from tests.support.paths import REPO
from tests.support.serving import actor_nodes, alive_actor_nodes, replicas_and_versions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_port": free_port()})
    workers = [cluster.add_node(num_cpus=1, resources={f"worker_{i}": 1}) for i in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster, {node.node_id for node in workers}
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def test_training_workers_and_serve_replicas_run_on_different_nodes_sharing_store_and_registry(
        three_nodes, tmp_path):
    import ray

    from cluster.settings import load_settings
    from control.deployment import deploy
    from store import Store
    from train import registry
    from train.pipeline import run_train

    cluster, worker_nodes = three_nodes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLOOP_")}
    env.update({"RAYLOOP_DATA_DIR": str(tmp_path / "data"), "RAYLOOP_PARAMS": str(REPO / "params.yaml"),
                "RAYLOOP_RAY_ADDRESS": cluster.address, "RAYLOOP_DATA_LIMIT": "600",
                "RAYLOOP_TRAIN_EPOCHS": "1", "RAYLOOP_TRAIN_MAX_STEPS": "4",  # placement is asserted, not accuracy
                "RAYLOOP_TRAIN_NUM_WORKERS": "auto",
                "RAYLOOP_SERVICES_SERVE_PORT": str(free_port()), "RAYLOOP_SERVE_NUM_REPLICAS": "2",
                "RAYLOOP_SERVE_NUM_CPUS": "0.75", "RAYLOOP_SERVE_INGRESS_NUM_CPUS": "0.1"})
    settings = load_settings(env)
    assert len(ray.nodes()) == 3

    # Ray Train: `auto` gives one DDP worker per node with CPUs; the model lands in the shared MLflow registry.
    summary = run_train(settings)
    train_nodes = actor_nodes("RayTrainWorker")
    assert len(train_nodes) == 2 and set(train_nodes) == worker_nodes, train_nodes
    assert summary["num_workers"] == 2 and registry.describe_champion(settings)["version"] == summary["model_version"]

    # Serve: the two Classifier replicas on the two worker nodes, both loading that registry version.
    url = deploy(settings, timeout=240)
    replica_nodes = alive_actor_nodes("ServeReplica:rayloop:Classifier", 2)
    assert len(replica_nodes) == 2 and set(replica_nodes) == worker_nodes, replica_nodes

    with httpx.Client(base_url=url, timeout=60) as client:
        answers = [client.post("/v1/predict", files={"file": ("x.png", png(40 + 4 * i), "image/png")})
                   for i in range(40)]
        assert {a.status_code for a in answers} == {200}
        assert {a.json()["model_version"] for a in answers} == {summary["model_version"]}
        ids = [a.json()["prediction_id"] for a in answers]
        feedback = client.post("/v1/feedback", json={"prediction_id": ids[0], "label": answers[0].json()["label"]})
        assert feedback.status_code == 201, feedback.text

    # Replicas on both nodes answered and logged into the one store the driver reads.
    replicas, _ = replicas_and_versions(url)
    assert len(replicas) == 2
    store = Store.from_settings(settings)
    try:
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and store.count_predictions() < len(ids):
            time.sleep(0.5)
        assert store.count_predictions() == len(ids)
        assert [f.label for f in store.get_prediction(ids[0]).feedback] == [answers[0].json()["label"]]
    finally:
        store.close()
