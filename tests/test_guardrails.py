"""The guardrails on automatic retraining, decided from audit events (no Ray, no store)."""

from datetime import datetime, timedelta, timezone

from monitoring.guardrails import breaker_hold, budget_hold, labels_awaited
from store import AuditEvent

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def event(name: str, hours_ago: float, **details) -> AuditEvent:
    return AuditEvent(f"id-{name}-{hours_ago}", NOW - timedelta(hours=hours_ago), "test", name, details)


def newest_first(events: list[AuditEvent]) -> list[AuditEvent]:
    return sorted(events, key=lambda e: e.at, reverse=True)


def test_the_budget_counts_only_automatic_retrains_of_the_last_24_hours():
    triggered = newest_first([event("retrain_triggered", h, trigger="drift") for h in (1, 5, 9)]
                             + [event("retrain_triggered", 2, trigger="manual"),
                                event("retrain_triggered", 30, trigger="drift")])
    assert budget_hold(triggered, NOW, per_day=4) is None
    hold = budget_hold(triggered, NOW, per_day=3)
    assert hold.kind == "budget" and "max_retrains_per_day=3" in hold.reason
    assert "2026-12-02 03:00 UTC" in hold.reason  # when the oldest of the three leaves the window
    assert budget_hold(triggered, NOW, per_day=0) is None  # 0: no budget


def test_the_breaker_trips_after_n_failed_gates_in_a_row_and_a_pass_or_reset_closes_it():
    failed = [event("gate_decision", h, passed=False, reason=f"worse {h}") for h in (1, 2, 3)]
    hold = breaker_hold(newest_first(failed), [], after=3)
    assert hold.kind == "breaker" and "worse 1" in hold.reason  # the latest gate's reason
    assert breaker_hold(newest_first(failed[:2]), [], after=3) is None  # two are not enough
    passed = newest_first([event("gate_decision", 0.5, passed=True, reason="better")] + failed)
    assert breaker_hold(passed[:3], [], after=3) is None  # a challenger started by hand passed
    assert breaker_hold(newest_first(failed), [event("breaker_reset", 0.5)], after=3) is None
    later = newest_first(failed + [event("gate_decision", h, passed=False, reason="again") for h in (0.1, 0.2)])
    assert breaker_hold(later[:3], [event("breaker_reset", 0.5)], after=3) is None  # two since the reset
    assert breaker_hold(newest_first(failed), [], after=0) is None  # 0: no breaker


def test_not_enough_evidence_neither_trips_the_breaker_nor_closes_it():
    waiting = [event("gate_decision", h, passed=False, outcome="not_enough_evidence", reason="few labels")
               for h in (1, 2, 3, 4)]
    assert breaker_hold(newest_first(waiting), [], after=3) is None
    rejected = [event("gate_decision", h, passed=False, outcome="reject", reason=f"worse {h}") for h in (1.5, 2.5, 5)]
    hold = breaker_hold(newest_first(waiting + rejected), [], after=3)
    assert hold is not None and "worse 1.5" in hold.reason


def test_a_retry_after_not_enough_evidence_waits_for_the_labels_the_gate_asked_for():
    trigger_at = NOW - timedelta(hours=2)
    short = event("gate_decision", 1, passed=False, outcome="not_enough_evidence",
                  evidence={"holdout_items": 60, "holdout_required": 160})
    assert labels_awaited(short, trigger_at, 0.25, 20) == 400  # 100 more holdout items at 1 in 4 labels
    tiny = event("gate_decision", 1, passed=False, outcome="not_enough_evidence",
                 evidence={"holdout_items": 5, "holdout_required": 900})
    assert labels_awaited(tiny, trigger_at, 0.25, 20) == 60  # first up to min_holdout, then the power rule
    assert labels_awaited(event("gate_decision", 1, passed=False, outcome="reject"), trigger_at, 0.25, 20) is None
    assert labels_awaited(short, NOW, 0.25, 20) is None  # a retrain triggered since: it has the labels
    assert labels_awaited(None, None, 0.25, 20) is None
