"""`rayloop up`, `down` and `status`: the whole system on this machine, started, stopped and shown."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable

from cluster import profile, ray_cluster, services
from cluster.settings import Settings, to_env


def urls(settings: Settings) -> dict[str, str]:
    """Where each user-facing service listens."""
    s = settings.services
    return {
        "Gradio demo": f"http://{s.host}:{s.ui_port}",
        "Serve API": f"http://{s.host}:{s.serve_port}/docs",
        "Ray dashboard": f"http://{s.host}:{s.dashboard_port}",
        "MLflow UI": f"http://{s.host}:{s.mlflow_port}",
        **({"Prometheus": f"http://{s.host}:{s.prometheus_port}"}
           if services.running_pid(settings, "prometheus") else {}),
    }


class StartLog:
    """What `rayloop up` did and how long each step took, for the summary line at the end."""

    def __init__(self, since: float):
        self.since, self.steps = since, []

    def timed(self, what: str, function: Callable, *args):
        began = time.time()
        result = function(*args)
        self.steps.append(f"{what} ({duration(time.time() - began)})")
        return result

    def summary(self) -> str:
        did = ", ".join(self.steps) or "everything was running already"
        return f"[rayloop] up in {duration(time.time() - self.since)}: {did}"


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def installed_seconds(since: float) -> float | None:
    """How long `make up` spent installing .venv, when it installed in this run (the stamp says)."""
    stamp = Path(sys.prefix) / ".installed"
    with contextlib.suppress(OSError, ValueError):  # no stamp, or one an older Makefile left empty
        if stamp.stat().st_mtime >= since:
            return float(stamp.read_text().strip())
    return None


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    """Start what is not running yet; on any failure stop what this run started, so nothing is half up."""
    since = args.started_at or time.time()
    log = StartLog(since)
    install = installed_seconds(since) if args.started_at else None
    if install is not None:
        log.steps.append(f"installed .venv ({duration(install)})")
    started: list[str] = []
    try:
        bring_up(settings, args, log, started)
    except profile.NotClusterReady as exc:
        print(f"rayloop up --cluster: error: {exc}", file=sys.stderr, flush=True)
        stop_started(settings, started)
        return 2
    except services.ServiceFailed as exc:
        print(f"rayloop up: error: {exc}", file=sys.stderr, flush=True)
        stop_started(settings, started)
        return 1
    except BaseException:
        stop_started(settings, started)
        raise
    print(log.summary())
    print("\nrayloop is up:")
    for name, url in urls(settings).items():
        print(f"  {name:<14} {url}")
    print("The Ray dashboard asks for Ray's auth token: `.venv/bin/ray get-auth-token` prints it.")
    print("Stop everything with `make down`.")
    return 0


def bring_up(settings: Settings, args: argparse.Namespace, log: StartLog, started: list[str]) -> None:
    from control import models
    from train.pipeline import run_train

    print(f"[rayloop] data dir {settings.data_dir}")
    if getattr(args, "cluster", False):
        if problems := profile.node_local(settings):
            raise profile.NotClusterReady(problems)
        print(f"[rayloop] cluster profile: registry {settings.mlflow_uri}, store {redacted(settings.database_url)}, "
              f"shared storage {settings.storage_uri}")
    refuse_taken_ports(settings, args)
    if settings.ray_address:
        print(f"[rayloop] using the Ray cluster at {settings.ray_address}")
    elif not ray_cluster.head_running(settings):
        print("[rayloop] starting a local Ray head ...", flush=True)
        started.append("ray")
        log.timed("started Ray", ray_cluster.start_head, settings)
    if settings.mlflow_uri.startswith(("http://", "https://")):
        print(f"[rayloop] using the MLflow server at {settings.mlflow_uri}")
        if getattr(args, "cluster", False):
            check_artifacts(settings)
    elif not services.running_pid(settings, "mlflow"):
        port = settings.services.mlflow_port
        started.append("mlflow")
        log.timed("started the MLflow UI", services.start, settings, "mlflow",
                  services.mlflow_ui_command(settings, port), f"http://{settings.services.host}:{port}/health",
                  None, 120, {**os.environ, **services.MLFLOW_SERVER_ENV})
        print("[rayloop] MLflow UI is up", flush=True)
    champion = models.champion(settings)
    if champion is None:
        print("[rayloop] no champion model yet: training one (first run only) ...", flush=True)
        log.timed("trained a champion", run_train, settings)
        champion = models.champion(settings)
    print(f"[rayloop] champion: {champion['name']} v{champion['version']} "
          f"(test accuracy {champion['metrics'].get('test_accuracy', float('nan')):.4f})")
    from control.deployment import deploy

    print("[rayloop] deploying the Serve application ...", flush=True)
    served_at = log.timed(f"deployed v{champion['version']}", deploy, settings)
    print(f"[rayloop] Serve is up at {served_at}")
    from monitoring import actor as monitor

    monitor.start(settings)
    print(f"[rayloop] drift monitor running ({monitor.describe(settings)})")
    if args.no_ui:
        print("[rayloop] Gradio demo not started (--no-ui)")
    elif not services.running_pid(settings, "ui"):
        started.append("ui")
        log.timed("started the demo", _start_ui, settings)
    if args.monitoring:
        from monitoring import prometheus_local

        fresh = not services.running_pid(settings, "prometheus")
        if fresh:
            started.append("prometheus")
        # A running one is told to reread its config (a new head has a new service-discovery file).
        log.timed("started Prometheus" if fresh else "reloaded Prometheus", prometheus_local.main, ["up"])


def check_artifacts(settings: Settings) -> None:
    """On a cluster, models must be logged where every node can load them from."""
    import mlflow

    from train import registry

    registry.configure(settings)
    location = mlflow.get_experiment_by_name(settings.registry.experiment).artifact_location
    if problem := profile.local_artifacts(settings, location):
        raise profile.NotClusterReady([problem])


def redacted(url: str) -> str:
    """A database URL without its password, for logs."""
    scheme, _, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}" if at and ":" in credentials else url


def refuse_taken_ports(settings: Settings, args: argparse.Namespace) -> None:
    """Before anything starts: the ports of what this run will start must be free. Another program on one
    (often a notebook's ray.init() on 8265) made our service fail late, or answer in its place."""
    s = settings.services
    wanted = []
    if not settings.ray_address and not ray_cluster.head_running(settings):
        wanted += [("the Ray head", "RAY", s.ray_port), ("the Ray dashboard", "DASHBOARD", s.dashboard_port),
                   ("Serve", "SERVE", s.serve_port)]
    if not settings.mlflow_uri.startswith(("http://", "https://")) and not services.running_pid(settings, "mlflow"):
        wanted.append(("the MLflow UI", "MLFLOW", s.mlflow_port))
    if not args.no_ui and not services.running_pid(settings, "ui"):
        wanted.append(("the Gradio demo", "UI", s.ui_port))
    if args.monitoring and not services.running_pid(settings, "prometheus"):
        wanted.append(("Prometheus", "PROMETHEUS", s.prometheus_port))
    taken = [f"port {port} ({what}: RAYLOOP_SERVICES_{key}_PORT)" for what, key, port in wanted
             if services.port_taken(port)]
    if taken:
        raise ValueError(f"another program listens on {', '.join(taken)}; stop it, or set that variable to a "
                         f"free port. Nothing was started.")


def stop_started(settings: Settings, started: list[str]) -> None:
    """Undo a failed `up`: stop, newest first, the services this run started (a head takes Serve along)."""
    for name in reversed(started):
        if name == "ray":
            import ray

            ray.shutdown()
            ray_cluster.stop_head(settings)
        else:
            services.stop(settings, name)
    if started:
        print(f"[rayloop] stopped what this start had started ({', '.join(started)}); "
              f"logs are in {settings.log_dir}", file=sys.stderr)


def _start_ui(settings: Settings) -> None:
    """The demo is a separate process that reaches Serve over HTTP only; it gets exactly these settings."""
    local = "127.0.0.1" if settings.services.host in {"0.0.0.0", "::"} else settings.services.host
    services.start(settings, "ui", [sys.executable, "-m", "ui.app"], f"http://{local}:{settings.services.ui_port}/",
                   timeout=180, env={**os.environ, **to_env(settings)})
    print("[rayloop] Gradio demo is up", flush=True)


def cmd_down(settings: Settings, args: argparse.Namespace) -> int:
    print(f"[rayloop] Gradio demo {'stopped' if services.stop(settings, 'ui') else 'was not running'}", flush=True)
    if services.stop(settings, "prometheus"):
        print("[rayloop] Prometheus stopped", flush=True)
    if settings.ray_address or ray_cluster.head_running(settings):
        from control.deployment import shutdown

        # Before Ray stops: replicas write their queued prediction logs on a graceful shutdown.
        print(f"[rayloop] Serve {'stopped' if shutdown(settings) else 'was not running'}", flush=True)
        from monitoring import actor as monitor

        print(f"[rayloop] drift monitor {'stopped' if monitor.stop() else 'was not running'}")
        import ray

        ray.shutdown()  # now, while the head is up: a driver left connected to a dead head waits at exit
    stopped = services.stop(settings, "mlflow")
    print(f"[rayloop] MLflow UI {'stopped' if stopped else 'was not running'}")
    if not settings.ray_address:
        print(f"[rayloop] local Ray {'stopped' if ray_cluster.stop_head(settings) else 'was not running'}")
    return 0


def cmd_monitor(settings: Settings, args: argparse.Namespace) -> int:
    """`rayloop monitor start|stop|status`: the drift monitor alone, on a Ray cluster that runs already.

    `rayloop up` starts it beside Serve; where something else deploys Serve (the KubeRay operator runs
    serveConfigV2 only), the head's start-up hook runs `rayloop monitor start`.
    """
    if not (settings.ray_address or ray_cluster.head_running(settings)):
        raise ValueError("no Ray cluster runs here for the drift monitor: `rayloop up` starts one, or set "
                         "RAYLOOP_RAY_ADDRESS to the cluster's address")
    from control.monitor import MonitorUnavailable, actor
    from monitoring import actor as monitor

    ray_cluster.connect(settings)
    every = monitor.describe(settings)
    if args.action == "stop":
        print(f"[rayloop] drift monitor {'stopped' if monitor.stop() else 'was not running'}")
        return 0
    if args.action == "start":
        monitor.start(settings)
        print(f"[rayloop] drift monitor running ({every})")
        return 0
    try:
        actor()
    except MonitorUnavailable:
        print("[rayloop] drift monitor not running")
        return 1
    print(f"[rayloop] drift monitor running ({every})")
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    """One aligned row per part; a URL only for a part that runs."""
    from control import models

    s = settings.services
    rows: list[tuple[str, str]] = []
    ray_up = bool(settings.ray_address) or ray_cluster.head_running(settings)
    where = settings.ray_address or f"local head {ray_cluster.head_address(settings)}"
    rows.append(("Ray", f"running  {where}, dashboard http://{s.host}:{s.dashboard_port}" if ray_up
                 else "not running"))
    if ray_up:
        from control.deployment import describe

        ray_cluster.connect(settings)
        rows.extend(describe(settings))
    if settings.mlflow_uri.startswith(("http://", "https://")):
        rows.append(("MLflow", f"remote  {settings.mlflow_uri}"))
    else:
        rows.append(("MLflow UI", service_row(settings, "mlflow", f"http://{s.host}:{s.mlflow_port}")))
    rows.append(("Gradio demo", service_row(settings, "ui", f"http://{s.host}:{s.ui_port}")))
    rows.append(("Prometheus", service_row(settings, "prometheus", f"http://{s.host}:{s.prometheus_port}")))
    champion = models.champion(settings)
    rows.append(("Champion", "none (run `rayloop train`)" if champion is None else
                 f"{champion['name']} v{champion['version']} "
                 f"test_accuracy={champion['metrics'].get('test_accuracy', float('nan')):.4f} "
                 f"data={champion['tags'].get('data_version', '?')} "
                 f"trained_at={champion['tags'].get('trained_at', '?')}"))
    width = max(len(label) for label, _ in rows) + 2
    for label, text in rows:
        print(f"{label:<{width}}{text}")
    return 0


def service_row(settings: Settings, name: str, url: str) -> str:
    pid = services.running_pid(settings, name)
    return f"running  {url} (pid {pid})" if pid else "not running"
