"""The one way a test runs the real Serve app: a fresh local Ray (cluster.ray_cluster.start_local), the app
deployed by control.deployment.deploy on a free port, over a data dir of the test's own."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from tests.support.paths import REPO
from tests.support.registry import register_tiny_model

# Upload limits the HTTP tests probe: a 300 kB body is too many bytes, a 30000 x 30000 PNG too many pixels.
SMALL_UPLOADS = {"RAYLOOP_SERVE_MAX_UPLOAD_BYTES": "200000", "RAYLOOP_SERVE_MAX_PIXELS": str(2048 * 2048)}


@dataclasses.dataclass
class Served:
    settings: object
    url: str
    champion: str | None = None  # the version registered or trained before the deploy

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


@contextlib.contextmanager
def serving(data_dir: Path, *, replicas: int | None = None, replica_cpus: float | None = None,
            topology: str | None = None, api_keys: str | None = None, env: dict[str, str] | None = None,
            champion: Callable[[object], str] | None = register_tiny_model,
            train: Callable[[object], str] | None = None, num_cpus: int = 2, dashboard: bool = False,
            metrics_export_port: int | None = None) -> Iterator[Served]:
    """Serve on a local Ray until the block ends, then Serve and Ray shut down.

    Settings come from params.yaml and `env` (RAYLOOP_* overrides; none of the caller's own RAYLOOP_*
    leak in). champion(settings) registers a model before Ray starts (default: a tiny untrained one);
    train(settings) runs on the started Ray before the deploy (e.g. a real training run). The dashboard
    is off unless asked for; metrics_export_port makes Ray export metrics there.
    """
    import ray
    from ray import serve as rayserve

    from cluster.ray_cluster import free_port, start_local
    from cluster.settings import load_settings
    from control.deployment import deploy

    values = {k: v for k, v in os.environ.items() if not k.startswith("RAYLOOP_")}
    values.update({"RAYLOOP_DATA_DIR": str(data_dir), "RAYLOOP_PARAMS": str(REPO / "params.yaml"),
                   "RAYLOOP_SERVICES_SERVE_PORT": str(free_port())})
    options = {"RAYLOOP_SERVE_NUM_REPLICAS": replicas, "RAYLOOP_SERVE_NUM_CPUS": replica_cpus,
               "RAYLOOP_SERVE_TOPOLOGY": topology, "RAYLOOP_API_KEYS": api_keys}
    values.update({name: str(value) for name, value in options.items() if value is not None})
    values.update(env or {})
    settings = load_settings(values)
    version = champion(settings) if champion else None
    if not ray.is_initialized():
        # address="local": a fresh instance even when a `rayloop up` head runs on this machine.
        metrics = {"_metrics_export_port": metrics_export_port} if metrics_export_port else {}
        start_local(num_cpus=num_cpus, include_dashboard=dashboard, logging_level="WARNING", **metrics)
    try:
        if train:
            version = train(settings)
        yield Served(settings, deploy(settings, timeout=240), version)
    finally:
        rayserve.shutdown()
        ray.shutdown()


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


def alive_actor_nodes(class_name: str, count: int, timeout: float = 120.0) -> list[str]:
    """The nodes of a class's ALIVE actors once `count` of them are (or what there is at the deadline).

    A Serve deployment answers as soon as one replica is up; another may still wait for its node's CPU,
    which a Ray Train worker that has just finished gives back only when its worker group is torn down."""
    import time

    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout
    while True:
        nodes = [a.node_id for a in list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")],
                                                limit=1000, raise_on_missing_output=False)]
        if len(nodes) >= count or time.monotonic() > deadline:
            return nodes
        time.sleep(1)


def actor_nodes(class_name: str) -> list[str]:
    """The node of each live actor of a class (one entry per actor)."""
    from ray.util.state import list_actors

    return [a.node_id for a in list_actors(filters=[("class_name", "=", class_name)], limit=1000,
                                           raise_on_missing_output=False)]
