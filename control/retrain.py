"""Requesting a retrain: one at a time, audited, as a Ray Job (or here, for `rayloop retrain --inline`).

Every caller (the CLI, POST /v1/admin/retrain, the drift monitor) goes through `request` or `run_here`,
so each retrain is guarded the same way and leaves the same `retrain_triggered` event, which the
monitor's cooldown and label count start from.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from cluster.settings import Settings, to_env
from store import RETRAIN_ENDINGS, Event, Store

JOB_KIND = "rayloop-retrain"
# The retrain job's entry point (rayloop/job.py), named as a string: control does not import the job.
JOB_MODULE = "rayloop.job"
ACTIVE = {"PENDING", "RUNNING"}
LEASE = "retrain"
LEASE_TTL_S = 60.0  # a holder renews every third of this; a dead holder's claim lapses after it
T = TypeVar("T")


class RetrainBusy(RuntimeError):
    """A retrain is already pending or running."""


def job_client(settings: Settings):
    """Ray's job client for this cluster's dashboard."""
    from ray.job_submission import JobSubmissionClient

    address = settings.ray_address
    if not address or address in {"auto", "local"} or address.startswith("ray://"):
        address = f"http://127.0.0.1:{settings.services.dashboard_port}"
    elif not address.startswith("http"):
        address = f"http://{address.split(':')[0]}:{settings.services.dashboard_port}"
    return JobSubmissionClient(address)


def retrain_jobs(settings: Settings) -> list:
    """Ray's record of every retrain job on this cluster (one call to the job service)."""
    return [job for job in job_client(settings).list_jobs() if (job.metadata or {}).get("kind") == JOB_KIND]


def status_of(job) -> str:
    return str(job.status).split(".")[-1]


def guard(settings: Settings, store: Store) -> None:
    """Before a retrain: settle how earlier jobs ended (audit_interrupted), then raise RetrainBusy when one
    is pending or running, as a Ray Job or here (the lease). One listing of the jobs serves both."""
    jobs = retrain_jobs(settings)
    audit_interrupted(store, jobs)
    running = next((job.submission_id for job in jobs if status_of(job) in ACTIVE), None)
    if running:
        raise RetrainBusy(f"retrain job {running} is still running")
    holder = store.lease_holder(LEASE)
    if holder:
        raise RetrainBusy(f"a retrain is running ({holder})")


def audit_interrupted(store: Store, jobs: list) -> list[str]:
    """Record `retrain_interrupted` for each retrain Ray Job that ended without an ending in the audit trail
    (its driver was killed, or its node died); returns their submission ids.

    Such a job promoted nothing unless it wrote `promoted`: aliases move only after the gate, and
    `champion` last. A `challenger` alias it may have set names a version that was never gated.
    """
    told = {e.details.get("ray_job") for name in RETRAIN_ENDINGS for e in store.list_audit(limit=1000, event_name=name)}
    found = []
    for job in jobs:
        status = status_of(job)
        if status in ACTIVE or job.submission_id in told:
            continue
        if status == "SUCCEEDED":
            continue  # ended by its own hand, and said so (or predates ray_job tags)
        store.audit("rayloop", Event.RETRAIN_INTERRUPTED, {
            "ray_job": job.submission_id, "status": status, "trigger": (job.metadata or {}).get("trigger"),
            # Ray appends the job's log tail to its message: the first line says how it ended.
            "message": (job.message or "").split(", last available logs")[0].split("\n")[0][:300]})
        found.append(job.submission_id)
        store.release_lease(LEASE, job_holder(job.submission_id))  # it died holding it: the next may start now
    return found


def job_holder(submission_id: str) -> str:
    """How a retrain Ray Job names itself as the lease's holder."""
    return f"ray job {submission_id}"


def request(settings: Settings, store: Store, trigger: str, actor: str, details: dict | None = None) -> str:
    """Submit a retrain as a Ray Job (the dashboard's Jobs view shows it); returns its submission id.

    Raises RetrainBusy when one is pending or running. First records how earlier retrain jobs that
    died silently ended (audit_interrupted); afterwards `retrain_triggered`, with `details`.
    """
    guard(settings, store)
    submission = submit(settings, trigger, actor)
    store.audit(actor, Event.RETRAIN_TRIGGERED, {"trigger": trigger, "job": submission, **(details or {})})
    return submission


def submit(settings: Settings, trigger: str, actor: str) -> str:
    """The Ray Job itself (no guard: see request)."""
    submission_id = f"retrain-{trigger}-{int(time.time())}"
    entrypoint = " ".join([shlex.quote(sys.executable), "-m", JOB_MODULE, "--trigger", shlex.quote(trigger),
                           "--actor", shlex.quote(actor), "--ray-job", shlex.quote(submission_id)])
    # The job runs in another process and directory: hand it these exact settings (API keys excepted:
    # a job needs none, and runtime_env is shown in the dashboard).
    env = {k: v for k, v in to_env(settings).items() if k != "RAYLOOP_SERVE_API_KEYS"}
    client = job_client(settings)
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env},
                                     metadata={"kind": JOB_KIND, "trigger": trigger, "actor": actor},
                                     submission_id=submission_id)
        except RuntimeError as exc:
            # A head that just started has no job agent registered for a few seconds.
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def run_here(settings: Settings, store: Store, trigger: str, actor: str, run: Callable[[], T]) -> T:
    """Run a retrain in this process (`rayloop retrain --inline`) under the same guard and audit as `request`."""
    guard(settings, store)
    with holding(store, f"{actor} (pid {os.getpid()} on {socket.gethostname()})"):
        store.audit(actor, Event.RETRAIN_TRIGGERED, {"trigger": trigger, "job": None, "inline": True})
        return run()


@contextmanager
def holding(store: Store, holder: str) -> Iterator[None]:
    """Hold the retrain lease while the block runs (renewed in the background); RetrainBusy if another does.

    A retrain job takes it too when it starts, so a job and an inline retrain never run at once even
    when both were requested in the same instant.
    """
    other = store.acquire_lease(LEASE, holder, LEASE_TTL_S)
    if other is not None:
        raise RetrainBusy(f"a retrain is running ({other})")
    done = threading.Event()

    def renew() -> None:
        while not done.wait(LEASE_TTL_S / 3):
            try:
                store.acquire_lease(LEASE, holder, LEASE_TTL_S)
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried; the claim lasts a minute
                print(f"[rayloop] could not renew the retrain lease: {exc!r}", flush=True)

    renewing = threading.Thread(target=renew, name="retrain-lease", daemon=True)
    renewing.start()
    try:
        yield
    finally:
        done.set()
        renewing.join(timeout=5)
        store.release_lease(LEASE, holder)


def wait(settings: Settings, submission_id: str, timeout: float = 3600) -> str:
    """Block until the job ends; returns its final status name."""
    client = job_client(settings)
    deadline = time.monotonic() + timeout
    status = "PENDING"
    while time.monotonic() < deadline:
        status = str(client.get_job_status(submission_id)).split(".")[-1]
        if status not in ACTIVE:
            return status
        time.sleep(2)
    return status


def logs(settings: Settings, submission_id: str) -> str:
    return job_client(settings).get_job_logs(submission_id)
