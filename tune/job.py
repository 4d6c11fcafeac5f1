"""The retrain job: what runs as a Ray Job (`python -m tune.job`), and how it is submitted once at a time."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time

import numpy as np

from cluster.settings import Settings, load_settings, to_env
from cluster.store import Store, UnknownPrediction
from train.transforms import decode, to_array
from tune.retrain import FeedbackSamples, RetrainResult, retrain

JOB_KIND = "rayloop-retrain"
ACTIVE = {"PENDING", "RUNNING"}
# Audit events that say how a retrain job ended; a job that ended without one was killed or crashed.
ENDINGS = {"retrain_finished", "retrain_failed", "retrain_interrupted"}


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
            prediction = store.get_prediction(prediction_id, wait_s=0)
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


def release_orphaned_placement_groups() -> int:
    """Remove placement groups whose creating job is dead; returns how many.

    A retrain job whose driver was SIGKILLed leaves its Tune/Train placement group CREATED (seen on
    Ray 2.60): its CPU stays reserved and the next retrain's workers wait for it forever. (rayloop's
    Serve deployments use no placement groups, so a detached Serve app started by a finished CLI
    process is not touched.)
    """
    import ray
    from ray.util.placement_group import PlacementGroup
    from ray.util.state import list_placement_groups

    try:
        dead = {j["JobID"] for j in ray._private.state.jobs() if j.get("IsDead")}
        groups = list_placement_groups(filters=[("state", "=", "CREATED")], limit=10_000,
                                       raise_on_missing_output=False)
    except Exception as exc:  # noqa: BLE001 - best effort: never stop a retrain over housekeeping
        print(f"[rayloop] could not list placement groups: {exc!r}", flush=True)
        return 0
    released = 0
    for group in groups:
        if group.creator_job_id in dead:
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group.placement_group_id)))
            released += 1
    return released


def run_job(settings: Settings, trigger: str, actor: str, rollout: bool = True,
            ray_job: str | None = None) -> RetrainResult:
    """Retrain from the store's feedback; on promotion, roll Serve over to the new version.

    Every audit event carries `ray_job` (the submission id) when run as a Ray Job, so a job that
    died without a word can be told apart later (audit_interrupted).
    """
    from cluster.ray_cluster import connect
    from train import registry

    connect(settings)
    released = release_orphaned_placement_groups()
    if released:
        print(f"[rayloop] released {released} placement group(s) left by dead jobs", flush=True)
    store = Store.from_settings(settings)
    tag = {"ray_job": ray_job} if ray_job else {}

    def audit(event: str, details: dict) -> None:
        store.audit(actor, event, {**details, **tag})

    try:
        champion, _ = registry.load_registered(settings)
        samples = feedback_samples(store, champion.classes, champion.image_size, champion.channels)
        on_promote = (lambda version: roll_out(settings, version, audit)) if rollout else None
        return retrain(settings, samples, trigger=trigger, audit=audit, on_promote=on_promote)
    except Exception as exc:
        audit("retrain_failed", {"trigger": trigger, "error": f"{type(exc).__name__}: {exc}"[:1000]})
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


class RetrainStopped(Exception):
    """The job was asked to stop (SIGTERM, e.g. `ray job stop`)."""


def audit_interrupted(settings: Settings, store: Store) -> list[str]:
    """Record `retrain_interrupted` for each retrain Ray Job that ended without an ending in the audit trail
    (its driver was killed, or its node died); returns their submission ids.

    Such a job promoted nothing unless it wrote `promoted`: aliases move only after the gate, and
    `champion` last. A `challenger` alias it may have set names a version that was never gated.
    """
    told = {e.details.get("ray_job") for name in ENDINGS for e in store.list_audit(limit=1000, event_name=name)}
    found = []
    for job in job_client(settings).list_jobs():
        status = str(job.status).split(".")[-1]
        if (job.metadata or {}).get("kind") != JOB_KIND or status in ACTIVE or job.submission_id in told:
            continue
        if status == "SUCCEEDED":
            continue  # ended by its own hand, and said so (or predates ray_job tags)
        store.audit("rayloop", "retrain_interrupted", {
            "ray_job": job.submission_id, "status": status, "trigger": (job.metadata or {}).get("trigger"),
            # Ray appends the job's log tail to its message: the first line says how it ended.
            "message": (job.message or "").split(", last available logs")[0].split("\n")[0][:300]})
        found.append(job.submission_id)
    return found


def submit(settings: Settings, trigger: str, actor: str) -> str:
    """Submit the retrain as a Ray Job (shown in the dashboard's Jobs view); never two at once.

    First records how earlier retrain jobs that died silently ended (audit_interrupted).
    """
    store = Store.from_settings(settings)
    try:
        audit_interrupted(settings, store)
    finally:
        store.close()
    running = active_retrain(settings)
    if running:
        raise RetrainBusy(f"retrain job {running} is still running")
    submission_id = f"retrain-{trigger}-{int(time.time())}"
    entrypoint = " ".join([shlex.quote(sys.executable), "-m", "tune.job", "--trigger", shlex.quote(trigger),
                           "--actor", shlex.quote(actor), "--ray-job", shlex.quote(submission_id)])
    # The job runs in another process and directory: hand it these exact settings (API keys excepted:
    # a job needs none, and runtime_env is shown in the dashboard).
    env = {k: v for k, v in to_env(settings).items() if k != "RAYLOOP_SERVE_API_KEYS"}
    client = job_client(settings)
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint, runtime_env={"env_vars": env},
                metadata={"kind": JOB_KIND, "trigger": trigger, "actor": actor},
                submission_id=submission_id,
            )
        except RuntimeError as exc:
            # A head that just started has no job agent registered for a few seconds.
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


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
    parser.add_argument("--ray-job", default=None, help="the Ray Job submission id (set by submit)")
    args = parser.parse_args(argv)

    def stopped(signum, _frame):
        raise RetrainStopped(f"signal {signal.Signals(signum).name}")

    # `ray job stop` sends SIGTERM first: end through run_job's failure path, which audits it.
    signal.signal(signal.SIGTERM, stopped)
    result = run_job(load_settings(), args.trigger, args.actor, rollout=not args.no_rollout, ray_job=args.ray_job)
    print(f"[rayloop] {result.job_name}: challenger v{result.challenger_version} "
          f"{'promoted' if result.promoted else 'not promoted'}: {result.gate.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
