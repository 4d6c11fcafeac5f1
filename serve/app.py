"""The Serve application: its deployments (HTTP ingress + batched classifier) and the builder Serve imports."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import ray
from ray import serve as rayserve
from ray.serve.handle import DeploymentHandle

from cluster import environment
from cluster.settings import Settings, load_settings
from control import models
from control import monitor as drift_monitor
from control.deployment import APP_NAME
from serve import images
from serve.classifier import Classifier, ModelServer
from serve.http import create_app
from serve.http.deps import RateWindow
from serve.metrics import http_metrics
from store import Store

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

    async def predict_image(self, data: bytes, route: float | None = None) -> dict:
        return self._checked(await self.handle.predict_image.remote(data, route))

    async def predict_pixels(self, pixels: np.ndarray, route: float | None = None) -> dict:
        return self._checked(await self.handle.predict_pixels.remote(pixels, route))

    async def explain(self, data: bytes, target: str | None = None) -> dict:
        return self._checked(await self.handle.explain.remote(data, target))

    async def info(self) -> dict:
        return await self.handle.info.remote()

    async def champion(self) -> dict | None:
        """Registry champion (cached briefly: MLflow is a database round trip or two)."""
        now = time.monotonic()
        if self._champion is None or now - self._champion[0] > CHAMPION_CACHE_S:
            self._champion = (now, await asyncio.to_thread(models.champion, self.settings))
        return self._champion[1]

    async def drift_report(self) -> dict:
        """The drift monitor's check of the latest window with Evidently's report (control.monitor.report)."""
        return await drift_monitor.report()


@ray.remote(num_cpus=0, max_restarts=-1)
class RateLimits:
    """Per-key request windows shared by every serving replica (guarded routes only: feedback, admin)."""

    def __init__(self):
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

    async def predict_image(self, data: bytes, route: float | None = None) -> dict:
        return self._checked(await self.server.predict_image(data, route))

    async def predict_pixels(self, pixels: np.ndarray, route: float | None = None) -> dict:
        return self._checked(await self.server.predict_pixels(pixels, route))

    async def explain(self, data: bytes, target: str | None = None) -> dict:
        return self._checked(await self.server.explain(data, target))

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
        super().__init__(settings, model_version)
        self.store = Store.from_settings(settings)
        self.http_metrics = http_metrics()

    def __serve_build_asgi_app__(self):
        return create_app(LocalBackend(self, self.settings), self.store, self.settings, self.http_metrics,
                          shared_rate_limit(self.settings))

    def __del__(self):
        super().__del__()
        store = getattr(self, "store", None)
        if store is not None:
            store.close()  # queued prediction logs are written before the replica goes


@rayserve.deployment(name="Ingress")
@rayserve.ingress()
class Ingress:
    """HTTP entry point: FastAPI routes from serve.http over the classifier handle and the store."""

    def __init__(self, classifier: DeploymentHandle, settings: Settings):
        self.settings = settings
        self.store = Store.from_settings(settings)
        self.backend = HandleBackend(classifier, settings)
        self.metrics = http_metrics()

    def __serve_build_asgi_app__(self):
        return create_app(self.backend, self.store, self.settings, self.metrics, shared_rate_limit(self.settings))

    def __del__(self):
        store = getattr(self, "store", None)
        if store is not None:
            store.close()  # queued prediction logs are written before the replica goes


# Every package of ours a replica imports, directly or not (tests/test_layers.py checks this list).
REPLICA_PACKAGES = ("cluster", "store", "train", "control", "serve")


def code_version(settings: Settings) -> str:
    """Hash of our source and the settings the replicas get: equal hashes mean equal replicas.

    Serve gives a deployment run from Python a random version, so every `rayserve.run` would
    replace the replicas. With this stable version a redeploy that changes only user_config
    (the model version) reconfigures the running replicas in place instead: no cold start.
    """
    digest = hashlib.sha256(repr(settings).encode())
    root = Path(__file__).resolve().parents[1]
    for package in REPLICA_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
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


def app_builder(args: dict):
    """Import-path entry of the Serve config: settings rebuilt from the RAYLOOP_* values in args."""
    environment.apply()  # for what the replicas start; they inherit the head's environment themselves
    return build(load_settings(env={**os.environ, **args.get("env", {})}))
