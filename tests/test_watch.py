"""Watches between the monitor's checks: the calibrated tests alone on each window with a quarter new, and the
actor's loop that runs the full check at once when one drifts."""

import threading
import time
from types import SimpleNamespace

import numpy as np

from cluster.settings import MonitorSettings, load_settings
from monitoring import actor
from monitoring.monitor import DriftMonitor
from store import Event
from tests import test_monitor
from tests.test_monitor import log_predictions

champion, served = test_monitor.champion, test_monitor.served  # a registered champion; windows of 80


def served_digits(served, images) -> None:
    """The champion's predictions on these digits, written to the store."""
    _, store, model, _, version = served
    log_predictions(store, model, images, version)
    store.flush()


def held_out(data) -> np.ndarray:
    return np.concatenate([data.split("test")[0], data.split("val")[0]])


def test_a_watch_decides_once_a_quarter_window_is_new_and_records_nothing(served):
    settings, store, _, data, _ = served
    clean = held_out(data)
    monitor = DriftMonitor(settings, store=store)
    served_digits(served, clean[:80])
    assert not monitor.watch()  # no check yet: the watch knows no champion
    calm = monitor.check_once()
    assert calm.report.decided_by == "calibrated" and not calm.report.drifted
    audited = store.count_audit(Event.DRIFT_CHECK)
    assert not monitor.watch()  # nothing new since the check

    served_digits(served, 255 - clean[:15])  # inverted, but 15 < 80 / 4 new
    assert not monitor.watch() and monitor._watched is None
    served_digits(served, 255 - clean[15:40])  # 40 of the 80 now inverted
    assert monitor.watch()
    assert store.count_audit(Event.DRIFT_CHECK) == audited  # a watch records nothing; the check it calls for does
    assert not monitor.watch()  # that window is decided: the next watch waits for a quarter more

    drifted = monitor.check_once()
    assert drifted.report.drifted and drifted.report.decided_by == "calibrated"
    assert store.count_audit(Event.DRIFT_CHECK) == audited + 1


def test_a_watch_of_a_clean_window_keeps_quiet(served):
    settings, store, _, data, _ = served
    clean = held_out(data)
    monitor = DriftMonitor(settings, store=store)
    served_digits(served, clean[:80])
    monitor.check_once()
    served_digits(served, clean[80:120])
    assert not monitor.watch() and monitor._watched is not None  # decided: no drift


class ScriptedMonitor:
    """What actor.run needs of a DriftMonitor: watches answer from a script, checks are counted."""

    def __init__(self, watches: list[bool], **rule):
        self.settings = SimpleNamespace(monitor=MonitorSettings(**rule))
        self.watches, self.watched, self.checks = list(watches), 0, []

    def watch(self) -> bool:
        self.watched += 1
        return self.watches.pop(0) if self.watches else False

    def check_or_record(self):
        self.checks.append(time.monotonic())
        return "store down" if len(self.checks) == 1 else SimpleNamespace(
            status="checked", trigger=None, model_version="1", report=None)


def run_until(monitor: ScriptedMonitor, done, seconds: float = 20.0) -> dict:
    """Run the loop until done() or `seconds` (far below the scripted 60 s interval), then stop it."""
    record, stop = {}, threading.Event()
    loop = threading.Thread(target=actor.run, args=(monitor, record, stop), daemon=True)
    loop.start()
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    loop.join(5)
    assert not loop.is_alive()
    return record


def test_the_loop_checks_when_due_and_at_once_when_a_watch_drifts():
    monitor = ScriptedMonitor([False, True], interval_s=60.0, watch_interval_s=0.25)
    record = run_until(monitor, lambda: len(monitor.checks) == 2)
    # The first check at start; the second called for by the second watch, long before the 60 s interval.
    assert len(monitor.checks) == 2 and monitor.watched >= 2
    assert 0.4 <= monitor.checks[1] - monitor.checks[0] < 30
    assert record == {"status": "checked", "trigger": None, "model_version": "1", "at": record["at"],
                      "drifted": None}


def test_without_watches_the_loop_only_checks_every_interval():
    monitor = ScriptedMonitor([True], interval_s=60.0, watch_interval_s=0.0)
    record = run_until(monitor, lambda: False, seconds=1.0)
    assert len(monitor.checks) == 1 and monitor.watched == 0 and record["status"] == "error: store down"


def test_sleeps_and_what_up_says():
    assert actor.wait_s(10.0, 25.0, 2.0) == 2.0 and actor.wait_s(24.0, 25.0, 2.0) == 1.0
    assert actor.wait_s(10.0, 25.0, 0.0) == 15.0 and actor.wait_s(30.0, 25.0, 2.0) == 0.0
    settings = load_settings({"RAYLOOP_MONITOR_WATCH_INTERVAL_S": "0"})
    assert actor.describe(settings) == "checks every 15s over the last 200 predictions"
    settings.monitor.watch_interval_s = 2.0
    assert actor.describe(settings) == "checks every 15s over the last 200 predictions, watching every 2s for 50 new"
