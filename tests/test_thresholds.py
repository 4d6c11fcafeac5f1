"""The monitor's calibrated decision: fitted once per champion, stored with its MLflow run, Evidently kept beside it."""

import numpy as np
import pytest

from control import models
from monitoring import thresholds
from monitoring.calibration import Calibration
from monitoring.drift import DriftReport
from monitoring.monitor import DriftMonitor
from monitoring.thresholds import Calibrations, artifact_name, decide, null_samples, per_day
from tests import test_monitor
from tests.test_calibration import WINDOW, features
from tests.test_monitor import log_predictions

champion, served = test_monitor.champion, test_monitor.served  # the monitor tests' fixtures: a registered champion


def test_null_samples_leave_a_few_draws_beyond_each_threshold():
    assert null_samples(0.001) == 15_000 and null_samples(0.0003) == 50_000
    assert null_samples(0.05) == 1_000  # never fewer than 1,000
    assert null_samples(thresholds.MIN_RATE) <= 50_000
    for bad in (thresholds.MIN_RATE / 2, 0.0, 1.0):
        with pytest.raises(ValueError, match="monitor.false_alarm_rate"):
            null_samples(bad)
    assert artifact_name(200, 0.001) == "drift/calibration-w200-r0.001-n15000.json"
    assert per_day(0.001, 200, 1.0) == pytest.approx(1.728) and per_day(0.001, 200, 10.0) == pytest.approx(17.28)


class Artifacts:
    """A run's artifacts as a dict, counting the reads and writes."""

    def __init__(self):
        self.files, self.loads, self.saves = {}, 0, 0

    def load(self, run_id, name):
        self.loads += 1
        return self.files.get((run_id, name))

    def save(self, run_id, name, value):
        self.saves += 1
        self.files[(run_id, name)] = value


def test_a_calibration_is_fitted_once_per_run_and_read_back_after(monkeypatch):
    reference, artifacts, said = features(1_000, np.random.default_rng(0)), Artifacts(), []
    first = Calibrations(WINDOW, 0.05, artifacts.load, artifacts.save, said.append)
    fitted = first.get("run-1", reference)
    assert isinstance(fitted, Calibration) and artifacts.saves == 1 and "calibrating" in said[0]
    assert said[0].endswith("false alarms <= 0.05 a decision, one decision per 50 new predictions: <= 86.4 a day "
                           "at 1 request/s")
    assert first.get("run-1", reference) is fitted and artifacts.loads == 1  # kept in memory

    monkeypatch.setattr(Calibration, "fit", lambda *a, **k: pytest.fail("fitted again"))
    again = Calibrations(WINDOW, 0.05, artifacts.load, artifacts.save, said.append).get("run-1", reference)
    assert again.thresholds() == fitted.thresholds() and artifacts.saves == 1  # a restarted monitor reads it


def test_a_reference_too_small_to_calibrate_leaves_evidently_deciding_and_says_why():
    artifacts, said = Artifacts(), []
    why = Calibrations(WINDOW, 0.05, artifacts.load, artifacts.save, said.append).get(
        "run-2", features(300, np.random.default_rng(1)))
    assert why == "reference: 300 rows, need at least 400 (and comparison_rows >= window_size) to calibrate " \
                  "windows of 200" and artifacts.saves == 0 and "Evidently's rule decides" in said[-1]
    report = decide(DriftReport(True, 0.5, {}, [], 0.1, True, WINDOW, 300, "now"), why, None)
    assert report.drifted and report.decided_by == "evidently" and report.calibration_error == why


def test_the_calibrated_decision_replaces_evidently_s_verdict_and_keeps_it_beside():
    calibration = Calibration.fit(features(2_000, np.random.default_rng(2)), WINDOW, 0.01, seed=0)
    shifted = features(WINDOW, np.random.default_rng(3), emb_shift={0: 1.0})
    report = decide(DriftReport(False, 0.0, {}, [], 0.0, False, WINDOW, 2_000, "now"), calibration, shifted)
    assert report.drifted and report.evidently_drifted is False and report.decided_by == "calibrated"
    assert "embedding_mmd2" in report.calibrated["fired"] and report.to_dict()["calibrated"]["window_size"] == WINDOW


def test_the_monitor_stores_the_calibration_with_the_champions_run_and_a_new_monitor_reads_it(served, capsys):
    settings, store, model, data, version = served
    held_out = np.concatenate([data.split("test")[0], data.split("val")[0]])
    log_predictions(store, model, held_out[:80], version)
    store.flush()
    first = DriftMonitor(settings, store=store).check_once()
    assert first.report.decided_by == "calibrated" and not first.report.drifted
    assert first.report.calibrated["false_alarm_rate"] == settings.monitor.false_alarm_rate

    run_id = models.champion(settings)["run_id"]
    stored = models.calibration(run_id, artifact_name(80, settings.monitor.false_alarm_rate))
    assert stored is not None and stored["window_size"] == 80
    capsys.readouterr()
    second = DriftMonitor(settings, store=store)
    second.check_once()
    assert "calibrating" not in capsys.readouterr().out
    assert second.calibrations.get(run_id, None).to_dict() == stored


def test_with_a_reference_too_small_for_the_window_evidently_decides_from_min_window(served, monkeypatch):
    settings, store, model, data, version = served
    monkeypatch.setattr(settings.monitor, "window_size", 100)  # the reference's 160 rows calibrate windows <= 80
    log_predictions(store, model, 255 - data.split("test")[0][:60], version)
    store.flush()
    outcome = DriftMonitor(settings, store=store).check_once()
    assert outcome.status == "checked" and outcome.report.drifted and outcome.report.decided_by == "evidently"
    assert "need at least 200" in outcome.report.calibration_error


def test_a_short_window_waits_in_the_loop_but_a_report_asked_for_gets_evidentlys_verdict(served):
    settings, store, model, data, version = served
    log_predictions(store, model, 255 - data.split("test")[0][:60], version)
    store.flush()
    monitor = DriftMonitor(settings, store=store)
    assert monitor.check_once().status == "waiting for 80 predictions of v1 (a calibrated check takes full windows)"
    asked = monitor.report_now()
    assert asked.status == "checked" and asked.report.decided_by == "evidently" and asked.report.html_path
    assert asked.report.calibration_error == "a calibrated check takes 80 predictions, the window has 60"
