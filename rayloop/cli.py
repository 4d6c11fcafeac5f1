"""The `rayloop` command line: the composition root, the one place that may import every part."""

from __future__ import annotations

from cluster import environment

environment.apply()  # before anything below imports ray

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from cluster.settings import Settings, as_dict, load_settings  # noqa: E402
from rayloop.lifecycle import cmd_down, cmd_monitor, cmd_status, cmd_up  # noqa: E402


def cmd_prepare(settings: Settings, args: argparse.Namespace) -> int:
    from train.pipeline import run_prepare

    run_prepare(settings)
    return 0


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    from train.launch import train

    if args.epochs:
        settings.train.epochs = args.epochs
    if args.workers is not None:
        settings.train.num_workers = str(args.workers)
    if args.target_val_accuracy is not None:
        settings.train.target_val_accuracy = args.target_val_accuracy
    summary = train(settings, register=not args.no_register)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from train.pipeline import run_evaluate

    run_evaluate(settings, Path(args.metrics), Path(args.plot))
    return 0


def cmd_retrain(settings: Settings, args: argparse.Namespace) -> int:
    """A retrain through the control plane: one at a time, audited, as a Ray Job (or here with --inline)."""
    from control import retrain
    from control.rollout import roll_out, serve_running
    from store import Store
    from tune import job

    store = Store.from_settings(settings)
    try:
        if args.inline:
            result = retrain.run_here(settings, store, args.trigger, args.actor, lambda: job.run_job(
                settings, args.trigger, args.actor, on_promote=roll_out, serving=serve_running))
            print(json.dumps(result.gate.as_dict(), indent=2))
            return 0
        submission = retrain.request(settings, store, args.trigger, args.actor)
    except retrain.RetrainBusy as busy:
        print(f"rayloop retrain: {busy}; not starting another", file=sys.stderr)
        return 3
    finally:
        store.close()
    print(f"[rayloop] submitted Ray Job {submission} (Ray dashboard -> Jobs)")
    if not args.wait:
        return 0
    status = retrain.wait(settings, submission)
    print(retrain.logs(settings, submission)[-4000:])
    print(f"[rayloop] job {submission}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_rollback(settings: Settings, args: argparse.Namespace) -> int:
    from control.rollout import RolloutFailed, roll_back
    from store import Store

    store = Store.from_settings(settings)
    try:
        frm, to = roll_back(settings, store, args.actor)
    except RolloutFailed as exc:
        print(f"rayloop rollback: {exc} (see `rayloop audit --event rollout_failed`)", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"[rayloop] champion v{frm} -> v{to} (v{frm} is now `previous`)")
    return 0


def cmd_rollout(settings: Settings, args: argparse.Namespace) -> int:
    """The staged rollout: its stage and live figures; promote or abort it (audited by its driver)."""
    from control.rollout import NoRollout, RolloutStalled, command_rollout, rollout_status
    from store import Store

    store = Store.from_settings(settings)
    try:
        if args.action == "status":
            current = rollout_status(store)
        else:
            current = command_rollout(store, args.action, args.actor)
    except (NoRollout, RolloutStalled) as exc:
        print(f"rayloop rollout {args.action}: {exc}", file=sys.stderr)
        return 3
    finally:
        store.close()
    if current is None:
        print("no staged rollout yet")
        return 0
    print(json.dumps({**current.as_dict(), "stale": current.stale()}, indent=2, default=str))
    return 0


def cmd_guardrails(settings: Settings, args: argparse.Namespace) -> int:
    """Whether a guardrail holds automatic retraining; --reset closes the circuit breaker (audited)."""
    from monitoring.monitor import DriftMonitor
    from store import Event, Store

    store = Store.from_settings(settings)
    try:
        if args.reset:
            store.audit(args.actor, Event.BREAKER_RESET, {})
        hold = DriftMonitor(settings, store=store).hold()
        print(json.dumps({"held": hold is not None, **(hold.as_dict() if hold else {}),
                          "max_retrains_per_day": settings.monitor.max_retrains_per_day,
                          "breaker_failed_gates": settings.monitor.breaker_failed_gates}, indent=2))
    finally:
        store.close()
    return 0


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    from store import Store

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
    from simulation.simulate import simulate
    from train.data import prepared_or_new

    data = prepared_or_new(settings.data, settings.prepared_dir)
    images, labels = data.split(args.split, limit=args.count)  # decoded here: only what will be sent
    url = args.url or f"http://{settings.services.host}:{settings.services.serve_port}"
    print(f"[simulate] {args.count} requests of {args.split}-split images with shift={args.shift} "
          f"to {url}, labels for {args.feedback_share:.0%}")
    result = simulate(url, images, labels, data.meta.classes, shift=args.shift, severity=args.severity,
                      count=args.count, feedback_share=args.feedback_share, concurrency=args.concurrency,
                      api_key=args.api_key or settings.serve.client_key(), seed=args.seed,
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
    train.add_argument("--workers", type=int, help="override train.num_workers (0: train in this process, "
                       "Ray Train's local mode)")
    train.add_argument("--target-val-accuracy", type=float, help="override train.target_val_accuracy: stop after "
                       "the first epoch whose validation accuracy reaches it (0: train every epoch)")
    train.add_argument("--no-register", action="store_true", help="train and save locally only")
    train.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    evaluate = sub.add_parser("evaluate", help="score the last trained model on the test split")
    evaluate.add_argument("--metrics", default="metrics.json")
    evaluate.add_argument("--plot", default="data/eval/predictions.csv")
    up = sub.add_parser("up", help="start Ray, MLflow UI, Serve, drift monitor, Gradio demo (and train a "
                                   "champion if none); print URLs")
    up.add_argument("--no-ui", action="store_true", help="do not start the Gradio demo (e.g. it runs elsewhere)")
    up.add_argument("--cluster", action="store_true",
                    help="refuse settings that keep state on one node (the cluster profile: MLflow server, "
                         "PostgreSQL, RAYLOOP_STORAGE_URI; docs/deploy.md)")
    up.add_argument("--monitoring", action="store_true",
                    help="also start a local Prometheus scraping Ray's metrics (needs `prometheus` installed)")
    up.add_argument("--started-at", type=float, default=0.0, help=argparse.SUPPRESS)  # `make up`: before install
    sub.add_parser("down", help="stop what `up` started")
    sub.add_parser("status", help="what is running, and the champion model")
    sub.add_parser("config", help="print the effective settings")
    monitor = sub.add_parser("monitor", help="start, stop or look for the drift monitor on the running cluster "
                                             "(`up` starts it; this is for clusters `up` did not start)")
    monitor.add_argument("action", choices=["start", "stop", "status"])
    retrain = sub.add_parser("retrain", help="retrain now (a Ray Job running Ray Tune), gate, promote, roll out")
    retrain.add_argument("--wait", action="store_true", help="follow the job until it ends")
    retrain.add_argument("--inline", action="store_true", help="run here instead of as a Ray Job")
    retrain.add_argument("--trigger", default="manual")
    retrain.add_argument("--actor", default="cli")
    rollback = sub.add_parser("rollback", help="put the previous champion back (rolling update)")
    rollback.add_argument("--actor", default="cli")
    rollout = sub.add_parser("rollout", help="the staged rollout of a challenger (shadow, canary): status, or "
                             "promote / abort it now")
    rollout.add_argument("action", choices=["status", "promote", "abort"])
    rollout.add_argument("--actor", default=os.environ.get("USER", "cli"), help="who acts, for the audit trail")
    guardrails = sub.add_parser("guardrails", help="whether the retrain budget or the circuit breaker holds "
                                "automatic retraining")
    guardrails.add_argument("--reset", action="store_true", help="close the circuit breaker (audited)")
    guardrails.add_argument("--actor", default=os.environ.get("USER", "cli"), help="who resets, for the audit trail")
    audit = sub.add_parser("audit", help="the audit trail, oldest first")
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--event", default="", help="only this event type, e.g. gate_decision")
    audit.add_argument("--full", action="store_true", help="do not shorten details")
    from simulation.shifts import SHIFT_KINDS

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
            "down": cmd_down, "status": cmd_status, "monitor": cmd_monitor, "config": cmd_config,
            "retrain": cmd_retrain, "rollback": cmd_rollback, "audit": cmd_audit, "simulate": cmd_simulate,
            "guardrails": cmd_guardrails, "rollout": cmd_rollout}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
        return COMMANDS[args.command](settings, args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"rayloop {args.command}: error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `rayloop` console script: main(), then a quick exit.

    A command that started Ray in-process stops it here. The interpreter's own teardown after that (joining
    Ray Data's and MLflow's idle pool threads, freeing torch) took 2.5 s with the work already done, so the
    process ends with os._exit once its output and logs are flushed. In-process callers (tests) use main().
    """
    code = main()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
