"""The `rayloop` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from cluster import ray_cluster, services
from cluster.settings import Settings, as_dict, load_settings, to_env


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


def cmd_prepare(settings: Settings, args: argparse.Namespace) -> int:
    from train.pipeline import run_prepare

    run_prepare(settings)
    return 0


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    from train.pipeline import run_train

    if args.epochs:
        settings.train.epochs = args.epochs
    if args.workers:
        settings.train.num_workers = args.workers
    summary = run_train(settings, register=not args.no_register)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from train.pipeline import run_evaluate

    run_evaluate(settings, Path(args.metrics), Path(args.plot))
    return 0


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
    from train import registry

    print(f"[rayloop] data dir {settings.data_dir}")
    refuse_taken_ports(settings, args)
    if settings.ray_address:
        print(f"[rayloop] using the Ray cluster at {settings.ray_address}")
    elif not ray_cluster.head_running(settings):
        print("[rayloop] starting a local Ray head ...", flush=True)
        started.append("ray")
        log.timed("started Ray", ray_cluster.start_head, settings)
    if settings.mlflow_uri.startswith(("http://", "https://")):
        print(f"[rayloop] using the MLflow server at {settings.mlflow_uri}")
    elif not services.running_pid(settings, "mlflow"):
        port = settings.services.mlflow_port
        started.append("mlflow")
        log.timed("started the MLflow UI", services.start, settings, "mlflow",
                  services.mlflow_ui_command(settings, port), f"http://{settings.services.host}:{port}/health",
                  None, 120)
        print("[rayloop] MLflow UI is up", flush=True)
    champion = registry.describe_champion(settings)
    if champion is None:
        print("[rayloop] no champion model yet: training one (first run only) ...", flush=True)
        log.timed("trained a champion", cmd_train, settings,
                  argparse.Namespace(epochs=0, workers=0, no_register=False, json=False))
        champion = registry.describe_champion(settings)
    print(f"[rayloop] champion: {champion['name']} v{champion['version']} "
          f"(test accuracy {champion['metrics'].get('test_accuracy', float('nan')):.4f})")
    from serve.app import deploy

    print("[rayloop] deploying the Serve application ...", flush=True)
    served_at = log.timed(f"deployed v{champion['version']}", deploy, settings)
    print(f"[rayloop] Serve is up at {served_at}")
    from monitoring import monitor

    monitor.start(settings)
    print(f"[rayloop] drift monitor running (every {settings.monitor.interval_s:g}s over the last "
          f"{settings.monitor.window_size} predictions)")
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
        from serve.app import shutdown

        # Before Ray stops: replicas write their queued prediction logs on a graceful shutdown.
        print(f"[rayloop] Serve {'stopped' if shutdown(settings) else 'was not running'}", flush=True)
        from monitoring import monitor

        print(f"[rayloop] drift monitor {'stopped' if monitor.stop() else 'was not running'}")
        import ray

        ray.shutdown()  # now, while the head is up: a driver left connected to a dead head waits at exit
    stopped = services.stop(settings, "mlflow")
    print(f"[rayloop] MLflow UI {'stopped' if stopped else 'was not running'}")
    if not settings.ray_address:
        print(f"[rayloop] local Ray {'stopped' if ray_cluster.stop_head(settings) else 'was not running'}")
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    """One aligned row per part; a URL only for a part that runs."""
    from train import registry

    s = settings.services
    rows: list[tuple[str, str]] = []
    ray_up = bool(settings.ray_address) or ray_cluster.head_running(settings)
    where = settings.ray_address or f"local head {ray_cluster.head_address(settings)}"
    rows.append(("Ray", f"running  {where}, dashboard http://{s.host}:{s.dashboard_port}" if ray_up
                 else "not running"))
    if ray_up:
        from serve.app import describe

        ray_cluster.connect(settings)
        rows.extend(describe(settings))
    if settings.mlflow_uri.startswith(("http://", "https://")):
        rows.append(("MLflow", f"remote  {settings.mlflow_uri}"))
    else:
        rows.append(("MLflow UI", service_row(settings, "mlflow", f"http://{s.host}:{s.mlflow_port}")))
    rows.append(("Gradio demo", service_row(settings, "ui", f"http://{s.host}:{s.ui_port}")))
    rows.append(("Prometheus", service_row(settings, "prometheus", f"http://{s.host}:{s.prometheus_port}")))
    champion = registry.describe_champion(settings)
    rows.append(("Champion", "none (run `rayloop train`)" if champion is None else
                 f"{champion['name']} v{champion['version']} "
                 f"test_accuracy={champion['metrics'].get('test_accuracy', float('nan')):.4f} "
                 f"data={champion['tags'].get('data_version', '?')} trained_at={champion['tags'].get('trained_at', '?')}"))
    width = max(len(label) for label, _ in rows) + 2
    for label, text in rows:
        print(f"{label:<{width}}{text}")
    return 0


def service_row(settings: Settings, name: str, url: str) -> str:
    pid = services.running_pid(settings, name)
    return f"running  {url} (pid {pid})" if pid else "not running"


def cmd_retrain(settings: Settings, args: argparse.Namespace) -> int:
    from tune import job

    if args.inline:
        result = job.run_job(settings, args.trigger, args.actor)
        print(json.dumps(result.gate.as_dict(), indent=2))
        return 0
    try:
        submission = job.submit(settings, args.trigger, args.actor)
    except job.RetrainBusy as busy:
        print(f"rayloop retrain: {busy}; not starting another", file=sys.stderr)
        return 3
    print(f"[rayloop] submitted Ray Job {submission} (Ray dashboard -> Jobs)")
    if not args.wait:
        return 0
    client = job.job_client(settings)
    status = job.wait_job(client, submission)
    print(client.get_job_logs(submission)[-4000:])
    print(f"[rayloop] job {submission}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_rollback(settings: Settings, args: argparse.Namespace) -> int:
    from tune.job import roll_back

    frm, to = roll_back(settings, args.actor)
    print(f"[rayloop] champion v{frm} -> v{to} (v{frm} is now `previous`)")
    return 0


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    from cluster.store import Store

    store = Store.from_settings(settings)
    try:
        for event in reversed(store.list_audit(limit=args.limit, event_name=args.event or None)):
            details = json.dumps(event.details, default=str)
            print(f"{event.at:%Y-%m-%d %H:%M:%S} {event.actor:<14} {event.event:<18} "
                  f"{details if args.full else details[:140]}")
    finally:
        store.close()
    return 0


def cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    from monitoring.simulate import simulate
    from train.data import prepared_or_new

    data = prepared_or_new(settings.data, settings.prepared_dir)
    images, labels = data.split(args.split)
    keys = [k.strip() for k in settings.serve.api_keys.split(",") if k.strip()]
    url = args.url or f"http://{settings.services.host}:{settings.services.serve_port}"
    print(f"[simulate] {args.count} requests of {args.split}-split images with shift={args.shift} "
          f"to {url}, labels for {args.feedback_share:.0%}")
    result = simulate(url, images, labels, data.meta.classes, shift=args.shift, severity=args.severity,
                      count=args.count, feedback_share=args.feedback_share, concurrency=args.concurrency,
                      api_key=args.api_key or (keys[0] if keys else None), seed=args.seed,
                      report_every=args.report_every, duration_s=args.duration)
    print(json.dumps(result.summary(), indent=2))
    return 0 if result.failed == 0 else 1


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    print(json.dumps(as_dict(settings), indent=2, default=str))
    return 0


def parser() -> argparse.ArgumentParser:
    """Argument parser with one sub-command per action."""
    p = argparse.ArgumentParser(prog="rayloop", description="Closed-loop ML on Ray: train, serve, watch, retrain.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="load the dataset and save a stratified train/val/test split")
    train = sub.add_parser("train", help="train with Ray Train, log to MLflow, register the model")
    train.add_argument("--epochs", type=int, default=0, help="override train.epochs")
    train.add_argument("--workers", type=int, default=0, help="override train.num_workers")
    train.add_argument("--no-register", action="store_true", help="train and save locally only")
    train.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    evaluate = sub.add_parser("evaluate", help="score the last trained model on the test split")
    evaluate.add_argument("--metrics", default="metrics.json")
    evaluate.add_argument("--plot", default="data/eval/predictions.csv")
    up = sub.add_parser("up", help="start Ray, MLflow UI, Serve, drift monitor, Gradio demo (and train a "
                                   "champion if none); print URLs")
    up.add_argument("--no-ui", action="store_true", help="do not start the Gradio demo (e.g. it runs elsewhere)")
    up.add_argument("--monitoring", action="store_true",
                    help="also start a local Prometheus scraping Ray's metrics (needs `prometheus` installed)")
    up.add_argument("--started-at", type=float, default=0.0, help=argparse.SUPPRESS)  # `make up`: before install
    sub.add_parser("down", help="stop what `up` started")
    sub.add_parser("status", help="what is running, and the champion model")
    sub.add_parser("config", help="print the effective settings")
    retrain = sub.add_parser("retrain", help="retrain now (a Ray Job running Ray Tune), gate, promote, roll out")
    retrain.add_argument("--wait", action="store_true", help="follow the job until it ends")
    retrain.add_argument("--inline", action="store_true", help="run here instead of as a Ray Job")
    retrain.add_argument("--trigger", default="manual")
    retrain.add_argument("--actor", default="cli")
    rollback = sub.add_parser("rollback", help="put the previous champion back (rolling update)")
    rollback.add_argument("--actor", default="cli")
    audit = sub.add_parser("audit", help="the audit trail, oldest first")
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--event", default="", help="only this event type, e.g. gate_decision")
    audit.add_argument("--full", action="store_true", help="do not shorten details")
    from monitoring.shifts import SHIFT_KINDS

    simulate = sub.add_parser("simulate", help="send shifted traffic + labels to the API; accuracy over time")
    simulate.add_argument("--shift", default="rotate", choices=["none", *SHIFT_KINDS])
    simulate.add_argument("--severity", type=float, default=None, help="strength of the shift (kind's default)")
    simulate.add_argument("--count", type=int, default=400)
    simulate.add_argument("--duration", type=float, default=0.0, help="keep sending for at least this many s")
    simulate.add_argument("--feedback-share", type=float, default=0.8)
    simulate.add_argument("--concurrency", type=int, default=4)
    simulate.add_argument("--report-every", type=int, default=50)
    simulate.add_argument("--split", default="test", choices=["train", "val", "test"])
    simulate.add_argument("--url", default="")
    simulate.add_argument("--api-key", default="")
    simulate.add_argument("--seed", type=int, default=0)
    return p


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "evaluate": cmd_evaluate, "up": cmd_up,
            "down": cmd_down, "status": cmd_status, "config": cmd_config, "retrain": cmd_retrain,
            "rollback": cmd_rollback, "audit": cmd_audit, "simulate": cmd_simulate}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
        return COMMANDS[args.command](settings, args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"rayloop {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
