"""The benchmark's traps: clean traffic whose labels must not make the loop promote, nor look like drift.

`random-labels`: every label drawn uniformly from the classes (so about a tenth agree with the truth): a model
retrained on them must not pass the gate. `clean-labels`: true labels on clean digits the champion already
gets right: nothing to gain, and clean traffic is where false alarms are counted. Both send clean digits with
labels for 80% of them; 400 labels (monitor.feedback_threshold) trigger a retrain without any drift.
"""

from __future__ import annotations

import time

import numpy as np

from simulation.bench_loop import GATE_OUTCOMES, Mark, Scenario, TrafficSets, labels_in, retrain_of, trap_finished
from simulation.scenario import BackgroundLoad, audit_marks, baseline_notes, loop_progress, settle, user_round
from store import Event, Store
from store.events import RETRAIN_ENDINGS

WAIT_POLL_S = 10   # while the first retrain runs after the last digit
WAIT_LOG_S = 60


def run_trap(url: str, store: Store, sets: TrafficSets, classes: list[str], scenario: Scenario,
             background: BackgroundLoad, *, window_size: int, timeout_s: float, samples: int = 5000,
             round_size: int = 50, pause_s: float = 3.0, feedback_share: float = 0.8, seed: int = 1, log=print) -> dict:
    """`samples` clean digits in rounds, labelled, then wait for the first retrain (if one was triggered) to end,
    or the timeout; returns the trap's measurements."""
    baseline = settle(store, background, window_size, log=log)
    t0, deadline, background_at_t0 = time.time(), time.monotonic() + timeout_s, background.sent
    rng = np.random.default_rng(seed)
    sent = labels = failed = 0
    all_sent_at, logged = None, time.monotonic()
    while time.monotonic() < deadline:
        if sent < samples:
            size = min(round_size, samples - sent)
            given = rng.integers(0, len(classes), size) if scenario.trap == "random-labels" else None
            rnd = user_round(url, sets.user, classes, shift="none", severity=None, sent_before=sent, size=size,
                             feedback_share=feedback_share, labels=given)
            time.sleep(pause_s)
            sent, labels = sent + rnd.sent, labels + rnd.feedback_sent - rnd.feedback_failed
            failed += rnd.failed + rnd.feedback_failed
            all_sent_at = time.time() if sent >= samples else None
            log(f"[bench-loop]   {sent} clean sent, {labels} labels, {loop_progress(store, t0)}, "
                f"background {background.sent} sent {background.failed} failed, {time.time() - t0:.0f}s")
            continue
        if finished(store, t0, all_sent_at):
            break
        if time.monotonic() - logged >= WAIT_LOG_S:
            logged = time.monotonic()
            log(f"[bench-loop]   all {samples} sent; waiting for the first retrain to end: {loop_progress(store, t0)}, "
                f"{time.time() - t0:.0f}s")
        time.sleep(WAIT_POLL_S)
    row = trap_outcome(store, t0, finished_sending=sent >= samples, timed_out=time.monotonic() >= deadline)
    row.update(user_sent=sent, samples_target=samples, labels_sent=labels, user_failed=failed)
    row["notes"] += baseline_notes(baseline)
    seen = sent + background.sent - background_at_t0
    row["notes"].append(f"the checks saw {sent:,} clean user and {background.sent - background_at_t0:,} clean "
                        f"background requests")
    # The monitor decides (a check or a watch) once a quarter window is new: each a chance of a false alarm.
    row["decisions"] = seen // max(1, window_size // 4)
    return row


def finished(store: Store, t0: float, all_sent_at: float) -> bool:
    """All digits sent, and the first retrain (if any was triggered) ended."""
    endings = [m for name in RETRAIN_ENDINGS for m in audit_marks(store, name, t0)]
    return trap_finished(audit_marks(store, Event.RETRAIN_TRIGGERED, t0), endings,
                         audit_marks(store, Event.DRIFT_CHECK, all_sent_at), time.time())


def trap_outcome(store: Store, t0: float, *, finished_sending: bool, timed_out: bool) -> dict:
    """The audit trail's side of a trap: false alarms among all checks, whether anything was promoted, and the
    first gate with the labels its retrain used."""
    checks = audit_marks(store, Event.DRIFT_CHECK, t0)
    promotions = audit_marks(store, Event.PROMOTED, t0)
    gates = audit_marks(store, Event.GATE_DECISION, t0)
    started = audit_marks(store, Event.RETRAIN_STARTED, t0)
    triggered = audit_marks(store, Event.RETRAIN_TRIGGERED, t0)
    gate = gates[0] if gates else None
    retrain = retrain_of(gate, started) if gate else (started[0] if started else None)
    row = {"false_alarms": sum(1 for c in checks if c.details.get("drifted")), "drift_checks": len(checks),
           "promoted": bool(promotions), "labels_used": labels_in(retrain),
           "retrain_search": retrain.details.get("search") if retrain else None,
           "outcome": trap_ending(gate, promotions, finished_sending, timed_out, bool(triggered)),
           "gate_outcome": gate.details.get("outcome") if gate else None,
           "gate_reason": gate.details.get("reason") if gate else None,
           "notes": [f"retrains triggered: {len(triggered)} "
                     f"({', '.join(str(t.details.get('trigger')) for t in triggered) or 'none'})"]}
    if promotions:
        row["champion_after"] = str(promotions[-1].details.get("version"))
    failures = [m for name in (Event.RETRAIN_FAILED, Event.RETRAIN_INTERRUPTED) for m in audit_marks(store, name, t0)]
    row["notes"] += [f"a retrain ended without a gate: {str(f.details)[:300]}" for f in failures]
    return row


def trap_ending(gate: Mark | None, promotions: list[Mark], finished_sending: bool, timed_out: bool,
                triggered: bool) -> str:
    """How a trap ended, in the table's words."""
    if promotions:
        return "promoted"
    if gate is not None:
        return GATE_OUTCOMES.get(gate.details.get("outcome"), str(gate.details.get("outcome")))
    if timed_out:
        return "timeout"
    return "retrain failed" if triggered and finished_sending else "no retrain"
