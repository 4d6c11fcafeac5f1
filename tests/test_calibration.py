"""Calibrated drift checks: clean traffic alarms at the configured rate, real shifts alarm, calibrations travel as JSON.

Synthetic drift features with fixed seeds: 8 embedding components of decreasing spread (as principal components
have), confidence from a Beta distribution rounded as the serving code rounds it, 10 classes of unequal shares.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from monitoring import calibration as calibration_module
from monitoring.calibration import (
    CLASS_TV,
    CONFIDENCE_KS,
    EMBEDDING_MMD2,
    Calibration,
    DriftDecision,
)

DIMS = 8
SPREAD = np.linspace(3.0, 0.5, DIMS)
CLASSES = [str(i) for i in range(10)]
SHARES = np.linspace(1.0, 2.0, 10) / 15.0
WINDOW = 200
CLEAN_WINDOWS = 300


def features(n: int, rng: np.random.Generator, *, emb_shift: dict[int, float] | None = None,
             class_skew: float = 0.0, confidence_drop: float = 0.0) -> pd.DataFrame:
    """n rows of drift features; emb_shift moves components by that many sd, class_skew moves that share of
    predictions to class "0", confidence_drop lowers every confidence."""
    embedding = rng.normal(size=(n, DIMS)) * SPREAD
    for component, sd in (emb_shift or {}).items():
        embedding[:, component] += sd * SPREAD[component]
    frame = pd.DataFrame(embedding, columns=[f"emb_{i}" for i in range(DIMS)])
    frame["confidence"] = np.round(np.clip(rng.beta(8.0, 1.5, n) - confidence_drop, 0.1, 1.0), 5)
    shares = (1 - class_skew) * SHARES + class_skew * np.eye(10)[0]
    frame["predicted_class"] = rng.choice(CLASSES, n, p=shares / shares.sum())
    frame["brightness"], frame["contrast"] = rng.uniform(size=n), rng.uniform(size=n)
    return frame


def alarm_share(decisions: list[DriftDecision], test: str | None = None) -> float:
    return float(np.mean([d.drift if test is None else test in d.fired for d in decisions]))


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return features(5_000, np.random.default_rng(0))


@pytest.fixture(scope="module")
def strict(reference) -> Calibration:
    """Calibrated to 1 false alarm in 100 checks, as the monitor would run it."""
    return Calibration.fit(reference, WINDOW, 0.01, seed=1, null_samples=1_000)


@pytest.fixture(scope="module")
def lenient(reference) -> Calibration:
    """Calibrated to 5 in 100, so that 300 clean windows say something about the rate."""
    return Calibration.fit(reference, WINDOW, 0.05, seed=2, null_samples=1_000)


@pytest.fixture(scope="module")
def clean_decisions(lenient) -> list[DriftDecision]:
    """Fresh windows from the reference's own distribution: every alarm among them is false."""
    rng = np.random.default_rng(3)
    return [lenient.check(features(WINDOW, rng)) for _ in range(CLEAN_WINDOWS)]


def test_clean_windows_alarm_at_most_at_the_configured_rate(clean_decisions):
    rate = 0.05
    # The most alarms a detector calibrated to `rate` shows in 300 windows, but for a 1-in-1000 unlucky draw.
    bound = stats.binom.ppf(0.999, CLEAN_WINDOWS, rate) / CLEAN_WINDOWS
    assert alarm_share(clean_decisions) <= bound


def test_a_reference_barely_larger_than_two_windows_still_alarms_at_most_at_the_rate(reference):
    # 1,000 rows: a pool of 500 for windows of 200. Drawn without replacement, its null windows would share
    # most rows and vary 40% less than live ones: 0.17 of these windows alarmed at 0.05 that way (0.03 now).
    small = Calibration.fit(reference.iloc[:1_000], WINDOW, 0.05, seed=4, null_samples=1_000)
    rng = np.random.default_rng(14)
    share = alarm_share([small.check(features(WINDOW, rng)) for _ in range(CLEAN_WINDOWS)])
    assert share <= 0.05 + 2.5 * np.sqrt(0.05 * 0.95 / CLEAN_WINDOWS)


def test_on_clean_windows_each_tests_p_values_spread_over_zero_to_one(clean_decisions):
    # A detector that never fires passes the bound above; calibrated p-values are near uniform, so about half
    # the clean windows have p <= 0.5 and about a tenth p <= 0.1 (ties in class shares make them a bit larger).
    for test in (EMBEDDING_MMD2, CLASS_TV, CONFIDENCE_KS):
        p = np.array([next(s.p_value for s in d.statistics if s.name == test) for d in clean_decisions])
        assert 0.3 <= np.mean(p <= 0.5) <= 0.7, test
        assert 0.02 <= np.mean(p <= 0.1) <= 0.2, test


def test_half_a_sd_mean_shift_in_three_embedding_components_alarms_in_nearly_every_window(strict):
    rng = np.random.default_rng(4)
    shifted = [strict.check(features(WINDOW, rng, emb_shift={1: 0.5, 4: 0.5, 6: 0.5})) for _ in range(100)]
    assert alarm_share(shifted) >= 0.95
    assert alarm_share(shifted, EMBEDDING_MMD2) >= 0.95


@pytest.mark.parametrize("shift, fires", [
    ({"class_skew": 0.2, "confidence_drop": 0.05}, CONFIDENCE_KS),
    ({"class_skew": 0.3}, CLASS_TV),
    ({"confidence_drop": 0.1}, CONFIDENCE_KS),
], ids=["skewed classes and lower confidence", "skewed classes", "lower confidence"])
def test_a_shift_in_the_models_outputs_alone_alarms(strict, shift, fires):
    rng = np.random.default_rng(5)
    shifted = [strict.check(features(WINDOW, rng, **shift)) for _ in range(100)]
    assert alarm_share(shifted) >= 0.95
    assert alarm_share(shifted, fires) >= 0.95
    assert alarm_share(shifted, EMBEDDING_MMD2) <= 0.05  # the embedding did not move


def test_a_window_drifts_exactly_when_a_statistic_exceeds_its_threshold(strict):
    rng = np.random.default_rng(6)
    windows = [features(WINDOW, rng, emb_shift={0: sd}, confidence_drop=sd / 10) for sd in np.linspace(0, 0.4, 40)]
    decisions = [strict.check(window) for window in windows]
    assert 0 < alarm_share(decisions) < 1  # both outcomes occur, so the equivalence below is tested both ways
    for decision in decisions:
        assert decision.drift == any(s.value > s.threshold for s in decision.statistics)
        assert decision.drift == bool(decision.fired)
        if decision.drift:  # Holm's first step is Bonferroni's: the smallest p-value is within rate / 3
            assert min(s.p_value for s in decision.statistics) <= 0.01 / 3
        assert decision.as_dict()["statistics"].keys() == {EMBEDDING_MMD2, CLASS_TV, CONFIDENCE_KS}


def test_a_calibration_read_back_from_json_decides_every_window_the_same(strict):
    restored = Calibration.from_dict(json.loads(json.dumps(strict.to_dict())))
    rng = np.random.default_rng(7)
    windows = [features(WINDOW, rng, emb_shift={2: sd}, class_skew=sd / 2) for sd in np.linspace(0, 0.5, 20)]
    assert [restored.check(w).as_dict() for w in windows] == [strict.check(w).as_dict() for w in windows]
    assert restored.thresholds() == strict.thresholds()
    assert json.loads(json.dumps(strict.check(windows[-1]).as_dict()))["drift"] is True


def test_a_calibration_of_another_format_version_is_refused(strict):
    data = {**strict.to_dict(), "format_version": 99}
    with pytest.raises(ValueError, match="format_version 99"):
        Calibration.from_dict(data)
    data = strict.to_dict()
    del data["bandwidth"]
    with pytest.raises(ValueError, match="bandwidth"):
        Calibration.from_dict(data)


def test_fit_and_check_work_is_capped_whatever_the_reference_size(monkeypatch):
    kernel_entries = []
    distances = calibration_module._sq_distances
    monkeypatch.setattr(calibration_module, "_sq_distances",
                        lambda x, y: kernel_entries.append(len(x) * len(y)) or distances(x, y))
    big = features(20_000, np.random.default_rng(8))
    calibration = Calibration.fit(big, WINDOW, 0.01, seed=9, null_samples=300, max_reference_rows=5_000,
                                  comparison_rows=1_000)
    assert calibration.reference_rows == 5_000
    assert len(calibration.comparison_embedding) == 1_000
    # Pool x comparison once, the comparison with itself twice (bandwidth, kernel mean), a window^2 per draw:
    # a few times 10^7 kernel entries, against 4 x 10^8 for the whole reference with itself.
    assert sum(kernel_entries) <= 4_000 * 1_000 + 2 * 1_000**2 + 300 * WINDOW**2
    kernel_entries.clear()
    calibration.check(big.iloc[:WINDOW])
    assert sum(kernel_entries) <= WINDOW * (WINDOW + 1_000)


@pytest.mark.parametrize("column", ["emb_3", "confidence", "predicted_class"])
def test_a_window_missing_a_feature_column_is_refused_by_name(strict, column):
    window = features(WINDOW, np.random.default_rng(10)).drop(columns=[column])
    with pytest.raises(ValueError, match=rf"window: missing drift feature columns \['{column}'\]"):
        strict.check(window)


@pytest.mark.parametrize("column, value", [("confidence", np.nan), ("emb_5", "high"), ("emb_0", np.inf),
                                           ("predicted_class", None)])
def test_a_window_with_unusable_values_is_refused_naming_the_column(strict, column, value):
    window = features(WINDOW, np.random.default_rng(11)).astype({column: object})
    window.loc[7, column] = value
    with pytest.raises(ValueError, match=rf"window: non-numeric, missing or infinite values in columns \['{column}'\]"):
        strict.check(window)


@pytest.mark.parametrize("rows", [WINDOW - 1, WINDOW + 1, 50])
def test_a_window_of_another_size_than_calibrated_is_refused(strict, rows):
    with pytest.raises(ValueError, match=rf"window: {rows} rows, .* exactly {WINDOW}"):
        strict.check(features(rows, np.random.default_rng(12)))


def test_fit_refuses_what_it_cannot_calibrate(reference):
    with pytest.raises(ValueError, match=r"reference: missing drift feature columns \['predicted_class'\]"):
        Calibration.fit(reference.drop(columns=["predicted_class"]), WINDOW, 0.01, seed=0)
    with pytest.raises(ValueError, match=r"emb_0\.\.emb_N"):
        Calibration.fit(reference[["confidence", "predicted_class"]], WINDOW, 0.01, seed=0)
    with pytest.raises(ValueError, match="reference: 300 rows, need at least 400"):
        Calibration.fit(reference.iloc[:300], WINDOW, 0.01, seed=0)
    with pytest.raises(ValueError, match="null_samples: 200 .* need at least 299"):  # p >= 1/201 > 0.01 / 3
        Calibration.fit(reference, WINDOW, 0.01, seed=0, null_samples=200)
    for bad in [{"false_alarm_rate": 0.0}, {"false_alarm_rate": 1.5}, {"window_size": 5}, {"window_size": 10**6}]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            Calibration.fit(reference, **{"window_size": WINDOW, "false_alarm_rate": 0.01, **bad}, seed=0)


def test_a_window_of_another_models_features_is_refused(strict):
    window = features(WINDOW, np.random.default_rng(13)).assign(emb_8=0.0)  # a model with more drift_dims
    with pytest.raises(ValueError, match=r"window: embedding columns \['emb_8'\]"):
        strict.check(window)


def test_null_draws_in_batches_give_exactly_what_draws_one_at_a_time_give(monkeypatch):
    reference = features(1_500, np.random.default_rng(21))
    reference.loc[:100, "confidence"] = 1.0  # ties: the Kolmogorov-Smirnov steps must still match
    batched = Calibration.fit(reference, WINDOW, 0.01, seed=3, null_samples=2_000)
    monkeypatch.setattr(calibration_module, "DENSE_POOL_ROWS", 0)  # every pool is then "large": one draw at a time
    one_by_one = Calibration.fit(reference, WINDOW, 0.01, seed=3, null_samples=2_000)
    for name in calibration_module.STATISTICS:
        np.testing.assert_allclose(batched.null[name], one_by_one.null[name], rtol=0, atol=1e-12)
    assert batched.thresholds() == pytest.approx(one_by_one.thresholds(), rel=1e-9)
