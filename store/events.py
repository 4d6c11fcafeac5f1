"""The audit trail's vocabulary: every event name any part of rayloop writes, in one place."""

from __future__ import annotations

from enum import StrEnum


class Event(StrEnum):
    """Audit event names (stored as their string values)."""

    FEEDBACK = "feedback"
    FEEDBACK_ERASED = "feedback_erased"
    DRIFT_CHECK = "drift_check"
    DRIFT_CHECK_FAILED = "drift_check_failed"
    RETRAIN_TRIGGERED = "retrain_triggered"
    RETRAIN_STARTED = "retrain_started"
    RETRAIN_FINISHED = "retrain_finished"
    RETRAIN_FAILED = "retrain_failed"
    RETRAIN_INTERRUPTED = "retrain_interrupted"
    TRIALS_FINISHED = "trials_finished"
    GATE_DECISION = "gate_decision"
    PROMOTED = "promoted"
    ROLLOUT_STARTED = "rollout_started"
    ROLLOUT_FINISHED = "rollout_finished"
    ROLLOUT_FAILED = "rollout_failed"
    ROLLOUT_SKIPPED = "rollout_skipped"
    ROLLBACK = "rollback"
    ROLLOUT_STAGE = "rollout_stage"                # a staged rollout entered shadow or a canary step
    ROLLOUT_ROLLED_BACK = "rollout_rolled_back"    # a staged rollout ended without promotion: breach or abort
    RETRAIN_HELD = "retrain_held"          # an automatic trigger held back by a guardrail (budget, breaker)
    RETRAIN_MERGED = "retrain_merged"      # a trigger that came while a retrain ran: folded into that one
    BREAKER_RESET = "breaker_reset"


# How a retrain ended; a retrain job that ended without one of these was killed or crashed.
RETRAIN_ENDINGS = (Event.RETRAIN_FINISHED, Event.RETRAIN_FAILED, Event.RETRAIN_INTERRUPTED)
# The loop's milestones, exported as counts so dashboards can mark retrains and promotions in time.
LOOP_EVENTS = (Event.RETRAIN_TRIGGERED, Event.RETRAIN_STARTED, Event.RETRAIN_FINISHED, Event.RETRAIN_FAILED,
               Event.PROMOTED, Event.ROLLOUT_FINISHED, Event.ROLLBACK, Event.ROLLOUT_STAGE,
               Event.ROLLOUT_ROLLED_BACK)
