"""The Serve application (ingress + classifier) and how `rayloop up/down/status` deploy, stop and show it."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import ray
from ray import serve as rayserve
from ray.serve.handle import DeploymentHandle

from cluster.settings import Settings
from cluster.store import Store
from serve import images
from serve.classifier import Classifier, ModelServer

APP_NAME = "rayloop"
CHAMPION_CACHE_S = 10.0


class HandleBackend:
    """The HTTP layer's view of the classifier deployment, through a Serve handle (serve.topology: split)."""

    def __init__(self, handle: DeploymentHandle, settings: Settings):
        self.handle = handle
        self.settings = settings
        self._champion: tuple[float, dict | None] | None = None

    @staticmethod
    def _checked(result: dict) -> dict:
        if "rejected" in result:
            raise images.ImageRejected(result["rejected"], result.get("too_large", False))
        return result

    async def predict_image(self, data: bytes) -> dict:
        return self._checked(await self.handle.predict_image.remote(data))

    async def predict_pixels(self, pixels: np.ndarray) -> dict:
        return self._checked(await self.handle.predict_pixels.remote(pixels))

    async def info(self) -> dict:
        return await self.handle.info.remote()

    async def champion(self) -> dict | None:
        """Registry champion (cached briefly: MLflow is a database round trip or two)."""
        now = time.monotonic()
        if self._champion is None or now - self._champion[0] > CHAMPION_CACHE_S:
            from train import registry

            self._champion = (now, await asyncio.to_thread(registry.describe_champion, self.settings))
        return self._champion[1]


@ray.remote(num_cpus=0, max_restarts=-1)
class RateLimits:
    """Per-key request windows shared by every serving replica (guarded routes only: feedback, admin)."""

    def __init__(self):
        from serve.api import RateWindow

        self.window = RateWindow()

    def hit(self, key: str, per_minute: int) -> float:
        return self.window.hit(key, per_minute)


def shared_rate_limit(settings: Settings):
    """hit(key digest, per_minute) -> seconds to wait, against one window for the whole application."""
    if settings.serve.rate_limit_per_minute <= 0 or not ray.is_initialized():
        return None
    limits = RateLimits.options(name=f"{APP_NAME}-rate-limits", namespace="serve", get_if_exists=True,
                                lifetime="detached").remote()
    return lambda key, per_minute: ray.get(limits.hit.remote(key, per_minute), timeout=10)


class LocalBackend(HandleBackend):
    """The HTTP layer's view of the model in its own replica (serve.topology: fused): plain calls, no hop."""

    def __init__(self, server: ModelServer, settings: Settings):
        super().__init__(None, settings)
        self.server = server

    async def predict_image(self, data: bytes) -> dict:
        return self._checked(await self.server.predict_image(data))

    async def predict_pixels(self, pixels: np.ndarray) -> dict:
        return self._checked(await self.server.predict_pixels(pixels))

    async def info(self) -> dict:
        return self.server.info()


@rayserve.deployment(name="Classifier")
@rayserve.ingress()
class ServingClassifier(ModelServer):
    """The HTTP API and the batched model in one replica (serve.topology: fused, the default).

    Each request skips the Ingress -> Classifier hop through a Ray handle, which cost about half of
    rayloop's CPU per request on 2 cores (bench/RESULTS.md); scale with serve.num_replicas.
    """

    def __init__(self, settings: Settings, model_version: str = "champion"):
        from serve.metrics import http_metrics

        super().__init__(settings, model_version)
        self.store = Store.from_settings(settings)
        self.http_metrics = http_metrics()
        import train.registry  # noqa: F401 - warm the MLflow import so the first /v1/model is quick

    def __serve_build_asgi_app__(self):
        from serve.api import create_app

        return create_app(LocalBackend(self, self.settings), self.store, self.settings, self.http_metrics,
                          shared_rate_limit(self.settings))

    def __del__(self):
        store = getattr(self, "store", None)
        if store is not None:
            store.close()  # queued prediction logs are written before the replica goes


@rayserve.deployment(name="Ingress")
@rayserve.ingress()
class Ingress:
    """HTTP entry point: FastAPI routes from serve.api over the classifier handle and the store."""

    def __init__(self, classifier: DeploymentHandle, settings: Settings):
        from serve.metrics import http_metrics

        self.settings = settings
        self.store = Store.from_settings(settings)
        self.backend = HandleBackend(classifier, settings)
        self.metrics = http_metrics()
        import train.registry  # noqa: F401 - warm the MLflow import so the first /v1/model is quick

    def __serve_build_asgi_app__(self):
        from serve.api import create_app

        return create_app(self.backend, self.store, self.settings, self.metrics, shared_rate_limit(self.settings))

    def __del__(self):
        store = getattr(self, "store", None)
        if store is not None:
            store.close()  # queued prediction logs are written before the replica goes


def code_version(settings: Settings) -> str:
    """Hash of our source and the settings the replicas get: equal hashes mean equal replicas.

    Serve gives a deployment run from Python a random version, so every `rayserve.run` would
    replace the replicas. With this stable version a redeploy that changes only user_config
    (the model version) reconfigures the running replicas in place instead: no cold start.
    """
    digest = hashlib.sha256(repr(settings).encode())
    for package in ("serve", "cluster", "train"):
        for path in sorted((Path(__file__).resolve().parents[1] / package).glob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def pinned(deployment, settings: Settings):
    # Serve 2.60 only lets its own code set `version` (hence _internal); pinned in pyproject.toml.
    return deployment.options(version=code_version(settings), _internal=True)


def build(settings: Settings, model_version: str | None = None):
    """The bound application, sized from settings.serve: one `Classifier` deployment serving HTTP and
    the model (topology fused), or Ingress -> Classifier through a handle (topology split).

    model_version (a registry version) goes to the classifier as user_config: changing only it
    makes Serve call Classifier.reconfigure on the running replicas (a rolling model update).
    """
    s = settings.serve
    if s.max_ongoing_requests < s.max_batch_size:
        raise ValueError(f"serve.max_ongoing_requests ({s.max_ongoing_requests}) must be >= "
                         f"serve.max_batch_size ({s.max_batch_size}): batches never exceed it")
    if s.topology not in {"fused", "split"}:
        raise ValueError(f"serve.topology={s.topology!r}: expected fused or split")
    scaling = ({"autoscaling_config": {"min_replicas": 1, "max_replicas": s.max_replicas,
                                       "target_ongoing_requests": max(2, s.max_batch_size)}}
               if s.num_replicas == 0 else {"num_replicas": s.num_replicas})
    user_config = {"model_version": str(model_version)} if model_version else None
    if s.topology == "fused":
        # HTTP requests wait on batches here too: allow many in flight, as the split Ingress does.
        return pinned(ServingClassifier, settings).options(
            max_ongoing_requests=max(256, 4 * s.max_ongoing_requests),
            ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
            user_config=user_config, **scaling,
        ).bind(settings)
    classifier = pinned(Classifier, settings).options(
        max_ongoing_requests=s.max_ongoing_requests,
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        user_config=user_config,
        **scaling,
    ).bind(settings)
    # The ingress may have many requests waiting on batches at once.
    ingress = pinned(Ingress, settings).options(
        max_ongoing_requests=max(256, 4 * s.max_ongoing_requests),
        num_replicas=s.ingress_replicas,
        ray_actor_options={"num_cpus": s.ingress_num_cpus},
    )
    return ingress.bind(classifier, settings)


def url(settings: Settings, path: str = "") -> str:
    return f"http://{settings.services.host}:{settings.services.serve_port}{path}"


def wait_healthy(settings: Settings, timeout: float = 180.0) -> bool:
    """Poll /healthz until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url(settings, "/healthz"), timeout=5) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def app_builder(args: dict):
    """Import-path entry of the Serve config: settings rebuilt from the RAYLOOP_* values in args."""
    import os

    from cluster.settings import load_settings

    return build(load_settings(env={**os.environ, **args.get("env", {})}))


def serve_config(settings: Settings, model_version: str | None = None) -> dict:
    """Declarative Serve config of the app. Only `user_config` differs between model versions, so
    Serve applies a new version as a lightweight update: reconfigure() on running replicas, a few at
    a time, no replica restarted (serve.run would redeploy every replica under a new random version).
    """
    import hashlib

    from cluster.settings import to_env

    env = to_env(settings)
    # Keys travel as digests: the Serve config is visible in the dashboard.
    env["RAYLOOP_SERVE_API_KEYS"] = ",".join(
        "sha256:" + hashlib.sha256(k.strip().encode()).hexdigest()
        for k in settings.serve.api_keys.split(",") if k.strip())
    app = {"name": APP_NAME, "route_prefix": "/", "import_path": "serve.app:app_builder", "args": {"env": env},
           # An access-log line per request in every replica costs throughput: off unless asked for.
           "logging_config": {"enable_access_log": settings.serve.access_log}}
    if model_version:
        app["deployments"] = [{"name": "Classifier", "user_config": {"model_version": str(model_version)}}]
    return {"http_options": {"host": settings.services.host, "port": settings.services.serve_port},
            "applications": [app]}


def deploy(settings: Settings, model_version: str | None = None, timeout: float = 300.0) -> str:
    """Connect to Ray, start Serve on the configured port, apply the app's config, wait for /healthz.

    Deploying again with another model_version is a rolling update: replicas reconfigure in place.
    """
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from cluster.ray_cluster import connect

    connect(settings)
    config = serve_config(settings, model_version)
    client = serve_start(http_options=config["http_options"])
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    if not wait_healthy(settings, timeout):
        raise RuntimeError(f"Serve did not answer {url(settings, '/healthz')} within {timeout:.0f}s")
    if model_version and not wait_version(str(model_version), timeout):
        raise RuntimeError(f"Serve did not move every replica to v{model_version} within {timeout:.0f}s")
    return url(settings)


def wait_version(version: str, timeout: float) -> bool:
    """Wait until the Classifier answers with `version` on enough calls to have reached every replica."""
    deadline = time.monotonic() + timeout
    in_a_row = 0
    while time.monotonic() < deadline and in_a_row < 12:
        try:
            served = str(ask_classifier("info", timeout=10)["model_version"])
            in_a_row = in_a_row + 1 if served == version else 0
        except Exception:  # noqa: BLE001 - a replica may be mid-update
            in_a_row = 0
        if in_a_row == 0:
            time.sleep(0.5)
    return in_a_row >= 12


def is_deployed() -> bool:
    """True when this cluster runs the rayloop application (call with Ray connected)."""
    try:
        return APP_NAME in rayserve.status().applications
    except Exception:  # noqa: BLE001 - no Serve controller: nothing deployed
        return False


def shutdown(settings: Settings) -> bool:
    """Stop Serve on the cluster (if Ray is reachable); True when something was stopped."""
    import ray

    from cluster.ray_cluster import connect

    if not ray.is_initialized():
        try:
            connect(settings)
        except Exception:  # noqa: BLE001 - nothing to stop when Ray is not there
            return False
    try:
        rayserve.shutdown()
        return True
    except Exception:  # noqa: BLE001
        return False


_handle_loop: asyncio.AbstractEventLoop | None = None


def _driver_loop() -> asyncio.AbstractEventLoop:
    """One event loop, on a daemon thread, for every handle call this process makes from plain code.

    With RAY_SERVE_THROUGHPUT_OPTIMIZED=1 a handle binds to the loop it is first used in, so a
    fresh asyncio.run() per call would leave it bound to a closed loop.
    """
    global _handle_loop
    if _handle_loop is None or _handle_loop.is_closed():
        _handle_loop = asyncio.new_event_loop()
        threading.Thread(target=_handle_loop.run_forever, name="serve-handles", daemon=True).start()
    return _handle_loop


def ask_classifier(method: str, timeout: float = 30.0):
    """Call a Classifier method from plain (non-async) code, e.g. `info` or `stats`."""
    async def call():
        handle = rayserve.get_deployment_handle("Classifier", APP_NAME)
        return await getattr(handle, method).remote()

    return asyncio.run_coroutine_threadsafe(call(), _driver_loop()).result(timeout)


def describe(settings: Settings) -> list[tuple[str, str]]:
    """(label, text) rows: the application's status and URL, each deployment's replicas, the served version."""
    def value(state) -> str:
        return str(state.value if hasattr(state, "value") else state)

    try:
        status = rayserve.status()
    except Exception as exc:  # noqa: BLE001 - no Serve controller on this cluster
        return [("Serve", f"not running ({type(exc).__name__})")]
    app = status.applications.get(APP_NAME)
    if app is None:
        return [("Serve", "not deployed")]
    rows = [("Serve", f"{value(app.status).lower()}  {url(settings, '/docs')}")]
    for name, deployment in app.deployments.items():
        counts = ", ".join(f"{n} {value(state)}".lower() for state, n in deployment.replica_states.items())
        rows.append((f"  {name}", f"{value(deployment.status).lower()} ({counts or 'no replicas'})"))
    try:
        info = ask_classifier("info")
        rows.append(("  serving", f"{info['name']} v{info['model_version']} on {info['device']}"))
    except Exception as exc:  # noqa: BLE001 - status must print even while replicas start
        rows.append(("  serving", f"unknown ({type(exc).__name__})"))
    return rows
