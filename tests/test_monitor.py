"""The drift monitor: real store, real MLflow registry, real Evidently; triggers fire once, as documented."""

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import mlflow
import numpy as np
import pytest

from cluster.settings import MonitorSettings, load_settings
from control import retrain
from monitoring.monitor import DriftMonitor, decide_trigger
from store import Store
from tests.support.jobs import FakeJobs, Job
from tests.support.paths import REPO
from train import registry
from train.data import prepare
from train.features import feature_rows
from train.pipeline import finalize, reference_batches
from train.train import build_model
from train.transforms import to_tensor


def requests_to(jobs: FakeJobs, settings, store, monkeypatch):
    """The monitor's way to ask for a retrain, as the monitor actor wires it, with Ray's job service faked."""
    monkeypatch.setattr(retrain, "job_client", lambda _settings: jobs)
    return lambda trigger, details: retrain.request(settings, store, trigger, "drift-monitor", details)


def triggers(jobs: FakeJobs) -> list[str]:
    return [job.metadata["trigger"] for job in jobs.list_jobs()]


RULE = MonitorSettings(min_feedback=10, feedback_threshold=50, schedule_s=0, cooldown_s=0)


def test_drift_with_enough_new_labels_triggers():
    assert decide_trigger(True, 10, None, RULE) == "drift"
    assert decide_trigger(True, 9, None, RULE) is None  # drift alone: wait for labels to learn from


def test_no_second_retrain_within_the_cooldown():
    rule = MonitorSettings(min_feedback=10, cooldown_s=600)
    assert decide_trigger(True, 500, 120.0, rule) is None  # the stream is still shifted, labels keep coming
    assert decide_trigger(True, 500, 700.0, rule) == "drift"
    assert decide_trigger(True, 500, None, rule) == "drift"  # never retrained: no cooldown


def test_not_enough_evidence_retries_within_the_cooldown_once_the_labels_it_asked_for_came():
    rule = MonitorSettings(min_feedback=10, cooldown_s=600)
    assert decide_trigger(True, 199, 120.0, rule, labels_awaited=200) is None
    assert decide_trigger(True, 200, 120.0, rule, labels_awaited=200) == "drift"
    assert decide_trigger(False, 200, 120.0, rule, labels_awaited=200) is None  # still needs a reason to retrain


def test_feedback_volume_and_schedule_trigger_without_drift():
    assert decide_trigger(False, 50, 5.0, RULE) == "feedback"
    scheduled = MonitorSettings(schedule_s=3600, cooldown_s=0)
    assert decide_trigger(False, 0, 4000.0, scheduled) == "schedule"
    assert decide_trigger(False, 0, 60.0, scheduled) is None


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A registered champion (untrained weights are enough to see pixels change), shared by the module's tests."""
    root = tmp_path_factory.mktemp("monitor")
    env = {**os.environ, "RAYLOOP_DATA_DIR": str(root / "data"), "RAYLOOP_PARAMS": str(REPO / "params.yaml"),
           "RAYLOOP_MONITOR_MIN_WINDOW": "40", "RAYLOOP_MONITOR_WINDOW_SIZE": "80",
           "RAYLOOP_MONITOR_MIN_FEEDBACK": "20"}
    settings = load_settings(env)
    data = prepare(settings.data.__class__(limit=800), settings.prepared_dir)
    model = build_model(settings, data)
    reference = finalize(model, reference_batches(settings, data))
    registry.configure(settings)
    with mlflow.start_run():
        version = registry.log_and_register(settings, model, reference, {}).version
    return env, model, data, version


@pytest.fixture
def served(champion, tmp_path):
    """The champion and a store of this test's own: predictions, feedback and audit start empty."""
    env, model, data, version = champion
    settings = load_settings({**env, "RAYLOOP_DATABASE_URL": f"sqlite:///{tmp_path / 'rayloop.db'}"})
    store = Store.from_settings(settings)
    yield settings, store, model, data, version
    store.close()


def log_predictions(store, model, images, version) -> list[str]:
    rows = feature_rows(model.infer(to_tensor(images)), model.classes)
    return [store.log_prediction(model_version=version, label=r["predicted_class"], confidence=r["confidence"],
                                 probabilities={}, features=r) for r in rows]


def test_inverted_traffic_is_flagged_and_triggers_one_retrain(served, monkeypatch):
    settings, store, model, data, version = served
    x_test, _ = data.split("test")
    clean = np.concatenate([x_test, data.split("val")[0]])[:80]
    jobs = FakeJobs()
    monitor = DriftMonitor(settings, store=store, request=requests_to(jobs, settings, store, monkeypatch))

    log_predictions(store, model, clean, version)
    store.flush()
    calm = monitor.check_once()
    assert calm.report is not None and not calm.report.drifted and calm.trigger is None

    ids = log_predictions(store, model, 255 - clean, version)  # inverted digits: a real shift
    for prediction_id in ids[:25]:
        store.add_feedback(prediction_id, "3")
    store.flush()
    shifted = monitor.check_once()

    assert shifted.report.drifted and shifted.report.share >= settings.monitor.drift_share
    assert shifted.trigger == "drift" and triggers(jobs) == ["drift"]
    assert (settings.data_dir / "drift").is_dir() and shifted.report.html_path.endswith(".html")
    events = store.list_audit(limit=10)
    assert [e.event for e in events[:2]] == ["retrain_triggered", "drift_check"]
    assert events[0].details["job"] in jobs.jobs and events[0].details["feedback_since_last"] == 25

    # The labels are now counted as used: the next check does not trigger again.
    again = monitor.check_once()
    assert again.report.drifted and again.trigger is None and triggers(jobs) == ["drift"]


def test_a_busy_retrain_is_not_doubled(served, monkeypatch):
    settings, store, model, data, version = served
    x_test, _ = data.split("test")

    jobs = FakeJobs(Job("retrain-drift-1", "RUNNING", {"kind": retrain.JOB_KIND, "trigger": "drift"}))
    ids = log_predictions(store, model, 255 - np.concatenate([x_test, data.split("val")[0]])[:80], version)
    for prediction_id in ids[:25]:
        store.add_feedback(prediction_id, "1")
    store.flush()
    outcome = DriftMonitor(settings, store=store, request=requests_to(jobs, settings, store, monkeypatch)).check_once()
    assert outcome.trigger == "drift (merged into the running retrain: retrain job retrain-drift-1 is still running)"
    assert list(jobs.jobs) == ["retrain-drift-1"]
    assert not store.list_audit(limit=10, event_name="retrain_triggered")
    [merged] = store.list_audit(limit=10, event_name="retrain_merged")
    assert merged.details["trigger"] == "drift" and "retrain-drift-1" in merged.details["into"]


def test_the_circuit_breaker_holds_automatic_retrains_after_failed_gates_until_reset(served, monkeypatch):
    settings, store, model, data, version = served
    x_test, _ = data.split("test")
    for n in range(3):  # three retrains in a row whose gates kept the champion
        store.audit("retrain-job", "gate_decision", {"passed": False, "reason": f"not better, round {n}"})
    ids = log_predictions(store, model, 255 - np.concatenate([x_test, data.split("val")[0]])[:80], version)
    for prediction_id in ids[:25]:
        store.add_feedback(prediction_id, "1")
    store.flush()
    jobs = FakeJobs()
    monitor = DriftMonitor(settings, store=store, request=requests_to(jobs, settings, store, monkeypatch))

    held = monitor.check_once()
    assert held.report.drifted and held.trigger.startswith("drift (held: the last 3 gates kept the champion")
    assert not jobs.jobs and "round 2" in held.trigger
    monitor.check_once()  # still held: audited once, when the hold began
    [event] = store.list_audit(limit=10, event_name="retrain_held")
    assert event.details["kind"] == "breaker" and event.details["trigger"] == "drift"

    store.audit("operator", "breaker_reset", {})
    assert monitor.hold() is None
    monitor._checked = None  # the same window, checked afresh
    assert monitor.check_once().trigger == "drift" and triggers(jobs) == ["drift"]


def test_predictions_of_other_versions_are_not_in_the_window(served):
    settings, store, model, data, version = served
    log_predictions(store, model, 255 - data.split("test")[0][:60], "999")
    store.flush()
    outcome = DriftMonitor(settings, store=store).check_once()
    assert outcome.report is None and outcome.status.startswith("waiting")


def test_old_reports_are_pruned_newest_kept(tmp_path):
    from monitoring.monitor import prune_reports

    for stamp in ("20260101T1", "20260101T2", "20260101T3"):
        (tmp_path / f"{stamp}.html").write_text("report")
        (tmp_path / f"{stamp}.json").write_text("{}")
    prune_reports(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20260101T3.html", "20260101T3.json"]


def test_an_idle_window_is_not_checked_again_and_keeps_its_verdict(served):
    settings, store, model, data, version = served
    monitor = DriftMonitor(settings, store=store)
    held_out = np.concatenate([data.split("test")[0], data.split("val")[0]])
    log_predictions(store, model, 255 - held_out[:80], version)
    store.flush()
    first = monitor.check_once()
    assert first.status == "checked" and first.report.drifted and first.report.decided_by == "calibrated"

    idle = monitor.check_once()  # no prediction since: nothing recomputed, nothing new audited
    assert idle.status == "no new predictions since the last check" and idle.report is first.report
    assert store.count_audit("drift_check") == 1

    # A check needs a quarter of a window new (20 of 80): one more prediction leaves the verdict standing.
    log_predictions(store, model, held_out[80:81], version)
    store.flush()
    few = monitor.check_once()
    assert few.status == "1 new predictions since the last check, which needs 20" and few.report is first.report
    log_predictions(store, model, held_out[81:100], version)
    store.flush()
    assert monitor.check_once().status == "checked" and store.count_audit("drift_check") == 2


def reports_on_disk(settings) -> set[str]:
    """The saved reports (the module's tests share one data dir: compare before with after)."""
    folder = Path(settings.reports_root)
    return {p.name for p in folder.glob("*.html")} if folder.is_dir() else set()


def test_a_lasting_drift_gets_one_report_per_interval_and_its_checks_link_it(served, monkeypatch):
    settings, store, model, data, version = served
    inverted = 255 - np.concatenate([data.split("test")[0], data.split("val")[0]])
    monitor = DriftMonitor(settings, store=store)
    before = reports_on_disk(settings)
    log_predictions(store, model, inverted[:80], version)
    store.flush()
    first = monitor.check_once()
    assert first.report.drifted and first.report.html_path and len(reports_on_disk(settings) - before) == 1

    log_predictions(store, model, inverted[80:100], version)  # still drifted: the episode's report stands
    store.flush()
    second = monitor.check_once()
    assert second.status == "checked" and second.report.drifted and second.report is not first.report
    assert second.report.html_path == first.report.html_path and len(reports_on_disk(settings) - before) == 1

    monkeypatch.setattr(settings.monitor, "report_interval_s", 0.0)  # the interval has passed
    log_predictions(store, model, inverted[100:120], version)
    store.flush()
    third = monitor.check_once()
    assert third.report.html_path != first.report.html_path and len(reports_on_disk(settings) - before) == 2


def test_a_report_on_request_covers_a_calm_window_once(served):
    settings, store, model, data, version = served
    monitor = DriftMonitor(settings, store=store)
    log_predictions(store, model, np.concatenate([data.split("test")[0], data.split("val")[0]])[:80], version)
    store.flush()
    before = reports_on_disk(settings)
    calm = monitor.check_once()
    assert not calm.report.drifted and calm.report.html_path is None and reports_on_disk(settings) == before

    asked = monitor.report_now()
    assert asked.status == "checked" and not asked.report.drifted and asked.trigger is None
    assert reports_on_disk(settings) - before == {asked.report.html_path.rsplit("/", 1)[1]}
    assert "<html" in open(asked.report.html_path).read(2000).lower()
    assert store.count_audit("drift_check") == 2  # the API's /v1/drift shows it as the latest check

    again = monitor.report_now()  # nothing new: the same report, nothing computed or audited
    assert again.report is asked.report and again.status == "no new predictions since the last check"
    assert store.count_audit("drift_check") == 2 and len(reports_on_disk(settings) - before) == 1


def test_a_failing_check_is_audited_once_per_error_and_the_next_check_still_runs(served, monkeypatch):
    settings, store, model, data, version = served
    monitor = DriftMonitor(settings, store=store)
    real_check = monitor.check_once
    errors = iter([RuntimeError("store unreachable")] * 3 + [ValueError("bad window")])

    def failing():
        raise next(errors)

    monkeypatch.setattr(monitor, "check_once", failing)
    answers = [monitor.check_or_record() for _ in range(4)]

    assert answers == ["RuntimeError: store unreachable"] * 3 + ["ValueError: bad window"]
    failed = [e.details["error"] for e in store.list_audit(event_name="drift_check_failed")]
    assert failed == ["ValueError: bad window", "RuntimeError: store unreachable"]  # newest first, no repeats
    monkeypatch.setattr(monitor, "check_once", real_check)
    assert monitor.check_or_record().status.startswith("waiting for")  # the loop goes on: no predictions yet
    monkeypatch.setattr(monitor, "check_once", lambda: (_ for _ in ()).throw(RuntimeError("store unreachable")))
    monitor.check_or_record()  # failing again after a good check: a new run of failures, audited again
    assert len(store.list_audit(event_name="drift_check_failed")) == 3


def test_retention_runs_with_the_checks_once_per_interval(served, monkeypatch):
    settings, store, model, data, version = served
    settings.store.retention_days, settings.store.prune_interval_s = 30, 3600
    monitor = DriftMonitor(settings, store=store)
    calls = []
    monkeypatch.setattr(store, "prune", lambda older_than: calls.append(older_than) or (0, 0))

    for _ in range(3):
        monitor.check_or_record()

    assert len(calls) == 1  # the first check prunes, the next ones are within the hour
    age = datetime.now(timezone.utc) - calls[0]
    assert timedelta(days=30) <= age < timedelta(days=30, minutes=1)
    settings.store.retention_days = 0  # keep everything
    monitor._pruned_at = None
    monitor.check_or_record()
    assert len(calls) == 1
