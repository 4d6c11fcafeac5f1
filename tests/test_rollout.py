"""Rolling model updates with several replicas, and rollback through the API: no request fails."""

import os
import threading
import time

import httpx
import pytest

from tests.conftest import REPO
from tests.test_serve_api import free_port, png, register_tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    """Serve with 2 Classifier replicas over a registry holding v1 (champion)."""
    import ray
    from ray import serve as rayserve

    from cluster.settings import load_settings
    from control.deployment import deploy

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLOOP_")}
    env.update({"RAYLOOP_DATA_DIR": str(tmp_path_factory.mktemp("rollout") / "data"),
                "RAYLOOP_PARAMS": str(REPO / "params.yaml"), "RAYLOOP_SERVICES_SERVE_PORT": str(free_port()),
                "RAYLOOP_SERVE_NUM_REPLICAS": "2", "RAYLOOP_SERVE_NUM_CPUS": "0.25"})
    settings = load_settings(env)
    first = register_tiny_model(settings)
    if not ray.is_initialized():
        from cluster.ray_cluster import start_local

        start_local(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    url = deploy(settings, timeout=240)
    yield settings, url, first
    rayserve.shutdown()
    ray.shutdown()


class Load:
    """Clients posting images on threads until stopped; every answer's status and version kept."""

    def __init__(self, url: str, threads: int = 3):
        self.url, self.answers, self._stop = url, [], threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                try:
                    r = client.post("/v1/predict", files={"file": ("x.png", png(), "image/png")})
                    self.answers.append((r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text))
                except httpx.HTTPError as exc:
                    self.answers.append((0, repr(exc)))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        time.sleep(1.0)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def replicas_and_versions(url: str, calls: int = 64, want: int = 2, deadline_s: float = 60) -> tuple[set, set]:
    """Which replicas answered and with which versions, from rounds of concurrent calls until `want`
    replicas have answered or the deadline passes (a fresh handle learns of replicas asynchronously
    and fast calls may all go to one idle replica)."""
    import asyncio

    from ray import serve as rayserve

    from control.deployment import APP_NAME, _driver_loop

    async def gather():
        handle = rayserve.get_deployment_handle("Classifier", APP_NAME)
        return await asyncio.gather(*(handle.info.remote() for _ in range(calls)))

    replicas, versions = set(), set()
    end = time.monotonic() + deadline_s
    while True:
        infos = asyncio.run_coroutine_threadsafe(gather(), _driver_loop()).result(60)
        replicas |= {i["replica"] for i in infos}
        versions |= {i["model_version"] for i in infos}
        if len(replicas) >= want or time.monotonic() > end:
            return replicas, versions
        time.sleep(0.5)


def test_promotion_rolls_over_every_replica_in_place_without_failures(two_replicas):
    from store import Store
    from train import registry
    from control.rollout import roll_out

    settings, url, first = two_replicas
    replicas_before, versions = replicas_and_versions(url)
    assert len(replicas_before) == 2 and versions == {first}
    second = register_tiny_model(settings, accuracy="0.3")
    store = Store.from_settings(settings)
    try:
        with Load(url) as load:
            registry.promote(settings, second)
            assert roll_out(settings, second, lambda event, details: store.audit("test", event, details))
    finally:
        store.close()

    statuses = [s for s, _ in load.answers]
    assert len(statuses) > 20 and set(statuses) == {200}, [a for a in load.answers if a[0] != 200][:3]
    assert load.answers[-1][1] == second
    replicas_after, versions = replicas_and_versions(url)
    assert versions == {second}
    assert replicas_after == replicas_before  # reconfigured in place: no replica restarted


def test_rollback_through_the_api_puts_the_previous_champion_back(two_replicas):
    from control.deployment import wait_version
    from train import registry

    settings, url, first = two_replicas
    current = registry.alias_version(settings, registry.CHAMPION)
    assert current != first
    with Load(url) as load:
        with httpx.Client(base_url=url, timeout=120) as client:
            answer = client.post("/v1/admin/rollback")
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"previous": current, "champion": first, "status": "rolled out"}
            assert wait_version(first, 120)
            audit = client.get("/v1/audit", params={"event": "rollback"}).json()["items"]
    assert audit and audit[0]["details"] == {"from": current, "to": first}
    assert {s for s, _ in load.answers} == {200}
    assert registry.alias_version(settings, registry.PREVIOUS) == current
    _, versions = replicas_and_versions(url)
    assert versions == {first}
