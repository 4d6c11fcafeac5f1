"""The Serve application seen from outside: its config, deploying and rolling it, stopping it, describing it.

Driver-side only: the replicas' code is in serve/, reached here through its import path, a string.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

import ray
from ray import serve as rayserve
from ray.serve._private.api import serve_start
from ray.serve.schema import ServeDeploySchema

from cluster.ray_cluster import connect
from cluster.settings import Settings, to_env

APP_NAME = "rayloop"
APP_IMPORT_PATH = "serve.app:app_builder"


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


def serve_config(settings: Settings, model_version: str | None = None) -> dict:
    """Declarative Serve config of the app. Only `user_config` differs between model versions, so
    Serve applies a new version as a lightweight update: reconfigure() on running replicas, a few at
    a time, no replica restarted (serve.run would redeploy every replica under a new random version).
    """
    env = to_env(settings)
    # Keys travel as digests: the Serve config is visible in the dashboard.
    env["RAYLOOP_SERVE_API_KEYS"] = ",".join(f"sha256:{digest}" for digest in sorted(settings.serve.key_digests()))
    app = {"name": APP_NAME, "route_prefix": "/", "import_path": APP_IMPORT_PATH, "args": {"env": env},
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
        if info.get("rollout"):  # a staged rollout under way (this replica's view)
            r = info["rollout"]
            rows.append(("  rollout", f"v{r['challenger']} in {r['stage']}, answering {r['canary_share']:.0%} "
                                      "(`rayloop rollout status`)"))
    except Exception as exc:  # noqa: BLE001 - status must print even while replicas start
        rows.append(("  serving", f"unknown ({type(exc).__name__})"))
    return rows
