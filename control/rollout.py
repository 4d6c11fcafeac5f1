"""Rolling Serve over to a model version, and rolling back to the previous champion."""

from __future__ import annotations

import time
from typing import Callable

from cluster.ray_cluster import connect
from cluster.settings import Settings
from control import deployment
from store import Event, Store
from train import registry

Audit = Callable[[str, dict], None]


class RolloutFailed(RuntimeError):
    """The registry moved, but Serve did not finish moving to the version (audited as rollout_failed)."""


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
