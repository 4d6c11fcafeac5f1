"""The drift monitor: checks of live traffic (calibrated tests beside Evidently's), watches between them, and
the retrain triggers. monitoring/actor.py runs it in Ray."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import pandas as pd

from cluster import storage
from cluster.settings import MonitorSettings, Settings
from control import models
from control import retrain as retrain_control
from monitoring import estimate
from monitoring.drift import DriftReport, DriftSettings, check_drift, save_report
from monitoring.guardrails import Hold, breaker_hold, budget_hold, decide_trigger, labels_awaited
from monitoring.thresholds import Calibrations, decide
from store import LOOP_EVENTS, Event, Store, retention

ACTOR = "drift-monitor"


def drift_settings(monitor: MonitorSettings) -> DriftSettings:
    """The drift rule from the monitor settings."""
    return DriftSettings(window_size=monitor.window_size, min_window=monitor.min_window,
                         column_threshold=monitor.column_threshold, drift_share=monitor.drift_share,
                         embedding_threshold=monitor.embedding_threshold,
                         require_embedding_drift=monitor.require_embedding_drift)


def prune_reports(folder: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` reports (names sort by time) in a folder or under a URI."""
    saved = storage.names(folder)
    for suffix in (".html", ".json"):
        for old in [n for n in saved if n.endswith(suffix)][:-keep or None] if keep > 0 else []:
            storage.delete(folder, old)


@dataclass
class CheckOutcome:
    """One pass of the monitor: the drift report (if a check ran) and the trigger (if one fired)."""

    status: str
    report: DriftReport | None
    trigger: str | None
    model_version: str | None
    feedback_since: int


class DriftMonitor:
    """Checks the serving champion's recent predictions against its reference; fires triggers."""

    def __init__(self, settings: Settings, request: Callable[[str, dict], str] | None = None,
                 store: Store | None = None):
        self.settings = settings
        self.store = store or Store.from_settings(settings)
        # request(trigger, details) -> job id: asks for a retrain (control.retrain.request); RetrainBusy if one runs.
        self.request = request
        self._reference: tuple[str, pd.DataFrame] | None = None
        rule = settings.monitor
        self.calibrations = Calibrations(rule.window_size, rule.false_alarm_rate, models.calibration,
                                         models.save_calibration)
        self._window: tuple[str, frozenset] | None = None  # (version, prediction ids) of the last window checked
        self._watched: tuple[str, frozenset] | None = None  # ... and of the last window a watch decided on
        self._estimator: tuple[str, estimate.AccuracyEstimator | str] | None = None  # (version, estimator)
        self._serving: tuple[str, str] | None = None  # (version, run id) of the champion the last check saw
        # (version, newest prediction id) the last check saw, and its report: an unchanged window keeps its verdict.
        self._checked: tuple[tuple[str, str], DriftReport] | None = None
        # When the last Evidently report was saved, and by which check (monotonic s, report).
        self._reported: tuple[float, DriftReport] | None = None
        self._pruned_at: float | None = None  # monotonic s of the last retention pass
        # The error of the current run of failed checks and when it was last audited (monotonic s).
        self._failing: tuple[str, float] | None = None
        self._holding: str | None = None  # the guardrail holding automatic retrains, as last audited
        self._merged: str | None = None   # the running retrain the last busy trigger was folded into
        # The loop's checks and a report asked for through the API must not interleave.
        self._lock = threading.Lock()
        self.gauges = _gauges()

    def reference(self, version: str, run_id: str) -> pd.DataFrame:
        """The champion's drift reference (cached per version)."""
        if self._reference is None or self._reference[0] != version:
            self._reference = (version, models.reference(run_id))
        return self._reference[1]

    def last_trigger_at(self) -> datetime | None:
        """When the last retrain was triggered (by anything), from the audit trail."""
        events = self.store.list_audit(limit=1, event_name=Event.RETRAIN_TRIGGERED)
        return events[0].at if events else None

    def window(self, version: str) -> pd.DataFrame:
        """Drift features of the latest predictions made by this model version."""
        return self._latest(version)[1]

    def _latest(self, version: str) -> tuple[frozenset, pd.DataFrame]:
        """(prediction ids, drift features) of the latest predictions made by this model version."""
        latest = [p for p in self.store.list_predictions(limit=self.settings.monitor.window_size * 3)
                  if p.model_version == version and p.features][: self.settings.monitor.window_size]
        return frozenset(p.id for p in latest), pd.DataFrame([p.features for p in latest])

    def check_once(self) -> CheckOutcome:
        """One drift check plus trigger evaluation; every outcome goes to the audit trail."""
        self.export_loop_events()
        champion = models.champion(self.settings)
        if champion is None:
            return CheckOutcome("no champion", None, None, None, 0)
        version = champion["version"]
        self._serving = (version, champion["run_id"])
        last = self.last_trigger_at()
        feedback_since = self.store.count_feedback(since=last)
        seconds_since = (datetime.now(timezone.utc) - last).total_seconds() if last else None
        report, status = self.check_window(version, champion["run_id"])
        gates = self.store.list_audit(limit=1, event_name=Event.GATE_DECISION)
        awaited = labels_awaited(gates[0] if gates else None, last, self.settings.tune.feedback_holdout_fraction,
                                 self.settings.gate.min_holdout)
        estimated = (report.estimated_accuracy or {}).get("accuracy") if report else None
        trigger = decide_trigger(bool(report and report.drifted), feedback_since, seconds_since,
                                 self.settings.monitor, awaited, estimated)
        hold = self.hold()
        self._export_hold(hold)
        if trigger and self.request is not None:
            trigger = self._held(trigger, hold) if hold else self._fire(trigger, feedback_since, report)
        if hold is None:
            self._holding = None
        return CheckOutcome(status, report, trigger, version, feedback_since)

    def watch(self) -> bool:
        """Between checks: the calibrated tests alone on the latest window once a quarter of it is new since
        the last decision (a check's or a watch's). A few ms, nothing recorded; True when it drifted (the loop
        then runs the full check at once). The champion is the last check's: a new one waits for the next."""
        with self._lock:
            if self._serving is None:
                return False
            version, run_id = self._serving
            newest = self.store.list_predictions(limit=1)
            decided = [seen for v, seen in filter(None, (self._window, self._watched)) if v == version]
            if not newest or any(newest[0].id in seen for seen in decided):
                return False  # nothing new since the last decision
            calibration = self.calibrations.get(run_id, self.reference(version, run_id))
            size = self.settings.monitor.window_size
            if isinstance(calibration, str):  # Evidently's rule decides, at the checks
                return False
            ids, window = self._latest(version)
            if len(window) < size or min((len(ids - seen) for seen in decided), default=size) < size // 4:
                return False
            self._watched = (version, ids)
            return calibration.check(window).drift

    def hold(self) -> Hold | None:
        """The guardrail holding automatic retrains now, if any: from a few of the newest audit events."""
        rule = self.settings.monitor
        triggered = self.store.list_audit(limit=2 * rule.max_retrains_per_day + 10, event_name=Event.RETRAIN_TRIGGERED)
        hold = budget_hold(triggered, datetime.now(timezone.utc), rule.max_retrains_per_day)
        if hold is None and rule.breaker_failed_gates > 0:
            hold = breaker_hold(self.store.list_audit(limit=rule.breaker_failed_gates + 20,
                                                    event_name=Event.GATE_DECISION),
                                self.store.list_audit(limit=1, event_name=Event.BREAKER_RESET),
                                rule.breaker_failed_gates)
        return hold

    def _held(self, trigger: str, hold: Hold) -> str:
        if self._holding != hold.kind:  # audited when a hold begins, not at every check while it lasts
            self.store.audit(ACTOR, Event.RETRAIN_HELD, {"trigger": trigger, **hold.as_dict()})
            self._holding = hold.kind
        return f"{trigger} (held: {hold.reason})"

    def check_or_record(self) -> CheckOutcome | str:
        """check_once, or the error it raised, recorded (record_failure): the loop never stops on one."""
        try:
            outcome = self.check_once()
        except Exception as exc:  # noqa: BLE001 - a failed check is reported, and the next one runs
            return self.record_failure(exc)
        self._failing = None
        try:
            self.prune_if_due()
        except Exception as exc:  # noqa: BLE001 - retention runs again next interval; the check stands
            print(f"[monitor] pruning old predictions failed: {type(exc).__name__}: {exc}", flush=True)
        return outcome

    def prune_if_due(self) -> tuple[int, int] | None:
        """Retention, every store.prune_interval_s: predictions older than store.retention_days and their
        images go unless feedback refers to them (Store.prune), then the oldest unlabelled images while they
        take more than store.max_image_gb (cap_images); counted in rayloop_pruned_total by kind."""
        days, cap = self.settings.store.retention_days, self.settings.store.max_image_gb
        now = time.monotonic()
        if (days <= 0 and cap <= 0) or (self._pruned_at is not None
                                        and now - self._pruned_at < self.settings.store.prune_interval_s):
            return None
        self._pruned_at = now
        rows = images = 0
        if days > 0:
            rows, images = self.store.prune(datetime.now(timezone.utc) - timedelta(days=days))
        self.store.analyze()  # the row estimate history totals use past 10,000 rows
        if cap > 0:
            images += self.store.cap_images(int(cap * 2**30))
        retention.count_pruned(retention.PREDICTIONS, rows)
        retention.count_pruned(retention.IMAGES, images)
        if rows:
            print(f"[monitor] retention: deleted {rows} predictions older than {days:g} days and {images} images",
                  flush=True)
        return rows, images

    def record_failure(self, exc: BaseException) -> str:
        """A check that raised: counted in rayloop_drift_check_failures_total, and audited as drift_check_failed
        (so `/v1/drift` says it failed) when the error is new, then at most every monitor.report_interval_s
        while it lasts: a store down for a day adds a few hundred events, not one per check."""
        error = f"{type(exc).__name__}: {exc}"[:500]
        if self.gauges is not None:
            self.gauges["failures"].inc()
        now = time.monotonic()
        if self._failing is None or self._failing[0] != error \
                or now - self._failing[1] >= self.settings.monitor.report_interval_s:
            try:
                self.store.audit(ACTOR, Event.DRIFT_CHECK_FAILED, {"error": error})
                self._failing = (error, now)
            except Exception as audit_exc:  # noqa: BLE001 - the store may be what failed; the metric counted it
                print(f"[monitor] drift check failed ({error}); could not audit it: {audit_exc}", flush=True)
        return error

    def report_now(self) -> CheckOutcome:
        """Check the latest window now and save Evidently's report whatever the verdict (the API's
        `/v1/drift?report=1`); a window already reported on is not computed again. Fires no trigger."""
        champion = models.champion(self.settings)
        if champion is None:
            return CheckOutcome("no champion", None, None, None, 0)
        report, status = self.check_window(champion["version"], champion["run_id"], report=True)
        return CheckOutcome(status, report, None, champion["version"], 0)

    def check_window(self, version: str, run_id: str, report: bool | None = None) -> tuple[DriftReport | None, str]:
        """The drift check of the latest window, unless it is the window the last check saw (idle traffic):
        then that check's report stands (labels may still arrive for it) and nothing is recomputed.

        `report`: True saves Evidently's report of this window whatever the verdict; None (the loop) saves
        one only when due (see _report_due); a drifted check without one links its drift episode's last."""
        with self._lock:
            return self._check_window(version, run_id, report)

    def _check_window(self, version: str, run_id: str, report: bool | None) -> tuple[DriftReport | None, str]:
        newest = self.store.list_predictions(limit=1)
        seen = (version, newest[0].id) if newest else None
        if seen is not None and self._checked is not None and self._checked[0] == seen \
                and (not report or (self._reported is not None and self._reported[1] is self._checked[1])):
            return self._checked[1], "no new predictions since the last check"
        ids, window = self._latest(version)
        size = self.settings.monitor.window_size
        if len(window) < self.settings.monitor.min_window:
            return None, f"waiting for {self.settings.monitor.min_window} predictions of v{version}"
        reference = self.reference(version, run_id)
        calibration = self.calibrations.get(run_id, reference)
        if not isinstance(calibration, str):
            if len(window) < size and not report:
                return None, f"waiting for {size} predictions of v{version} (a calibrated check takes full windows)"
            if len(window) < size:  # a report asked for: Evidently's rule decides a window this short
                calibration = f"a calibrated check takes {size} predictions, the window has {len(window)}"
            # A quarter of a window new at least: checks of nearly the same rows would add chances of a false
            # alarm, not evidence (monitor.false_alarm_rate is per check).
            fresh = len(ids - self._window[1]) if self._window is not None and self._window[0] == version else size
            if fresh < size // 4 and self._checked is not None and not report:
                return self._checked[1], f"{fresh} new predictions since the last check, which needs {size // 4}"
        rule = drift_settings(self.settings.monitor)
        outcome = decide(check_drift(reference, window, rule), calibration, window)
        self._estimate(outcome, version, reference, window)
        self._window = (version, ids)
        if report or (report is None and self._report_due(outcome)):
            save_report(reference, window, outcome, rule, self.settings.shared_root)
            self._reported = (time.monotonic(), outcome)
        elif outcome.drifted and self._reported is not None:
            # The same drift episode: its latest report (at most monitor.report_interval_s old) stands.
            outcome.html_path, outcome.json_path = self._reported[1].html_path, self._reported[1].json_path
        self.store.audit(ACTOR, Event.DRIFT_CHECK, {**outcome.to_dict(), "model_version": version})
        self._export(outcome)
        prune_reports(self.settings.reports_root, self.settings.monitor.keep_reports)
        self._checked = (seen, outcome) if seen is not None else None
        return outcome, "checked"

    def _estimate(self, outcome: DriftReport, version: str, reference: pd.DataFrame, window: pd.DataFrame) -> None:
        """The window's accuracy estimated from its confidences, by the champion's estimator (cached)."""
        if self._estimator is None or self._estimator[0] != version:
            self._estimator = (version, estimate.from_reference(reference))
        estimator = self._estimator[1]
        if isinstance(estimator, str):
            outcome.estimate_error = estimator
        else:
            outcome.estimated_accuracy = estimator.estimate(window[estimate.CONFIDENCE].to_numpy()).as_dict()

    def _report_due(self, outcome: DriftReport) -> bool:
        """Evidently's report (1-2 s of CPU) is built for a window that drifted when the drift is new (the
        last check was calm), and then at most every monitor.report_interval_s while it lasts."""
        if not outcome.drifted:
            return False
        last_check = self._checked[1] if self._checked is not None else None
        if last_check is None or not last_check.drifted or self._reported is None:
            return True
        return time.monotonic() - self._reported[0] >= self.settings.monitor.report_interval_s

    def _fire(self, trigger: str, feedback_since: int, report: DriftReport | None) -> str | None:
        try:
            self.request(trigger, {"feedback_since_last": feedback_since,
                                   "drift_share": report.share if report else None})
        except retrain_control.RetrainBusy as busy:
            # Folded into the running retrain: no second one starts, and labels that came after it began
            # count toward the next trigger. Recorded once per running retrain, not at every check.
            if self._merged != str(busy):
                self.store.audit(ACTOR, Event.RETRAIN_MERGED, {"trigger": trigger, "into": str(busy)})
                self._merged = str(busy)
            return f"{trigger} (merged into the running retrain: {busy})"
        self._merged = None
        return trigger

    def _export_hold(self, hold: Hold | None) -> None:
        if self.gauges is not None:
            for kind in ("budget", "breaker"):
                self.gauges["held"].set(1.0 if hold is not None and hold.kind == kind else 0.0, tags={"kind": kind})

    def _export(self, report: DriftReport) -> None:
        if self.gauges is None:
            return
        self.gauges["share"].set(report.share)
        self.gauges["drifted"].set(1.0 if report.drifted else 0.0)
        self.gauges["embedding"].set(report.embedding_score)
        for column, score in report.scores.items():
            self.gauges["score"].set(score, tags={"feature": column})
        for name, test in (report.calibrated or {}).get("statistics", {}).items():  # p-values, as the columns'
            self.gauges["score"].set(test["p_value"], tags={"feature": f"calibrated_{name}"})
        if report.estimated_accuracy is not None:
            self.gauges["estimated"].set(report.estimated_accuracy["accuracy"])

    def export_loop_events(self) -> None:
        """Set the loop-event gauges to the counts in the audit trail (part of every check)."""
        # Counted from the audit trail, which every process of the loop (retrain jobs, the API's
        # rollback) writes to: a short-lived job's own metrics would vanish when it exits.
        if self.gauges is None:
            return
        for event in LOOP_EVENTS:
            self.gauges["events"].set(self.store.count_audit(event), tags={"event": event})

    def close(self) -> None:
        self.store.close()


def _gauges() -> dict | None:
    """Ray metrics (exported to Prometheus by Ray) when running inside Ray, else None."""
    import ray

    if not ray.is_initialized():
        return None
    from ray.util.metrics import Counter, Gauge

    return {
        "share": Gauge("rayloop_drift_share", "Share of drift features whose test says drift"),
        "drifted": Gauge("rayloop_drift_detected", "1 when the latest drift check reported drift"),
        "embedding": Gauge("rayloop_drift_embedding_mmd", "MMD^2 of the embedding components vs reference"),
        "score": Gauge("rayloop_drift_feature_pvalue", "Drift test p-value per feature", tag_keys=("feature",)),
        "events": Gauge("rayloop_loop_events", "Loop events so far (retrains, promotions, rollbacks) by name",
                        tag_keys=("event",)),
        "failures": Counter("rayloop_drift_check_failures_total", "Drift checks that raised an error"),
        "estimated": Gauge("rayloop_estimated_accuracy",
                           "Serving model's accuracy on the latest window, estimated from its confidence"),
        "held": Gauge("rayloop_auto_retrain_held", "1 while a guardrail (budget, breaker) holds automatic retrains",
                      tag_keys=("kind",)),
    }
