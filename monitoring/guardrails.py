"""When the monitor retrains: its triggers, and the guardrails on them (a daily budget, a circuit breaker).

The guardrails hold back the drift monitor's own triggers (drift, feedback volume, schedule); a retrain asked for by
a person (`rayloop retrain`, POST /v1/admin/retrain) still runs. Both are read from the audit trail, which
every process of the loop writes: a restarted monitor, or one on another node, sees the same state, and
each scan reads a bounded number of the newest events.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from cluster.settings import MonitorSettings
from store import AuditEvent

AUTOMATIC = frozenset({"drift", "estimate", "feedback", "schedule"})  # the monitor's triggers; anything else is by hand
DAY = timedelta(days=1)


@dataclass(frozen=True)
class Hold:
    """Why the monitor does not start a retrain now."""

    kind: str  # budget | breaker
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def budget_hold(triggered: list[AuditEvent], now: datetime, per_day: int) -> Hold | None:
    """A hold when `per_day` automatic retrains were triggered in the last 24 hours.

    `triggered`: `retrain_triggered` events, newest first; the caller reads a bounded number of them (a
    person's retrains among them are not counted, so read a few more than `per_day`). 0 = no budget.
    """
    if per_day <= 0:
        return None
    recent = [e for e in triggered if e.details.get("trigger") in AUTOMATIC and now - e.at < DAY]
    if len(recent) < per_day:
        return None
    frees = recent[per_day - 1].at + DAY
    return Hold("budget", f"{len(recent)} automatic retrains in the last 24 hours reached the budget of "
                          f"monitor.max_retrains_per_day={per_day}; the next may start at "
                          f"{frees:%Y-%m-%d %H:%M} UTC")


def breaker_hold(gates: list[AuditEvent], resets: list[AuditEvent], after: int) -> Hold | None:
    """A hold when the last `after` gate decisions since the last reset all kept the champion.

    `gates`: `gate_decision` events, newest first (at least `after` of them); `resets`: `breaker_reset`
    events, newest first. A challenger that passes the gate (a retrain started by hand, say) closes the
    breaker as a reset does. A gate that found "not enough evidence" is no failure (the next trigger is
    meant to retry with more labels) and does not close the breaker either: it is skipped, so pass a few
    more than `after`. 0 = no breaker.
    """
    if after <= 0:
        return None
    since = resets[0].at if resets else None
    recent = [g for g in gates if (since is None or g.at > since)
              and g.details.get("outcome") != "not_enough_evidence"][:after]
    if len(recent) < after or any(g.details.get("passed") for g in recent):
        return None
    last = recent[0].details.get("reason", "")
    return Hold("breaker", f"the last {after} gates kept the champion (the latest: {last[:200]}); automatic "
                           f"retraining is paused until `rayloop guardrails --reset` or a retrain started by "
                           f"hand passes the gate")


def labels_awaited(gate: AuditEvent | None, last_trigger: datetime | None, holdout_fraction: float,
                   min_holdout: int) -> int | None:
    """New labels after which a gate's "not enough evidence" may be retried before the cooldown ends.

    `gate`: the newest `gate_decision` event. When it is later than the last trigger and found not enough
    evidence, the retry waits for the labels that bring the feedback holdout (`holdout_fraction` of new
    labels) to the size the gate asked for (`holdout_required`, or `min_holdout` when the holdout was below
    it): retrying sooner would find the same evidence. None: no such gate, the cooldown applies as usual.
    """
    if gate is None or gate.details.get("outcome") != "not_enough_evidence" \
            or (last_trigger is not None and gate.at < last_trigger):
        return None
    evidence = gate.details.get("evidence") or {}
    have = int(evidence.get("holdout_items") or 0)
    want = max(int(evidence.get("holdout_required") or 0) if have >= min_holdout else min_holdout, have + 1)
    return math.ceil((want - have) / max(holdout_fraction, 1e-9))


def decide_trigger(drifted: bool, feedback_since: int, seconds_since: float | None,
                   rule: MonitorSettings, labels_awaited: int | None = None,
                   estimated_accuracy: float | None = None) -> str | None:
    """Which trigger fires now, if any: drift or a low estimated accuracy (each with enough new labels),
    feedback volume, or schedule.

    `labels_awaited`: after a gate found not enough evidence, the new labels that let the next trigger
    retry before the cooldown ends (monitoring.guardrails.labels_awaited). `estimated_accuracy`: the
    window's, when estimated; below `monitor.min_estimated_accuracy` (when set) it fires "estimate"."""
    waited = labels_awaited is not None and feedback_since >= labels_awaited
    if seconds_since is not None and seconds_since < rule.cooldown_s and not waited:
        return None
    if drifted and feedback_since >= rule.min_feedback:
        return "drift"
    low = estimated_accuracy is not None and estimated_accuracy < rule.min_estimated_accuracy
    if low and feedback_since >= rule.min_feedback:
        return "estimate"
    if feedback_since >= rule.feedback_threshold:
        return "feedback"
    if rule.schedule_s > 0 and (seconds_since is None or seconds_since >= rule.schedule_s):
        return "schedule"
    return None
