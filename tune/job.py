"""The retrain job: what runs as a Ray Job (`python -m tune.job`), and how it is submitted once at a time."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np

from cluster.settings import Settings, load_settings, to_env
from cluster.store import Store, UnknownPrediction
from train.transforms import decode, to_array
from tune.retrain import FeedbackSamples, RetrainResult, retrain

JOB_KIND = "rayloop-retrain"
ACTIVE = {"PENDING", "RUNNING"}


def feedback_samples(store: Store, classes: list[str], size: int, channels: int) -> FeedbackSamples:
    """Every labelled image users sent back (latest label per prediction), at the model's pixel format."""
    latest: dict[str, str] = {}
    for item in store.list_feedback(limit=1_000_000):  # oldest first: later labels win
        latest[item.prediction_id] = item.label
    ids, images, labels = [], [], []
    index = {name: i for i, name in enumerate(classes)}
    for prediction_id, label in latest.items():
        if label not in index:
            continue  # a label the model cannot learn (class list changed): skipped, not guessed
        try:
            prediction = store.get_prediction(prediction_id)
            if not prediction.blob_key:
                continue
            image = decode(store.blobs.get(prediction.blob_key))
        except (UnknownPrediction, FileNotFoundError, OSError):
            continue  # erased or unreadable: nothing to learn from
        ids.append(prediction_id)
        images.append(to_array(image, size, channels))
        labels.append(index[label])
    if not ids:
        return FeedbackSamples.empty(size, channels)
    return FeedbackSamples(ids, np.stack(images), np.asarray(labels, dtype=np.int64))


def run_job(settings: Settings, trigger: str, actor: str, rollout: bool = True) -> RetrainResult:
    """Retrain from the store's feedback; on promotion, roll Serve over to the new version."""
    from cluster.ray_cluster import connect
    from train import registry

    connect(settings)
    store = Store.from_settings(settings)
    try:
        champion, _ = registry.load_registered(settings)
        samples = feedback_samples(store, champion.classes, champion.image_size, champion.channels)

        def audit(event: str, details: dict) -> None:
            store.audit(actor, event, details)

        on_promote = (lambda version: roll_out(settings, version, audit)) if rollout else None
        return retrain(settings, samples, trigger=trigger, audit=audit, on_promote=on_promote)
    except Exception as exc:
        store.audit(actor, "retrain_failed", {"trigger": trigger, "error": f"{type(exc).__name__}: {exc}"[:1000]})
        raise
    finally:
        store.close()


def job_client(settings: Settings):
    """Ray's job client for this cluster's dashboard."""
    from ray.job_submission import JobSubmissionClient

    address = settings.ray_address
    if not address or address in {"auto", "local"} or address.startswith("ray://"):
        address = f"http://127.0.0.1:{settings.services.dashboard_port}"
    elif not address.startswith("http"):
        address = f"http://{address.split(':')[0]}:{settings.services.dashboard_port}"
    return JobSubmissionClient(address)


def active_retrain(settings: Settings) -> str | None:
    """Submission id of a retrain job still pending or running, if any."""
    for job in job_client(settings).list_jobs():
        if (job.metadata or {}).get("kind") == JOB_KIND and str(job.status).split(".")[-1] in ACTIVE:
            return job.submission_id
    return None


class RetrainBusy(RuntimeError):
    """A retrain job is already pending or running."""


def submit(settings: Settings, trigger: str, actor: str) -> str:
    """Submit the retrain as a Ray Job (shown in the dashboard's Jobs view); never two at once."""
    running = active_retrain(settings)
    if running:
        raise RetrainBusy(f"retrain job {running} is still running")
    entrypoint = " ".join([shlex.quote(sys.executable), "-m", "tune.job", "--trigger", shlex.quote(trigger),
                           "--actor", shlex.quote(actor)])
    # The job runs in another process and directory: hand it these exact settings (API keys excepted:
    # a job needs none, and runtime_env is shown in the dashboard).
    env = {k: v for k, v in to_env(settings).items() if k != "RAYLOOP_SERVE_API_KEYS"}
    return job_client(settings).submit_job(
        entrypoint=entrypoint, runtime_env={"env_vars": env},
        metadata={"kind": JOB_KIND, "trigger": trigger, "actor": actor},
        submission_id=f"retrain-{trigger}-{int(time.time())}",
    )


def wait_job(client, submission_id: str, timeout: float = 3600) -> str:
    """Block until the job ends; returns its final status name."""
    deadline = time.monotonic() + timeout
    status = "PENDING"
    while time.monotonic() < deadline:
        status = str(client.get_job_status(submission_id)).split(".")[-1]
        if status not in ACTIVE:
            return status
        time.sleep(2)
    return status


def roll_out(settings: Settings, version: str, audit) -> bool:
    """Rolling update of the Classifier to `version` when Serve runs; False when there is nothing to update."""
    from serve.app import deploy, is_deployed

    if not is_deployed():
        audit("rollout_skipped", {"version": version, "reason": "Serve is not running"})
        return False
    audit("rollout_started", {"version": version})
    started = time.perf_counter()
    deploy(settings, model_version=version)
    audit("rollout_finished", {"version": version, "seconds": round(time.perf_counter() - started, 2)})
    return True


def roll_back(settings: Settings, actor: str) -> tuple[str, str]:
    """Put `previous` back as champion and roll Serve over to it; returns (from, to)."""
    from cluster.ray_cluster import connect
    from tune import promotion

    connect(settings)
    store = Store.from_settings(settings)
    try:
        frm, to = promotion.rollback(settings)
        store.audit(actor, "rollback", {"from": frm, "to": to})
        roll_out(settings, to, lambda event, details: store.audit(actor, event, details))
        return frm, to
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one retrain (Ray Tune + gate + rollout).")
    parser.add_argument("--trigger", default="manual")
    parser.add_argument("--actor", default="retrain-job")
    parser.add_argument("--no-rollout", action="store_true")
    args = parser.parse_args(argv)
    result = run_job(load_settings(), args.trigger, args.actor, rollout=not args.no_rollout)
    print(f"[rayloop] {result.job_name}: challenger v{result.challenger_version} "
          f"{'promoted' if result.promoted else 'not promoted'}: {result.gate.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
