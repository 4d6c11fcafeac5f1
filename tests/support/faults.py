"""A Serve replica SIGKILLed under load, and what it cost: the fault tests' measurement (tests/reliability)."""

from __future__ import annotations

import os
import signal
import time

import psutil

from tests.support.load import Load

MAX_FAILED_SHARE = 0.01
STEADY_S = 3.0        # load before the kill, and again after recovery


def replica_pids(deployment: str) -> set[int]:
    """Pids of this test's own Ray workers that host a replica of `deployment` (Ray sets the process title).

    Only descendants of this process are searched: the cluster is the one ray.init started here,
    never another Ray instance on the machine.
    """
    from control.deployment import APP_NAME

    pids = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if process.status() != psutil.STATUS_ZOMBIE and \
                    f"ServeReplica:{APP_NAME}:{deployment}" in " ".join(process.cmdline()):
                pids.add(process.pid)
        except psutil.Error:
            continue
    return pids


def running_replicas(deployment: str) -> int:
    """RUNNING replicas of a deployment when the app is RUNNING and the deployment HEALTHY, else 0."""
    from ray import serve as rayserve

    from control.deployment import APP_NAME

    app = rayserve.status().applications.get(APP_NAME)
    if app is None or str(getattr(app.status, "value", app.status)) != "RUNNING":
        return 0
    state = app.deployments[deployment]
    if str(getattr(state.status, "value", state.status)) != "HEALTHY":
        return 0
    return sum(n for s, n in state.replica_states.items() if str(getattr(s, "value", s)) == "RUNNING")


def kill_under_load(url: str, deployment: str, replicas: int, timeout: float = 180,
                    pids_of=None, whole=None) -> dict:
    """SIGKILL one replica of `deployment` while clients post; wait until Serve is whole again.

    pids_of() finds the deployment's replica processes and whole() says Serve is back to full health;
    by default both ask this test's own in-process Ray.
    """
    pids_of = pids_of or (lambda: replica_pids(deployment))
    whole = whole or (lambda: running_replicas(deployment) == replicas)
    before = pids_of()
    assert len(before) == replicas and whole(), (before, deployment)
    victim = min(before)
    with Load(url, timeout=90) as load:
        time.sleep(STEADY_S)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        recovered_at = None
        while time.monotonic() - killed_at < timeout:
            pids = pids_of()
            if victim not in pids and len(pids) == replicas and whole():
                recovered_at = time.monotonic()
                break
            time.sleep(0.25)
        assert recovered_at is not None, f"{deployment} did not get back to {replicas} running replicas"
        time.sleep(STEADY_S)
    failures = load.failed()
    after = [a for a in load.answers if a.sent_at >= recovered_at]
    return {
        "deployment": deployment, "replicas": replicas, "requests": len(load.answers), "failed": len(failures),
        "failed_share": round(len(failures) / max(1, len(load.answers)), 4),
        "failed_statuses": sorted({a.status for a in failures}),
        "recovery_s": round(recovered_at - killed_at, 1),
        "last_failure_after_kill_s": round(max(a.sent_at for a in failures) - killed_at, 1) if failures else None,
        "max_latency_s": round(max(a.seconds for a in load.answers), 2),
        "requests_after_recovery": len(after), "failed_after_recovery": len(load.failed(recovered_at)),
        "replaced_pid": victim, "new_pids": sorted(pids_of() - before),
    }
