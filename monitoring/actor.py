"""The drift monitor as a detached Ray actor: full checks every monitor.interval_s, watches in between.

A full check (DriftMonitor.check_once) runs Evidently's tests beside the calibrated ones, records the check
in the audit trail, exports the gauges and fires triggers. Between two, every monitor.watch_interval_s, a
watch (DriftMonitor.watch) runs the calibrated tests alone on the latest window once a quarter of it is new
(a few ms, nothing recorded); when it finds drift the full check runs at once. Under heavy traffic a window
of 200 fills in seconds: without watches, drift would wait up to an interval and the windows in between
would never be looked at.
"""

from __future__ import annotations

import threading
import time

from cluster.settings import Settings
from control import retrain as retrain_control
from control.monitor import ACTOR_NAME, NAMESPACE
from monitoring.monitor import ACTOR, DriftMonitor
from store import Store


def describe(settings: Settings) -> str:
    """What the monitor does, for `rayloop up` and `rayloop monitor`."""
    rule = settings.monitor
    watches = (f", watching every {rule.watch_interval_s:g}s for {rule.window_size // 4} new"
               if rule.watch_interval_s > 0 else "")
    return f"checks every {rule.interval_s:g}s over the last {rule.window_size} predictions{watches}"


def wait_s(now: float, next_check: float, watch_interval_s: float) -> float:
    """Seconds to sleep before the next watch (or the next full check, when sooner or with no watches)."""
    until_check = max(0.0, next_check - now)
    return min(until_check, watch_interval_s) if watch_interval_s > 0 else until_check


def run(monitor: DriftMonitor, record: dict, stop: threading.Event | None = None) -> None:
    """The loop: a full check when due or when a watch found drift; `record` gets the last check's state."""
    rule, stop = monitor.settings.monitor, stop or threading.Event()
    next_check = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_check or _watch(monitor):
            outcome = monitor.check_or_record()
            record.clear()
            if isinstance(outcome, str):
                record.update(status=f"error: {outcome}", at=time.time())
            else:
                record.update(status=outcome.status, trigger=outcome.trigger, model_version=outcome.model_version,
                              at=time.time(), drifted=outcome.report.drifted if outcome.report else None)
            next_check = now + max(1.0, rule.interval_s)
        stop.wait(max(0.2, wait_s(time.monotonic(), next_check, rule.watch_interval_s)))


def _watch(monitor: DriftMonitor) -> bool:
    if monitor.settings.monitor.watch_interval_s <= 0:
        return False
    try:
        return monitor.watch()
    except Exception as exc:  # noqa: BLE001 - the next full check runs (and records) the same work anyway
        print(f"[monitor] watch failed: {type(exc).__name__}: {exc}", flush=True)
        return False


def _actor_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class DriftMonitorActor:
        """Detached actor running the monitor's loop (run); Ray restarts it if it dies."""

        def __init__(self, settings: Settings):
            store = Store.from_settings(settings)
            self.monitor = DriftMonitor(settings, store=store, request=lambda trigger, details: retrain_control.request(
                settings, store, trigger, ACTOR, details))
            self.last: dict = {"status": "starting"}
            # A thread, not a task started by a call: it comes back by itself when Ray restarts the actor.
            threading.Thread(target=run, args=(self.monitor, self.last), name="drift-monitor", daemon=True).start()

        def state(self) -> dict:
            return dict(self.last)

        def report(self) -> dict:
            """control.monitor.report: the latest window checked now, with Evidently's report saved."""
            outcome = self.monitor.report_now()
            return {"status": outcome.status, "model_version": outcome.model_version,
                    "report": outcome.report.to_dict() if outcome.report else None}

    return DriftMonitorActor


def start(settings: Settings):
    """Start (or find: get_if_exists) the detached monitor actor and its loop."""
    return _actor_class().options(name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached",
                                  get_if_exists=True).remote(settings)


def stop() -> bool:
    """Kill the monitor actor if it runs."""
    import ray

    try:
        ray.kill(ray.get_actor(ACTOR_NAME, namespace=NAMESPACE), no_restart=True)
        return True
    except ValueError:
        return False
