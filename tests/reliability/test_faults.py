"""Replica death under load: Serve replaces a SIGKILLed Classifier or Ingress replica by itself.

Measured figures (failed share, recovery seconds) are printed and kept in bench/reliability_faults.json.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import REPO, free_port
from tests.test_serve_api import png, register_tiny_model

pytestmark = pytest.mark.slow

MAX_FAILED_SHARE = 0.01
STEADY_S = 3.0        # load before the kill, and again after recovery


def record_figures(section: str, figures: dict) -> None:
    """Figures of the fault tests go to bench/reliability_faults.json (see tests/reliability)."""
    from tests.reliability import FAULTS, record_figures as record

    record(section, figures, FAULTS)


class Load:
    """Client threads posting /v1/predict until stopped; every answer kept as (sent_at, status, seconds)."""

    def __init__(self, url: str, threads: int = 3):
        self.url, self.answers, self._stop = url, [], threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=90) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    status = client.post("/v1/predict", files={"file": ("x.png", png(), "image/png")}).status_code
                except httpx.HTTPError:
                    status = 0
                self.answers.append((started, status, time.monotonic() - started))

    def failed(self, since: float = 0.0) -> list[tuple[float, int, float]]:
        return [a for a in self.answers if a[1] != 200 and a[0] >= since]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def replica_pids(deployment: str) -> set[int]:
    """Pids of this test's own Ray workers that host a replica of `deployment` (Ray sets the process title).

    Only descendants of this process are searched: the cluster is the one ray.init started here,
    never another Ray instance on the machine.
    """
    from control.deployment import APP_NAME

    pids = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if process.status() != psutil.STATUS_ZOMBIE and \
                    f"ServeReplica:{APP_NAME}:{deployment}" in " ".join(process.cmdline()):
                pids.add(process.pid)
        except psutil.Error:
            continue
    return pids


def running_replicas(deployment: str) -> int:
    """RUNNING replicas of a deployment when the app is RUNNING and the deployment HEALTHY, else 0."""
    from ray import serve as rayserve

    from control.deployment import APP_NAME

    app = rayserve.status().applications.get(APP_NAME)
    if app is None or str(getattr(app.status, "value", app.status)) != "RUNNING":
        return 0
    state = app.deployments[deployment]
    if str(getattr(state.status, "value", state.status)) != "HEALTHY":
        return 0
    return sum(n for s, n in state.replica_states.items() if str(getattr(s, "value", s)) == "RUNNING")


def kill_under_load(url: str, deployment: str, replicas: int, timeout: float = 180,
                    pids_of=None, whole=None) -> dict:
    """SIGKILL one replica of `deployment` while clients post; wait until Serve is whole again.

    pids_of() finds the deployment's replica processes and whole() says Serve is back to full health;
    by default both ask this test's own in-process Ray.
    """
    pids_of = pids_of or (lambda: replica_pids(deployment))
    whole = whole or (lambda: running_replicas(deployment) == replicas)
    before = pids_of()
    assert len(before) == replicas and whole(), (before, deployment)
    victim = min(before)
    with Load(url) as load:
        time.sleep(STEADY_S)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        recovered_at = None
        while time.monotonic() - killed_at < timeout:
            pids = pids_of()
            if victim not in pids and len(pids) == replicas and whole():
                recovered_at = time.monotonic()
                break
            time.sleep(0.25)
        assert recovered_at is not None, f"{deployment} did not get back to {replicas} running replicas"
        time.sleep(STEADY_S)
    failures = load.failed()
    after = [a for a in load.answers if a[0] >= recovered_at]
    return {
        "deployment": deployment, "replicas": replicas, "requests": len(load.answers), "failed": len(failures),
        "failed_share": round(len(failures) / max(1, len(load.answers)), 4),
        "failed_statuses": sorted({s for _, s, _ in failures}),
        "recovery_s": round(recovered_at - killed_at, 1),
        "last_failure_after_kill_s": round(max(t for t, _, _ in failures) - killed_at, 1) if failures else None,
        "max_latency_s": round(max(d for _, _, d in load.answers), 2),
        "requests_after_recovery": len(after), "failed_after_recovery": len(load.failed(recovered_at)),
        "replaced_pid": victim, "new_pids": sorted(pids_of() - before),
    }


@pytest.fixture(scope="module")
def two_classifiers(tmp_path_factory):
    """Serve (topology split) with 2 Classifier replicas and 1 Ingress on a local Ray, over a tiny registered champion."""
    import ray
    from ray import serve as rayserve

    from cluster.settings import load_settings
    from control.deployment import deploy

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLOOP_")}
    env.update({"RAYLOOP_DATA_DIR": str(tmp_path_factory.mktemp("faults") / "data"),
                "RAYLOOP_PARAMS": str(REPO / "params.yaml"), "RAYLOOP_SERVICES_SERVE_PORT": str(free_port()),
                "RAYLOOP_SERVE_NUM_REPLICAS": "2", "RAYLOOP_SERVE_NUM_CPUS": "0.25",
                # Ingress -> Classifier through a handle: the kills below hit each side on its own. The default
                # (fused) topology's replica kill is test_restart's, behind HAProxy as `rayloop up` runs it.
                "RAYLOOP_SERVE_TOPOLOGY": "split"})
    settings = load_settings(env)
    register_tiny_model(settings)
    if not ray.is_initialized():
        from cluster.ray_cluster import start_local

        start_local(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    url = deploy(settings, timeout=240)
    yield settings, url
    rayserve.shutdown()
    ray.shutdown()


def scale_ingress(settings, replicas: int, timeout: float = 180) -> None:
    """Apply the app's Serve config with `replicas` Ingress replicas and wait until they all run."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from control.deployment import serve_config

    config = serve_config(settings)
    config["applications"][0]["deployments"] = [{"name": "Ingress", "num_replicas": replicas}]
    serve_start(http_options=config["http_options"]).deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_replicas("Ingress") == replicas and len(replica_pids("Ingress")) == replicas:
            return
        time.sleep(0.5)
    raise AssertionError(f"Ingress did not reach {replicas} running replicas")


def test_a_killed_classifier_replica_is_replaced_and_almost_no_request_fails(two_classifiers):
    from tests.test_rollout import replicas_and_versions

    settings, url = two_classifiers
    served_by, _ = replicas_and_versions(url)
    assert len(served_by) == 2

    figures = kill_under_load(url, "Classifier", replicas=2)
    record_figures("classifier_replica_killed", figures)

    assert figures["failed_share"] <= MAX_FAILED_SHARE, figures
    assert figures["requests_after_recovery"] > 0 and figures["failed_after_recovery"] == 0, figures
    served_after, _ = replicas_and_versions(url)
    assert len(served_after) == 2 and served_after != served_by  # a new replica took the dead one's place
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200


def test_a_killed_sole_ingress_replica_comes_back_by_itself(two_classifiers):
    settings, url = two_classifiers
    figures = kill_under_load(url, "Ingress", replicas=1)
    record_figures("ingress_replica_killed_1_of_1", figures)

    # One ingress replica: requests it held die with it, the rest wait for the new one (latency).
    assert figures["requests_after_recovery"] > 0 and figures["failed_after_recovery"] == 0, figures
    assert figures["recovery_s"] < 120, figures


def test_with_two_ingress_replicas_a_killed_one_costs_almost_no_request(two_classifiers):
    settings, url = two_classifiers
    scale_ingress(settings, 2)

    figures = kill_under_load(url, "Ingress", replicas=2)
    record_figures("ingress_replica_killed_1_of_2", figures)

    assert figures["failed_share"] <= MAX_FAILED_SHARE, figures
    assert figures["requests_after_recovery"] > 0 and figures["failed_after_recovery"] == 0, figures
