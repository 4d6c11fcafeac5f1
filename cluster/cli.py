"""The `rayloop` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster import ray_cluster, services
from cluster.settings import Settings, as_dict, load_settings


def urls(settings: Settings) -> dict[str, str]:
    """Where each user-facing service listens."""
    s = settings.services
    return {
        "Ray dashboard": f"http://{s.host}:{s.dashboard_port}",
        "MLflow UI": f"http://{s.host}:{s.mlflow_port}",
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


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from train import registry

    print(f"[rayloop] data dir {settings.data_dir}")
    if settings.ray_address:
        print(f"[rayloop] using the Ray cluster at {settings.ray_address}")
    elif not ray_cluster.head_running():
        print("[rayloop] starting a local Ray head ...", flush=True)
        ray_cluster.start_head(settings)
    if settings.mlflow_uri.startswith(("http://", "https://")):
        print(f"[rayloop] using the MLflow server at {settings.mlflow_uri}")
    else:
        port = settings.services.mlflow_port
        services.start(settings, "mlflow", services.mlflow_ui_command(settings, port),
                       f"http://{settings.services.host}:{port}/health", timeout=120)
        print("[rayloop] MLflow UI is up", flush=True)
    champion = registry.describe_champion(settings)
    if champion is None:
        print("[rayloop] no champion model yet: training one (first run only) ...", flush=True)
        cmd_train(settings, argparse.Namespace(epochs=0, workers=0, no_register=False, json=False))
        champion = registry.describe_champion(settings)
    print(f"[rayloop] champion: {champion['name']} v{champion['version']} "
          f"(test accuracy {champion['metrics'].get('test_accuracy', float('nan')):.4f})")
    print("\nrayloop is up:")
    for name, url in urls(settings).items():
        print(f"  {name:<14} {url}")
    print("Stop everything with `make down`.")
    return 0


def cmd_down(settings: Settings, args: argparse.Namespace) -> int:
    stopped = services.stop(settings, "mlflow")
    print(f"[rayloop] MLflow UI {'stopped' if stopped else 'was not running'}")
    if not settings.ray_address:
        ray_cluster.stop_head()
        print("[rayloop] local Ray stopped")
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from train import registry

    ray_up = bool(settings.ray_address) or ray_cluster.head_running()
    print(f"Ray:       {'running' if ray_up else 'not running'} ({settings.ray_address or 'local head'})")
    mlflow_pid = services.running_pid(settings, "mlflow")
    print(f"MLflow UI: {'running, pid %d' % mlflow_pid if mlflow_pid else 'not running'}")
    champion = registry.describe_champion(settings)
    if champion is None:
        print("Champion:  none (run `rayloop train`)")
    else:
        print(f"Champion:  {champion['name']} v{champion['version']} "
              f"test_accuracy={champion['metrics'].get('test_accuracy', float('nan')):.4f} "
              f"data={champion['tags'].get('data_version', '?')} trained_at={champion['tags'].get('trained_at', '?')}")
    for name, url in urls(settings).items():
        print(f"{name + ':':<11}{url}")
    return 0


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
    sub.add_parser("up", help="start Ray, MLflow UI (and train a champion if none); print URLs")
    sub.add_parser("down", help="stop what `up` started")
    sub.add_parser("status", help="what is running, and the champion model")
    sub.add_parser("config", help="print the effective settings")
    return p


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "evaluate": cmd_evaluate, "up": cmd_up,
            "down": cmd_down, "status": cmd_status, "config": cmd_config}


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
