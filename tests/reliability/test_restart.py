"""Restarts lose nothing acknowledged: `rayloop down` + `up`, and a SIGKILL of the whole Ray head.

What "acknowledged" means per record (README "Serving", store/store.py):
- feedback (201) and its audit event: committed before the answer; must survive anything.
- audit events, model versions (MLflow), drift checks and their reports: committed/written before they
  are visible; must survive anything.
- predictions (200 with a prediction_id): written by the serving replica's background writer, and
  answered only once committed (`store.durable_predictions`, on by default: the rows of requests
  waiting together go in one transaction). A hard kill can only lose predictions not answered yet;
  the test asserts none answered is lost and records the count.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from cluster.ray_cluster import free_port
from tests.support.faults import MAX_FAILED_SHARE, kill_under_load
from tests.support.figures import FAULTS, record_figures
from tests.support.images import png
from tests.support.paths import REPO
from tests.support.registry import register_tiny_model

pytestmark = pytest.mark.slow
RAYLOOP = str(Path(sys.executable).parent / "rayloop")
KEY = "restart-test-key"


def rayloop(command: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([RAYLOOP, *command.split()], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"rayloop {command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


class System:
    """A `rayloop up` system in its own data dir and ports, and what clients were told by it."""

    def __init__(self, root: Path):
        ports = {name: free_port() for name in ("SERVE", "MLFLOW", "DASHBOARD", "RAY", "UI")}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLOOP_") and k != "RAY_ADDRESS"}
        self.env.update({f"RAYLOOP_SERVICES_{name}_PORT": str(port) for name, port in ports.items()})
        self.env.update(RAYLOOP_DATA_DIR=str(root / "data"), RAYLOOP_API_KEYS=KEY, RAY_USAGE_STATS_ENABLED="0",
                        RAYLOOP_SERVICES_METRICS_EXPORT_PORT="0",
                        # The monitor checks often over small windows, and never triggers a retrain here.
                        RAYLOOP_MONITOR_INTERVAL_S="2", RAYLOOP_MONITOR_MIN_WINDOW="10",
                        RAYLOOP_MONITOR_WINDOW_SIZE="40", RAYLOOP_MONITOR_MIN_FEEDBACK="100000",
                        RAYLOOP_MONITOR_FEEDBACK_THRESHOLD="100000")
        from cluster.settings import load_settings

        self.settings = load_settings(self.env)
        self.url = f"http://127.0.0.1:{ports['SERVE']}"
        self.predictions: dict[str, float] = {}   # id -> when the 200 came back (monotonic)
        self.feedback: set[str] = set()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"})

    def predict_and_label(self, client: httpx.Client, n: int, label_every: int = 3) -> None:
        for i in range(n):
            answer = client.post("/v1/predict", files={"file": ("x.png", png((i * 37) % 256), "image/png")})
            assert answer.status_code == 200, answer.text
            prediction_id = answer.json()["prediction_id"]
            self.predictions[prediction_id] = time.monotonic()
            if i % label_every == 0:
                given = client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": str(i % 10)})
                assert given.status_code == 201, given.text
                self.feedback.add(given.json()["feedback_id"])

    def store(self):
        from store import Store

        return Store.from_settings(self.settings)

    def durable_state(self) -> dict:
        """What the store, the registry and the drift folder hold right now."""
        from mlflow.tracking import MlflowClient

        from train import registry

        store = self.store()
        try:
            predictions = {p.id for p in store.list_predictions(limit=100_000)}
            feedback = {f.id for f in store.list_feedback(limit=100_000)}
            audit = {e.id for e in store.list_audit(limit=100_000)}
            drift_checks = {e.id for e in store.list_audit(limit=100_000, event_name="drift_check")}
        finally:
            store.close()
        registry.configure(self.settings)
        versions = {str(v.version) for v in MlflowClient().search_model_versions(
            f"name='{self.settings.registry.model_name}'")}
        reports = {p.name for p in (self.settings.data_dir / "drift").glob("*") if p.suffix in {".html", ".json"}}
        return {"predictions": predictions, "feedback": feedback, "audit": audit, "drift_checks": drift_checks,
                "versions": versions, "reports": reports}

    def wait_for_drift_check(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while time.monotonic() < deadline:
                if client.get("/v1/drift").json().get("status") == "checked":
                    return
                time.sleep(1)
        raise AssertionError("the drift monitor wrote no check")


def assert_kept(before: dict, after: dict, skip: tuple[str, ...] = ()) -> None:
    for key, items in before.items():
        if key not in skip:
            lost = items - after[key]
            assert not lost, f"{len(lost)} {key} lost across the restart, e.g. {sorted(lost)[:3]}"


def assert_served_again(system: System, sample: list[str]) -> None:
    """After `up`, the API answers from what was stored before: old predictions, feedback, drift, audit."""
    with system.client() as client:
        assert client.get("/healthz").status_code == 200
        for prediction_id in sample:
            assert client.get(f"/v1/predictions/{prediction_id}").status_code == 200, prediction_id
        drift = client.get("/v1/drift").json()
        assert drift["status"] == "checked"
        if drift.get("report_url"):
            assert client.get(drift["report_url"]).status_code == 200
        assert client.get("/v1/audit", params={"event": "feedback", "limit": 1}).json()["items"]
        assert client.post("/v1/predict", files={"file": ("x.png", png(), "image/png")}).status_code == 200


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """`rayloop up` over a tiny registered champion (so `up` trains nothing); `down` at the end."""
    system = System(tmp_path_factory.mktemp("restart"))
    register_tiny_model(system.settings)
    try:
        rayloop("up --no-ui", system.env)
        yield system
    finally:
        subprocess.run([RAYLOOP, "down"], cwd=REPO, env=system.env, capture_output=True, text=True, timeout=300)


def head_replica_pids(system: System, deployment: str) -> set[int]:
    """Pids of this system's replica processes of `deployment` (under its own Ray head only)."""
    pids = set()
    for process in head_processes(system)[1:]:
        try:
            if process.status() != psutil.STATUS_ZOMBIE and \
                    f"ServeReplica:rayloop:{deployment}" in " ".join(process.cmdline()):
                pids.add(process.pid)
        except psutil.Error:
            continue
    return pids


def test_a_killed_serving_replica_behind_haproxy_costs_almost_no_request(system):
    """`rayloop up` as shipped: HAProxy ingress (when available) in front of two Classifier replicas that
    each serve HTTP and the model (topology fused); one of them is SIGKILLed under load."""
    from cluster.ray_cluster import serve_env

    def healthy() -> bool:
        try:
            return httpx.get(f"{system.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    replicas = system.settings.serve.num_replicas
    figures = kill_under_load(system.url, "Classifier", replicas=replicas, whole=healthy,
                              pids_of=lambda: head_replica_pids(system, "Classifier"))
    figures["proxy"] = "haproxy" if serve_env(system.settings) else "default"
    record_figures(f"serving_replica_killed_1_of_{replicas}_{figures['proxy']}", figures, FAULTS)
    assert figures["requests_after_recovery"] > 0 and figures["failed_after_recovery"] == 0, figures
    assert figures["recovery_s"] < 120, figures
    if replicas > 1:  # the other replica kept answering: only requests the dead one held can fail
        assert figures["failed_share"] <= MAX_FAILED_SHARE, figures


def test_down_then_up_loses_nothing_acknowledged(system):
    with system.client() as client:
        system.predict_and_label(client, 40)  # a full window: the monitor's calibrated check takes nothing less
    system.wait_for_drift_check()
    second = register_tiny_model(system.settings, accuracy="0.2")  # a model version, not promoted
    with system.client() as client:
        system.predict_and_label(client, 20)  # answered just before `down`: still queued in the replica
    acknowledged = set(system.predictions)

    started = time.monotonic()
    rayloop("down", system.env, timeout=300)
    down_s = time.monotonic() - started
    before = system.durable_state()
    rayloop("up --no-ui", system.env)
    restart_s = time.monotonic() - started
    after = system.durable_state()

    missing = acknowledged - before["predictions"]
    record_figures("graceful_down_up", {"predictions_acknowledged": len(acknowledged),
                                        "predictions_lost": len(missing), "feedback": len(system.feedback),
                                        "audit_events": len(before["audit"]), "down_s": round(down_s, 1),
                                        "down_and_up_s": round(restart_s, 1)}, FAULTS)
    assert not missing, f"{len(missing)} acknowledged predictions were not written by the graceful down"
    assert system.feedback <= before["feedback"]
    assert second in before["versions"] and before["drift_checks"] and before["reports"]
    assert_kept(before, after)
    assert_served_again(system, sorted(acknowledged)[:5])


def head_processes(system: System) -> list[psutil.Process]:
    """The `ray start --block` process `up` started for this data dir, and every process under it."""
    from cluster import services

    pid = services.running_pid(system.settings, "ray")
    assert pid is not None, "no Ray head recorded for this data dir"
    head = psutil.Process(pid)
    return [head, *head.children(recursive=True)]


def test_a_hard_kill_of_the_ray_head_loses_no_answered_prediction_feedback_audit_or_model(system):
    system.predictions.clear()
    system.feedback.clear()
    with system.client() as client:
        system.predict_and_label(client, 20)
    time.sleep(3 * system.settings.store.flush_interval_s + 1)  # written by now
    settled = set(system.predictions)

    # Traffic keeps flowing while every process of the head dies at once (SIGKILL: no shutdown code runs).
    stop = threading.Event()

    def traffic():
        with system.client() as client:
            while not stop.is_set():
                try:
                    system.predict_and_label(client, 3, label_every=3)  # 1 of 3 labelled
                except (httpx.HTTPError, AssertionError):
                    return

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    time.sleep(2.0)
    victims = head_processes(system)
    state_before_kill = system.durable_state()
    killed_at = time.monotonic()
    os.killpg(victims[0].pid, signal.SIGKILL)
    for process in victims:  # anything of this head that left its process group
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    stop.set()
    sender.join(timeout=60)
    psutil.wait_procs(victims, timeout=30)

    after_kill = system.durable_state()
    rayloop("up --no-ui", system.env)
    recovered_s = time.monotonic() - killed_at
    after_up = system.durable_state()

    lost = {pid: killed_at - at for pid, at in system.predictions.items() if pid not in after_kill["predictions"]}
    window = system.settings.store.flush_interval_s
    record_figures("ray_head_sigkill", {
        "predictions_acknowledged": len(system.predictions), "predictions_lost": len(lost),
        "lost_acknowledged_s_before_kill": sorted(round(s, 2) for s in lost.values()),
        "flush_interval_s": window, "feedback_acknowledged": len(system.feedback),
        "feedback_lost": len(system.feedback - after_kill["feedback"]),
        "recovery_s_to_up": round(recovered_s, 1)}, FAULTS)

    assert settled <= after_kill["predictions"]
    assert system.feedback <= after_kill["feedback"], "feedback answered 201 was lost"
    assert_kept(state_before_kill, after_kill, skip=("predictions",))
    # A prediction is answered only once its row is committed (store.durable_predictions): none can go.
    assert lost == {}, lost
    assert_kept(after_kill, after_up)
    assert_served_again(system, sorted(settled)[:5])
