"""Rolling Serve over to a model version, and rolling back to the previous champion."""

from __future__ import annotations

import time
from typing import Callable

from cluster.ray_cluster import connect
from cluster.settings import Settings
from control import deployment
from store import Event, Store
from store.rollouts import Rollout, Rollouts
from train import registry

Audit = Callable[[str, dict], None]


class RolloutFailed(RuntimeError):
    """The registry moved, but Serve did not finish moving to the version (audited as rollout_failed)."""


def serve_running(settings: Settings) -> bool:
    """True when this cluster runs rayloop's Serve application (live traffic a staged rollout can use)."""
    connect(settings)
    return deployment.is_deployed()


def roll_out(settings: Settings, version: str, audit: Audit) -> bool:
    """Rolling update of the Classifier to `version` when Serve runs; False when there is nothing to update.

    Each step is audited; a failure as `rollout_failed` with its error, then raised as RolloutFailed.
    """
    connect(settings)
    if not deployment.is_deployed():
        audit(Event.ROLLOUT_SKIPPED, {"version": version, "reason": "Serve is not running"})
        return False
    audit(Event.ROLLOUT_STARTED, {"version": version})
    started = time.perf_counter()
    try:
        deployment.deploy(settings, model_version=version)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:1000]
        audit(Event.ROLLOUT_FAILED, {"version": version, "error": error})
        raise RolloutFailed(f"rolling Serve over to v{version} failed: {error}") from exc
    audit(Event.ROLLOUT_FINISHED, {"version": version, "seconds": round(time.perf_counter() - started, 2)})
    return True


def roll_back(settings: Settings, store: Store, actor: str) -> tuple[str, str]:
    """Put `previous` back as champion and roll Serve over to it, awaited and audited; returns (from, to).

    Raises ValueError when there is no previous champion, RolloutFailed when Serve did not follow.
    """
    frm, to = registry.rollback(settings)
    store.audit(actor, Event.ROLLBACK, {"from": frm, "to": to})
    roll_out(settings, to, lambda event, details: store.audit(actor, event, details))
    return frm, to


class NoRollout(LookupError):
    """No staged rollout is under way."""


class RolloutStalled(RuntimeError):
    """The rollout's driver stopped answering: it can be aborted, not promoted."""


def rollout_status(store: Store) -> Rollout | None:
    """The newest staged rollout (under way or ended), with the figures its driver last wrote."""
    return Rollouts(store.engine).latest()


def command_rollout(store: Store, command: str, actor: str, wait_s: float = 120.0) -> Rollout:
    """An operator's `promote` or `abort` of the rollout under way, carried out by its driver within a poll;
    returns the rollout once it ended (or as it stands after wait_s: a promotion waits for its rolling update).

    A rollout whose driver is gone (its job died; the replicas already serve the champion alone) is ended
    here as abandoned on abort; it cannot be promoted, as no gate-to-champion path runs any more.
    """
    rollouts = Rollouts(store.engine)
    current = rollouts.current()
    if current is None:
        raise NoRollout("no rollout is under way")
    if current.stale():
        if command != "abort":
            raise RolloutStalled(f"rollout {current.id} of v{current.challenger} stopped: its driver (the retrain "
                                 f"job) is gone and the champion serves alone; abort it, then retrain")
        if rollouts.end(current.id, "abandoned", f"aborted by {actor}: its driver had stopped"):
            store.audit(actor, Event.ROLLOUT_ROLLED_BACK, {"rollout": current.id, "version": current.challenger,
                                                           "reason": "aborted; its driver had stopped"})
        return rollouts.get(current.id)
    if not rollouts.command(current.id, command, actor):
        return rollouts.get(current.id)  # it ended meanwhile
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        now = rollouts.get(current.id)
        if not now.live:
            return now
        time.sleep(0.25)
    return rollouts.get(current.id)
