"""Accuracy before labels (monitoring/estimate.py) on constructed data: where it holds and where it cannot."""

import numpy as np
import pytest
from scipy import stats

from cluster.settings import MonitorSettings
from monitoring.estimate import MIN_ROWS, AccuracyEstimator, _pool_adjacent_violators, from_reference
from monitoring.guardrails import decide_trigger
from monitoring.monitor import DriftMonitor
from tests import test_monitor
from tests.support.jobs import FakeJobs
from tests.test_monitor import log_predictions, requests_to, triggers


def calibrated(n: int, rng: np.random.Generator, a: float = 6.0, b: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Predictions of a calibrated model: right with exactly the chance it states (confidence ~ Beta(a, b))."""
    confidence = np.clip(rng.beta(a, b, n), 0.1, 1.0)
    return confidence, rng.random(n) < confidence


def test_isotonic_blocks_pool_what_falls_and_keep_what_rises():
    assert _pool_adjacent_violators(np.array([0.0, 1.0, 2.0]), np.ones(3)) == [(0, 0, 0.0), (1, 1, 1.0), (2, 2, 2.0)]
    blocks = _pool_adjacent_violators(np.array([1.0, 3.0, 2.0, 0.0]), np.ones(4))
    assert [b[:2] for b in blocks] == [(0, 0), (1, 3)] and blocks[1][2] == pytest.approx(5 / 3)
    assert _pool_adjacent_violators(np.array([0.0, 2.0, 1.0]), np.array([1.0, 1.0, 3.0])) == \
        [(0, 0, 0.0), (1, 2, 1.25)]


def test_the_chance_never_falls_as_confidence_rises_and_stays_a_probability():
    estimator = AccuracyEstimator.fit(*calibrated(3_000, np.random.default_rng(0)))
    grid = np.linspace(0, 1, 501)
    chances = estimator.chance(grid)
    assert np.all(np.diff(chances) >= 0) and chances.min() >= 0 and chances.max() <= 1
    assert estimator.chance([0.95])[0] > estimator.chance([0.6])[0] + 0.2  # it learned the slope
    assert len(estimator.confidences) < 400  # blocks, not every held-out value


def test_windows_of_a_shift_that_lowers_confidence_are_estimated_within_their_interval_about_90_percent():
    rng = np.random.default_rng(1)
    estimator = AccuracyEstimator.fit(*calibrated(5_000, rng))
    covered, errors = 0, []
    for _ in range(200):  # a shift: the model is less sure (Beta(3, 2)), and as right as it says
        confidence, right = calibrated(200, rng, a=3.0, b=2.0)
        estimate = estimator.estimate(confidence)
        covered += estimate.low <= right.mean() <= estimate.high
        errors.append(estimate.accuracy - right.mean())
    assert abs(np.mean(errors)) < 0.01  # unbiased on the shift
    assert stats.binom.ppf(0.001, 200, 0.85) <= covered <= stats.binom.ppf(0.999, 200, 0.93)


def test_a_shift_that_leaves_the_model_confidently_wrong_is_what_it_cannot_see():
    rng = np.random.default_rng(2)
    estimator = AccuracyEstimator.fit(*calibrated(5_000, rng))
    confident = np.clip(rng.beta(6.0, 1.5, 300), 0.1, 1.0)
    wrong = rng.random(300) < 0.2  # the accuracy fell to 0.2 while the confidence did not move
    assert estimator.estimate(confident).accuracy - wrong.mean() > 0.5


def test_round_trip_and_bad_input_is_refused_by_name():
    estimator = AccuracyEstimator.fit(*calibrated(500, np.random.default_rng(3)))
    again = AccuracyEstimator.from_dict(estimator.to_dict())
    assert again.estimate([0.7, 0.9]).as_dict() == estimator.estimate([0.7, 0.9]).as_dict()
    assert again.rows == 500 and 0 < again.accuracy < 1
    with pytest.raises(ValueError, match=f"need at least {MIN_ROWS}"):
        AccuracyEstimator.fit([0.9] * 10, [1] * 10)
    with pytest.raises(ValueError, match="probability in"):
        AccuracyEstimator.fit([1.5] * 60, [1] * 60)
    with pytest.raises(ValueError, match="0/1 or a bool"):
        AccuracyEstimator.fit([0.5] * 60, [2] * 60)
    with pytest.raises(ValueError, match="one each"):
        AccuracyEstimator.fit([0.5] * 60, [1] * 59)
    with pytest.raises(ValueError, match="no predictions"):
        estimator.estimate([])
    with pytest.raises(ValueError, match="format_version"):
        AccuracyEstimator.from_dict({"format_version": 9})


# -- wired into the monitor: fitted on the champion's reference, in every check, a trigger when set --

champion, served = test_monitor.champion, test_monitor.served  # a registered champion; windows of 80


def test_a_low_estimate_triggers_like_drift_with_enough_labels_and_only_when_set():
    rule = MonitorSettings(min_feedback=10, feedback_threshold=50, cooldown_s=0, min_estimated_accuracy=0.8)
    assert decide_trigger(False, 10, None, rule, estimated_accuracy=0.7) == "estimate"
    assert decide_trigger(False, 9, None, rule, estimated_accuracy=0.7) is None  # labels to learn from first
    assert decide_trigger(False, 10, None, rule, estimated_accuracy=0.85) is None
    assert decide_trigger(True, 10, None, rule, estimated_accuracy=0.7) == "drift"  # drift names it first
    off = MonitorSettings(min_feedback=10, feedback_threshold=50, cooldown_s=0)
    assert decide_trigger(False, 10, None, off, estimated_accuracy=0.01) is None  # 0: off


def test_the_reference_keeps_each_right_answer_and_every_check_estimates_accuracy(served, monkeypatch):
    settings, store, model, data, version = served
    from control import models
    from train.pipeline import reference_batches
    from tune.gate import right_answers

    reference = models.reference(models.champion(settings)["run_id"])
    right = right_answers(model, reference_batches(settings, data))
    np.testing.assert_array_equal(reference["correct"].to_numpy(), right.astype(float))

    clean = np.concatenate([data.split("test")[0], data.split("val")[0]])[:80]
    jobs = FakeJobs()
    monitor = DriftMonitor(settings, store=store, request=requests_to(jobs, settings, store, monkeypatch))
    ids = log_predictions(store, model, clean, version)
    store.flush()
    report = monitor.check_once().report
    estimated = report.estimated_accuracy
    assert estimated["predictions"] == 80 and estimated["low"] <= estimated["accuracy"] <= estimated["high"]
    expected = from_reference(reference).estimate(report_confidences(store, version)).accuracy
    assert estimated["accuracy"] == pytest.approx(expected) and report.estimate_error is None

    for prediction_id in ids[:settings.monitor.min_feedback]:
        store.add_feedback(prediction_id, "3")
    monkeypatch.setattr(settings.monitor, "min_estimated_accuracy", estimated["accuracy"] + 0.01)
    log_predictions(store, model, clean[:20], version)  # a quarter of the window new: the next check runs
    store.flush()
    assert monitor.check_once().trigger == "estimate" and triggers(jobs) == ["estimate"]


def report_confidences(store, version) -> np.ndarray:
    latest = [p for p in store.list_predictions(limit=80) if p.model_version == version]
    return np.array([p.features["confidence"] for p in latest])


def test_a_reference_without_right_answers_says_why_there_is_no_estimate():
    import pandas as pd

    why = from_reference(pd.DataFrame({"confidence": [0.9] * 100}))
    assert isinstance(why, str) and "no right answers" in why
    assert "need at least 50" in from_reference(pd.DataFrame({"confidence": [0.9] * 10, "correct": [1.0] * 10}))
